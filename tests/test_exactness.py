"""Where the method is exact, the compiled model must equal the plain computation."""
import pytest
import torch

import tiny_models
from helpers import compile_chipmunk, denoise_loop, newest_runtimes, rel_err, runtime_ids

MODELS = list(tiny_models.FACTORIES)


@pytest.mark.parametrize("name", MODELS)
def test_dense_mode_equals_eager_every_step(name):
    model, make_inputs = tiny_models.FACTORIES[name]()
    eager = denoise_loop(model, make_inputs, steps=10)
    compiled = denoise_loop(compile_chipmunk(model, mode="dense", num_steps=10), make_inputs, steps=10)
    for step, (a, b) in enumerate(zip(compiled, eager)):
        assert rel_err(a, b) < 1e-5, (name, step, rel_err(a, b))


def test_dense_mode_equals_plain_inductor():
    model, make_inputs = tiny_models.flux()
    plain = denoise_loop(torch.compile(model), make_inputs, steps=10)
    torch._dynamo.reset()
    ours = denoise_loop(compile_chipmunk(model, mode="dense", inner_backend="inductor"), make_inputs, steps=10)
    for step, (a, b) in enumerate(zip(ours, plain)):
        assert rel_err(a, b) < 1e-5, (step, rel_err(a, b))


@pytest.mark.parametrize("name", MODELS)
def test_all_columns_and_units_selected_equals_dense(name):
    """attn/mlp sparsity 0 and no random extras: every sparse step selects everything, so it is exact."""
    model, make_inputs = tiny_models.FACTORIES[name]()
    before = runtime_ids()
    eager = denoise_loop(model, make_inputs, steps=12, size=16 if name in ("flux", "plain_dit") else 8)
    compiled = compile_chipmunk(model, attn_sparsity=0.0, mlp_sparsity=0.0, attn_random_fraction=0.0,
                                mlp_random_fraction=0.0)
    outs = denoise_loop(compiled, make_inputs, steps=12, size=16 if name in ("flux", "plain_dit") else 8)
    for step, (a, b) in enumerate(zip(outs, eager)):
        assert rel_err(a, b) < 2e-5, (name, step, rel_err(a, b))
    counters = newest_runtimes(before)[0].site_counters
    assert counters.get("mlp:sparse", 0) > 0, counters
    assert counters.get("attention:sparse", 0) > 0, counters  # HunyuanVideo: masked (key-padding) attention


def test_dense_steps_exact_and_sparse_steps_differ():
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=2)
    eager = denoise_loop(model, make_inputs, steps=12, size=16)
    outs = denoise_loop(compile_chipmunk(model, attn_sparsity=0.8, mlp_sparsity=0.7), make_inputs, steps=12,
                        size=16, driver=model)
    errors = [rel_err(a, b) for a, b in zip(outs, eager)]
    # Step 0 and step 10 are dense for attention and MLP: exact. Other steps are sparse: approximate.
    assert errors[0] < 1e-5 and errors[10] < 1e-5, errors
    assert all(e > 1e-5 for i, e in enumerate(errors) if i not in (0, 10)), errors


def test_slowly_changing_latents_stay_close_to_dense():
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=2)
    eager = denoise_loop(model, make_inputs, steps=20, size=16, step_size=0.01)
    outs = denoise_loop(compile_chipmunk(model, num_steps=20), make_inputs, steps=20, size=16, step_size=0.01)
    for step, (a, b) in enumerate(zip(outs, eager)):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 0.05, (step, rel_err(a, b))


def test_gqa_attention_all_selected_equals_dense():
    """Grouped-query SDPA (fewer K/V heads) through the sparse path: all columns selected is exact."""
    from test_detection import GatedNet
    torch.manual_seed(0)
    model = GatedNet("swiglu").eval()
    compiled = compile_chipmunk(model, attn_sparsity=0.0, mlp_sparsity=0.0, attn_random_fraction=0.0,
                                mlp_random_fraction=0.0)
    before = runtime_ids()
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(1, 70, 32, generator=torch.Generator().manual_seed(step))
            assert rel_err(compiled(x), model(x)) < 2e-5, step
    assert newest_runtimes(before)[0].site_counters.get("attention:sparse", 0) > 0


def test_model_dtype_output_cache_all_selected_and_half_the_bytes():
    """mlp_output_cache_dtype='model' on a bf16 model: the MLP output caches are bf16 (the cache memory drops by
    half their float32 size), all units selected stays within bf16 rounding of the eager model, and with
    sparsity on the outputs track the float32-cache run."""
    from test_detection import GatedNet
    torch.manual_seed(0)
    model = GatedNet("gelu").eval().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x0, drift = torch.randn(1, 64, 32, generator=gen), torch.randn(1, 64, 32, generator=gen)
    xs = [(x0 + 0.05 * s * drift).to(torch.bfloat16) for s in range(6)]  # slowly changing, as over denoising steps
    results = {}
    for dtype in ("float32", "model"):
        for sparsity in (0.0, 0.6):
            torch._dynamo.reset()
            before = runtime_ids()
            compiled = compile_chipmunk(model, mlp_output_cache_dtype=dtype, attn_sparsity=sparsity,
                                        mlp_sparsity=sparsity, attn_random_fraction=0.0, mlp_random_fraction=0.0)
            with torch.no_grad():
                outs = [compiled(x) for x in xs]
            rt = newest_runtimes(before)[0]
            assert rt.site_counters.get("mlp:sparse_refresh", 0) > 0, rt.site_counters
            results[dtype, sparsity] = outs, rt.state_bytes
    with torch.no_grad():
        eager = [model(x) for x in xs]
    for step, (a, b) in enumerate(zip(results["model", 0.0][0], eager)):
        assert rel_err(a, b) < 2e-2, (step, rel_err(a, b))
    for step, (a, b) in enumerate(zip(results["model", 0.6][0], results["float32", 0.6][0])):
        assert rel_err(a, b) < 2e-2, (step, rel_err(a, b))  # measured <= 0.74 %
    y_bytes_f32 = 2 * 64 * 32 * 4  # two MLP sites, [1, 64, 32] outputs
    assert results["float32", 0.0][1] - results["model", 0.0][1] == y_bytes_f32 // 2


class _InPlaceDiT(tiny_models.PlainDiT):
    """Unused in-place updates around the sites: a scaled embedding, a slice filled in place (as diffusers'
    CogVideoX patch embedding writes its positional table), an activation with inplace=True and an adaLN-style
    modulation chained in place."""

    def forward(self, x, t):
        c = self.t_embed(t[:, None])
        h = self.embed(x)
        h.mul_(2.0)
        pos = torch.zeros_like(h)
        pos[:, 3:].copy_(h[:, :-3])
        h = h + pos
        torch.nn.functional.silu(h, inplace=True)  # result unused: the update of h is what counts
        for block in self.blocks:
            h = block(h, c)
        y = self.out(h)
        y.mul_(1.5).add_(0.1)
        return y


def test_unused_in_place_updates_survive_the_rewrite():
    """The rewrite's dead-code elimination must keep in-place methods whose results nobody reads."""
    torch.manual_seed(0)
    model = _InPlaceDiT().eval()
    _, make_inputs = tiny_models.plain_dit()
    eager = denoise_loop(model, make_inputs, steps=3)
    before = runtime_ids()
    compiled = denoise_loop(compile_chipmunk(model, mode="dense", inner_backend="eager"), make_inputs, steps=3)
    assert newest_runtimes(before), "no site was rewritten: the test would not exercise the rewrite"
    for step, (a, b) in enumerate(zip(compiled, eager)):
        assert rel_err(a, b) < 1e-6, (step, rel_err(a, b))


def test_cogvideox_off_its_sample_size_dense_mode_equals_eager():
    """10 x 10 latents on a model built for 8 x 8: the patch embedding rebuilds its positional table in place."""
    model, make_inputs = tiny_models.cogvideox()
    eager = denoise_loop(model, make_inputs, steps=2, size=10)
    compiled = denoise_loop(compile_chipmunk(model, mode="dense"), make_inputs, steps=2, size=10)
    for step, (a, b) in enumerate(zip(compiled, eager)):
        assert rel_err(a, b) < 1e-5, (step, rel_err(a, b))


class _InPlaceActBlock(tiny_models.PlainBlock):
    def forward(self, x, c):
        h = self.norm2(x)
        return x + self.w_down(torch.nn.functional.silu(self.w_gate(h), inplace=True) * self.w_up(h))


def test_in_place_activation_inside_a_site_is_replaced_with_it(tmp_path):
    """The site's own in-place activation goes with the rewrite (its dense gate projection is not kept alive)."""
    torch.manual_seed(0)
    model = tiny_models.PlainDiT(depth=2).eval()
    model.blocks = torch.nn.ModuleList(_InPlaceActBlock(32, 2, 64) for _ in range(2)).eval()
    _, make_inputs = tiny_models.plain_dit()
    eager = denoise_loop(model, make_inputs, steps=3)
    compiled = denoise_loop(compile_chipmunk(model, mode="dense", inner_backend="eager", dump_dir=str(tmp_path)),
                            make_inputs, steps=3)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(compiled, eager))
    after = next(p for p in tmp_path.iterdir() if p.name.endswith("_after.py")).read_text()
    dense_gate = [line for line in after.splitlines() if "linear(" in line and "w_gate" in line]
    assert not dense_gate, dense_gate  # the dense gate projection would still run every step


@pytest.mark.parametrize("act", ["geglu", "swiglu"])
def test_gated_mlp_all_units_selected_equals_eager(act):
    """Gated feed-forwards (GEGLU, SwiGLU): the dense fill computes act(gate) * up in place in the activation
    cache, the sparse steps gather both projections; with every unit and column selected both are exact."""
    from test_detection import GatedNet
    torch.manual_seed(0)
    model = GatedNet(act).eval()
    xs = [torch.randn(1, 40, 32) * 0.1 + torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(s)) * 0.01
          for s in range(6)]
    before = runtime_ids()
    compiled = compile_chipmunk(model, num_steps=6, attn_sparsity=0.0, mlp_sparsity=0.0, attn_random_fraction=0.0,
                                mlp_random_fraction=0.0)
    with torch.no_grad():
        for step, x in enumerate(xs):
            assert rel_err(compiled(x), model(x)) < 2e-5, (act, step)
    counters = newest_runtimes(before)[0].site_counters
    assert counters.get("mlp:dense_fill", 0) > 0 and counters.get("mlp:sparse", 0) + counters.get(
        "mlp:sparse_refresh", 0) > 0, counters

"""Options are validated with clear errors; graphs the passes cannot handle fall back with one warning."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import chipmunk_compile
import tiny_models
from chipmunk_compile.options import OPTION_DOCS, ChipmunkOptions
from helpers import FAST, compile_chipmunk, denoise_loop, first_output, rel_err


def test_every_option_is_documented():
    import dataclasses
    assert {f.name for f in dataclasses.fields(ChipmunkOptions)} == set(OPTION_DOCS)


@pytest.mark.parametrize("bad, message", [
    ({"attn_sparsty": 0.9}, "did you mean 'attn_sparsity'"),
    ({"attn_sparsity": 1.5}, r"attn_sparsity.*\[0, 1\]"),
    ({"mlp_sparsity": "high"}, "mlp_sparsity"),
    ({"mode": "fast"}, "'chipmunk' \\| 'dense'"),
    ({"attn_warmup_steps": 1}, "step 1 the first selection"),
    ({"attn_dense_steps": [3, 5]}, "contains step 0"),
    ({"num_steps": 0}, "num_steps"),
    ({"invocations_per_step": True}, "invocations_per_step"),
    ({"kernels": "cuda"}, "'auto' \\| 'torch' \\| 'triton'"),
])
def test_bad_options_raise_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ChipmunkOptions.from_dict(bad)


def test_bad_options_raise_through_torch_compile():
    model, make_inputs = tiny_models.plain_dit()
    compiled = torch.compile(model, backend="chipmunk", options={"attn_sparsity": -1})
    with pytest.raises(Exception, match="attn_sparsity"):
        compiled(**make_inputs())


def test_explicit_schedules():
    opts = ChipmunkOptions.from_dict({"attn_dense_steps": [0, 1, 7], "mlp_dense_steps": [0, 4]})
    assert [s for s in range(10) if opts.attention_dense_at(s)] == [0, 1, 7]
    assert [s for s in range(10) if opts.mlp_dense_at(s)] == [0, 4]
    default = ChipmunkOptions()
    assert [s for s in range(50) if default.attention_dense_at(s)] == [0, 1, 10, 20, 30, 40]
    assert [s for s in range(50) if default.mlp_dense_at(s)] == [0, 10, 20, 30, 40]


def test_analysis_failure_falls_back_with_one_warning(monkeypatch):
    from chipmunk_compile import backend

    def broken(graph):
        raise RuntimeError("synthetic analysis failure")

    monkeypatch.setattr(backend, "find_mlp_sites", broken)
    model, make_inputs = tiny_models.flux()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = denoise_loop(compile_chipmunk(model), make_inputs, steps=3, size=16, driver=model)
    ours = [w for w in caught if issubclass(w.category, chipmunk_compile.ChipmunkFallbackWarning)]
    assert len(ours) == 1 and "synthetic analysis failure" in str(ours[0].message)
    eager = denoise_loop(model, make_inputs, steps=3, size=16)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(outs, eager))


def test_unsupported_dtype_stays_dense_with_warning():
    model, make_inputs = tiny_models.plain_dit()
    model = model.double()
    inputs = {k: v.double() for k, v in make_inputs().items()}
    with pytest.warns(chipmunk_compile.ChipmunkFallbackWarning, match="unsupported dtype"), torch.no_grad():
        out = compile_chipmunk(model)(**inputs)
    assert rel_err(out, model(**inputs)) < 1e-10


def test_dump_dir_writes_code_report_and_picture(tmp_path):
    model, make_inputs = tiny_models.flux()
    with torch.no_grad():
        compile_chipmunk(model, dump_dir=str(tmp_path))(**make_inputs(size=16))
    files = sorted(os.listdir(tmp_path))
    stem = files[0].rsplit("_", 1)[0]
    assert f"{stem}_before.py" in files and f"{stem}_after.py" in files and f"{stem}_sites.json" in files
    assert any(f.endswith(("_rewritten.svg", "_rewritten.dot")) for f in files)
    after = (tmp_path / f"{stem}_after.py").read_text()
    assert "chipmunk.attention" in after and "chipmunk.mlp" in after
    assert "chipmunk" not in (tmp_path / f"{stem}_before.py").read_text()
    sites = json.loads((tmp_path / f"{stem}_sites.json").read_text())
    assert {s["kind"] for s in sites} == {"attention", "mlp"}


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIPMUNK_DUMP_DIR", str(tmp_path))
    assert ChipmunkOptions.from_dict({}).dump_dir == str(tmp_path)


def test_explain_report_prints_a_table():
    model, make_inputs = tiny_models.flux()
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 0}, **make_inputs())
    text = str(report)
    assert "transformer_blocks.0.attn" in text and "5 of 5 sites rewritten" in text
    assert json.loads(report.to_json())["graphs"] == 1


def test_logging_under_package_logger(caplog):
    model, make_inputs = tiny_models.plain_dit()
    with caplog.at_level("INFO", logger="chipmunk_compile"), torch.no_grad():
        compile_chipmunk(model)(**make_inputs())
    assert any("sites rewritten" in r.message for r in caplog.records if r.name == "chipmunk_compile")


def test_backend_name_works_without_import():
    """The torch_dynamo_backends entry point registers 'chipmunk' for a process that never imports us."""
    code = ("import torch\n"
            "m = torch.nn.Linear(4, 4)\n"
            "c = torch.compile(m, backend='chipmunk', options={'inner_backend': 'eager'})\n"
            "print(float((c(torch.ones(2, 4)) - m(torch.ones(2, 4))).abs().max()))\n"
            "import sys; print('chipmunk_compile' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.0", "True"]  # loaded lazily by torch through the entry point


def test_readme_documents_every_option():
    import dataclasses
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    missing = [f.name for f in dataclasses.fields(ChipmunkOptions) if f"`{f.name}`" not in readme]
    assert not missing, f"README options table lacks {missing}; regenerate with scripts/options_table.py"


def test_grad_mode_runs_plain_with_a_clear_warning():
    model, make_inputs = tiny_models.plain_dit()
    inputs = make_inputs()
    with pytest.warns(chipmunk_compile.ChipmunkFallbackWarning, match="torch.no_grad"):
        out = compile_chipmunk(model)(**inputs)
    assert rel_err(out, model(**inputs)) < 1e-5


def test_inference_mode_works():
    model, make_inputs = tiny_models.plain_dit()
    compiled = compile_chipmunk(model, attn_sparsity=0.0, mlp_sparsity=0.0, attn_random_fraction=0.0,
                                mlp_random_fraction=0.0)
    with torch.inference_mode():
        for step in range(3):
            inputs = make_inputs(step=step)
            assert rel_err(compiled(**inputs), model(**inputs)) < 1e-5


def test_dead_code_elimination_keeps_in_place_calls():
    import operator

    import torch.fx as fx

    from chipmunk_compile.backend import has_side_effects
    graph = fx.Graph()
    x = graph.placeholder("x")
    kept = [graph.call_method("mul_", (x, 2.0)), graph.call_method("copy_", (x, x)),
            graph.call_function(torch.add, (x, x), {"out": x}), graph.call_function(operator.setitem, (x, 0, 1.0)),
            graph.call_function(torch.ops.aten.add_.Tensor, (x, x))]
    dropped = [graph.call_method("mul", (x, 2.0)), graph.call_function(torch.add, (x, x)),
               graph.call_method("__getitem__", (x, 0))]
    assert all(has_side_effects(n) for n in kept)
    assert not any(has_side_effects(n) for n in dropped)


def test_autocast_runs_plain_with_a_clear_warning():
    """A float32 model called under torch.autocast: the chipmunk ops do not follow autocast (they would mix bf16
    activations with float32 weights), so the graph runs plain with one warning and matches eager autocast."""
    model, make_inputs = tiny_models.plain_dit()
    inputs = make_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**inputs)
        with pytest.warns(chipmunk_compile.ChipmunkFallbackWarning, match="autocast.*Cast the model"):
            got = compile_chipmunk(model)(**inputs)
    assert got.dtype == want.dtype and rel_err(got, want) < 1e-2


def test_autocast_around_the_blocks_inside_the_model_keeps_them_dense():
    """The model enters torch.autocast around its blocks in its own forward: every site sits in the region, so
    each stays dense (the ops do not follow autocast), with one warning that names the region, and the output
    matches eager autocast."""
    class AutocastInside(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x, t)

    model, make_inputs = tiny_models.plain_dit()
    wrapped = AutocastInside(model).eval()
    inputs = make_inputs()
    with torch.no_grad():
        want = wrapped(**inputs)
        with pytest.warns(chipmunk_compile.ChipmunkFallbackWarning, match="autocast") as record:
            got = compile_chipmunk(wrapped)(**inputs)
    assert rel_err(got, want) < 1e-2
    text = " ".join(str(w.message) for w in record)
    assert "model's own code" in text and "Cast the model" not in text  # casting cannot help here
    assert "left dense" in text and not chipmunk_compile.stats(wrapped)  # no site rewritten: no runtime


@torch.no_grad()
def test_an_autocast_region_outside_the_sites_does_not_stop_the_rewrite():
    """Mochi computes its RoPE frequencies under torch.autocast(..., float32) in its forward: a region that
    holds no attention or MLP leaves every site sparse (no warning), the region keeps its autocast arithmetic
    in the compiled graph (dense mode equals eager exactly, though the bf16 region would differ in float32),
    and a sparse run follows its dense reference as without the region."""
    class AutocastedEmbedding(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = torch.nn.Parameter(torch.randn(()) + 1.0, requires_grad=False)

        def forward(self, x, t):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                t = torch.matmul(t[:, None], self.scale.reshape(1, 1))[:, 0]  # bf16 under the region
            return self.inner(x, t.float())

    model, make_inputs = tiny_models.plain_dit()
    wrapped = AutocastedEmbedding(model).eval()
    inputs = [make_inputs(step=s) for s in range(4)]
    want = [wrapped(**i) for i in inputs]
    assert rel_err(model(inputs[1]["x"], inputs[1]["t"] * wrapped.scale), want[1]) > 1e-5  # the region matters
    dense = compile_chipmunk(wrapped, mode="dense", num_steps=4)
    for i, w in zip(inputs, want):
        assert rel_err(dense(**i), w) < 1e-6
    torch._dynamo.reset()
    compiled = compile_chipmunk(wrapped, num_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chipmunk_compile.ChipmunkFallbackWarning)
        got = [compiled(**i) for i in inputs]
    assert chipmunk_compile.stats(wrapped)[0]["sites_rewritten"] > 0
    assert all(rel_err(g, w) < 0.1 for g, w in zip(got, want))


@torch.no_grad()
def test_graph_break_that_skips_the_forward_runs_the_blocks_as_one_block_graphs():
    """A data-dependent .item() inside a loop of the transformer's forward (as some video DiTs do with their text
    masks) makes Dynamo skip that frame and compile each block alone: each block is then one block graph, run
    sparse with its own caches (layers in first-call order), and the embedders compiled alone stay plain."""
    class BreakInForward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, mask):
            for i in range(x.shape[0]):  # a graph break inside a for loop: Dynamo cannot resume in this frame
                n = int(mask[i].sum().item())
            c = self.inner.t_embed(t[:, None])
            h = self.inner.embed(x[:, :n])
            for block in self.inner.blocks:
                h = block(h, c)
            return self.inner.out(h)

    model, make_inputs = tiny_models.plain_dit()
    wrapped = BreakInForward(model).eval()
    compiled = compile_chipmunk(wrapped, num_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chipmunk_compile.ChipmunkFallbackWarning)
        for step in range(4):
            inputs = dict(make_inputs(step=step), mask=torch.ones(1, 64))
            got, want = compiled(**inputs), wrapped(**inputs)
            assert rel_err(got, want) < (1e-6 if step == 0 else 0.1), step
    infos = chipmunk_compile.stats(model)
    assert len(infos) == 2 and all(g["sites_rewritten"] == 2 and g["plans"]["attention:sparse"] == 2 for g in infos)


def test_python_float_argument_recompiling_every_call_is_reported_once():
    class FloatTimestep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t: float):
            return self.inner(x, torch.full((x.shape[0],), t))

    model, make_inputs = tiny_models.plain_dit()
    wrapped = FloatTimestep(model).eval()
    x = make_inputs()["x"]
    compiled = compile_chipmunk(wrapped)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for step in range(5):
            compiled(x, 1.0 - step / 50)
    ours = [str(w.message) for w in caught if issubclass(w.category, chipmunk_compile.ChipmunkFallbackWarning)]
    assert len(ours) == 1 and "compiled 3 times with the same tensor shapes" in ours[0], ours
    # Tensor timesteps: one graph, no such warning.
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        denoise_loop(compile_chipmunk(model), make_inputs, steps=5)
    assert not [w for w in caught if issubclass(w.category, chipmunk_compile.ChipmunkFallbackWarning)]


def test_graph_break_inside_the_transformer_is_reported_when_it_leaves_everything_dense():
    class Broken(tiny_models.PlainDiT):
        def forward(self, x, t):
            c = self.t_embed(t[:, None])
            h = self.embed(x)
            for block in self.blocks[:2]:
                h = block(h, c)
            torch._dynamo.graph_break()  # e.g. a print or .item() between blocks: two graphs of two blocks
            for block in self.blocks[2:]:
                h = block(h, c)
            return self.out(h)

    torch.manual_seed(0)
    model = Broken(depth=4).eval()
    _, make_inputs = tiny_models.plain_dit()
    with pytest.warns(chipmunk_compile.ChipmunkFallbackWarning, match="graph break inside the transformer"), \
            torch.no_grad():
        out = compile_chipmunk(model, first_dense_layers=2)(**make_inputs())
    assert rel_err(out, model(**make_inputs())) < 1e-5


def test_option_values_from_numpy_and_malformed_step_lists():
    import numpy as np
    opts = ChipmunkOptions.from_dict({"attn_sparsity": np.float32(0.5), "num_steps": np.int64(30),
                                      "attn_dense_steps": [np.int64(10), 0]})
    assert opts.attn_sparsity == 0.5 and type(opts.num_steps) is int and opts.attn_dense_steps == (0, 10)
    for bad in ([0, "5"], [0, None], [0, [5]], [0, 2.5]):
        with pytest.raises(ValueError, match="attn_dense_steps"):
            ChipmunkOptions.from_dict({"attn_dense_steps": bad})
    with pytest.raises(ValueError, match="options must be a dict"):
        ChipmunkOptions.from_dict("mode=dense")


@torch.no_grad()
def test_repeated_blocks_without_any_site_say_so_once():
    """Blocks with nothing the backend can rewrite (here linear attention, as Sana uses: no softmax) compile
    and run plain, with one warning that there is no speedup, instead of silence."""
    class LinearAttentionBlock(torch.nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

        def forward(self, x):
            q, k, v = torch.relu(self.qkv(x)).chunk(3, dim=-1)
            kv = k.transpose(1, 2) @ v
            return x + self.out((q @ kv) / (q @ k.sum(1, keepdim=True).transpose(1, 2) + 1e-6))

    class LinearAttentionDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(LinearAttentionBlock() for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = LinearAttentionDiT().eval()
    x = torch.randn(1, 64, 32)
    with pytest.warns(chipmunk_compile.ChipmunkFallbackWarning, match="repeated blocks.*no softmax attention") as rec:
        got = compile_chipmunk(model)(x)
    assert sum("repeated blocks" in str(w.message) for w in rec) == 1
    assert rel_err(got, model(x)) < 1e-6


@torch.no_grad()
def test_a_region_that_turns_autocast_off_does_not_force_plain():
    """torch.autocast(..., enabled=False) around float32 RoPE / timestep maths (Z-Image, OmniGen, ...) changes
    nothing when the model is not under autocast: the graph runs sparse, with no warning."""
    class AutocastOffInside(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            with torch.autocast(x.device.type, enabled=False):
                t = t.float() * 1.0
            return self.inner(x, t)

    model, make_inputs = tiny_models.plain_dit()
    wrapped = AutocastOffInside(model).eval()
    compiled = compile_chipmunk(wrapped, num_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chipmunk_compile.ChipmunkFallbackWarning)
        for s in range(4):
            compiled(**make_inputs(step=s))
    assert chipmunk_compile.stats(wrapped)[0]["sites_rewritten"] > 0


class _RegionBlock(torch.nn.Module):
    """A DiT-like block; in block 2 a bf16 autocast region covers its MLP ("mlp") or only the MLP's input norm
    ("input")."""

    def __init__(self, index, region, dim=32, heads=2):
        super().__init__()
        self.index, self.region, self.heads = index, region, heads
        self.n1, self.n2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        special = self.index == 2
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=special):
            h = self.n2(x)
            if self.region == "mlp":
                return x + self.fc2(torch.nn.functional.gelu(self.fc1(h))).float()
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))  # h: float32 (autocast runs norms in it)


@torch.no_grad()
@pytest.mark.parametrize("region, dense_site", [("mlp", "blocks.2.fc2"), ("input", None)])
def test_only_sites_computed_inside_an_autocast_region_stay_dense(region, dense_site):
    """A region around one block's MLP keeps that MLP dense (its reason names the region) and rewrites the rest;
    a region that only computes a site's input (a norm) leaves the site sparse. Dense mode equals eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.blocks = torch.nn.ModuleList(_RegionBlock(i, region) for i in range(4))
    model.forward = lambda x: [x := b(x) for b in model.blocks][-1]
    x = torch.randn(1, 64, 32)
    want = model(x)
    assert rel_err(compile_chipmunk(model, mode="dense")(x), want) < 1e-6
    torch._dynamo.reset()
    report = chipmunk_compile.explain(model, x, options=FAST)
    dense = [s for s in report.sites if not s.rewritten]
    assert [s.module.split("model.")[-1] for s in dense if "autocast" in s.reason] == (
        [dense_site] if dense_site else [])
    assert len(report.sites) - len(dense) == 8 - (1 if dense_site else 0)

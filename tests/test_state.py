"""Cache state: per batch element, per invocation, per graph; resets; regional compilation per block instance."""
import copy

import pytest
import torch

import chipmunk_compile
import tiny_models
from chipmunk_compile import runtime
from helpers import FAST, compile_chipmunk, denoise_loop, first_output, newest_runtimes, rel_err, runtime_ids


def _plans(rt):
    return dict(rt.site_counters)


@torch.no_grad()
def test_reset_by_call_num_steps_and_explicit_reset():
    model, make_inputs = tiny_models.flux()
    before = runtime_ids()
    compiled = compile_chipmunk(model, num_steps=4)
    inputs = [make_inputs(step=s, seed=s, size=16) for s in range(6)]
    outs = [first_output(compiled(**inputs[s])) for s in range(5)]     # steps 0..3, then a new generation
    rt = newest_runtimes(before)[0]
    ref = [first_output(model(**inputs[s])) for s in range(5)]
    assert rel_err(outs[0], ref[0]) < 1e-5
    assert rel_err(outs[2], ref[2]) > 1e-5          # a sparse step
    assert rel_err(outs[4], ref[4]) < 1e-5          # call 5 = step 0 of the next generation: dense
    assert rt.step == 1
    (info,) = [g for g in chipmunk_compile.stats(model) if g["graph"] == rt.id]
    assert info["step"] == 1 and info["plans"]["attention:sparse"] == 2 * 2  # steps 2, 3 × 2 attention sites
    assert info["sites_rewritten"] == 5 and info["cache_mib"] > 0
    assert chipmunk_compile.reset(model) >= 1
    assert rt.calls == 0
    assert rel_err(first_output(compiled(**inputs[5])), first_output(model(**inputs[5]))) < 1e-5
    rt.reset()
    assert chipmunk_compile.reset() >= 1            # all models


@torch.no_grad()
def test_new_resolution_and_batch_get_fresh_state():
    model, make_inputs = tiny_models.flux()
    before = runtime_ids()
    compiled = compile_chipmunk(model)
    for s in range(3):
        compiled(**make_inputs(step=s, size=16))
    for kwargs in ({"size": 12}, {"size": 16, "batch": 2}, {"size": 16}):
        inputs = make_inputs(step=3, seed=7, **kwargs)
        out = first_output(compiled(**inputs))
        # first call of a new graph (or back to an old one after another shape ran): dense, exact
        assert rel_err(out, first_output(model(**inputs))) < 1e-5, kwargs
    runtimes = newest_runtimes(before)
    assert len(runtimes) == 3  # 16, 12, 16×batch2: three graphs, each with its own state
    assert all(s.rewritten for rt in runtimes for s in rt.site_records)


@torch.no_grad()
def test_batch_of_two_equals_two_single_runs():
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=1)
    opts = dict(attn_sparsity=0.7, mlp_sparsity=0.6)

    def batched(step):
        a, b = (make_inputs(batch=1, size=16, seed=s, step=step) for s in (1, 2))
        return {k: (torch.cat([a[k], b[k]]) if k in ("hidden_states", "encoder_hidden_states",
                                                     "pooled_projections", "timestep") else a[k]) for k in a}

    compiled = compile_chipmunk(model, **opts)
    batch_outs = [first_output(compiled(**batched(step))) for step in range(6)]
    torch._dynamo.reset()
    for i, seed in enumerate((1, 2)):
        chipmunk_compile.reset()
        single = compile_chipmunk(model, **opts)
        for step in range(6):
            out = first_output(single(**make_inputs(batch=1, size=16, seed=seed, step=step)))
            assert rel_err(out[0], batch_outs[step][i]) < 1e-4, (seed, step)
        torch._dynamo.reset()


@torch.no_grad()
def test_separate_cfg_invocations_keep_separate_caches():
    model, make_inputs = tiny_models.flux()
    cond = [make_inputs(size=16, seed=1, step=s) for s in range(6)]
    uncond = [make_inputs(size=16, seed=2, step=s) for s in range(6)]
    compiled = compile_chipmunk(model, invocations_per_step=2)
    interleaved = []
    for s in range(6):
        interleaved.append((first_output(compiled(**cond[s])), first_output(compiled(**uncond[s]))))
    torch._dynamo.reset()
    for which, seq in ((0, cond), (1, uncond)):
        alone = compile_chipmunk(model)
        for s in range(6):
            out = first_output(alone(**seq[s]))
            assert rel_err(out, interleaved[s][which]) < 1e-5, (which, s)
        torch._dynamo.reset()


def _weights_as_buffers(model):
    """The same model with every parameter turned into a buffer (as converted or frozen weights are)."""
    for module in list(model.modules()):
        for name, p in list(module._parameters.items()):
            if p is not None:
                del module._parameters[name]
                module.register_buffer(name, p.detach().clone())
    return model


def _count_inner_compiles(monkeypatch) -> list:
    """Records each graph the backend hands to its inner compiler (the number of its inputs)."""
    from chipmunk_compile import backend
    compiles, inner = [], backend.inner_compile

    def counting(gm, inputs, *args):
        compiles.append(len(inputs))
        return inner(gm, inputs, *args)
    monkeypatch.setattr(backend, "inner_compile", counting)
    return compiles


@torch.no_grad()
@pytest.mark.parametrize("weights", ["parameters", "buffers"])
def test_two_models_side_by_side(weights, monkeypatch):
    """Dynamo reuses one graph for both instances; each must still get its own caches (also when the weights
    are buffers, which Dynamo passes as plain tensors)."""
    m1, make_inputs = tiny_models.flux()
    m2, _ = tiny_models.flux()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if weights == "buffers":
        m1, m2 = _weights_as_buffers(m1), _weights_as_buffers(m2)
    seq, latents = [], None
    for s in range(5):  # one fixed input sequence, driven by m1
        seq.append(make_inputs(size=16, step=s, latents=latents))
        latents = seq[-1]["hidden_states"] - 0.02 * first_output(m1(**seq[-1]))
    solo = []
    for m in (m1, m2):
        compiled = compile_chipmunk(m)
        solo.append([first_output(compiled(**inputs)) for inputs in seq])
        torch._dynamo.reset()
    compiles = _count_inner_compiles(monkeypatch)
    c1, c2 = compile_chipmunk(m1), compile_chipmunk(m2)
    for s, inputs in enumerate(seq):
        out1, out2 = first_output(c1(**inputs)), first_output(c2(**inputs))
        assert rel_err(out1, solo[0][s]) < 1e-5 and rel_err(out2, solo[1][s]) < 1e-5, s
        assert rel_err(out1, out2) > 1e-3
    assert len(compiles) == 1  # the second instance reuses the first one's compiled rewrite, with its own caches
    # every instance has its own runtime: resetting m2 leaves m1's state alone
    assert chipmunk_compile.reset(m2) == 1


def _regional_run(options, compile_blocks, steps=4):
    """Flux (2 double + 2 single blocks) compiled whole and block by block with the same options, driven by the
    same slowly moving inputs: (regional outputs, whole-model outputs, eager outputs, regional model)."""
    import copy
    import warnings
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=2)
    regional, whole = copy.deepcopy(model), copy.deepcopy(model)
    compile_blocks(regional, options)
    whole_compiled = compile_chipmunk(whole, **options)
    g = torch.Generator().manual_seed(1)
    x0, drift = torch.randn(1, 64, 4, generator=g), torch.randn(1, 64, 4, generator=g)
    outs = ([], [], [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", chipmunk_compile.ChipmunkFallbackWarning)
        for s in range(steps):
            inputs = make_inputs(size=8, step=s, latents=x0 + 0.03 * s * drift)
            for out, fn in zip(outs, (regional, whole_compiled, model)):
                out.append(first_output(fn(**inputs)))
    return (*outs, regional)


def _compile_repeated_blocks(model, options):
    model.compile_repeated_blocks(backend="chipmunk", options={**FAST, **options})


def _compile_each_block(model, options):
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile(backend="chipmunk", options={**FAST, **options})


@torch.no_grad()
@pytest.mark.parametrize("compile_blocks", [_compile_repeated_blocks, _compile_each_block])
def test_regional_compilation_runs_sparse_per_block_instance(compile_blocks):
    """Each block compiled alone is one block: every instance gets its own caches and step count, its layer is
    its rank in first-call order, and without random columns/units the result equals the whole-model compile
    (the same method and schedule)."""
    options = dict(num_steps=4, attn_random_fraction=0.0, mlp_random_fraction=0.0)
    regional, whole, eager, model = _regional_run(options, compile_blocks)
    assert rel_err(regional[0], eager[0]) < 1e-5                          # step 0: dense
    for s in range(1, 4):
        assert rel_err(regional[s], whole[s]) < 1e-5, s
    assert rel_err(regional[3], eager[3]) > 1e-5                          # sparse steps ran
    infos = chipmunk_compile.stats(model)
    assert len(infos) == 4 and [g["sites_rewritten"] for g in infos] == [3, 3, 2, 2]
    assert all(g["plans"]["attention:sparse"] == 2 and g["step"] == 0 for g in infos)
    layers = [{r.layer for r in runtime.lookup(g["graph"]).site_records} for g in infos]
    assert layers == [{0}, {1}, {2}, {3}]
    # Instances of one block graph share site numbers; their random draws differ by layer.
    first, second = (runtime.lookup(g["graph"]) for g in infos[:2])
    assert first.block_layer == 0 and second.block_layer == 1
    draws = [torch.rand(8, generator=rt.generator(0, torch.device("cpu"))) for rt in (first, second)]
    assert not torch.equal(*draws)


@torch.no_grad()
def test_regional_compilation_compiles_each_block_graph_once(monkeypatch):
    """Block instances share one compiled rewrite per block graph (their caches passed as inputs, the ops bound
    to the instance being called), here through real Inductor (CPU): outputs equal the whole-model compile's. The
    token permutation stays a buffer of the shared graph (a constant of every instance)."""
    compiles = _count_inner_compiles(monkeypatch)
    options = dict(num_steps=4, attn_random_fraction=0.0, mlp_random_fraction=0.0, inner_backend="inductor",
                   token_grid=(1, 8, 8), token_tile=(1, 4, 4))
    model, make_inputs = tiny_models.flux(num_layers=3, num_single_layers=2)
    whole = compile_chipmunk(copy.deepcopy(model), **{**options, "inner_backend": "aot_eager"})
    _compile_repeated_blocks(model, options)
    g = torch.Generator().manual_seed(1)
    x0, drift = torch.randn(1, 64, 4, generator=g), torch.randn(1, 64, 4, generator=g)
    for s in range(4):
        inputs = make_inputs(size=8, step=s, latents=x0 + 0.03 * s * drift)
        assert rel_err(first_output(model(**inputs)), first_output(whole(**inputs))) < 1e-5, s
    # The whole model: 1. The 3 double + 2 single block instances: Dynamo traces the first single block apart
    # (its input's strides differ from the later ones'), so 3 block graphs and 3 inner compiles, not 5.
    assert len(compiles) == 1 + 3
    infos = chipmunk_compile.stats(model)
    assert len(infos) == 5 and all(g["plans"]["attention:sparse"] == 2 and g["cache_mib"] > 0 for g in infos)
    # every site over the image tokens (all but the text-only feed-forward) runs reordered
    assert all(r.details["token_order"] == "tiles" for rt in runtime._runtimes_of(model) for r in rt.site_records
               if r.module != "ff_context.net.2")


def test_cuda_graphs_from_any_source_keep_per_instance_compiles():
    """Shared compiles pass caches as graph inputs, which CUDA graphs would copy into static buffers at every replay:
    the options, the compile mode and Inductor's global config each switch sharing off."""
    from chipmunk_compile.backend import wants_cudagraphs
    from chipmunk_compile.options import ChipmunkOptions
    assert not wants_cudagraphs(ChipmunkOptions(), None)
    assert wants_cudagraphs(ChipmunkOptions(cudagraphs=True), None)
    assert wants_cudagraphs(ChipmunkOptions(), "reduce-overhead")
    with torch._inductor.config.patch({"triton.cudagraphs": True}):
        assert wants_cudagraphs(ChipmunkOptions(), None)


@torch.no_grad()
def test_regional_blocks_sharing_their_first_weight_get_their_own_caches():
    """Blocks that share a weight (here one modulation layer tied across blocks, each block's first parameter) are
    still different instances: each gets its own caches, step count and layer, and the result equals the
    whole-model compile. (Instances used to be told apart by their first parameter alone: all three blocks shared
    one runtime, advanced three times per forward, and read each other's caches.)"""
    options = {**FAST, "num_steps": 4, "attn_random_fraction": 0.0, "mlp_random_fraction": 0.0}
    model, make_inputs = tiny_models.plain_dit(depth=3)
    for block in model.blocks[1:]:
        block.ada = model.blocks[0].ada
    whole = torch.compile(copy.deepcopy(model), backend="chipmunk", options=options)
    for block in model.blocks:
        block.compile(backend="chipmunk", options=options)
    g = torch.Generator().manual_seed(1)
    x0, drift = torch.randn(1, 64, 4, generator=g), torch.randn(1, 64, 4, generator=g)
    for s in range(4):
        inputs = make_inputs(size=8, step=s, latents=x0 + 0.03 * s * drift)
        assert rel_err(model(**inputs), whole(**inputs)) < 1e-5, s
    # three runtimes (the tied weight makes each of them one of block 2's), layers 0, 1, 2, one step each
    assert sorted(rt.block_layer for rt in runtime._runtimes_of(model.blocks[2])) == [0, 1, 2]
    assert [g["step"] for g in chipmunk_compile.stats(model)] == [0, 0, 0]  # 4 calls each: a new generation


@torch.no_grad()
def test_regional_compilation_dense_mode_and_first_dense_layers():
    regional, whole, eager, model = _regional_run(dict(num_steps=4, mode="dense"), _compile_repeated_blocks, steps=3)
    assert all(rel_err(r, e) < 1e-5 for r, e in zip(regional, eager))
    torch._dynamo.reset()
    options = dict(num_steps=4, first_dense_layers=2, attn_random_fraction=0.0, mlp_random_fraction=0.0)
    regional, whole, eager, model = _regional_run(options, _compile_repeated_blocks)
    assert all(rel_err(r, w) < 1e-5 for r, w in zip(regional, whole))
    # the first two block instances (the double blocks) run plain; the single blocks (layers 2, 3) sparse
    infos = chipmunk_compile.stats(model)
    assert len(infos) == 2 and all(g["plans"]["attention:sparse"] == 2 for g in infos)
    assert [{r.layer for r in runtime.lookup(g["graph"]).site_records} for g in infos] == [{2}, {3}]


def test_derived_weight_copies_follow_in_place_updates():
    """Cached transformed weights (the unit-major W2 the CUDA kernels read) are rebuilt after any in-place
    update of the weight, e.g. load_state_dict or a fused LoRA."""
    from chipmunk_compile.options import ChipmunkOptions
    from chipmunk_compile.runtime import GraphRuntime
    rt = GraphRuntime(ChipmunkOptions(), num_sites=1)
    w = torch.randn(4, 6)
    first = rt.derived("w", w, lambda t: t.t().contiguous())
    assert rt.derived("w", w, lambda t: t.t().contiguous()) is first
    with torch.no_grad():
        torch.nn.Linear(6, 4).weight.data  # unrelated tensor: no effect
        w.add_(1.0)
    again = rt.derived("w", w, lambda t: t.t().contiguous())
    assert again is not first and torch.equal(again, w.t())


@torch.no_grad()
def test_stats_and_reset_follow_the_weight_tensors_not_just_their_addresses():
    """A model whose weights sit at another model's addresses (as a new model may after a deleted one) is not
    that model: stats and reset must not report or touch its graphs."""
    m1, make_inputs = tiny_models.plain_dit()
    before = runtime_ids()
    compiled = compile_chipmunk(m1)
    compiled(**make_inputs())
    assert len(newest_runtimes(before)) == 1
    m2, _ = tiny_models.plain_dit()
    for p2, p1 in zip(m2.parameters(), m1.parameters()):
        p2.data = p1.data  # same storage, different Parameter objects
    assert chipmunk_compile.stats(m2) == [] and chipmunk_compile.reset(m2) == 0
    assert len(chipmunk_compile.stats(m1)) == 1 and chipmunk_compile.stats(compiled) == chipmunk_compile.stats(m1)


@torch.no_grad()
def test_deleted_model_releases_its_graph_and_caches():
    """The caches (GBs for a video DiT) live as long as the model, not until torch._dynamo.reset()."""
    import gc
    model, make_inputs = tiny_models.plain_dit()
    before = runtime_ids()
    compiled = compile_chipmunk(model)
    for s in range(3):
        compiled(**make_inputs(step=s))
    ids = {rt.id for rt in newest_runtimes(before)}
    assert len(ids) == 1
    del compiled, model
    gc.collect()
    assert not ids & runtime_ids()


@torch.no_grad()
def test_weights_moved_to_new_memory_keep_their_graph_and_caches():
    """Offloading (model.to('cpu') ... model.to('cuda')) gives the same parameter objects new memory: the model
    keeps its compiled graph, caches and step count instead of being rebuilt as a new instance with fresh
    caches (which also used to keep the old caches alive)."""
    model, make_inputs = tiny_models.plain_dit()
    seq = [make_inputs(step=s) for s in range(6)]
    compiled = compile_chipmunk(model)
    unmoved = [compiled(**inputs) for inputs in seq]
    assert chipmunk_compile.reset(model) == 1
    before = runtime_ids()
    moved = []
    for s, inputs in enumerate(seq):
        if s in (2, 4):
            ptr = next(model.parameters()).data_ptr()
            held = [p.data for p in model.parameters()]  # the old storage stays allocated: no address reuse
            model.double().float()  # new storage for every weight, the same Parameter objects, same values
            del held
            assert next(model.parameters()).data_ptr() != ptr
        moved.append(compiled(**inputs))
    assert newest_runtimes(before) == []  # no new instance was built
    plans = chipmunk_compile.stats(model)[0]["plans"]
    assert any(kind.endswith("sparse") for kind in plans), plans  # sparse steps ran after the moves
    for s in range(6):
        assert rel_err(moved[s], unmoved[s]) < 1e-6, s


@torch.no_grad()
def test_follow_scheduler_keeps_generations_in_step_with_the_sampler():
    """A 6-step sampler with the default num_steps=50: without help the second generation starts at step 6 of
    the first and reads its caches; follow_scheduler resets at every set_timesteps and counts 6 steps."""
    import copy
    import types
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    copies = [copy.deepcopy(model) for _ in range(2)]

    def generate(compiled, scheduler, seed):
        scheduler.set_timesteps(6)
        x = make_inputs(seed=seed)["x"]
        for t in scheduler.timesteps:
            x = x - 0.05 * compiled(x=x, t=(t / 1000).expand(1))
        return x

    followed, scheduler = compile_chipmunk(model), FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(scheduler=scheduler, transformer=followed)  # as a diffusers pipeline holds them
    chipmunk_compile.follow_scheduler(pipe)
    generate(followed, scheduler, seed=0)
    second = generate(followed, scheduler, seed=1)
    assert chipmunk_compile.stats(model)[0]["step"] == 0  # 6 calls = one whole generation
    reference = generate(compile_chipmunk(copies[0], num_steps=6), FlowMatchEulerDiscreteScheduler(), seed=1)
    assert rel_err(second, reference) < 1e-6
    unaided = compile_chipmunk(copies[1])  # num_steps=50: out of step from the second generation on
    generate(unaided, FlowMatchEulerDiscreteScheduler(), seed=0)
    assert rel_err(generate(unaided, FlowMatchEulerDiscreteScheduler(), seed=1), reference) > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("calls_per_step, invocations, warns", [(2, 1, True), (2, 2, False), (1, 1, False)])
def test_a_followed_model_called_more_often_per_step_than_configured_warns(calls_per_step, invocations, warns):
    """Separate cond/uncond calls (Wan, true-CFG Flux / HunyuanVideo / QwenImage) with invocations_per_step left
    at 1 used to wrap the step counter mid-generation silently: a followed model now says so, once, and names
    the option; the right setting and plain samplers stay quiet."""
    import types
    import warnings
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    compiled, scheduler = compile_chipmunk(model, invocations_per_step=invocations), FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(types.SimpleNamespace(scheduler=scheduler, transformer=compiled))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for generation in range(2):
            scheduler.set_timesteps(4)
            x = make_inputs(seed=generation)["x"]
            for t in scheduler.timesteps:
                for _ in range(calls_per_step):
                    out = compiled(x=x, t=(t / 1000).expand(1))
                x = x - 0.05 * out
    messages = [str(w.message) for w in caught if "invocations_per_step" in str(w.message)]
    assert len(messages) == (1 if warns else 0), messages


def _cfg_generation(compiled, scheduler, make_inputs, seed, sizes=(8, 8), steps=6):
    """A sampler with separate cond / uncond calls per step (sizes: their token grids; equal sizes share one
    graph), guidance combined, the latents moved by ``scheduler.step``. Returns every call's output."""
    scheduler.set_timesteps(steps)
    x = {size: make_inputs(seed=seed, size=size)["x"] for size in set(sizes)}
    outs = []
    for t in scheduler.timesteps:
        preds = [compiled(x=x[size] + 0.01 * i, t=(t / 1000).expand(1)) for i, size in enumerate(sizes)]
        outs.extend(preds)
        for size, pred in zip(sizes, preds):
            x[size] = x[size] - 0.05 * pred
        scheduler.step(preds[0], t, x[sizes[0]])
    return outs


@torch.no_grad()
def test_a_stepping_scheduler_gives_separate_cfg_calls_their_own_caches():
    """follow_scheduler also follows scheduler.step: a model called twice per step (cond and uncond) with
    invocations_per_step left at 1 gets one cache set per call from the second generation on, exactly as
    invocations_per_step=2 does, and nothing warns."""
    import types
    import warnings
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    reference_model = copy.deepcopy(model)
    compiled, scheduler = compile_chipmunk(model), FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(types.SimpleNamespace(scheduler=scheduler, transformer=compiled))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cfg_generation(compiled, scheduler, make_inputs, seed=0)
        followed = _cfg_generation(compiled, scheduler, make_inputs, seed=1)
    assert not [w for w in caught if "invocations_per_step" in str(w.message)]
    reference = compile_chipmunk(reference_model, invocations_per_step=2, num_steps=6)
    expected = _cfg_generation(reference, FlowMatchEulerDiscreteScheduler(), make_inputs, seed=1)
    for i, (a, b) in enumerate(zip(followed, expected)):
        assert rel_err(a, b) < 1e-6, i
    eager = _cfg_generation(model, FlowMatchEulerDiscreteScheduler(), make_inputs, seed=1)
    assert rel_err(followed[-1], eager[-1]) > 1e-5  # sparse steps ran
    (info,) = chipmunk_compile.stats(model)
    assert info["plans"]["attention:sparse"] > 0 and info["step"] == 0


@torch.no_grad()
def test_a_stepping_scheduler_with_one_call_per_step_changes_nothing():
    """One call per step: the switch to counting by scheduler steps keeps the caches (the counting agreed), so
    already the first generation equals a model compiled with the sampler's step count."""
    import types
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    reference_model = copy.deepcopy(model)
    compiled, scheduler = compile_chipmunk(model), FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(types.SimpleNamespace(scheduler=scheduler, transformer=compiled))
    followed = _cfg_generation(compiled, scheduler, make_inputs, seed=0, sizes=(8,))
    expected = _cfg_generation(compile_chipmunk(reference_model, num_steps=6), FlowMatchEulerDiscreteScheduler(),
                               make_inputs, seed=0, sizes=(8,))
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(followed, expected))
    assert chipmunk_compile.stats(model)[0]["plans"]["attention:sparse"] == 2 * 4  # 2 sites, steps 2..5


@torch.no_grad()
def test_a_stepped_model_called_on_without_scheduler_steps_counts_by_calls_again():
    """After a followed sampler, a loop that never steps the scheduler must not make a cache set per call: after
    MAX_STEPPED_INVOCATIONS calls in one step the model counts steps by calls again (one warning)."""
    import types
    import warnings
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    compiled, scheduler = compile_chipmunk(model, num_steps=6), FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(types.SimpleNamespace(scheduler=scheduler, transformer=compiled))
    _cfg_generation(compiled, scheduler, make_inputs, seed=0, sizes=(8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            compiled(**make_inputs(step=step))
    assert len([w for w in caught if "without a step of the followed scheduler" in str(w.message)]) == 1
    first, rt = sorted(runtime._runtimes_of(model), key=lambda r: r.id)  # the loop's graph: its t has other strides
    assert not rt.stepped and rt.step == 3  # 3 calls in step 0, then counted: calls 4-6 are steps 0-2
    assert rt.state_bytes == first.state_bytes  # the extra cache sets of the 3 uncounted calls are gone


@torch.no_grad()
@pytest.mark.parametrize("variant", ["followed twice", "step repeated"])
def test_a_step_is_counted_once(variant):
    """follow_scheduler called twice for one model, or a sampler that calls scheduler.step twice per iteration and
    rewinds its step_index in between (Cosmos), must not count a step twice: the generation equals a model compiled
    with the sampler's step count."""
    import types
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    reference_model = copy.deepcopy(model)
    compiled, scheduler = compile_chipmunk(model), FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(scheduler=scheduler, transformer=compiled)
    chipmunk_compile.follow_scheduler(pipe)
    if variant == "followed twice":
        chipmunk_compile.follow_scheduler(pipe)

    def generation(fn, sched):
        sched.set_timesteps(6)
        x, outs = make_inputs(seed=0)["x"], []
        for t in sched.timesteps:
            outs.append(fn(x=x, t=(t / 1000).expand(1)))
            if variant == "step repeated":
                sched.step(outs[-1], t, x)
                sched._step_index -= 1
            x = sched.step(outs[-1], t, x).prev_sample
        return outs

    followed = generation(compiled, scheduler)
    expected = generation(compile_chipmunk(reference_model, num_steps=6), FlowMatchEulerDiscreteScheduler())
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(followed, expected))


@torch.no_grad()
def test_the_first_scheduler_step_drops_caches_the_counting_mixed_up():
    """Three calls per step on two graphs (cond on graph A, uncond on graph B, a third branch on A again) with
    invocations_per_step=1: counted, the third call restarted A, so at the first scheduler step A has made exactly
    one counted call, but of another branch. Its caches must go: A's cond call of step 1 is then dense (exact)."""
    import types
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    compiled, scheduler = compile_chipmunk(model), FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(types.SimpleNamespace(scheduler=scheduler, transformer=compiled))
    scheduler.set_timesteps(6)
    x8, x6 = make_inputs(seed=0)["x"], make_inputs(seed=1, size=6)["x"]
    for timestep in scheduler.timesteps[:2]:
        t = (timestep / 1000).expand(1)
        cond = compiled(x=x8, t=t)
        compiled(x=x6, t=t)
        compiled(x=x8.flip(1), t=t)
        scheduler.step(cond, timestep, x8)
    assert rel_err(cond, model(x=x8, t=t)) < 1e-5


@torch.no_grad()
def test_a_stepping_scheduler_lets_cond_and_uncond_graphs_of_different_shapes_run_sparse():
    """Cond / uncond calls of different shapes (QwenImage true CFG) compile two graphs that used to restart each
    other from dense steps at every call; with the scheduler's steps followed each graph keeps its own steps and
    equals a model that only ever sees its calls."""
    import types
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    solo_models = [copy.deepcopy(model) for _ in range(2)]
    compiled, scheduler = compile_chipmunk(model), FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(types.SimpleNamespace(scheduler=scheduler, transformer=compiled))
    _cfg_generation(compiled, scheduler, make_inputs, seed=0, sizes=(8, 6))
    both = _cfg_generation(compiled, scheduler, make_inputs, seed=1, sizes=(8, 6))
    assert all(g["plans"].get("attention:sparse", 0) > 0 for g in chipmunk_compile.stats(model))
    for index, size in enumerate((8, 6)):  # each graph alone: its calls of the same sampler run
        solo = compile_chipmunk(solo_models[index], num_steps=6)
        scheduler_alone = FlowMatchEulerDiscreteScheduler()
        scheduler_alone.set_timesteps(6)
        x = make_inputs(seed=1, size=size)["x"]
        for step, t in enumerate(scheduler_alone.timesteps):
            out = solo(x=x + 0.01 * index, t=(t / 1000).expand(1))
            assert rel_err(out, both[2 * step + index]) < 1e-6, (size, step)
            x = x - 0.05 * out


@torch.no_grad()
def test_under_cuda_graphs_extra_calls_per_step_run_dense_and_warn():
    """With CUDA graphs every instance's caches have invocations_per_step slots: a stepped model called more often
    per step runs the extra calls dense (exact) and says which setting fits."""
    import types
    import warnings
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, make_inputs = tiny_models.plain_dit()
    compiled, scheduler = compile_chipmunk(model, cudagraphs=True), FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(types.SimpleNamespace(scheduler=scheduler, transformer=compiled))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cfg_generation(compiled, scheduler, make_inputs, seed=0)
        outs = _cfg_generation(compiled, scheduler, make_inputs, seed=1)
    eager = _cfg_generation(model, FlowMatchEulerDiscreteScheduler(), make_inputs, seed=1)
    messages = [str(w.message) for w in caught if "invocations_per_step=2" in str(w.message)]
    assert len(messages) == 1, messages
    assert rel_err(outs[1], eager[1]) < 1e-5  # the uncond call of step 0 (dense anyway)
    (info,) = chipmunk_compile.stats(model)
    assert info["plans"]["attention:dense"] >= 5 and info["plans"]["attention:sparse"] > 0  # uncond calls dense


@torch.no_grad()
def test_two_graphs_of_one_model_alternating_mid_generation_warn_once():
    """Cond / uncond calls of different shapes (QwenImage true CFG: prompts of different lengths) compile two
    graphs that restart each other from dense steps at every call: no speedup, said once instead of an INFO
    log line only."""
    import warnings
    model, make_inputs = tiny_models.plain_dit()
    compiled = compile_chipmunk(model, num_steps=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            for size in (8, 6):
                compiled(**make_inputs(step=step, size=size))
    messages = [str(w.message) for w in caught if "restarted from dense steps" in str(w.message)]
    assert len(messages) == 1, messages


def test_follow_scheduler_rejects_what_it_cannot_follow():
    import numpy as np
    import types
    model, _ = tiny_models.plain_dit()
    assert chipmunk_compile.begin_generation(model, np.int64(5)) == 0  # numpy ints are steps too
    with pytest.raises(TypeError, match="set_timesteps"):
        chipmunk_compile.follow_scheduler(object(), model)
    with pytest.raises(ValueError, match="transformer"):
        chipmunk_compile.follow_scheduler(object())
    with pytest.raises(ValueError, match="positive int"):
        chipmunk_compile.begin_generation(model, 0)
    with pytest.raises(ValueError, match="positive int"):
        chipmunk_compile.begin_generation(model, True)
    with pytest.raises(TypeError, match="expected the model"):
        chipmunk_compile.follow_scheduler(types.SimpleNamespace(set_timesteps=lambda n: None), lambda x: x)


@torch.no_grad()
def test_follow_scheduler_survives_a_deep_copy_and_follows_both_experts():
    """A deep copy of a followed scheduler (LTX2 pipelines copy theirs for the audio latents) sets its own
    timesteps; follow_scheduler(pipe) follows transformer_2 (Wan 2.2's low-noise expert) too."""
    import copy
    import types
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, _ = tiny_models.plain_dit()
    scheduler = FlowMatchEulerDiscreteScheduler()
    chipmunk_compile.follow_scheduler(scheduler, model)
    scheduler.set_timesteps(6)
    duplicate = copy.deepcopy(scheduler)
    duplicate.set_timesteps(3)
    assert (len(duplicate.timesteps), len(scheduler.timesteps)) == (3, 6)
    low = copy.deepcopy(model)
    pipe = types.SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=model, transformer_2=low)
    chipmunk_compile.follow_scheduler(pipe)
    compiled = compile_chipmunk(low)
    x = torch.randn(1, 256, 4)
    for steps in (6, 4):
        pipe.scheduler.set_timesteps(steps)
        for t in pipe.scheduler.timesteps[:2]:
            compiled(x=x, t=(t / 1000).reshape(1))
        assert [rt.options.num_steps for rt in chipmunk_compile.runtime._runtimes_of(low)] == [steps]
        assert chipmunk_compile.stats(low)[0]["step"] == 2


@torch.no_grad()
def test_regional_layers_survive_a_new_resolution_after_one_forward():
    """A block instance rebuilt for a new resolution keeps the layer it got at its first build, even when the
    model ran a single forward before (a one-step warm-up): first_dense_layers still applies to the same blocks."""
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=2)
    _compile_repeated_blocks(model, dict(num_steps=4, first_dense_layers=2))
    model(**make_inputs(size=8))
    before = runtime_ids()
    for s in range(2):
        model(**make_inputs(size=16, step=s))
    assert sorted(rt.block_layer for rt in newest_runtimes(before)) == [2, 3]

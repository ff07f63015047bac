"""End-to-end check and timing of the chipmunk backend on a CUDA GPU (Triton kernels by default).

Part 1, correctness (small Flux transformer, bf16, random weights, 12 steps with slowly moving latents, every
call compared with eager on the same inputs):
  - mode="dense" vs eager; all columns/units selected vs eager (both exact up to bf16 rounding);
  - default chipmunk vs eager (approximate: reported);
  - mode="reduce-overhead" (CUDA graphs around the chipmunk ops) vs the same backend without CUDA graphs;
  - option mlp_output_cache_dtype='float32' (the default caches y in bf16): all selected vs eager, default
    sparsity vs eager and vs the default run.
Part 2, speed (a FLUX-width transformer: 3072 wide, 24 heads of 128, 2 double + 4 single blocks, 1024x1024
image = 4096 image + 512 text tokens, bf16): median step time of plain Inductor vs chipmunk on dense steps,
sparse steps and over a whole 50-step schedule (per step with a sync after each, and a whole generation with
one sync at the end), plus every host synchronisation the chipmunk steps make; also with CUDA graphs and with
the float32 y_cache option.
Prints a table; writes backend_<gpu>.json to $OUT or benchmarks/results. ``--speed-only``: part 2 in the default
torch.compile mode only.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import triton
from diffusers import FluxTransformer2DModel

import chipmunk_compile

DEV, DT = "cuda", torch.bfloat16
RESULTS: dict = {"checks": [], "speed": []}


def flux(width_heads, head_dim, double, single, text_dim=64):
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                  attention_head_dim=head_dim, num_attention_heads=width_heads,
                                  joint_attention_dim=text_dim, pooled_projection_dim=64,
                                  axes_dims_rope=(head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
                                  ).to(DEV, DT).eval()


def inputs(side, text, text_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(side * side, 3)
    ids[:, 1] = torch.arange(side).repeat_interleave(side)
    ids[:, 2] = torch.arange(side).repeat(side)
    return dict(hidden_states=torch.randn(1, side * side, 16, generator=g).to(DEV, DT),
                encoder_hidden_states=torch.randn(1, text, text_dim, generator=g).to(DEV, DT),
                pooled_projections=torch.randn(1, 64, generator=g).to(DEV, DT),
                timestep=torch.ones(1, device=DEV, dtype=DT), img_ids=ids.to(DEV),
                txt_ids=torch.zeros(text, 3, device=DEV), return_dict=False)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def trajectory(model, side=32, text=16, steps=12):
    seq, x = [], None
    for s in range(steps):
        inp = inputs(side, text)
        if x is not None:
            inp["hidden_states"] = x
        inp["timestep"] = torch.full((1,), 1.0 - s / 50, device=DEV, dtype=DT)
        seq.append(inp)
        x = inp["hidden_states"] - 0.02 * model(**inp)[0]
    return seq


@torch.no_grad()
def check(name, model, seq, ref_outs, limit, **compile_kwargs):
    torch._dynamo.reset()
    chipmunk_compile.reset()
    compiled = torch.compile(model, backend="chipmunk", **compile_kwargs)
    outs = [compiled(**inp)[0].clone() for inp in seq]
    errs = [rel(o, r) for o, r in zip(outs, ref_outs)]
    ok = limit is None or max(errs) < limit
    RESULTS["checks"].append(dict(name=name, max_rel_err=max(errs), per_step=errs, limit=limit, ok=ok))
    print(f"check {name:34s} max rel err {max(errs):.2e}  limit {limit}  {'OK' if ok else 'FAIL'}")
    return outs


def part1():
    model = flux(4, 64, 2, 2)
    seq = trajectory(model)
    with torch.no_grad():
        eager = [model(**inp)[0] for inp in seq]
    base = {"first_dense_layers": 0}
    # Noise floor: plain Inductor vs eager in bf16 (fusions round differently); exact checks are held to it.
    torch._dynamo.reset()
    plain = torch.compile(model)
    with torch.no_grad():
        floor = max(rel(plain(**inp)[0], e) for inp, e in zip(seq, eager))
    RESULTS["noise_floor_inductor_vs_eager"] = floor
    print(f"noise floor (plain inductor vs eager, bf16): {floor:.2e}")
    limit = 1.5 * floor + 1e-3
    check("dense mode vs eager", model, seq, eager, limit, options={**base, "mode": "dense"})
    check("all selected vs eager", model, seq, eager, limit,
          options={**base, "attn_sparsity": 0.0, "mlp_sparsity": 0.0, "attn_random_fraction": 0.0,
                   "mlp_random_fraction": 0.0})
    default = check("default chipmunk vs eager", model, seq, eager, None, options=base)
    # Option mlp_output_cache_dtype='float32' (the default keeps y_cache in bf16): exact up to bf16 rounding with
    # everything selected; with the default sparsity compared with eager and with the default (bf16-cache) run.
    fp32_cache = {**base, "mlp_output_cache_dtype": "float32"}
    check("all selected, fp32 y_cache vs eager", model, seq, eager, limit,
          options={**fp32_cache, "attn_sparsity": 0.0, "mlp_sparsity": 0.0, "attn_random_fraction": 0.0,
                   "mlp_random_fraction": 0.0})
    check("default, fp32 y_cache vs eager", model, seq, eager, None, options=fp32_cache)
    check("default, fp32 y_cache vs bf16 y_cache", model, seq, default, None, options=fp32_cache)
    from torch._dynamo.utils import counters
    counters.clear()
    check("reduce-overhead vs default chipmunk", model, seq, default, 2e-2, mode="reduce-overhead")
    RESULTS["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
    print("cudagraph skips:", RESULTS["cudagraph_skips"])


@torch.no_grad()
def step_times(fn, inp, steps, warm):
    times = []
    for s in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(**inp)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times[warm:]


@torch.no_grad()
def generation_ms(fn, inp, steps=50):
    """A whole generation's wall time with one synchronisation at the end, as a sampling loop runs (the host
    queues step i+1 while the GPU still runs step i)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(**inp)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def host_syncs(fn, inp):
    """Messages of the host synchronisations one call makes (torch's sync debug mode)."""
    import warnings
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(**inp)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]


def part2(torch_mode=None, extra_options=None):
    """Plain Inductor vs chipmunk, both compiled with the same torch.compile mode (``extra_options``: chipmunk
    options on top of the defaults)."""
    model = flux(24, 128, 2, 4, text_dim=4096)
    inp = inputs(64, 512, text_dim=4096)
    mode_kw = {} if torch_mode is None else {"mode": torch_mode}
    torch._dynamo.reset()
    t0 = time.perf_counter()
    plain = torch.compile(model, **mode_kw)
    dense_ms = statistics.median(step_times(plain, inp, 12, 2))
    compile_plain = time.perf_counter() - t0
    plain_gen = generation_ms(plain, inp)
    torch._dynamo.reset()
    chipmunk_compile.reset()
    t0 = time.perf_counter()
    # A custom backend gets either mode or options: CUDA graphs are asked for through the cudagraphs option.
    ours = torch.compile(model, backend="chipmunk", options={"first_dense_layers": 0, "num_steps": 50,
                                                             "cudagraphs": torch_mode == "reduce-overhead",
                                                             **(extra_options or {})})
    times = step_times(ours, inp, 50, 0)  # a whole generation: step i of the schedule is call i
    compile_ours = time.perf_counter() - t0
    times2 = step_times(ours, inp, 50, 0)  # second generation, everything compiled
    # Third and fourth generations: whole-loop wall time (one sync at the end; plain Inductor's was measured the
    # same way above) and the host synchronisations of every step of the schedule.
    chipmunk_gen = generation_ms(ours, inp)
    syncs = {}
    for step in range(50):
        for msg in host_syncs(ours, inp):
            syncs.setdefault(msg, []).append(step)
    opts = chipmunk_compile.ChipmunkOptions(num_steps=50)
    dense_steps = [t for s, t in enumerate(times2) if opts.attention_dense_at(s) or opts.mlp_dense_at(s)]
    sparse_steps = [t for s, t in enumerate(times2) if not (opts.attention_dense_at(s) or opts.mlp_dense_at(s))]
    row = dict(model="flux-width 3072, 2 double + 4 single, 4096+512 tokens, bf16",
               torch_compile_mode=torch_mode or "default", extra_options=extra_options or {},
               first_dense_layers=0, dense_inductor_ms=dense_ms,
               chipmunk_dense_step_ms=statistics.median(dense_steps),
               chipmunk_sparse_step_ms=statistics.median(sparse_steps),
               chipmunk_schedule_mean_ms=sum(times2) / len(times2),
               schedule_speedup=dense_ms / (sum(times2) / len(times2)),
               sparse_step_speedup=dense_ms / statistics.median(sparse_steps),
               compile_s_plain=compile_plain, first_generation_s_chipmunk=compile_ours,
               generation_ms_inductor=plain_gen, generation_ms_chipmunk=chipmunk_gen,
               generation_speedup=plain_gen / chipmunk_gen,
               host_syncs_per_generation={m: len(v) for m, v in syncs.items()})
    RESULTS["speed"].append(row)
    for k, v in row.items():
        print(f"  {k:32s} {v:.3f}" if isinstance(v, float) else f"  {k:32s} {v}")


def main():
    gpu = torch.cuda.get_device_name()
    RESULTS.update(device=gpu, torch=torch.__version__, triton=triton.__version__)
    speed_only = "--speed-only" in sys.argv   # part 2 in default mode only
    if not speed_only:
        part1()
    part2()
    if not speed_only:
        part2("reduce-overhead")
        part2(None, {"mlp_output_cache_dtype": "float32"})
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()
    with open(os.path.join(out_dir, f"backend_{tag}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()

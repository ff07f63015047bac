"""Whole-generation speed of the chipmunk backend on a full-size FLUX.1 transformer (random weights) vs Inductor.

backend_gpu.py times a FLUX-width model with 6 blocks; this script takes the real depth and shapes, where the
blocks are nearly all of a step and ``first_dense_layers=2`` leaves 55 of 57 layers sparse:
FluxTransformer2DModel with 19 double + 38 single blocks, width 3072 (24 heads of 128), 4096-wide text
embeddings, guidance embedding (FLUX.1-dev), bf16, random weights (speed does not depend on the values: the
kept fractions are fixed). Image 1280x768 (the Chipmunk reference's FLUX setting: 48 x 80 latent patches =
3840 image tokens) + 512 text tokens, 50 steps, batch 1.

For each of plain ``torch.compile`` (Inductor, default mode) and ``backend="chipmunk"`` (default options,
num_steps=50, token_grid set to the latent patch grid): the first generation (compiles), then the wall time of
two more whole generations (one sync at the end, as a sampler loop runs) and the median per-step time.
Prints a table; writes full_size_flux_<gpu>.json to $OUT (or benchmarks/results).
``--profile``: chipmunk only; after a warm-up generation, each call of steps 10-13 of a second one (a dense step,
sparse steps with and without the MLP refresh) under torch.profiler: the top GPU kernels, GPU time by kind and
the host time per call (time for the call to return, GPU still working) against the step's wall time.
``--regional``: both backends compile each repeated block alone (diffusers' ``compile_repeated_blocks``).
Usage: python benchmarks/full_size_flux.py [--steps 50] [--profile] [--regional] [--tiny (CPU smoke test of the script)]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from diffusers import FluxTransformer2DModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chipmunk_compile  # noqa: E402

FULL = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
TINY = dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, in_channels=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def build(config, device, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters created in bf16 directly: no float32 copy of 12B weights
    try:
        with torch.device(device):
            return FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)


def make_inputs(config, grid, text, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h).repeat_interleave(w)
    ids[:, 2] = torch.arange(w).repeat(h)
    return dict(hidden_states=torch.randn(1, h * w, config["in_channels"], generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g).to(device,
                                                                                                     dtype),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
                img_ids=ids.to(device), txt_ids=torch.zeros(text, 3, device=device),
                guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32), return_dict=False)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(fn, inputs, steps, device, per_step=False):
    """One sampler loop (Euler on a linear schedule); returns (wall ms, per-step ms or [], final latents)."""
    x = inputs["hidden_states"]
    step_ms = []
    sync(device)
    t_start = time.perf_counter()
    for s in range(steps):
        t = torch.full((1,), 1.0 - s / steps, device=device, dtype=x.dtype)
        t0 = time.perf_counter()
        v = fn(**dict(inputs, hidden_states=x, timestep=t))[0]
        if per_step:
            sync(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
        x = x - v / steps
    sync(device)
    return (time.perf_counter() - t_start) * 1e3, step_ms, x


def run(name, fn, inputs, steps, device):
    t0 = time.perf_counter()
    _, _, first = generate(fn, inputs, steps, device)
    first_s = time.perf_counter() - t0
    walls = [generate(fn, inputs, steps, device)[0] for _ in range(2)]
    _, step_ms, last = generate(fn, inputs, steps, device, per_step=True)
    row = dict(name=name, first_generation_s=first_s, generation_ms=statistics.median(walls), generations_ms=walls,
               median_step_ms=statistics.median(step_ms), step_ms=step_ms,
               output_finite=bool(torch.isfinite(last).all()), output_std=last.float().std().item())
    print(f"{name}: first generation (compiles) {first_s:.1f} s, generation {row['generation_ms']:.0f} ms, "
          f"median step {row['median_step_ms']:.1f} ms, finite={row['output_finite']}", flush=True)
    return row, last


KINDS = (("chipmunk mlp", ("mlp_mm1", "mlp_mm2", "_select", "block_mean")),
         ("chipmunk attention", ("sparse_attn", "dense_colmass", "dense_attn", "_colsum", "attn_ws", "attn_kernel")),
         ("sdpa / flash", ("flash", "fmha", "attention")), ("cuBLAS gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet")),
         ("inductor fused", ("triton_",)))


def kind_of(name: str) -> str:
    return next((k for k, keys in KINDS if any(key in name for key in keys)), "other")


@torch.no_grad()
def profile_steps(fn, inputs, steps, device, profiled=(10, 11, 12, 13)):
    """Two generations (every call is one step of the schedule): the first times the profiled steps' host and
    wall time, the second runs them under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    report = {s: {} for s in profiled}
    for use_profiler in (False, True):
        x = inputs["hidden_states"]
        for s in range(steps):
            args = dict(inputs, hidden_states=x, timestep=torch.full((1,), 1.0 - s / steps, device=device,
                                                                     dtype=x.dtype))
            if s not in profiled:
                x = x - fn(**args)[0] / steps
            elif not use_profiler:
                sync(device)
                t0 = time.perf_counter()
                v = fn(**args)[0]
                report[s]["host_ms"] = (time.perf_counter() - t0) * 1e3
                sync(device)
                report[s]["wall_ms"] = (time.perf_counter() - t0) * 1e3
                x = x - v / steps
            else:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    v = fn(**args)[0]
                    sync(device)
                x = x - v / steps
                kernels = {}
                for e in prof.key_averages():
                    if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
                        kernels[e.key] = kernels.get(e.key, 0.0) + e.self_device_time_total / 1e3
                by_kind = {}
                for name, ms in kernels.items():
                    by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
                report[s].update(gpu_kernel_ms=sum(kernels.values()), by_kind=by_kind,
                                 top=sorted(kernels.items(), key=lambda kv: -kv[1])[:15])
    for s, r in report.items():
        print(f"--- step {s}: wall {r['wall_ms']:.1f} ms, host (call returns) {r['host_ms']:.1f} ms, GPU kernels "
              f"{r['gpu_kernel_ms']:.1f} ms", flush=True)
        for k, ms in sorted(r["by_kind"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:20s} {ms:8.2f} ms")
        for name, ms in r["top"]:
            print(f"    {ms:8.2f} ms  {name[:110]}")
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="small model on the CPU (checks the script, no speed)")
    p.add_argument("--profile", action="store_true", help="profile chipmunk's steps 10-13 (no Inductor run)")
    p.add_argument("--regional", action="store_true",
                   help="regional compilation (compile_repeated_blocks) for both backends instead of the whole model")
    a = p.parse_args()
    device, dtype = ("cpu", torch.float32) if a.tiny else ("cuda", torch.bfloat16)
    config, grid, text = (TINY, (8, 12), 16) if a.tiny else (FULL, (48, 80), 512)
    model = build(config, device, dtype)
    inputs = make_inputs(config, grid, text, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.2f} B parameters, {grid[0] * grid[1]} image + {text} text tokens", flush=True)
    inner = {"inner_backend": "aot_eager"} if a.tiny else {}
    tiny_blocks = {"attn_query_group": 32, "mlp_token_block": 32, "attn_kv_tile": 16, "mlp_unit_tile": 16} if a.tiny else {}
    rows = []
    if a.profile:
        options = dict(num_steps=a.steps, token_grid=[1, *grid], **inner, **tiny_blocks)
        ours = torch.compile(model, backend="chipmunk", options=options)
        generate(ours, inputs, a.steps, device)
        report = profile_steps(ours, inputs, a.steps, device)
        if not a.tiny:
            from results_io import write_results
            write_results("full_size_flux_profile", dict(options=options, steps=report))
        return
    options = dict(num_steps=a.steps, token_grid=[1, *grid], **inner, **tiny_blocks)
    torch._dynamo.reset()
    if a.regional:  # diffusers' regional compilation: each repeated block compiled alone, with each backend
        plain = build(config, device, dtype)
        plain.load_state_dict(model.state_dict())
        plain.compile_repeated_blocks(**({} if not a.tiny else {"backend": "aot_eager"}))
        ours = model
        ours.compile_repeated_blocks(backend="chipmunk", options=options)
    else:
        plain = torch.compile(model) if not a.tiny else torch.compile(model, backend="aot_eager")
        ours = torch.compile(model, backend="chipmunk", options=options)
    row, plain_out = run("inductor", plain, inputs, a.steps, device)
    rows.append(row)
    if a.regional:
        del plain
    torch._dynamo.reset()
    chipmunk_compile.reset()
    row, ours_out = run("chipmunk", ours, inputs, a.steps, device)
    row["options"] = options
    row["stats"] = chipmunk_compile.stats(model)
    row["rel_diff_vs_inductor_final_latents"] = ((ours_out.float() - plain_out.float()).norm()
                                                 / plain_out.float().norm()).item()
    rows.append(row)
    speedup = rows[0]["generation_ms"] / rows[1]["generation_ms"]
    step_speedup = rows[0]["median_step_ms"] / rows[1]["median_step_ms"]
    summary = dict(model=f"FluxTransformer2DModel {config}, {n_params / 1e9:.2f} B params, random weights, "
                         f"{str(dtype).split('.')[-1]}", tokens=dict(image=grid[0] * grid[1], text=text),
                   steps=a.steps, generation_speedup=speedup, median_step_speedup=step_speedup, runs=rows)
    print(f"\n{'backend':10s} {'generation ms':>14s} {'median step ms':>15s} {'first gen s':>12s}")
    for r in rows:
        print(f"{r['name']:10s} {r['generation_ms']:14.0f} {r['median_step_ms']:15.1f} {r['first_generation_s']:12.1f}")
    print(f"whole generation speedup {speedup:.2f}x, median step {step_speedup:.2f}x; final latents differ from "
          f"Inductor's by {rows[1]['rel_diff_vs_inductor_final_latents']:.3f} (relative)")
    if not a.tiny:
        from results_io import write_results
        write_results("full_size_flux_regional" if a.regional else "full_size_flux", dict(summary, regional=a.regional))


if __name__ == "__main__":
    main()

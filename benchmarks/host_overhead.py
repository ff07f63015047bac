"""Where a whole generation's time goes besides the GPU kernels: host cost per call, Python's garbage collector,
and the token reordering, on a FLUX-width transformer of reduced depth (CUDA).

full_size_flux.py --profile showed sparse steps whose GPU kernels take 87 ms running in 95-160 ms of wall time.
This script measures, on FLUX width (3072, 24 heads of 128, 4096-wide text, guidance embedding, 1280x768 =
3840 image + 512 text tokens, bf16) with ``--double`` + ``--single`` blocks:
  - Inductor and chipmunk (token_grid on): whole-generation wall time, and per call the time for the call to
    return while the GPU still works (host) against the synchronised step time;
  - chipmunk with the garbage collector off during the generation (gc.disable) and after gc.freeze();
  - chipmunk without token_grid (no per-site token permutation);
  - a cProfile of one chipmunk generation (top functions by own time).
Usage: python benchmarks/host_overhead.py [--double 4] [--single 8] [--steps 50]
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chipmunk_compile  # noqa: E402
from full_size_flux import FULL, build, generate, make_inputs, sync  # noqa: E402


@torch.no_grad()
def host_and_step_ms(fn, inputs, steps):
    """Per call: (host ms: until the call returns, step ms: until the GPU is done), over one generation."""
    x = inputs["hidden_states"]
    host, step = [], []
    for s in range(steps):
        t = torch.full((1,), 1.0 - s / steps, device="cuda", dtype=x.dtype)
        sync("cuda")
        t0 = time.perf_counter()
        v = fn(**dict(inputs, hidden_states=x, timestep=t))[0]
        host.append((time.perf_counter() - t0) * 1e3)
        sync("cuda")
        step.append((time.perf_counter() - t0) * 1e3)
        x = x - v / steps
    return host, step


def measure(name, fn, inputs, steps, rows):
    t0 = time.perf_counter()
    generate(fn, inputs, steps, "cuda")
    first_s = time.perf_counter() - t0
    gens = [generate(fn, inputs, steps, "cuda")[0] for _ in range(2)]
    host, step = host_and_step_ms(fn, inputs, steps)
    gc.disable()
    try:
        gens_nogc = [generate(fn, inputs, steps, "cuda")[0] for _ in range(2)]
    finally:
        gc.enable()
    row = dict(name=name, first_generation_s=first_s, generation_ms=statistics.median(gens),
               generation_ms_gc_disabled=statistics.median(gens_nogc), host_ms_median=statistics.median(host),
               host_ms_max=max(host), step_ms_median=statistics.median(step), host_ms=host, step_ms=step)
    rows.append(row)
    print(f"{name}: generation {row['generation_ms']:.0f} ms (gc off {row['generation_ms_gc_disabled']:.0f}), "
          f"host per call median {row['host_ms_median']:.1f} max {row['host_ms_max']:.1f} ms, "
          f"step median {row['step_ms_median']:.1f} ms", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=4)
    p.add_argument("--single", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    config = dict(FULL, num_layers=a.double, num_single_layers=a.single)
    grid, text = (48, 80), 512
    model = build(config, "cuda", torch.bfloat16)
    inputs = make_inputs(config, grid, text, "cuda", torch.bfloat16)
    rows = []
    torch._dynamo.reset()
    measure("inductor", torch.compile(model), inputs, a.steps, rows)
    for label, options in (("chipmunk token_grid", dict(num_steps=a.steps, token_grid=[1, *grid])),
                           ("chipmunk raster", dict(num_steps=a.steps))):
        torch._dynamo.reset()
        chipmunk_compile.reset()
        ours = torch.compile(model, backend="chipmunk", options=options)
        measure(label, ours, inputs, a.steps, rows)
        if label == "chipmunk token_grid":
            gc.collect()
            gc.freeze()
            t = [generate(ours, inputs, a.steps, "cuda")[0] for _ in range(2)]
            gc.unfreeze()
            rows[-1]["generation_ms_after_gc_freeze"] = statistics.median(t)
            print(f"  after gc.freeze(): generation {statistics.median(t):.0f} ms", flush=True)
            prof = cProfile.Profile()
            prof.enable()
            generate(ours, inputs, a.steps, "cuda")
            prof.disable()
            text_out = io.StringIO()
            pstats.Stats(prof, stream=text_out).sort_stats("tottime").print_stats(30)
            rows[-1]["cprofile_top"] = text_out.getvalue()
            print(text_out.getvalue()[-6000:], flush=True)
    print(f"\n{'run':22s} {'gen ms':>8s} {'gc off':>8s} {'host/call':>10s} {'step':>8s}")
    for r in rows:
        print(f"{r['name']:22s} {r['generation_ms']:8.0f} {r['generation_ms_gc_disabled']:8.0f} "
              f"{r['host_ms_median']:10.1f} {r['step_ms_median']:8.1f}")
    from results_io import write_results
    write_results("host_overhead", dict(model=f"FluxTransformer2DModel {config}", steps=a.steps, runs=rows))


if __name__ == "__main__":
    main()

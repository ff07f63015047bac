"""Profiles one dense and one sparse step of the chipmunk backend on a FLUX-width transformer (CUDA).

Prints the top CUDA kernels and the top CPU-side ops by self time for each step kind, so the overhead of the
delta-cache ops over plain Inductor can be attributed. ``--host``: instead, the host (Python) cost per step of
plain Inductor and of chipmunk (time for a call to return while the GPU still works) and a cProfile of a whole
chipmunk generation. Usage: python benchmarks/profile_backend.py [--host]
"""
from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import chipmunk_compile
from backend_gpu import flux, inputs, step_times


def warm_plain_model():
    """The FLUX-width benchmark model, its inputs and a warmed-up plain Inductor compile of it."""
    model = flux(24, 128, 2, 4, text_dim=4096)
    inp = inputs(64, 512, text_dim=4096)
    plain = torch.compile(model)
    step_times(plain, inp, 3, 0)
    return model, inp, plain


@torch.no_grad()
def main():
    model, inp, plain = warm_plain_model()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        plain(**inp)
        torch.cuda.synchronize()
    print("=== plain inductor step")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    torch._dynamo.reset()
    ours = torch.compile(model, backend="chipmunk", options={"first_dense_layers": 0, "num_steps": 50})
    step_times(ours, inp, 50, 0)          # one whole generation (compile, autotune)
    step_times(ours, inp, 12, 0)          # steps 0..11 of the next one
    for label in ("sparse step 12 (mlp refresh)", "sparse step 13"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ours(**inp)
            torch.cuda.synchronize()
        print(f"=== chipmunk {label}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    step_times(ours, inp, 50 - 14 - 0, 0)  # finish the generation: next call is step 0
    step_times(ours, inp, 10, 0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours(**inp)                        # step 10: dense attention with selection, dense MLP
        torch.cuda.synchronize()
    print("=== chipmunk dense step 10")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18))


@torch.no_grad()
def launch_ms(fn, inp, steps):
    """Host time per call: how long each call takes to return (the GPU queue is drained before each call, so
    the host never waits for queue space)."""
    out = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(**inp)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@torch.no_grad()
def host():
    model, inp, plain = warm_plain_model()
    print(f"plain inductor host ms per step: {statistics.median(launch_ms(plain, inp, 20)):.2f}")
    torch._dynamo.reset()
    ours = torch.compile(model, backend="chipmunk", options={"first_dense_layers": 0, "num_steps": 50})
    step_times(ours, inp, 50, 0)
    times = launch_ms(ours, inp, 50)
    opts = chipmunk_compile.ChipmunkOptions(num_steps=50)
    sparse = [t for s, t in enumerate(times) if not (opts.attention_dense_at(s) or opts.mlp_dense_at(s))]
    dense = [t for s, t in enumerate(times) if opts.attention_dense_at(s) or opts.mlp_dense_at(s)]
    print(f"chipmunk host ms per step: sparse {statistics.median(sparse):.2f}, dense {statistics.median(dense):.2f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        ours(**inp)
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    host() if "--host" in sys.argv else main()

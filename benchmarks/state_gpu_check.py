"""Model state on a CUDA GPU: offloading keeps a model's graph and caches, deleting it frees them.

A small Flux transformer (bf16, random weights) compiled with the chipmunk backend (default options, Triton
kernels) runs a 12-step generation; then
  1. the same generation again after `model.to("cpu").to("cuda")` between two steps (what CPU-offload hooks do):
     outputs must equal the run without the move, and no new graph (runtime) may be built;
  2. `del` of the model and its compiled wrapper: the CUDA memory its caches held must be freed.
Prints a table; writes state_gpu_check_<gpu>.json to $OUT or benchmarks/results.
"""
from __future__ import annotations

import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backend_gpu import flux, inputs, rel  # noqa: E402
from results_io import write_results  # noqa: E402

import chipmunk_compile  # noqa: E402
from chipmunk_compile import runtime  # noqa: E402

STEPS = 12


@torch.no_grad()
def main():
    rows = []

    def row(what, value, ok):
        rows.append(dict(check=what, value=value, ok=bool(ok)))
        print(f"{what:70s} {value!s:>22s}  {'ok' if ok else 'FAILED'}", flush=True)

    model = flux(8, 64, 2, 2)
    opts = {"num_steps": STEPS, "first_dense_layers": 0}
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    seq = []
    for s in range(STEPS):
        x = inputs(32, 64, seed=s)
        x["timestep"] = torch.full((1,), 1.0 - s / STEPS, device="cuda", dtype=torch.bfloat16)
        seq.append(x)
    first = [compiled(**x)[0].clone() for x in seq]
    before = {rt.id for rt in runtime.live_runtimes()}
    moved = []
    for s, x in enumerate(seq):
        if s in (3, 7):
            model.to("cpu").to("cuda")
        moved.append(compiled(**x)[0].clone())
    new = [rt for rt in runtime.live_runtimes() if rt.id not in before]
    err = max(rel(a, b) for a, b in zip(moved, first))
    row("offload between steps: max rel. difference to the unmoved run", f"{err:.2e}", err < 1e-3)  # (atomics: not bitwise)
    row("offload between steps: graphs built anew", len(new), not new)
    plans = chipmunk_compile.stats(model)[0]["plans"]
    row("offload: sparse plans ran", {k: v for k, v in plans.items() if "sparse" in k}, any("sparse" in k for k in plans))
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    cache = sum(s["cache_mib"] for s in chipmunk_compile.stats(model)) * 2**20
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ids = {rt.id for rt in runtime.live_runtimes()}
    del compiled, model, first, moved
    gc.collect()
    torch.cuda.synchronize()
    freed = held - torch.cuda.memory_allocated()
    row("del model: runtimes left alive", len(ids & {rt.id for rt in runtime.live_runtimes()}),
        not ids & {rt.id for rt in runtime.live_runtimes()})
    row("del model: MiB freed (weights + caches expected)",
        f"{freed / 2**20:.1f} ({weights / 2**20:.1f} + {cache / 2**20:.1f})", freed >= weights + 0.9 * cache)
    write_results("state_gpu_check", dict(rows=rows))
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

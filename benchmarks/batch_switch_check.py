"""The kernels' cached launches on a CUDA GPU when the batch size changes at fixed shapes and strides.

Each kernel launch is cached by its arguments (``kernels/launch.py``); a batch size that the kernel sees only
through its grid must not reuse another batch size's grid. Runs the sparse attention (Gluon on Hopper, else
Triton), the sparse MLP update (mm1 + mm2) and the selection kernel with B = 1, 2, 1, 2 at otherwise equal shapes,
each against the torch reference on the same inputs (outputs poisoned with NaN beforehand), and prints the
relative errors. Writes batch_switch_check_<gpu>.json to $OUT or benchmarks/results.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402

from chipmunk_compile.kernels import attention_reference, attention_sparse_triton  # noqa: E402
from chipmunk_compile.kernels import mlp_reference, mlp_sparse_triton, selection_reference, selection_triton  # noqa: E402


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def check(B: int, seed: int) -> dict:
    dev, dt = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)  # CPU: interpreter dry run
    g = torch.Generator(device=dev).manual_seed(seed)
    H, N, D, group, kept = (4, 1152, 128, 192, 256) if dev == "cuda" else (1, 384, 64, 192, 64)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
    groups = N // group
    indices = torch.argsort(torch.rand(B, H, groups, N, device=dev, generator=g), dim=-1)[..., :kept].int()
    base = torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g)
    out = torch.full_like(base, float("nan"))
    attention_sparse_triton.sparse_attention_delta(q, k, v, 0.088, indices, group, base, 1.0, out=out)
    ref = attention_reference.sparse_attention_delta(q.double(), k.double(), v.double(), 0.088, indices, group,
                                                     base.double(), 1.0)
    attention = rel(out, ref)

    C, F, T, units = (256, 1024, 128, 256) if dev == "cuda" else (64, 128, 128, 32)
    x = torch.randn(B, N, C, device=dev, dtype=dt, generator=g)
    w1 = torch.randn(F, C, device=dev, dtype=dt, generator=g) / C ** 0.5
    b1 = torch.randn(F, device=dev, dtype=dt, generator=g)
    w2 = torch.randn(C, F, device=dev, dtype=dt, generator=g) / F ** 0.5
    unit_idx = torch.argsort(torch.rand(B, N // T, F, device=dev, generator=g), dim=-1)[..., :units].int()
    a = torch.randn(B, F, N, device=dev, dtype=dt, generator=g).transpose(1, 2)  # unit-major, as the op keeps it
    y = torch.randn(B, N, C, device=dev, dtype=dt, generator=g)
    a_ref, y_ref = a.double(), y.double()
    mlp_out = torch.full((B, N, C), float("nan"), device=dev, dtype=dt)
    mlp_sparse_triton.sparse_mlp_update(x, w1, b1, None, None, w2.t().contiguous().t(), "gelu_tanh", unit_idx, a, y,
                                        T, out=mlp_out)
    mlp_reference.sparse_mlp_update(x.double(), w1.double(), b1.double(), None, None, w2.double(), "gelu_tanh",
                                    unit_idx, a_ref, y_ref, T)
    mlp = max(rel(mlp_out, y_ref), rel(a, a_ref))

    scores = torch.rand(B, H, groups, N, device=dev, generator=g)
    picked = torch.full((B, H, groups, kept), -1, dtype=torch.int32, device=dev)
    selection_triton.select_topk_with_random(scores, kept, 0, None, None, out=picked)
    expected = selection_reference.select_topk_with_random(scores, kept, 0, None, None)
    same = bool(torch.equal(picked.sort(-1).values.long(), expected.sort(-1).values.long()))
    return dict(batch=B, attention_rel_err=attention, mlp_rel_err=mlp, selection_equal=same)


def main():
    rows = [check(B, seed) for seed, B in enumerate((1, 2, 1, 2))]
    print(f"{'batch':>5s} {'attention':>10s} {'mlp':>10s} {'selection':>10s}")
    for r in rows:
        print(f"{r['batch']:5d} {r['attention_rel_err']:10.2e} {r['mlp_rel_err']:10.2e} {str(r['selection_equal']):>10s}")
    ok = all(r["attention_rel_err"] < 2e-2 and r["mlp_rel_err"] < 2e-2 and r["selection_equal"] for r in rows)
    print("PASS" if ok else "FAIL")
    write_results("batch_switch_check", dict(rows=rows, passed=ok))


if __name__ == "__main__":
    main()

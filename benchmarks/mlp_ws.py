"""GPU check and timing of the warp-specialised (Gluon) sparse MLP down-projection (mm2) against the Triton one.

The Gluon mm2 is opt-in (``sparse_mlp_update(..., kernel="gluon")``): on H100 it measured within +-6 % of the
Triton kernel (mlp_ws_*.json), so the default stays Triton.

Correctness: y_cache after mm2 on mm1's packed deltas, Gluon vs the Triton kernel and vs the float32 torch
reference (ragged last token block, unit lists of 320). Timing (do_bench medians, same process, random data):
mm2 alone, Triton vs Gluon configurations, FLUX-width MLP 3072 -> 12288 -> 3072 at N4608 / N16896 and 70 / 90 %
sparsity, with the ideal share of the dense down-projection. Writes mlp_ws_<gpu>.json to $OUT or
benchmarks/results. Usage: python benchmarks/mlp_ws.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import kept, ms, rel_err  # noqa: E402  (benchmarks/kernels.py helpers)
from results_io import write_results  # noqa: E402

from chipmunk_compile.kernels import mlp_mm2_gluon as ws  # noqa: E402
from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr  # noqa: E402

DEV, BF16, T = "cuda", torch.bfloat16, 128


def mm2(x, w1, b1, w2t, idx, a, y, delta, kernel, config=None):
    if config:
        saved = dict(ws._CONFIG)
        ws._CONFIG.update(config)
    try:
        mlp_tr._launch(x, w1, b1, None, None, w2t, "gelu_tanh", idx, a, y, T, None, run_mm1=False, delta=delta,
                       kernel=kernel)
    finally:
        if config:
            ws._CONFIG.clear()
            ws._CONFIG.update(saved)


def main():
    gpu = torch.cuda.get_device_name()
    print(f"device {gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    results = dict(device=gpu, torch=torch.__version__, triton=triton.__version__, rows=[], correctness_rel_err={})
    configs = [{}, dict(PIPELINE=False), dict(BLOCK_D=128, CONSUMER_REGS=152), dict(NUM_STAGES=3)]

    torch.manual_seed(0)
    B, N, C, Fh = 2, 1000, 256, 1024
    x = torch.randn(B, N, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
    nb = -(-N // T)
    idx = torch.rand(B * nb, Fh, device=DEV).topk(kept(Fh, 0.7), dim=-1).indices.view(B, nb, -1)
    a0 = torch.randn(B, N, Fh, device=DEV, dtype=BF16)
    y0 = torch.randn(B, N, C, device=DEV)
    a_ref, y_ref = a0.float(), y0.clone()
    mlp_ref.sparse_mlp_update(x.float(), w1.float(), b1.float(), None, None, w2.float(), "gelu_tanh", idx, a_ref,
                              y_ref, T)
    w2t = w2.t().contiguous().t()
    a = a0.clone()
    delta = mlp_tr._launch(x, w1, b1, None, None, w2t, "gelu_tanh", idx, a, y0.clone(), T, None, run_mm2=False)
    assert ws.supports(delta, w2t, y0, T) is None, ws.supports(delta, w2t, y0, T)
    for cfg in [None] + configs:
        y = y0.clone()
        mm2(x, w1, b1, w2t, idx, a, y, delta, "triton" if cfg is None else "gluon", cfg)
        name = "triton" if cfg is None else (",".join(f"{k}={v}" for k, v in cfg.items()) or "gluon default")
        results["correctness_rel_err"][name] = err = rel_err(y - y0, y_ref - y0)
        print(f"check mm2 {name:40s} rel err vs reference {err:.2e}", flush=True)
        assert err < 2e-2, name

    for N in (4608, 16896):
        torch.manual_seed(1)
        C, Fh = 3072, 12288
        x = torch.randn(1, N, C, device=DEV, dtype=BF16)
        w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
        w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
        h = F.gelu(F.linear(x, w1, b1), approximate="tanh")
        dense_mm2 = ms(lambda: F.linear(h, w2), False)
        w2t = w2.t().contiguous().t()
        a = h[0].t().contiguous().unsqueeze(0).transpose(1, 2)
        y = torch.zeros(1, N, C, device=DEV)
        nb = N // T
        for sp in (0.7, 0.9):
            k = kept(Fh, sp, 256)
            idx = torch.rand(nb, Fh, device=DEV).topk(k, dim=-1, sorted=False).indices.unsqueeze(0)
            delta = mlp_tr._launch(x, w1, b1, None, None, w2t, "gelu_tanh", idx, a, y, T, None, run_mm2=False)
            tri = ms(lambda: mm2(x, w1, b1, w2t, idx, a, y, delta, "triton"), False)
            row = dict(shape=f"N{N} {C}-{Fh}-{C}", sparsity=sp, units=k, dense_mm2_ms=dense_mm2,
                       ideal_ms=dense_mm2 * k / Fh, triton_ms=tri, gluon={})
            for cfg in configs:
                name = ",".join(f"{a_}={b_}" for a_, b_ in cfg.items()) or "default"
                row["gluon"][name] = ms(lambda: mm2(x, w1, b1, w2t, idx, a, y, delta, "gluon", cfg), False)
            best = min(row["gluon"].values())
            row.update(gluon_ms=best, fraction_of_ideal=row["ideal_ms"] / best, triton_fraction=row["ideal_ms"] / tri)
            results["rows"].append(row)
            cfgs = " ".join(f"{n}:{t:.3f}" for n, t in row["gluon"].items())
            print(f"mm2 {row['shape']:22s} {sp:.1f} dense {dense_mm2:.3f} ideal {row['ideal_ms']:.3f} triton {tri:.3f} "
                  f"gluon {best:.3f} ({row['fraction_of_ideal']:.2f} of ideal) | {cfgs}", flush=True)
    write_results("mlp_ws", results)


if __name__ == "__main__":
    main()

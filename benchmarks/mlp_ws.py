"""GPU check and timing of the persistent ping-pong Gluon mm2 (``kernels/mlp_mm2_gluon.py``) against the Triton mm2.

Correctness: y_cache (bf16 with the op's output, and float32) after mm2 on mm1's packed deltas, Gluon vs the
Triton kernel and vs the float32 torch reference (batch 2, ragged last token block); every config below.
Timing (CUDA-graph replays: GPU time, medians, same process, random data): mm2 alone with the op's output (as
the op runs it), Triton (autotuned) vs each Gluon configuration, bf16 and float32 y_cache, FLUX-width MLP
3072 -> 12288 -> 3072 at N4608 / N16896 and 70 / 90 % sparsity, beside cuBLAS for mm2's FLOPs. Writes
mlp_ws_<gpu>.json to $OUT or benchmarks/results. Usage: python benchmarks/mlp_ws.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import graph_ms, kept, rel_err  # noqa: E402  (benchmarks/kernels.py helpers)
from results_io import write_results  # noqa: E402

from chipmunk_compile.kernels import mlp_mm2_gluon as ws  # noqa: E402
from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr  # noqa: E402

DEV, BF16, T = "cuda", torch.bfloat16, 128
CONFIGS = [{}, dict(BLOCK_M=64, BLOCK_D=256, NUM_STAGES=5), dict(BLOCK_M=64, BLOCK_D=256, NUM_STAGES=4),
           dict(BLOCK_M=64, BLOCK_D=128, NUM_STAGES=6)]


def cfg_name(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def mm2(x, w1, b1, w2t, idx, a, y, delta, out, kernel, config=None):
    saved = dict(ws._CONFIG)
    ws._CONFIG.update(config or {})
    try:
        mlp_tr._launch(x, w1, b1, None, None, w2t, "gelu_tanh", idx, a, y, T, None, run_mm1=False, delta=delta,
                       kernel=kernel, out=out)
    finally:
        ws._CONFIG.clear()
        ws._CONFIG.update(saved)


def check(results):
    torch.manual_seed(0)
    B, N, C, Fh = 2, 1000, 256, 1024
    x = torch.randn(B, N, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
    nb = -(-N // T)
    idx = torch.rand(B * nb, Fh, device=DEV).topk(kept(Fh, 0.7), dim=-1).indices.view(B, nb, -1)
    a0 = torch.randn(B, N, Fh, device=DEV, dtype=BF16)
    w2t = w2.t().contiguous().t()
    for y_dtype in (BF16, torch.float32):
        y0 = torch.randn(B, N, C, device=DEV).to(y_dtype)
        a_ref, y_ref = a0.float(), y0.float().clone()  # (clone: .float() of a float32 y0 is y0 itself)
        mlp_ref.sparse_mlp_update(x.float(), w1.float(), b1.float(), None, None, w2.float(), "gelu_tanh", idx, a_ref,
                                  y_ref, T)
        delta = mlp_tr._launch(x, w1, b1, None, None, w2t, "gelu_tanh", idx, a0.clone(), y0.clone(), T, None,
                               run_mm2=False)
        assert ws.supports(delta, w2t, y0, T) is None, ws.supports(delta, w2t, y0, T)
        y_tri, out_tri = y0.clone(), torch.full((B, N, C), float("nan"), device=DEV, dtype=BF16)
        mm2(x, w1, b1, w2t, idx, a0, y_tri, delta, out_tri, "triton")
        for cfg in CONFIGS:
            y, out = y0.clone(), torch.full((B, N, C), float("nan"), device=DEV, dtype=BF16)
            mm2(x, w1, b1, w2t, idx, a0, y, delta, out, "gluon", cfg)
            name = f"y {str(y_dtype)[6:]} {cfg_name(cfg)}"
            errs = dict(vs_reference=rel_err(y.float() - y0.float(), y_ref - y0.float()),
                        vs_triton=rel_err(y.float(), y_tri.float()),
                        out_equals_y=bool(torch.equal(out, y.to(BF16))),
                        triton_vs_reference=rel_err(y_tri.float() - y0.float(), y_ref - y0.float()))
            results["correctness"][name] = errs
            print(f"check mm2 gluon {name:40s} {errs}", flush=True)
            assert errs["vs_reference"] < 2e-2 and errs["vs_triton"] < 1e-2 and errs["out_equals_y"], name


def main():
    results = dict(rows=[], correctness={})
    check(results)
    for N in (4608, 16896):
        torch.manual_seed(1)
        C, Fh = 3072, 12288
        x = torch.randn(1, N, C, device=DEV, dtype=BF16)
        w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
        w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
        h = F.gelu(F.linear(x, w1, b1), approximate="tanh")
        w2t = w2.t().contiguous().t()
        a = h[0].t().contiguous().unsqueeze(0).transpose(1, 2)
        out = torch.empty(1, N, C, device=DEV, dtype=BF16)
        nb = N // T
        for sp in (0.7, 0.9):
            k = kept(Fh, sp, 256)
            idx = torch.stack([torch.randperm(Fh, device=DEV)[:k].sort().values for _ in range(nb)]).unsqueeze(0)
            cublas = graph_ms(lambda: F.linear(h[..., :k], w2[:, :k]), False)
            for y_dtype in (BF16,):  # the default cache dtype (float32 is checked above)
                y = torch.zeros(1, N, C, device=DEV, dtype=y_dtype)
                delta = mlp_tr._launch(x, w1, b1, None, None, w2t, "gelu_tanh", idx, a, y, T, None, run_mm2=False)
                tri = graph_ms(lambda: mm2(x, w1, b1, w2t, idx, a, y, delta, out, "triton"), False)
                row = dict(shape=f"N{N} {C}-{Fh}-{C}", sparsity=sp, units=k, y_cache=str(y_dtype)[6:],
                           cublas_same_flops_ms=cublas, triton_ms=tri, triton_config=str(mlp_tr._mm2_tuned.best_config),
                           gluon={})
                for cfg in CONFIGS:
                    try:
                        row["gluon"][cfg_name(cfg)] = graph_ms(
                            lambda: mm2(x, w1, b1, w2t, idx, a, y, delta, out, "gluon", cfg), False)
                    except Exception as e:  # noqa: BLE001
                        row["gluon"][cfg_name(cfg)] = f"FAILED {type(e).__name__}: {str(e)[:100]}"
                times = [t for t in row["gluon"].values() if isinstance(t, float)]
                row.update(gluon_ms=min(times), speedup_vs_triton=tri / min(times))
                results["rows"].append(row)
                cfgs = " ".join(f"{n}:{t:.3f}" if isinstance(t, float) else f"{n}:{t}" for n, t in row["gluon"].items())
                print(f"mm2 N{N} {sp:.1f} y {row['y_cache']:8s} cuBLAS(same FLOPs) {cublas:.3f} triton {tri:.3f} "
                      f"gluon {min(times):.3f} ({tri / min(times):.2f}x) | {cfgs}", flush=True)
    write_results("mlp_ws", results)


if __name__ == "__main__":
    main()

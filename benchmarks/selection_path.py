"""The MLP refresh's selection path, piece by piece (CUDA only; H100 experiments).

A refresh step runs, before its two sparse GEMMs: block means of x, the nb-row scoring GEMM (together
``block_mean_preactivation``), the noise draw and the selection kernel. This times each piece as a CUDA-graph
replay (GPU time, medians; every replay also pays ~5 us of graph launch) at the MLP shapes of
``benchmarks/kernels.py`` (N4608 / N16896, 3072 -> 12288, bf16):

- block means (float32 mean + cast), the scoring GEMM (cuBLAS), ``block_mean_preactivation``, the noise draw;
- the selection kernel per warps x store-pass chunk (entries per thread), sets checked against the first
  variant's (same noise), as ``selection_triton._launch_shape`` picks them from;
- the whole refresh path as the op runs it (``mlp_op.refresh_indices``).
A Triton block-means kernel and a Triton scoring GEMM were timed here too (commit 0eee61c, results in
``results/selection_path_*.json``): equal at N4608, slower at N16896 (means 0.057 vs 0.053 ms, GEMM 0.062 vs
0.043 ms), so the op keeps torch / cuBLAS for them.
Usage: python benchmarks/selection_path.py [--shapes 4608:0.7,16896:0.9]   (prints a table, writes JSON)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import graph_ms, kept  # noqa: E402
from results_io import write_results  # noqa: E402

from chipmunk_compile.kernels import mlp_op  # noqa: E402
from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import selection_triton as sel_tr  # noqa: E402

DEV, BF16, T = "cuda", torch.bfloat16, 128
ROWS: list[dict] = []


def rec(shape, what, t, **extra):
    ROWS.append(dict(shape=shape, what=what, ms=t, **extra))
    print(f"{shape:14s} {what:72s} {t:8.4f} ms {extra if extra else ''}", flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bench(N, sp, C=3072, Fh=12288):
    torch.manual_seed(3)
    shape = f"N{N} sp{sp}"
    x = torch.randn(1, N, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    nb = N // T
    k = kept(Fh, sp, 256)
    n_rand = min(k, -(-Fh // 20))
    hbar_cache = torch.randn(1, nb, Fh, device=DEV)
    hbar0 = hbar_cache.clone()

    # ---- block means and the scoring GEMM (torch, as the op runs them)
    rec(shape, "means: torch mean(f32) + cast", graph_ms(
        lambda: x.reshape(1, nb, T, C).mean(dim=2, dtype=torch.float32).to(BF16), False))
    means = x.reshape(1, nb, T, C).mean(dim=2, dtype=torch.float32).to(BF16)[0]
    rec(shape, "gemm: cuBLAS F.linear(means, W1, b1)", graph_ms(lambda: F.linear(means, w1, b1), False))
    exact = mlp_ref.block_mean_preactivation(x.double(), w1.double(), b1.double(), None, None, T)
    hbar_new = mlp_ref.block_mean_preactivation(x, w1, b1, None, None, T, weight_dtype_out=True)
    rec(shape, "block_mean_preactivation (means + GEMM)", graph_ms(
        lambda: mlp_ref.block_mean_preactivation(x, w1, b1, None, None, T, True), False),
        err_vs_fp64=rel(hbar_new, exact))

    # ---- noise and the selection kernel
    noise = torch.empty(nb, Fh, device=DEV)
    rec(shape, "noise: uniform_", graph_ms(lambda: noise.uniform_(), False))
    rec(shape, "restore copy of the references (subtracted below)", graph_ms(lambda: hbar_cache.copy_(hbar0), False))
    restore = ROWS[-1]["ms"]
    idx = torch.empty(1, nb, k, device=DEV, dtype=torch.int64)

    def select(warps, per_thread):
        sel_tr.NUM_WARPS, sel_tr.STORE_ENTRIES_PER_THREAD = warps, per_thread
        hbar_cache.copy_(hbar0)
        sel_tr.mlp_refresh_selection(hbar_new, hbar_cache, Fh, k - n_rand, n_rand, None, out=idx)

    def sets():
        return [frozenset(r.tolist()) for r in idx[0].cpu()]

    first = None
    for warps in (16, 32, 8):
        for per_thread in (1, 2, 4, 8, 32):
            if warps * 32 * per_thread > 16384:
                continue
            torch.manual_seed(11)  # the same noise draw (default generator) for every variant
            select(warps, per_thread)
            got = sets()
            first = first or got
            t = graph_ms(lambda: select(warps, per_thread), False) - restore
            rec(shape, f"select kernel w{warps} store chunk {per_thread}/thread", t,
                rows_equal_to_first=sum(a == b for a, b in zip(got, first)), rows=nb)
    sel_tr.NUM_WARPS, sel_tr.STORE_ENTRIES_PER_THREAD = None, None
    rec(shape, f"select kernel as shipped {sel_tr._launch_shape(nb, 16384, x.device)} (warps, chunk)",
        graph_ms(lambda: (hbar_cache.copy_(hbar0), sel_tr.mlp_refresh_selection(
            hbar_new, hbar_cache, Fh, k - n_rand, n_rand, None, out=idx)), False) - restore)

    # ---- the refresh path as the op runs it
    def path():
        hbar_cache.copy_(hbar0)
        mlp_op.refresh_indices(x, w1, b1, None, None, hbar_cache, idx, k - n_rand, n_rand, T, None, "auto")
    rec(shape, "refresh path (means + GEMM + noise + kernel)", graph_ms(path, False) - restore)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4608:0.7,4608:0.9,16896:0.7,16896:0.9")
    args = parser.parse_args()
    for item in args.shapes.split(","):
        n, sp = item.split(":")
        bench(int(n), float(sp))
    write_results("selection_path", dict(rows=ROWS))


if __name__ == "__main__":
    main()

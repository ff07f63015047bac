"""Is the sparse MLP step bound by its gathered weight traffic? Times it with and without weight reuse.

Each token block gathers its own kept units' weight rows, W1[S] (K x C) for mm1 and W2^T[S] (K x Dout) for
mm2, so without reuse between blocks one sparse step moves about nb * K * (C + Dout) * 2 bytes of weights
(~128 FLOP per byte at 128-token blocks, under the H100's ~300 FLOP/B ridge), against 2 * |W| for the dense MLP.

For N in (4608, 16896), sparsity 70 / 90 % and token blocks of 128 / 256 it times (do_bench medians, same
process, random data) the dense torch MLP and the two sparse GEMMs with (a) an independent random unit list per
block (the benchmark's case) and (b) the same list for every block (every gathered row an L2 hit after the
first block), and prints the no-reuse weight bytes, the HBM time they would need at the measured copy
bandwidth, and the speedup bound that would leave. Measured on H100 (mlp_roofline_*.json): the GEMMs beat that
no-reuse HBM time, the shared list is only 2-10 % faster and 256-token blocks change nothing, so L2 absorbs the
gathers and the GEMMs are limited by their own efficiency (~70 % of the dense GEMM's rate), not by HBM.
Writes mlp_roofline_<gpu>.json to $OUT or benchmarks/results. Usage: python benchmarks/mlp_roofline.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402

DEV, BF16 = "cuda", torch.bfloat16


def ms(fn):
    fn()
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    gpu = torch.cuda.get_device_name()
    print(f"device {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    big = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV)
    copy_gbps = 2 * big.numel() / ms(lambda: big.clone()) / 1e6  # read + write, GB/s
    del big
    C, Fh = 3072, 12288
    rows = []
    print(f"copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'N':>6} {'sp':>4} {'blk':>4} {'units':>6} {'gathered GB':>11} {'HBM ms':>7} {'dense ms':>8} "
          f"{'gemms ms':>8} {'same-list ms':>12} {'speedup':>7} {'bound':>6}")
    for N in (4608, 16896):
        torch.manual_seed(0)
        x = torch.randn(1, N, C, device=DEV, dtype=BF16)
        w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
        w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
        dense = ms(lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2))
        w2_t = w2.t().contiguous().t()
        a_cache = F.gelu(F.linear(x, w1, b1), approximate="tanh")[0].t().contiguous().unsqueeze(0).transpose(1, 2)
        y_cache = torch.zeros(1, N, C, device=DEV)
        for sp in (0.7, 0.9):
            k = max(256, round((1 - sp) * Fh / 256) * 256)
            for block in (128, 256):
                nb = N // block
                rand = torch.rand(nb, Fh, device=DEV).topk(k, dim=-1, sorted=False).indices.unsqueeze(0)
                same = rand[:, :1].expand(1, nb, k).contiguous()
                run = lambda idx: mlp_tr.sparse_mlp_update(x, w1, b1, None, None, w2_t, "gelu_tanh",  # noqa: E731
                                                           idx, a_cache, y_cache, block)
                t_rand, t_same = ms(lambda: run(rand)), ms(lambda: run(same))
                gathered = nb * k * (C + C) * 2
                hbm_ms = gathered / copy_gbps / 1e6
                row = dict(N=N, sparsity=sp, token_block=block, units=k, gathered_bytes=gathered, hbm_ms=hbm_ms,
                           dense_ms=dense, gemms_ms=t_rand, gemms_same_list_ms=t_same, speedup=dense / t_rand,
                           speedup_same_list=dense / t_same, bound_without_reuse=dense / max(hbm_ms, dense * k / Fh))
                rows.append(row)
                print(f"{N:6d} {sp:4.1f} {block:4d} {k:6d} {gathered / 1e9:11.2f} {hbm_ms:7.3f} {dense:8.3f} "
                      f"{t_rand:8.3f} {t_same:12.3f} {row['speedup']:6.2f}x {row['bound_without_reuse']:5.2f}x",
                      flush=True)
    write_results("mlp_roofline", dict(copy_gbps=copy_gbps, rows=rows))


if __name__ == "__main__":
    main()

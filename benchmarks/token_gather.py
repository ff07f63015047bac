"""How fast the token reordering's gathers run in each memory layout (CUDA).

With token_grid, every rewritten site gathers its queries / inputs into tile order and its output back
(full_size_flux.py --profile: ~7 ms of a 95 ms FLUX step). This times, at FLUX 1280x768 shapes (4352 tokens,
24 heads of 128, width 3072, bf16), index_select and indexing in the layouts the graph hands over, and names the
CUDA kernel each one launches. Prints a table; writes token_gather_<gpu>.json.
Usage: python benchmarks/token_gather.py
"""
from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402


def kernel_names(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key[:90] for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA})


def main():
    B, H, N, D, C = 1, 24, 4352, 128, 3072
    dev, dt = "cuda", torch.bfloat16
    perm = torch.randperm(N, device=dev)
    q_strided = torch.randn(B, N, H, D, device=dev, dtype=dt).transpose(1, 2)  # [B, H, N, D] view, token-major
    o_contig = torch.randn(B, H, N, D, device=dev, dtype=dt)
    x = torch.randn(B, N, C, device=dev, dtype=dt)
    cases = {
        "q strided .index_select(2)": lambda: q_strided.index_select(2, perm),
        "q token-major view .index_select(1)": lambda: q_strided.transpose(1, 2).index_select(1, perm).transpose(1, 2),
        "o contiguous .index_select(2)": lambda: o_contig.index_select(2, perm),
        "o contiguous [:, :, perm]": lambda: o_contig[:, :, perm],
        "o contiguous as [B*H, N, D] .index_select(1)": lambda: o_contig.view(B * H, N, D).index_select(1, perm),
        "o contiguous as [B*H*N, D] .index_select(0)": lambda: o_contig.view(B * H * N, D).index_select(
            0, (perm[None, :] + N * torch.arange(B * H, device=dev)[:, None]).reshape(-1)),
        "o contiguous -> token-major copy": lambda: o_contig.transpose(1, 2).contiguous(),
        "mlp x contiguous .index_select(1)": lambda: x.index_select(1, perm),
        "copy of q (bandwidth reference)": lambda: q_strided.transpose(1, 2).clone(),
    }
    ref = q_strided.index_select(2, perm)
    assert torch.equal(cases["q token-major view .index_select(1)"](), ref)
    assert torch.equal(cases["o contiguous as [B*H, N, D] .index_select(1)"]().view(B, H, N, D),
                       o_contig.index_select(2, perm))
    records = []
    for name, fn in cases.items():
        ms = do_bench(fn, rep=100)
        rec = dict(name=name, ms=ms, gb_per_s=2 * B * N * H * D * 2 / ms / 1e6, kernels=kernel_names(fn))
        records.append(rec)
    print(f"{'case':40s} {'ms':>8s} {'GB/s':>8s}  kernels")
    for r in records:
        print(f"{r['name']:40s} {r['ms']:8.4f} {r['gb_per_s']:8.0f}  {r['kernels']}")
    write_results("token_gather", dict(shape=dict(B=B, H=H, N=N, D=D, C=C), results=records))


if __name__ == "__main__":
    main()

"""The sparse MLP step's token_grid reordering on the GPU: inside mm1 / mm2 (token_perm) against gathers around.

Up to session 10 the op gathered x into tile order before the kernels and the output back after (two row
gathers of [N, 3072] per MLP site and step); now mm1 reads x rows at their tokens and mm2's epilogue writes the
output rows there. For FLUX-width shapes (3072 -> 12288 -> 3072, GELU-tanh, bf16, bf16 y_cache) at 70 %:
  - check: both ways give the same caches and output (bitwise: the same arithmetic on the same rows), and
    agree with the float32 reference;
  - time (CUDA-graph replays): a sparse step (no refresh) with gathers around, with token_perm, and without any
    reordering; and a refresh's block means of the reordered tokens from a gathered copy vs one averaging GEMM.
Prints a table; writes mlp_token_perm_<gpu>.json to $OUT or benchmarks/results.
Usage: python benchmarks/mlp_token_perm.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import graph_ms, kept, random_indices, rel_err  # noqa: E402  (benchmarks/kernels.py helpers)
from results_io import write_results  # noqa: E402

from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr  # noqa: E402

DEV, BF16, TOKEN_BLOCK = "cuda", torch.bfloat16, 128


def run(N, sparsity, quick, C=3072, Fh=12288):
    torch.manual_seed(4)
    x = torch.randn(1, N, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    w2_t = (torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5).t().contiguous().t()
    nb = -(-N // TOKEN_BLOCK)
    k = kept(Fh, sparsity, 256)
    idx = random_indices(nb, Fh, k).view(1, nb, k).sort(-1).values.to(torch.int32)
    a0 = torch.randn(1, Fh, N, device=DEV, dtype=BF16).transpose(1, 2)
    y0 = torch.randn(1, N, C, device=DEV, dtype=BF16)
    perm = torch.randperm(N, device=DEV)
    unperm = torch.argsort(perm)

    def fresh():
        return a0.clone(memory_format=torch.preserve_format), y0.clone(), torch.empty(1, N, C, device=DEV, dtype=BF16)

    def around(a, y, out):
        mlp_tr.sparse_mlp_update(x.index_select(1, perm), w1, b1, None, None, w2_t, "gelu_tanh", idx, a, y,
                                 TOKEN_BLOCK, out=out)
        return out.index_select(1, unperm)

    def inside(a, y, out):
        mlp_tr.sparse_mlp_update(x, w1, b1, None, None, w2_t, "gelu_tanh", idx, a, y, TOKEN_BLOCK, out=out,
                                 token_perm=perm)
        return out

    def plain(a, y, out):
        mlp_tr.sparse_mlp_update(x, w1, b1, None, None, w2_t, "gelu_tanh", idx, a, y, TOKEN_BLOCK, out=out)
        return out

    a1, y1, o1 = fresh()
    r1 = around(a1, y1, o1)
    a2, y2, o2 = fresh()
    r2 = inside(a2, y2, o2)
    torch.cuda.synchronize()
    exact = torch.equal(r1, r2) and torch.equal(y1, y2) and torch.equal(a1, a2)
    a3, y3, o3 = a0.float(), y0.float(), torch.empty(1, N, C, device=DEV)
    mlp_ref.sparse_mlp_update(x.float(), w1.float(), b1.float(), None, None, w2_t.float(), "gelu_tanh", idx, a3, y3,
                              TOKEN_BLOCK, out=o3, token_perm=perm)
    err = rel_err(r2, o3)
    # Timed on one set of buffers (the step's arithmetic does not depend on their values).
    a, y, out = fresh()
    row = dict(bench="mlp_token_perm", shape=f"N{N} {C}-{Fh}-{C} gelu_tanh", sparsity=sparsity,
               exact_vs_gathers=exact, rel_err_vs_reference=err,
               gathers_ms=graph_ms(lambda: around(a, y, out), quick),
               in_kernel_ms=graph_ms(lambda: inside(a, y, out), quick),
               no_reordering_ms=graph_ms(lambda: plain(a, y, out), quick))
    # A refresh step's block means of the reordered tokens: a gathered copy of x then the mean (up to session
    # 10), against one averaging GEMM over x in model order (``block_averaging_matrix``); both then scored.
    averaging = mlp_ref.block_averaging_matrix(perm, TOKEN_BLOCK, BF16)
    means_gemm = mlp_ref.block_mean_preactivation(x, w1, b1, None, None, TOKEN_BLOCK, weight_dtype_out=True,
                                                  averaging=averaging)
    means_copy = mlp_ref.block_mean_preactivation(x.index_select(1, perm), w1, b1, None, None, TOKEN_BLOCK,
                                                  weight_dtype_out=True)
    row.update(block_means_rel_diff=rel_err(means_gemm, means_copy),
               block_means_gather_ms=graph_ms(lambda: x.index_select(1, perm).view(1, nb, TOKEN_BLOCK, C).mean(
                   2, dtype=torch.float32).to(BF16), quick),
               block_means_gemm_ms=graph_ms(lambda: torch.matmul(averaging, x), quick),
               hbar_gather_ms=graph_ms(lambda: mlp_ref.block_mean_preactivation(
                   x.index_select(1, perm), w1, b1, None, None, TOKEN_BLOCK, weight_dtype_out=True), quick),
               hbar_gemm_ms=graph_ms(lambda: mlp_ref.block_mean_preactivation(
                   x, w1, b1, None, None, TOKEN_BLOCK, weight_dtype_out=True, averaging=averaging), quick))
    print(f"  refresh block means: gather + mean {row['block_means_gather_ms']:.4f} ms, averaging GEMM "
          f"{row['block_means_gemm_ms']:.4f} ms; with the scoring GEMM {row['hbar_gather_ms']:.4f} vs "
          f"{row['hbar_gemm_ms']:.4f} ms; rel diff {row['block_means_rel_diff']:.1e}", flush=True)
    print(f"{row['shape']:36s} {sparsity:4.2f}  gathers around {row['gathers_ms']:7.3f} ms  in kernels "
          f"{row['in_kernel_ms']:7.3f} ms  no reordering {row['no_reordering_ms']:7.3f} ms  bitwise equal {exact}  "
          f"rel err vs float32 reference {err:.1e}", flush=True)
    assert exact and err < 2e-2, row
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    print(f"device {gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = [run(n, 0.7, args.quick) for n in (4352, 4608, 16896)]
    write_results("mlp_token_perm", dict(device=gpu, torch=torch.__version__, triton=triton.__version__,
                                         results=rows))


if __name__ == "__main__":
    main()

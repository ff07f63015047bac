"""Triton block-mean pre-activations for the MLP refresh: hbar[b, blk] = W mean_{t in blk}(x[b, t]) + bias.

Same semantics as ``mlp_reference.block_mean_preactivation`` (the oracle): means summed in float32 and rounded
once to the weights' dtype, then the nb-row scoring GEMM in the weights' dtype with a float32 accumulator,
output [B, nb, P*F] (gate then up when gated) in the weights' dtype or float32.

    before (torch, per refresh)                       after (two launches, no intermediate copies)
    means = x.reshape(B, nb, T, C).mean(2, f32)       _block_means: one program per (token block, C tile) sums
    means = means.to(w.dtype)                                       the block's rows in fp32, divides by the
    [F.pad for a ragged last block]                                 block's real length, writes w.dtype
    hbar = F.linear(means, W, b) [cat over paths]     _scoring_gemm: rows (B*nb) x units; every row tile of one
                                                                    unit tile runs next to the others, so each
                                                                    W slab comes from HBM once; + bias; the
                                                                    paths write their halves of one output

Why (H100, ``benchmarks/selection_path.py``): with 36-132 rows the GEMM only streams W1 (75 MB for 3072 x
12288 bf16); cuBLAS picks a kernel that reaches ~1.8 TB/s there (0.042 ms), and the torch means path is a
float32 reduction plus a cast kernel. The interpreter runs these kernels too (CPU tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from chipmunk_compile.kernels import mlp_reference
from chipmunk_compile.kernels.launch import CachedLaunch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _block_means_kernel(X, OUT, N, C, nb, token_block, stride_xb, stride_xn, stride_xc,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)                      # b * nb + blk: the output row
    b = (row // nb).to(tl.int64)
    blk = row % nb
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    first = blk * token_block
    count = tl.minimum(token_block, N - first)  # the ragged last block averages over its real tokens
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for t0 in range(0, token_block, BLOCK_T):
        local = t0 + tl.arange(0, BLOCK_T)
        ok = (local < count)[:, None] & c_ok[None, :]
        ptrs = X + b * stride_xb + (first + local)[:, None].to(tl.int64) * stride_xn + offs_c[None, :] * stride_xc
        acc += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / count.to(tl.float32)
    tl.store(OUT + row.to(tl.int64) * C + offs_c, mean.to(OUT.dtype.element_ty), mask=c_ok)


@triton.jit
def _scoring_gemm_kernel(M, W, BIAS, OUT, rows, C, F, stride_wf, stride_wc, out_row_stride, out_col0,
                         HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, EVEN_C: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    n_r = tl.cdiv(rows, BLOCK_R)
    pid_r = tl.program_id(0) % n_r              # row tiles fastest: concurrent programs share one W slab
    pid_f = tl.program_id(0) // n_r
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    r_ok = offs_r < rows
    f_ok = offs_f < F
    offs_c = tl.arange(0, BLOCK_C)
    m_ptrs = M + offs_r[:, None].to(tl.int64) * C + offs_c[None, :]
    w_ptrs = W + offs_f[None, :].to(tl.int64) * stride_wf + offs_c[:, None] * stride_wc
    acc = tl.zeros([BLOCK_R, BLOCK_F], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        if EVEN_C:
            m = tl.load(m_ptrs, mask=r_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=f_ok[None, :], other=0.0)
        else:
            c_ok = (c0 + offs_c) < C
            m = tl.load(m_ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=f_ok[None, :] & c_ok[:, None], other=0.0)
        acc = tl.dot(m, w, acc, input_precision=PRECISION)
        m_ptrs += BLOCK_C
        w_ptrs += BLOCK_C * stride_wc
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = OUT + offs_r[:, None].to(tl.int64) * out_row_stride + out_col0 + offs_f[None, :]
    # Rounded to the weights' dtype first (the GEMM's own output, as the reference's), then to OUT's dtype.
    tl.store(o_ptrs, acc.to(W.dtype.element_ty).to(OUT.dtype.element_ty), mask=r_ok[:, None] & f_ok[None, :])


def _cg(br, bf, bc, warps, stages):
    return triton.Config({"BLOCK_R": br, "BLOCK_F": bf, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


# Candidates for a memory-bound GEMM of 36-256 rows: narrow unit tiles give every SM several W streams in flight.
_GEMM_CONFIGS = [_cg(64, 64, 128, 4, 4), _cg(64, 32, 128, 4, 4), _cg(64, 64, 64, 4, 6), _cg(64, 128, 64, 4, 4),
                 _cg(128, 64, 64, 8, 4), _cg(64, 32, 256, 4, 3)]
_GEMM_INTERPRET = {"BLOCK_R": 16, "BLOCK_F": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1}
_gemm = triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BLOCK_C"] == 0})(_scoring_gemm_kernel)
_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["rows", "C", "F"])(_gemm)
_gemm_launch = CachedLaunch(_gemm_tuned)
MEANS_BLOCK_T, MEANS_BLOCK_C = 32, 128


def block_means(x: torch.Tensor, token_block: int, dtype: torch.dtype) -> torch.Tensor:
    """Means of ``x [B, N, C]`` over token blocks, [B * nb, C] in ``dtype`` (summed in float32)."""
    B, N, C = x.shape
    nb = -(-N // token_block)
    out = torch.empty((B * nb, C), dtype=dtype, device=x.device)
    block_c = min(MEANS_BLOCK_C, triton.next_power_of_2(C))
    _block_means_kernel[(B * nb, triton.cdiv(C, block_c))](x, out, N, C, nb, token_block, *x.stride(),
                                                          BLOCK_T=min(MEANS_BLOCK_T, triton.next_power_of_2(token_block)),
                                                          BLOCK_C=block_c, num_warps=4)
    return out


def scoring_gemm(means: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, col0: int,
                 config: dict | None = None) -> None:
    """out[:, col0:col0 + F] = means @ w^T + bias for contiguous ``means [rows, C]`` and ``out [rows, *]``."""
    rows, C = means.shape
    F = w.shape[0]
    args = (means, w, w if bias is None else bias, out, rows, C, F, *w.stride(), out.stride(0), col0)
    meta = dict(HAS_BIAS=bias is not None, PRECISION="ieee" if means.dtype == torch.float32 else "tf32")
    if config is None and _INTERPRET:
        config = _GEMM_INTERPRET
    if config is None:
        _gemm_launch(lambda m: (triton.cdiv(rows, m["BLOCK_R"]) * triton.cdiv(F, m["BLOCK_F"]),), args, meta)
    else:
        kw = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        grid = (triton.cdiv(rows, kw["BLOCK_R"]) * triton.cdiv(F, kw["BLOCK_F"]),)
        _gemm[grid](*args, **meta, **kw, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))


def block_mean_preactivation(x, w_gate, b_gate, w_up, b_up, token_block: int, weight_dtype_out: bool = False):
    """As ``mlp_reference.block_mean_preactivation``: [B, nb, P*F] in the weights' dtype or float32."""
    if x.dtype == torch.float64 or w_gate.dtype == torch.float64:
        return mlp_reference.block_mean_preactivation(x, w_gate, b_gate, w_up, b_up, token_block, weight_dtype_out)
    B, N, _ = x.shape
    nb = -(-N // token_block)
    means = block_means(x, token_block, w_gate.dtype)
    paths = [(w_gate, b_gate)] + ([(w_up, b_up)] if w_up is not None else [])
    F = w_gate.shape[0]
    out = torch.empty((B * nb, len(paths) * F), dtype=w_gate.dtype if weight_dtype_out else torch.float32,
                      device=x.device)
    for p, (w, b) in enumerate(paths):
        scoring_gemm(means, w, b, out, p * F)
    return out.reshape(B, nb, len(paths) * F)

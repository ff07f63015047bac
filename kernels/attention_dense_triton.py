"""Triton dense attention with per-query LSE and, in the same pass, the per-group column mass.

Work decomposition: one program per (query tile of BLOCK_M rows, batch*head). It walks all keys in tiles of
BLOCK_N with an online softmax (base-2 exponentials, scale folded into log2(e)), so O and the LSE are exact.
When ``lse_prev`` is given it also computes, from the same score tile, exp(s_ij - lse_prev_i), sums it over the
tile's rows of each 192-query group, and atomically adds the [BLOCK_N] partial column mass into
cs[b, h, g, j]; a group's three 64-row tiles (or the rows of whatever groups a tile straddles) therefore reduce
into one row of cs without a second pass over QK^T. Full key tiles run unmasked; only the ragged last key tile
is masked. K/V may have fewer heads (GQA): query head h reads kv head h // (Hq // Hk).

Same call signature and semantics as ``attention_reference.dense_attention_lse_colmass``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, k_base, v_base, start_n, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0, offs_m,
                 stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                 D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                 HAS_CS: tl.constexpr, SINGLE_GROUP: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    k_mask = offs_d[:, None] < D
    v_mask = offs_dv[None, :] < DV
    if MASK_N:
        k_mask = k_mask & (offs_n[None, :] < Nk)
        v_mask = v_mask & (offs_n[:, None] < Nk)
    kt = tl.load(k_ptrs, mask=k_mask, other=0.0)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale          # log2 units
    if MASK_N:
        s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    if HAS_CS:
        # Probabilities under the previous step's softmax constants; padded rows carry lse=+inf -> 0.
        pc = tl.exp2(s - lse_prev2[:, None])
        if SINGLE_GROUP:
            part = tl.sum(pc, 0)
            tl.atomic_add(cs_row + (row0 // group_size) * Nk + offs_n, part, mask=offs_n < Nk, sem="relaxed")
        else:
            g_first = row0 // group_size
            g_last = (tl.minimum(row0 + BLOCK_M, Nq) - 1) // group_size
            for g in range(g_first, g_last + 1):
                in_g = (offs_m // group_size) == g
                part = tl.sum(tl.where(in_g[:, None], pc, 0.0), 0)
                tl.atomic_add(cs_row + g * Nk + offs_n, part, mask=offs_n < Nk, sem="relaxed")
    return m_new, l_i, acc


@triton.jit
def _dense_attn_kernel(Q, K, V, O, LSE, LSE_PREV, CS,
                       stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       H, kv_group, Nq, Nk, num_groups, group_size, qk_scale,
                       D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                       HAS_CS: tl.constexpr, PRECISION: tl.constexpr, SINGLE_GROUP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // kv_group
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_valid = offs_m < Nq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    if HAS_CS:
        lse_prev2 = tl.load(LSE_PREV + pid_bh * Nq + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    else:
        lse_prev2 = l_i
    cs_row = CS + pid_bh * num_groups * Nk

    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, start_n, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0, offs_m,
                                     stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                                     D, DV, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, False, HAS_CS, SINGLE_GROUP, PRECISION)
    if n_full < Nk:
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, n_full, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0, offs_m,
                                     stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                                     D, DV, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, True, HAS_CS, SINGLE_GROUP, PRECISION)

    o = acc / l_i[:, None]
    o_ptrs = O + pid_bh * Nq * DV + offs_m[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=m_valid)


# A tile lies inside one query group when G is a multiple of BLOCK_M (G=192 with 64-row tiles).
_dense_attn = triton.heuristics({"SINGLE_GROUP": lambda a: a["group_size"] % a["BLOCK_M"] == 0})(_dense_attn_kernel)

_DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]
# CS is accumulated with atomics, so every benchmarking run of the autotuner must start from zeros.
_dense_attn_tuned = triton.autotune(_CONFIGS, key=["D_PAD", "DV_PAD", "HAS_CS", "kv_group", "Nq", "Nk"],
                                    reset_to_zero=["CS"])(_dense_attn)


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def dense_attention_lse_colmass(q, k, v, scale: float, lse_prev, group_size: int, config: dict | None = None):
    """(o [B,H,Nq,Dv] in q.dtype, lse fp32 [B,H,Nq], column mass fp32 [B,H,ceil(Nq/G),Nk] or None).

    ``config`` forces one launch configuration (tests); by default the GPU autotunes and the interpreter uses a
    small fixed configuration.
    """
    B, H, Nq, D = q.shape
    Hk, Nk, DV = k.shape[1], k.shape[2], v.shape[3]
    assert k.shape[0] == B and v.shape[:3] == k.shape[:3] and k.shape[3] == D and H % Hk == 0
    assert max(D, DV) <= 256, "head dims above 256 are not supported"
    o = torch.empty((B, H, Nq, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    num_groups = -(-Nq // group_size)
    has_cs = lse_prev is not None
    if has_cs:
        lse_prev = lse_prev.to(torch.float32).contiguous()
        cs = torch.zeros((B, H, num_groups, Nk), dtype=torch.float32, device=q.device)
    else:
        lse_prev = lse
        cs = torch.empty((1,), dtype=torch.float32, device=q.device)
    args = (q, k, v, o, lse, lse_prev, cs, *q.stride(), *k.stride(), *v.stride(),
            H, H // Hk, Nq, Nk, num_groups, group_size, scale * _LOG2E)
    meta = dict(D=D, DV=DV, D_PAD=_pad_dim(D), DV_PAD=_pad_dim(DV), HAS_CS=has_cs,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if config is None and _INTERPRET:
        config = _DEFAULT_CONFIG
    if config is None:
        _dense_attn_tuned[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)](*args, **meta)
    else:
        _dense_attn[(triton.cdiv(Nq, config["BLOCK_M"]), B * H)](*args, **meta, **config)
    return o, lse, (cs if has_cs else None)

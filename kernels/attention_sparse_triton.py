"""Triton column-sparse attention delta: out = base + sign * P^S, P^S renormalised over each group's columns.

Work decomposition: one program per (query tile, batch*head). A query tile holds M_SUB sub-tiles of BLOCK_M
consecutive queries of one query group (the whole 192-query group as 3 x 64 with M_SUB=3, or 64/128-row tiles
with M_SUB=1), so all its rows share the group's index list indices[b, h, g, :]. The program walks that list in
chunks of BLOCK_N indices, gathers the K and V rows they name into dense tiles (row gathers through pointer
arithmetic; the compiler pipelines them over num_stages) and runs an online softmax over the gathered tiles
only, so the normaliser covers exactly the selected columns. Each gathered K/V tile feeds all M_SUB
sub-tiles, which is why one 192-row program can beat three 64-row ones. Full index chunks run unmasked; only a
ragged last chunk masks its tail. The epilogue reads base, adds sign * acc / l and writes out (out may alias
base: every element is read and written by the same program). Programs of one group are adjacent in launch
order so their K/V gathers share L2. GQA: query head h reads kv head h // (Hq // Hk).

Same semantics as ``attention_reference.sparse_attention_delta`` (plus an optional ``out``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(ptr, stride_b, stride_h, stride_n, stride_d, b, h, rows, row_end,
               D: tl.constexpr, D_PAD: tl.constexpr):
    offs_d = tl.arange(0, D_PAD)
    ptrs = ptr + b * stride_b + h * stride_h + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(rows[:, None] < row_end) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _online_softmax_step(q, kt, v, m_i, l_i, acc, col_ok, qk_scale,
                         MASK_N: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale        # log2 units
    if MASK_N:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _gathered_chunk(q0, q1, q2, k_base, v_base, idx_base, start, n_sel, s0, s1, s2,
                    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                    M_SUB: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_k = start + tl.arange(0, BLOCK_N)
    col_ok = offs_k < n_sel
    if MASK_N:
        # Tail indices read key row 0 (always valid memory); their scores are masked to -inf.
        idx = tl.load(idx_base + offs_k, mask=col_ok, other=0).to(tl.int64)
    else:
        idx = tl.load(idx_base + offs_k).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    kt = tl.load(k_base + idx[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=offs_d[:, None] < D, other=0.0)
    v = tl.load(v_base + idx[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=offs_dv[None, :] < DV, other=0.0)
    m0, l0, a0 = s0
    s0 = _online_softmax_step(q0, kt, v, m0, l0, a0, col_ok, qk_scale, MASK_N, PRECISION)
    if M_SUB == 3:
        m1, l1, a1 = s1
        s1 = _online_softmax_step(q1, kt, v, m1, l1, a1, col_ok, qk_scale, MASK_N, PRECISION)
        m2, l2, a2 = s2
        s2 = _online_softmax_step(q2, kt, v, m2, l2, a2, col_ok, qk_scale, MASK_N, PRECISION)
    return s0, s1, s2


@triton.jit
def _store_delta(state, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd,
                 stride_ob, stride_oh, stride_on, stride_od, b, h, rows, row_end, sign,
                 DV: tl.constexpr, DV_PAD: tl.constexpr):
    m_i, l_i, acc = state
    offs_d = tl.arange(0, DV_PAD)
    mask = (rows[:, None] < row_end) & (offs_d[None, :] < DV)
    base = tl.load(BASE + b * stride_bb + h * stride_bh + rows[:, None] * stride_bn + offs_d[None, :] * stride_bd,
                   mask=mask, other=0.0)
    out = base.to(tl.float32) + sign * (acc / l_i[:, None])
    tl.store(OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_attn_kernel(Q, K, V, IDX, BASE, OUT,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_bb, stride_bh, stride_bn, stride_bd,
                        stride_ob, stride_oh, stride_on, stride_od,
                        H, kv_group, Nq, num_groups, group_size, n_sel, qk_scale, sign,
                        D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                        PRECISION: tl.constexpr, M_SUB: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // kv_group
    tiles_per_group = tl.cdiv(group_size, BLOCK_M * M_SUB)
    g = pid // tiles_per_group
    row0 = g * group_size + (pid % tiles_per_group) * (BLOCK_M * M_SUB)
    row_end = tl.minimum(g * group_size + group_size, Nq)
    rows0 = row0 + tl.arange(0, BLOCK_M)
    rows1 = rows0 + BLOCK_M
    rows2 = rows1 + BLOCK_M

    q0 = _load_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b, h, rows0, row_end, D, D_PAD)
    state0 = (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
              tl.zeros([BLOCK_M, DV_PAD], tl.float32))
    # With M_SUB == 1 the second and third sub-tiles are never touched and compile away.
    q1 = q0
    q2 = q0
    state1 = state0
    state2 = state0
    if M_SUB == 3:
        q1 = _load_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b, h, rows1, row_end, D, D_PAD)
        q2 = _load_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b, h, rows2, row_end, D, D_PAD)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    idx_base = IDX + (pid_bh * num_groups + g) * n_sel
    n_full = (n_sel // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        state0, state1, state2 = _gathered_chunk(q0, q1, q2, k_base, v_base, idx_base, start, n_sel,
                                                 state0, state1, state2, stride_kn, stride_kd, stride_vn, stride_vd,
                                                 qk_scale, D, DV, D_PAD, DV_PAD, M_SUB, BLOCK_N, False, PRECISION)
    if n_full < n_sel:
        state0, state1, state2 = _gathered_chunk(q0, q1, q2, k_base, v_base, idx_base, n_full, n_sel,
                                                 state0, state1, state2, stride_kn, stride_kd, stride_vn, stride_vd,
                                                 qk_scale, D, DV, D_PAD, DV_PAD, M_SUB, BLOCK_N, True, PRECISION)

    _store_delta(state0, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd, stride_ob, stride_oh, stride_on,
                 stride_od, b, h, rows0, row_end, sign, DV, DV_PAD)
    if M_SUB == 3:
        _store_delta(state1, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd, stride_ob, stride_oh,
                     stride_on, stride_od, b, h, rows1, row_end, sign, DV, DV_PAD)
        _store_delta(state2, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd, stride_ob, stride_oh,
                     stride_on, stride_od, b, h, rows2, row_end, sign, DV, DV_PAD)


_DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "M_SUB": 1, "num_warps": 4, "num_stages": 2}
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "M_SUB": 1}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "M_SUB": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "M_SUB": 1}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "M_SUB": 1}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "M_SUB": 1}, num_warps=8, num_stages=2),
    # One program per 192-group: K/V gathered once for 3 sub-tiles (spills some registers at d128 on sm_90).
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "M_SUB": 3}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "M_SUB": 3}, num_warps=8, num_stages=3),
]
# The autotuner runs the kernel several times; OUT may alias BASE, so restore it after every trial.
_sparse_attn_tuned = triton.autotune(_CONFIGS, key=["D_PAD", "DV_PAD", "group_size", "kv_group", "Nq"],
                                     restore_value=["OUT"])(_sparse_attn_kernel)


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def sparse_attention_delta(q, k, v, scale: float, indices, group_size: int, base, sign: float,
                           out=None, config: dict | None = None):
    """``base + sign * P^S`` written into ``out`` (a new tensor like base when None; may be base itself).

    ``config`` forces one launch configuration (tests); by default the GPU autotunes and the interpreter uses a
    small fixed configuration.
    """
    B, H, Nq, D = q.shape
    Hk, DV = k.shape[1], v.shape[3]
    num_groups, n_sel = indices.shape[2], indices.shape[3]
    assert num_groups == -(-Nq // group_size), (num_groups, Nq, group_size)
    assert indices.shape[:2] == (B, H) and H % Hk == 0 and n_sel >= 1 and max(D, DV) <= 256
    assert base.shape == (B, H, Nq, DV)
    indices = indices.contiguous()
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    args = (q, k, v, indices, base, out, *q.stride(), *k.stride(), *v.stride(), *base.stride(), *out.stride(),
            H, H // Hk, Nq, num_groups, group_size, n_sel, scale * _LOG2E, float(sign))
    meta = dict(D=D, DV=DV, D_PAD=_pad_dim(D), DV_PAD=_pad_dim(DV),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if config is None and _INTERPRET:
        config = _DEFAULT_CONFIG
    if config is None:
        grid = lambda m: (num_groups * triton.cdiv(group_size, m["BLOCK_M"] * m["M_SUB"]), B * H)  # noqa: E731
        _sparse_attn_tuned[grid](*args, **meta)
    else:
        rows = config["BLOCK_M"] * config["M_SUB"]
        _sparse_attn_kernel[(num_groups * triton.cdiv(group_size, rows), B * H)](*args, **meta, **config)
    return out

"""Triton column-sparse attention delta: out = base + sign * P^S, P^S renormalised over each group's columns.

Work decomposition: one program per (query tile, batch*head). A query tile stacks up to three sub-tiles of
BLOCK_M, BLOCK_M1, BLOCK_M2 consecutive queries of one query group (a 64-row tile alone; or the whole 192-query
group as 128 + 64 or 3 x 64), so all its rows share the group's index list indices[b, h, g, :]. The program
walks that list in chunks of BLOCK_N indices, gathers the K and V rows they name into dense tiles (row gathers
through pointer arithmetic, cp.async-pipelined over num_stages) and runs an online softmax over the gathered
tiles only, so the normaliser covers exactly the selected columns. Each gathered K/V tile feeds every sub-tile.
Full index chunks run unmasked; only a ragged last chunk masks its tail. The epilogue reads base, adds
sign * acc / l and writes out (out may alias base: every element is read and written by the same program).
Programs of one group are adjacent in launch order so their K/V gathers share L2. GQA: query head h reads kv
head h // (Hq // Hk). An optional per-key score bias (key-padding mask) is gathered with the keys. Configs may
still name ``M_SUB`` (1 or 3 stacked BLOCK_M sub-tiles).

Same semantics as ``attention_reference.sparse_attention_delta`` (plus an optional ``out``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from chipmunk_compile.kernels.attention_dense_triton import pad_dim, scaled_key_bias
from chipmunk_compile.kernels.attention_reference import check_token_perm
from chipmunk_compile.kernels.dispatch import gluon_module
from chipmunk_compile.kernels.launch import CachedLaunch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(ptr, stride_b, stride_h, stride_n, stride_d, b, h, tokens, rows, row_end,
               D: tl.constexpr, D_PAD: tl.constexpr):
    # The query rows ``rows`` of a tile, found at ``tokens`` (rows themselves without a perm).
    offs_d = tl.arange(0, D_PAD)
    ptrs = ptr + b * stride_b + h * stride_h + tokens[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(rows[:, None] < row_end) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _online_softmax_step(q, kt, v, kb, m_i, l_i, acc, col_ok, qk_scale,
                         MASK_N: tl.constexpr, HAS_KB: tl.constexpr, PRECISION: tl.constexpr):
    qk = tl.dot(q, kt, input_precision=PRECISION)
    if HAS_KB:
        qk += kb[None, :]
    if MASK_N:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    # log2 units: one FMA (scale, subtract the running max) and one exp2 per score; P @ V accumulates in place.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _gathered_chunk(q0, q1, q2, k_base, v_base, kb_base, idx_base, start, n_sel, s0, s1, s2,
                    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                    BLOCK_M1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_N: tl.constexpr, HAS_KB: tl.constexpr, PRECISION: tl.constexpr):
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
    kb = col_ok.to(tl.float32)  # unused unless HAS_KB
    if HAS_KB:
        kb = tl.load(kb_base + idx)  # the selected keys' score bias (pre-divided by the scale)
    m0, l0, a0 = s0
    s0 = _online_softmax_step(q0, kt, v, kb, m0, l0, a0, col_ok, qk_scale, MASK_N, HAS_KB,
                                  PRECISION)
    if BLOCK_M1 > 0:
        m1, l1, a1 = s1
        s1 = _online_softmax_step(q1, kt, v, kb, m1, l1, a1, col_ok, qk_scale, MASK_N, HAS_KB,
                                  PRECISION)
    if BLOCK_M2 > 0:
        m2, l2, a2 = s2
        s2 = _online_softmax_step(q2, kt, v, kb, m2, l2, a2, col_ok, qk_scale, MASK_N, HAS_KB,
                                  PRECISION)
    return s0, s1, s2


@triton.jit
def _store_delta(state, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd,
                 stride_ob, stride_oh, stride_on, stride_od, b, h, rows, out_rows, row_end, sign,
                 DV: tl.constexpr, DV_PAD: tl.constexpr):
    # base is read at the group's rows, out written at out_rows (the same rows, or their tokens under a perm).
    m_i, l_i, acc = state
    offs_d = tl.arange(0, DV_PAD)
    mask = (rows[:, None] < row_end) & (offs_d[None, :] < DV)
    base = tl.load(BASE + b * stride_bb + h * stride_bh + rows[:, None] * stride_bn + offs_d[None, :] * stride_bd,
                   mask=mask, other=0.0)
    out = base.to(tl.float32) + sign * (acc / l_i[:, None])
    tl.store(OUT + b * stride_ob + h * stride_oh + out_rows[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _token_rows(PERM, rows, row_end, HAS_PERM: tl.constexpr):
    """The query tokens of a tile's rows: rows themselves, or PERM[rows] (rows past row_end: token 0, masked)."""
    tokens = rows
    if HAS_PERM:
        tokens = tl.load(PERM + rows, mask=rows < row_end, other=0).to(tl.int32)
    return tokens


@triton.jit
def _init_state(BLOCK: tl.constexpr, DV_PAD: tl.constexpr):
    return (tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.float32),
            tl.zeros([BLOCK, DV_PAD], tl.float32))


@triton.jit
def _sparse_attn_kernel(Q, K, V, IDX, BASE, OUT, KB, PERM, stride_kbb,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_bb, stride_bh, stride_bn, stride_bd,
                        stride_ob, stride_oh, stride_on, stride_od,
                        H, kv_group, Nq, num_groups, group_size, n_sel, qk_scale, sign,
                        D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                        PRECISION: tl.constexpr, HAS_KB: tl.constexpr, HAS_PERM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_M2: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    # A program's query tile: sub-tiles of BLOCK_M, BLOCK_M1, BLOCK_M2 rows (0 = absent), stacked.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // kv_group
    tile_rows = BLOCK_M + BLOCK_M1 + BLOCK_M2
    tiles_per_group = tl.cdiv(group_size, tile_rows)
    g = pid // tiles_per_group
    row0 = g * group_size + (pid % tiles_per_group) * tile_rows
    row_end = tl.minimum(g * group_size + group_size, Nq)
    rows0 = row0 + tl.arange(0, BLOCK_M)
    tok0 = _token_rows(PERM, rows0, row_end, HAS_PERM)

    q0 = _load_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b, h, tok0, rows0, row_end, D, D_PAD)
    state0 = _init_state(BLOCK_M, DV_PAD)
    # Absent sub-tiles are never touched and compile away.
    q1 = q0
    q2 = q0
    state1 = state0
    state2 = state0
    rows1 = rows0
    rows2 = rows0
    tok1 = tok0
    tok2 = tok0
    if BLOCK_M1 > 0:
        rows1 = row0 + BLOCK_M + tl.arange(0, BLOCK_M1)
        tok1 = _token_rows(PERM, rows1, row_end, HAS_PERM)
        q1 = _load_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b, h, tok1, rows1, row_end, D, D_PAD)
        state1 = _init_state(BLOCK_M1, DV_PAD)
    if BLOCK_M2 > 0:
        rows2 = row0 + BLOCK_M + BLOCK_M1 + tl.arange(0, BLOCK_M2)
        tok2 = _token_rows(PERM, rows2, row_end, HAS_PERM)
        q2 = _load_rows(Q, stride_qb, stride_qh, stride_qn, stride_qd, b, h, tok2, rows2, row_end, D, D_PAD)
        state2 = _init_state(BLOCK_M2, DV_PAD)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    idx_base = IDX + (pid_bh * num_groups + g) * n_sel
    kb_base = KB + b * stride_kbb
    n_full = (n_sel // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        state0, state1, state2 = _gathered_chunk(q0, q1, q2, k_base, v_base, kb_base, idx_base, start, n_sel,
                                                 state0, state1, state2, stride_kn, stride_kd, stride_vn, stride_vd,
                                                 qk_scale, D, DV, D_PAD, DV_PAD, BLOCK_M1, BLOCK_M2, BLOCK_N, False,
                                                 HAS_KB, PRECISION)
    if n_full < n_sel:
        state0, state1, state2 = _gathered_chunk(q0, q1, q2, k_base, v_base, kb_base, idx_base, n_full, n_sel,
                                                 state0, state1, state2, stride_kn, stride_kd, stride_vn, stride_vd,
                                                 qk_scale, D, DV, D_PAD, DV_PAD, BLOCK_M1, BLOCK_M2, BLOCK_N, True,
                                                 HAS_KB, PRECISION)

    _store_delta(state0, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd, stride_ob, stride_oh, stride_on,
                 stride_od, b, h, rows0, tok0, row_end, sign, DV, DV_PAD)
    if BLOCK_M1 > 0:
        _store_delta(state1, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd, stride_ob, stride_oh,
                     stride_on, stride_od, b, h, rows1, tok1, row_end, sign, DV, DV_PAD)
    if BLOCK_M2 > 0:
        _store_delta(state2, BASE, OUT, stride_bb, stride_bh, stride_bn, stride_bd, stride_ob, stride_oh,
                     stride_on, stride_od, b, h, rows2, tok2, row_end, sign, DV, DV_PAD)


def _normalize_config(config: dict) -> dict:
    """Accept the older {"M_SUB": 1|3} spelling: M_SUB=3 is three stacked BLOCK_M sub-tiles."""
    config = dict(config)
    m_sub = config.pop("M_SUB", None)
    if m_sub is not None:
        assert m_sub in (1, 3), m_sub
        extra = config["BLOCK_M"] if m_sub == 3 else 0
        config.setdefault("BLOCK_M1", extra)
        config.setdefault("BLOCK_M2", extra)
    config.setdefault("BLOCK_M1", 0)
    config.setdefault("BLOCK_M2", 0)
    return config


def _tile_rows(m) -> int:
    return m["BLOCK_M"] + m["BLOCK_M1"] + m["BLOCK_M2"]


_DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "M_SUB": 1, "num_warps": 4, "num_stages": 2}


def _cfg(bm, bn, warps, stages, bm1=0, bm2=0):
    return triton.Config({"BLOCK_M": bm, "BLOCK_M1": bm1, "BLOCK_M2": bm2, "BLOCK_N": bn},
                         num_warps=warps, num_stages=stages)


# Measured on H100 (benchmarks/KERNEL_NOTES.md, HunyuanVideo N118800 at 93%): 64-row programs at 4 warps are the
# fastest (34.8 ms); the 128 + 64 split, which gathers each K/V row once per 192-query group, runs at 40 ms
# (255 registers, one program per SM); 128-row programs waste a third of their rows (55 ms).
_CONFIGS = [
    _cfg(64, 64, 4, 3),
    _cfg(64, 64, 4, 2),
    _cfg(128, 64, 8, 3, bm1=64),
    _cfg(128, 64, 8, 4, bm1=64),
]
# The autotuner runs the kernel several times; OUT may alias BASE, so restore it after every trial.
_sparse_attn_tuned = triton.autotune(_CONFIGS, key=["D_PAD", "DV_PAD", "group_size", "kv_group", "Nq", "HAS_KB",
                                                    "HAS_PERM"],
                                     restore_value=["OUT"])(_sparse_attn_kernel)


_sparse_attn_launch = CachedLaunch(_sparse_attn_tuned)



def _warp_specialized_kernel():
    """The Gluon (Hopper, warp-specialised) sparse kernel module, or None."""
    return gluon_module("attention_sparse_gluon")


def sparse_attention_delta(q, k, v, scale: float, indices, group_size: int, base, sign: float,
                           out=None, config: dict | None = None, key_bias=None, kernel: str = "auto",
                           token_perm=None):
    """``base + sign * P^S`` written into ``out`` (a new tensor like base when None; may be base itself).

    ``token_perm``: query row r is q[..., token_perm[r], :] and its result goes to out[..., token_perm[r], :]
    (base stays in row order; ``attention_reference.sparse_attention_delta`` has the exact semantics).

    ``kernel``: "auto" takes the warp-specialised Gluon kernel where it applies (Hopper, bf16/fp16, head dim 64
    or 128, groups of up to 192 queries; ``attention_sparse_gluon.supports``), else this Triton kernel;
    "triton" forces this one, "gluon" requires the Gluon one. ``config`` forces one launch configuration of the
    chosen kernel (tests); by default the GPU autotunes and the interpreter uses a small fixed configuration.
    """
    assert kernel in ("auto", "triton", "gluon"), kernel
    B, H, Nq, D = q.shape
    Hk, DV = k.shape[1], v.shape[3]
    num_groups, n_sel = indices.shape[2], indices.shape[3]
    assert num_groups == -(-Nq // group_size), (num_groups, Nq, group_size)
    assert indices.shape[:2] == (B, H) and H % Hk == 0 and n_sel >= 1 and max(D, DV) <= 256
    assert base.shape == (B, H, Nq, DV)
    indices = indices.contiguous()
    if token_perm is not None:
        check_token_perm(token_perm, Nq, base, out)
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    kb, kb_stride = scaled_key_bias(key_bias, B, k.shape[2], scale)
    if kernel != "triton":
        ws = _warp_specialized_kernel()
        why = "this Triton has no Gluon" if ws is None else ws.supports(q, k, v, base, out, group_size)
        if why is None:
            return ws.sparse_attention_delta_ws(q, k, v, scale, indices, group_size, base, sign, out, kb, kb_stride,
                                                config=config, token_perm=token_perm)
        if kernel == "gluon":
            raise ValueError(f"the warp-specialised sparse attention kernel does not apply here: {why}")
    perm = out if token_perm is None else token_perm  # any pointer when absent (never read)
    args = (q, k, v, indices, base, out, out if kb is None else kb, perm, kb_stride, *q.stride(), *k.stride(),
            *v.stride(), *base.stride(), *out.stride(),
            H, H // Hk, Nq, num_groups, group_size, n_sel, scale * _LOG2E, float(sign))
    meta = dict(D=D, DV=DV, D_PAD=pad_dim(D), DV_PAD=pad_dim(DV), HAS_KB=kb is not None, HAS_PERM=perm is not out,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if config is None and _INTERPRET:
        config = _DEFAULT_CONFIG
    if config is None:
        grid = lambda m: (num_groups * triton.cdiv(group_size, _tile_rows(m)), B * H)  # noqa: E731
        _sparse_attn_launch(grid, args, meta)
    else:
        config = _normalize_config(config)
        grid = (num_groups * triton.cdiv(group_size, _tile_rows(config)), B * H)
        _sparse_attn_kernel[grid](*args, **meta, **config)
    return out

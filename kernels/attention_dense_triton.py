"""Triton dense attention with per-query LSE and, in the same pass, the per-group column mass.

Work decomposition: one program per (query tile of BLOCK_M rows, batch*head). It walks all keys in tiles of
BLOCK_N with an online softmax (base-2 exponentials, scale folded into log2(e), P @ V accumulated in place), so
O and the LSE are exact. When ``lse_prev`` is given it also computes the column mass from the same tile with no
second exponential per score: exp(s_ij - lse_prev_i) = p_ij * r_i with p_ij = exp(s_ij - m_i) (already
computed for the tile) and r_i = exp(m_i - lse_prev_i). The tile's per-group column sums r^T P are taken on the
tensor cores as R @ P (R[16, BLOCK_M] holding r on the rows of each group the tile touches; CS_MODE 2) or with
tl.sum (CS_MODE 1, cheaper for 64-row single-group tiles), and atomically added into cs[b, h, g, :]. Full key
tiles run unmasked; only the ragged last key tile is masked. K/V may have fewer heads (GQA): query head h reads
kv head h // (Hq // Hk). An optional per-key bias (``key_bias [B, Nk]``, a key-padding mask as 0 / -inf) is added
to every score of its key.

Anchored softmax (ANCHOR=1, with ``lse_prev``): the previous dense step's LSE is used as the fixed softmax shift
instead of a running max, so p = exp(s - lse_prev) is at once the tile's attention weight (no max, no rescale of
the accumulator) and its column-mass contribution (no r factor). The new LSE is lse_prev + log(sum p). Exact
whatever the anchor: a program whose row normalisers leave [2^-60, 2^100] (the logits moved by more than ~40
nats since the previous dense step, or overflowed) redoes its rows with the online softmax.

The first dense step needs no column mass: the wrapper then takes O and the LSE from PyTorch's cuDNN or
FlashAttention kernels where they apply (``vendor_attention_with_lse``), which run at SDPA speed.

Same call signature and semantics as ``attention_reference.dense_attention_lse_colmass``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from chipmunk_compile.kernels.dispatch import gluon_module
from chipmunk_compile.kernels.launch import CachedLaunch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, k_base, v_base, kb_row, start_n, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0, offs_m,
                 stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                 D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                 HAS_CS: tl.constexpr, SINGLE_GROUP: tl.constexpr, MAX_G: tl.constexpr, CS_MODE: tl.constexpr,
                 ANCHORED: tl.constexpr, HAS_KB: tl.constexpr, PRECISION: tl.constexpr):
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
    qk = tl.dot(q, kt, input_precision=PRECISION)
    if HAS_KB:
        # Per-key score bias (key-padding mask), pre-divided by the scale: (s + kb) * scale = s*scale + bias.
        qk += tl.load(kb_row + offs_n, mask=offs_n < Nk, other=0.0)[None, :]
    if MASK_N:
        qk = tl.where(offs_n[None, :] < Nk, qk, float("-inf"))
    if ANCHORED:
        # Anchored softmax: the previous step's LSE is the fixed shift, so p = exp(s - lse_prev) is both the
        # tile's attention weight (no running max, no rescale of acc) and its column-mass contribution.
        m_new = m_i
        p = tl.exp2(qk * qk_scale - lse_prev2[:, None])
        l_i = l_i + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        pv = p.to(v.dtype)
        acc = tl.dot(pv, v, acc, input_precision=PRECISION)
    else:
        # Online softmax in log2 units: one FMA (scale, subtract the running max) and one exp2 per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
        p = tl.exp2(qk)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        pv = p.to(v.dtype)
        acc = acc * alpha[:, None]
        acc = tl.dot(pv, v, acc, input_precision=PRECISION)
    if HAS_CS:
        # Column mass exp(s_ij - lse_prev_i) under the previous step's softmax constants. Padded rows carry
        # lse_prev = +inf and contribute 0.
        if ANCHORED:
            r = tl.full([BLOCK_M], 1.0, tl.float32)
            pc = p
        elif CS_MODE == 0:
            # Reference formulation: a second exponential per score.
            pc = tl.exp2(qk + (m_new - lse_prev2)[:, None])
        else:
            # exp(s - lse_prev) = p * exp(m - lse_prev): a per-row factor on the tile's probabilities, no extra
            # exponential per score. The clamp keeps r finite (p <= 1, so the product stays exact).
            r = tl.exp2(tl.minimum(m_new - lse_prev2, 126.0))
        if CS_MODE == 2:
            # Column sums on the tensor cores: R[16, BLOCK_M] @ P, row j of R holding r on the rows of the j-th
            # group the tile touches (a tile touches at most 16 groups; the wrapper checks).
            g_first = row0 // group_size
            gsel = tl.arange(0, 16)
            in_g = (offs_m[None, :] // group_size - g_first) == gsel[:, None]
            rmat = tl.where(in_g, r[None, :], 0.0).to(pv.dtype)
            part = tl.dot(rmat, pv, input_precision=PRECISION)
            g_last = (tl.minimum(row0 + BLOCK_M, Nq) - 1) // group_size
            ok = ((g_first + gsel)[:, None] <= g_last) & (offs_n[None, :] < Nk)
            tl.atomic_add(cs_row + (g_first + gsel)[:, None] * Nk + offs_n[None, :], part, mask=ok, sem="relaxed")
        else:
            if CS_MODE == 1 and not ANCHORED:
                pc = p * r[:, None]
            if SINGLE_GROUP:
                part = tl.sum(pc, 0)
                tl.atomic_add(cs_row + (row0 // group_size) * Nk + offs_n, part, mask=offs_n < Nk, sem="relaxed")
            else:
                # A statically unrolled loop over the (at most MAX_G) groups the tile touches: a dynamic loop
                # here would stop the compiler from software-pipelining the key loop.
                g_first = row0 // group_size
                g_last = (tl.minimum(row0 + BLOCK_M, Nq) - 1) // group_size
                for gi in tl.static_range(MAX_G):
                    g = g_first + gi
                    in_g = (offs_m // group_size) == g
                    part = tl.sum(tl.where(in_g[:, None], pc, 0.0), 0)
                    tl.atomic_add(cs_row + g * Nk + offs_n, part, mask=(offs_n < Nk) & (g <= g_last),
                                  sem="relaxed")
    return m_new, l_i, acc


@triton.jit
def _attend_all_keys(q, k_base, v_base, kb_row, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0, offs_m,
                     stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                     D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_CS: tl.constexpr, SINGLE_GROUP: tl.constexpr,
                     MAX_G: tl.constexpr, CS_MODE: tl.constexpr, ANCHORED: tl.constexpr, HAS_KB: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Full key tiles unmasked, then the ragged last tile masked."""
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, kb_row, start_n, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0,
                                     offs_m, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                                     D, DV, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, False, HAS_CS, SINGLE_GROUP, MAX_G,
                                     CS_MODE, ANCHORED, HAS_KB, PRECISION)
    if n_full < Nk:
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, kb_row, n_full, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0,
                                     offs_m, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                                     D, DV, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, True, HAS_CS, SINGLE_GROUP, MAX_G,
                                     CS_MODE, ANCHORED, HAS_KB, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _add_tail_pieces(O, LSE, LSE_PREV, PART_O, PART_L, pid_bh, pid_m, g, item_rel, part_rows, Nq, group_size,
                     n_tail, tail_ctas, item_tiles, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     MAX_PIECES: tl.constexpr):
    """O and LSE of a BLOCK_M-row tile of tail item item_rel, which the Gluon kernel ran in pieces over key ranges
    (``attention_dense_gluon.tail_pieces``): all share the anchor lse_prev, so O = sum O_j / sum l_j and LSE =
    lse_prev + log(sum l_j). The pieces: the ranges c (of tail_ctas equal ranges over the tail's W key tiles)
    that meet the item, piece slot s * tail_ctas + c with s = 0 where range c starts in this item. False (nothing
    stored) when a row's summed normaliser leaves the safe range: the caller then recomputes the tile."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Nq
    offs_dv = tl.arange(0, DV_PAD)
    w = n_tail * item_tiles
    x0 = item_rel * item_tiles
    # Range c holds tile x iff c * w // tail_ctas <= x < (c + 1) * w // tail_ctas.
    c_first = ((x0 + 1) * tail_ctas + w - 1) // w - 1
    c_last = ((x0 + item_tiles) * tail_ctas + w - 1) // w - 1
    in_group = offs_m - g * group_size
    o_mask = m_valid[:, None] & (offs_dv[None, :] < DV)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    # Unrolled (MAX_PIECES bounds c_last - c_first + 1), so all pieces' loads are in flight at once.
    for i in tl.static_range(MAX_PIECES):
        c = c_first + i
        lo = c * w // tail_ctas
        # (empty ranges exist when the tail has fewer tiles than ranges)
        use = (c <= c_last) & ((c + 1) * w // tail_ctas > lo)
        rows = (item_rel - lo // item_tiles) * tail_ctas * part_rows + c * part_rows + in_group
        l_i += tl.load(PART_L + rows, mask=m_valid & use, other=0.0)
        acc += tl.load(PART_O + rows.to(tl.int64)[:, None] * DV + offs_dv[None, :], mask=o_mask & use, other=0.0)
    l_i = tl.where(m_valid, l_i, 1.0)
    bad = m_valid & ((l_i < 8.7e-19) | (l_i > 1.2e30) | (l_i != l_i))
    ok = tl.sum(bad.to(tl.int32)) == 0
    o_ptrs = O + pid_bh * Nq * DV + offs_m[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=o_mask & ok)
    anchor = tl.load(LSE_PREV + pid_bh * Nq + offs_m, mask=m_valid, other=0.0)
    tl.store(LSE + pid_bh * Nq + offs_m, anchor + tl.log(l_i), mask=m_valid & ok)
    return ok


@triton.jit
def _dense_attn_kernel(Q, K, V, O, LSE, LSE_PREV, CS, KB, stride_kbb,
                       stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       H, kv_group, Nq, Nk, num_groups, group_size, qk_scale, REDO, PART_O, PART_L, first_split,
                       part_rows, n_split_tiles, tail_ctas, item_tiles,
                       D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                       HAS_CS: tl.constexpr, PRECISION: tl.constexpr, SINGLE_GROUP: tl.constexpr,
                       MAX_G: tl.constexpr, CS_MODE: tl.constexpr, ANCHOR: tl.constexpr, ANCHORED: tl.constexpr,
                       HAS_KB: tl.constexpr, HAS_REDO: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLAG_BLOCK: tl.constexpr = 1024,
                       MAX_PIECES: tl.constexpr = 1):
    if HAS_REDO:
        # Pass after the Gluon anchored kernel (work items = blocks of group_size rows, a multiple of BLOCK_M).
        # Programs below n_split_tiles each add the pieces of one BLOCK_M-row tile of an
        # item the Gluon kernel ran in pieces (its tail); the rest each scan FLAG_BLOCK items' redo flags at once and
        # recompute the flagged ones (rare: the anchor was far off). Tiles needing it, also split tiles whose
        # summed normaliser is out of range, are recomputed with the online softmax.
        pid = tl.program_id(0)
        tiles_per_item = group_size // BLOCK_M
        if pid < n_split_tiles:
            item = first_split + pid // tiles_per_item
            pid_bh = (item // num_groups).to(tl.int64)
            g = item % num_groups
            pid_m = g * tiles_per_item + pid % tiles_per_item
            if pid_m * BLOCK_M < Nq:
                if not _add_tail_pieces(O, LSE, LSE_PREV, PART_O, PART_L, pid_bh, pid_m, g, item - first_split,
                                        part_rows, Nq, group_size, n_split_tiles // tiles_per_item, tail_ctas,
                                        item_tiles, DV, DV_PAD, BLOCK_M, MAX_PIECES):
                    _dense_rows(Q, K, V, O, LSE, LSE_PREV, CS, KB, stride_kbb, stride_qb, stride_qh, stride_qn,
                                stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
                                stride_vd, H, kv_group, Nq, Nk, num_groups, group_size, qk_scale, pid_m, pid_bh,
                                D, DV, D_PAD, DV_PAD, HAS_CS, PRECISION, SINGLE_GROUP, MAX_G, CS_MODE, ANCHORED,
                                HAS_KB, BLOCK_M, BLOCK_N)
        else:
            # REDO [items, 4]: one flag per 64 rows of an item (the Gluon kernel's consumers), the rest unused.
            items = (pid - n_split_tiles) * FLAG_BLOCK + tl.arange(0, FLAG_BLOCK)
            col = tl.arange(0, 4)
            used = (col * 64 < group_size)[None, :]
            flags = tl.load(REDO + items[:, None] * 4 + col[None, :], mask=(items < first_split)[:, None] & used,
                            other=0)
            if tl.max(tl.max(flags, 1), 0) != 0:
                blk = pid - n_split_tiles
                for i in range(blk * FLAG_BLOCK, tl.minimum((blk + 1) * FLAG_BLOCK, first_split)):
                    if tl.max(tl.load(REDO + i * 4 + col, mask=col * 64 < group_size, other=0), 0) != 0:
                        pid_bh = (i // num_groups).to(tl.int64)
                        g = i % num_groups
                        for r in range(tiles_per_item):
                            pid_m = g * tiles_per_item + r
                            if pid_m * BLOCK_M < Nq:
                                _dense_rows(Q, K, V, O, LSE, LSE_PREV, CS, KB, stride_kbb, stride_qb, stride_qh,
                                            stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                                            stride_vb, stride_vh, stride_vn, stride_vd, H, kv_group, Nq, Nk,
                                            num_groups, group_size, qk_scale, pid_m, pid_bh, D, DV, D_PAD, DV_PAD,
                                            HAS_CS, PRECISION, SINGLE_GROUP, MAX_G, CS_MODE, ANCHORED, HAS_KB,
                                            BLOCK_M, BLOCK_N)
    else:
        _dense_rows(Q, K, V, O, LSE, LSE_PREV, CS, KB, stride_kbb, stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                    H, kv_group, Nq, Nk, num_groups, group_size, qk_scale, tl.program_id(0),
                    tl.program_id(1).to(tl.int64), D, DV, D_PAD, DV_PAD, HAS_CS, PRECISION, SINGLE_GROUP, MAX_G,
                    CS_MODE, ANCHORED, HAS_KB, BLOCK_M, BLOCK_N)


@triton.jit
def _dense_rows(Q, K, V, O, LSE, LSE_PREV, CS, KB, stride_kbb, stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                H, kv_group, Nq, Nk, num_groups, group_size, qk_scale, pid_m, pid_bh,
                D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                HAS_CS: tl.constexpr, PRECISION: tl.constexpr, SINGLE_GROUP: tl.constexpr, MAX_G: tl.constexpr,
                CS_MODE: tl.constexpr, ANCHORED: tl.constexpr, HAS_KB: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows pid_m * BLOCK_M ... of head pid_bh: O, LSE and (HAS_CS) their column mass over all keys."""
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
    if ANCHORED:
        m_i = lse_prev2
    cs_row = CS + pid_bh * num_groups * Nk

    kb_row = KB + b * stride_kbb
    m_i, l_i, acc = _attend_all_keys(q, k_base, v_base, kb_row, Nk, m_i, l_i, acc, lse_prev2, cs_row, row0, offs_m,
                                     stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, group_size, Nq,
                                     D, DV, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, HAS_CS, SINGLE_GROUP, MAX_G, CS_MODE,
                                     ANCHORED, HAS_KB, PRECISION)
    if ANCHORED:
        # Rows whose anchored normaliser left the safe range (the logits moved by more than ~40 nats since the
        # previous dense step) are redone with the online softmax; the column mass is already complete.
        bad = m_valid & ((l_i < 8.7e-19) | (l_i > 1.2e30) | (l_i != l_i))
        if tl.sum(bad.to(tl.int32)) > 0:
            m_i, l_i, acc = _attend_all_keys(q, k_base, v_base, kb_row, Nk,
                                             tl.full([BLOCK_M], float("-inf"), tl.float32),
                                             tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, DV_PAD], tl.float32),
                                             lse_prev2, cs_row, row0, offs_m, stride_kn, stride_kd, stride_vn,
                                             stride_vd, qk_scale, group_size, Nq, D, DV, D_PAD, DV_PAD, BLOCK_M,
                                             BLOCK_N, False, SINGLE_GROUP, MAX_G, CS_MODE, False, HAS_KB, PRECISION)

    o = acc / l_i[:, None]
    o_ptrs = O + pid_bh * Nq * DV + offs_m[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=m_valid)


# A tile lies inside one query group when G is a multiple of BLOCK_M (G=192 with 64-row tiles); otherwise it
# touches at most MAX_G groups. Column-mass formulation (CS_MODE): 0 = a second exp2 per score (reference),
# 1 = p * exp2(m - lse_prev) reduced over rows with tl.sum, 2 = the same reduced on the tensor cores (R @ P);
# mode 2 covers at most 16 groups per tile and falls back to mode 1 beyond that.
_dense_attn = triton.heuristics({
    "SINGLE_GROUP": lambda a: a["group_size"] % a["BLOCK_M"] == 0,
    "MAX_G": lambda a: (a["BLOCK_M"] - 1) // a["group_size"] + 2,
    "CS_MODE": lambda a: 1 if a["CS_MODE"] == 2 and (a["BLOCK_M"] - 1) // a["group_size"] + 2 > 16 else a["CS_MODE"],
    "ANCHORED": lambda a: bool(a["ANCHOR"]) and bool(a["HAS_CS"]),
})(_dense_attn_kernel)

CS_MODE = 2  # for explicit configs that do not name one
USE_VENDOR_LSE = True  # the LSE-only dense step through cuDNN / FlashAttention (benchmarks switch it off)
ANCHOR = 1  # likewise: anchor the softmax on lse_prev when it is given (exact either way)
_DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# The pass behind the Gluon kernel: 16-row programs (each inside one query group; the online softmax where a
# recompute is needed, which is rare). Its programs: one per 16 rows of a tail group, adding up that group's
# pieces (16 rows keep all pieces' loads in flight: 64-row programs took 16 us at N4608 on an H100), and one per
# _FLAG_BLOCK groups' redo flags (a vector load; a launch of one 64-row program per tile cost 12 / 17 us at
# N4608 / N16896, mostly flag reads at ~3 resident programs per SM).
_REDO_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "CS_MODE": 1, "ANCHOR": 0, "num_warps": 4, "num_stages": 3}
_FLAG_BLOCK = 1024
# Measured on H100 (benchmarks/KERNEL_NOTES.md, sweep of 6 tilings x 2 formulations x anchoring): with column mass
# the anchored 64-row single-group tiles (one tl.sum per tile) are fastest (N4608 0.73 ms, N16896 9.35 ms vs
# 0.81 / 9.75 for the best online-softmax variant); 128-row tiles need the tensor-core reduction (mode 2).
# Without column mass the 128x64 8-warp and 64x64 4-warp tiles lead (the wrapper prefers cuDNN/flash there).
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "CS_MODE": 1, "ANCHOR": 1}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "CS_MODE": 2, "ANCHOR": 1}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "CS_MODE": 2, "ANCHOR": 1}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "CS_MODE": 2, "ANCHOR": 0}, num_warps=8, num_stages=3),
]
# CS is accumulated with atomics, so every benchmarking run of the autotuner must start from zeros.
_dense_attn_tuned = triton.autotune(_CONFIGS, key=["D_PAD", "DV_PAD", "HAS_CS", "HAS_KB", "kv_group", "Nq", "Nk"],
                                    reset_to_zero=["CS"])(_dense_attn)


_dense_attn_launch = CachedLaunch(_dense_attn_tuned)


def scaled_key_bias(key_bias, batch: int, num_keys: int, scale: float):
    """(key_bias / scale as contiguous-per-row float32 [B, Nk] with its batch stride, or (None, 0)): the kernels
    add it to the raw q.k score before scaling."""
    if key_bias is None:
        return None, 0
    assert key_bias.shape == (batch, num_keys), (tuple(key_bias.shape), (batch, num_keys))
    kb = key_bias.to(torch.float32) / scale
    if kb.stride(-1) != 1:
        kb = kb.contiguous()
    return kb, kb.stride(0)


def pad_dim(d: int) -> int:
    """Head dims padded to a power of two (at least 16) for the kernels' tiles."""
    return max(16, triton.next_power_of_2(d))


# The first dense step needs only O and the LSE: PyTorch's own fused kernels return both. Tried in this order on
# the first call per (dtype, head dim); the first that runs is kept, None when none does (then the Triton kernel).
_VENDOR_LSE_ORDER = ("cudnn", "flash")
_vendor_choice: dict = {}


def _vendor_attention_with_lse(kind: str, q, k, v, scale: float):
    if kind == "cudnn":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                 scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    o, lse = out[0], out[1]
    return o.contiguous(), lse.reshape(q.shape[:3]).to(torch.float32)


def vendor_attention_with_lse(q, k, v, scale: float):
    """(o, lse) from cuDNN / FlashAttention through PyTorch, or None where neither applies (GQA, head dims
    that differ or exceed 256, fp32, CPU)."""
    if (not q.is_cuda or _INTERPRET or q.dtype not in (torch.float16, torch.bfloat16) or k.shape[1] != q.shape[1]
            or q.shape[-1] != v.shape[-1] or q.shape[-1] > 256 or q.shape[-1] % 8):
        return None
    key = (q.dtype, q.shape[-1], q.device)
    kinds = (_vendor_choice[key],) if key in _vendor_choice else _VENDOR_LSE_ORDER
    for kind in kinds:
        if kind is None:
            return None
        try:
            result = _vendor_attention_with_lse(kind, q, k, v, scale)
        except RuntimeError:
            continue
        _vendor_choice[key] = kind
        return result
    _vendor_choice[key] = None
    return None


def _warp_specialized_kernel():
    """The Gluon (Hopper, warp-specialised) column-mass kernel module, or None."""
    return gluon_module("attention_dense_gluon")


def _kernel_args(q, k, v, scale, o, lse, lse_prev, cs, kb, kb_stride, group_size):
    """The kernel's arguments up to qk_scale."""
    H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    return (q, k, v, o, lse, lse_prev, cs, lse if kb is None else kb, kb_stride, *q.stride(), *k.stride(),
            *v.stride(), H, H // k.shape[1], Nq, Nk, -(-Nq // group_size), group_size, scale * _LOG2E)


def _kernel_meta(q, v, has_cs: bool, kb) -> dict:
    D, DV = q.shape[3], v.shape[3]
    return dict(D=D, DV=DV, D_PAD=pad_dim(D), DV_PAD=pad_dim(DV), HAS_CS=has_cs, HAS_KB=kb is not None,
                HAS_REDO=False, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def finish_gluon_dense_step(q, k, v, scale: float, lse_prev, group_size: int, o, lse, redo, first_split: int,
                            part_o, part_l, part_rows: int, tail_ctas: int, item_tiles: int, key_bias_scaled=None,
                            key_bias_stride: int = 0):
    """The launch behind the Gluon column-mass kernel (its outputs o, lse, redo and tail partials as
    ``attention_dense_gluon.dense_colmass_ws`` returns them): adds up the pieces of the groups it ran in pieces
    (work items g + G * (b * H + h) from ``first_split`` on, cut as ``attention_dense_gluon.tail_pieces(items -
    first_split, item_tiles, tail_ctas)``) and recomputes with the online softmax the O and LSE of every group
    flagged in ``redo`` or whose summed normaliser is out of range; the column mass is already complete. The key
    bias comes as ``scaled_key_bias`` returns it."""
    B, H, Nq, _ = q.shape
    kb = key_bias_scaled
    args = _kernel_args(q, k, v, scale, o, lse, lse_prev, lse, kb, key_bias_stride, group_size)
    assert group_size % _REDO_CONFIG["BLOCK_M"] == 0, group_size
    split_tiles = (redo.shape[0] - first_split) * (group_size // _REDO_CONFIG["BLOCK_M"])
    flag_blocks = triton.cdiv(first_split, _FLAG_BLOCK)
    n_tail = redo.shape[0] - first_split
    # Ranges c = c(x) hold tiles x with c(x) = ceil((x + 1) ctas / W) - 1: an item's item_tiles tiles meet at
    # most ceil(item_tiles * ctas / W) + 1 of them (empty ones included).
    max_pieces = min(tail_ctas, -(-item_tiles * tail_ctas // (n_tail * item_tiles)) + 1) if n_tail else 1
    if split_tiles + flag_blocks:
        _dense_attn[(split_tiles + flag_blocks, 1)](*args, redo, part_o, part_l, first_split, part_rows,
                                                    split_tiles, tail_ctas, item_tiles,
                                                    **dict(_kernel_meta(q, v, False, kb), HAS_REDO=True),
                                                    FLAG_BLOCK=_FLAG_BLOCK,
                                                    MAX_PIECES=triton.next_power_of_2(max_pieces), **_REDO_CONFIG)


def dense_attention_lse_colmass(q, k, v, scale: float, lse_prev, group_size: int, config: dict | None = None,
                                key_bias=None, kernel: str = "auto", ws_config: dict | None = None):
    """(o [B,H,Nq,Dv] in q.dtype, lse fp32 [B,H,Nq], column mass fp32 [B,H,ceil(Nq/G),Nk] or None).

    ``config`` forces one launch configuration of this Triton kernel (tests); by default the GPU autotunes and
    the interpreter uses a small fixed configuration. Without ``lse_prev`` (no column mass) and no ``config``,
    PyTorch's fused SDPA kernels are used where they apply (they also return the LSE). With ``lse_prev``,
    ``kernel`` "auto" takes the warp-specialised Gluon kernel where it applies (``attention_dense_gluon.supports``),
    "triton" forces this one and "gluon" requires the Gluon one; ``ws_config`` overrides the Gluon kernel's
    launch settings (benchmarks and tests, e.g. {"SPLIT": n} to split the last n query groups over two CTAs).
    """
    assert kernel in ("auto", "triton", "gluon"), kernel
    B, H, Nq, D = q.shape
    Hk, Nk, DV = k.shape[1], k.shape[2], v.shape[3]
    assert k.shape[0] == B and v.shape[:3] == k.shape[:3] and k.shape[3] == D and H % Hk == 0
    assert max(D, DV) <= 256, "head dims above 256 are not supported"
    if lse_prev is None and config is None and USE_VENDOR_LSE and key_bias is None:
        vendor = vendor_attention_with_lse(q, k, v, scale)
        if vendor is not None:
            return vendor[0], vendor[1], None
    o = torch.empty((B, H, Nq, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    num_groups = -(-Nq // group_size)
    has_cs = lse_prev is not None
    ws = None
    if has_cs and config is None and kernel != "triton":
        ws = _warp_specialized_kernel()
        why = "this Triton has no Gluon" if ws is None else ws.supports(q, k, v, group_size)
        if why is not None:
            if kernel == "gluon":
                raise ValueError(f"the warp-specialised column-mass kernel does not apply here: {why}")
            ws = None
    if has_cs:
        lse_prev = lse_prev.to(torch.float32).contiguous()
        # The Gluon kernel stores every column-mass entry once; the Triton kernel accumulates with atomics.
        cs = (torch.empty if ws is not None else torch.zeros)((B, H, num_groups, Nk), dtype=torch.float32,
                                                               device=q.device)
    else:
        lse_prev = lse
        cs = torch.empty((1,), dtype=torch.float32, device=q.device)
    kb, kb_stride = scaled_key_bias(key_bias, B, Nk, scale)
    if ws is not None:
        redo = torch.empty((B * H * num_groups, 4), dtype=torch.int32, device=q.device)
        split = ws.dense_colmass_ws(q, k, v, scale, lse_prev, group_size, o, lse, cs, redo, kb, kb_stride,
                                    config=ws_config)
        finish_gluon_dense_step(q, k, v, scale, lse_prev, group_size, o, lse, redo, *split, kb, kb_stride)
        return o, lse, cs
    no_redo = (lse, lse, lse, 0, 0, 0, 1, 1)  # REDO .. item_tiles: unused outside the pass behind the Gluon kernel
    args = _kernel_args(q, k, v, scale, o, lse, lse_prev, cs, kb, kb_stride, group_size) + no_redo
    meta = _kernel_meta(q, v, has_cs, kb)
    if config is None and _INTERPRET:
        config = _DEFAULT_CONFIG
    if config is None:
        _dense_attn_launch(lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H), args, meta)
    else:
        config = {"CS_MODE": CS_MODE, "ANCHOR": ANCHOR, **config}
        _dense_attn[(triton.cdiv(Nq, config["BLOCK_M"]), B * H)](*args, **meta, **config)
    return o, lse, (cs if has_cs else None)

"""Warp-specialised column-sparse attention delta for Hopper (sm_90), written in Gluon.

Same result as ``attention_sparse_triton.sparse_attention_delta`` (and the torch reference
``attention_reference.sparse_attention_delta``): out = base + sign * P^S, with P^S the attention of each query
over its group's selected key columns only (softmax renormalised over that set).

Why a second kernel: the Triton kernel runs three 64-row programs per 192-query group, and each gathers the same
selected K/V rows, so every row crosses L2 three times; at HunyuanVideo size that traffic, not the tensor cores,
bounds it (~55 % of the ideal). Here one CTA owns a whole query group and gathers each selected row once:

    before (Triton, 3 programs per group)          after (this kernel, 1 CTA per group)
    prog 0: gather K/V[idx] -> softmax(Q0 K^T) V    producer warpgroup: idx -> cp.async gather of K/V[idx]
    prog 1: gather K/V[idx] -> softmax(Q1 K^T) V                        into a NUM_STAGES ring (mbarriers)
    prog 2: gather K/V[idx] -> softmax(Q2 K^T) V    consumer warpgroups 0..2: rows 64c..64c+63 of the group,
                                                     wgmma on the shared tiles, online softmax, epilogue

Partitions (``gl.warp_specialize``): the default partition (4 warps, few registers) is the producer; each
consumer is a 4-warp worker with a larger register budget. Per ring slot: ``ready`` completes when all producer
threads' cp.async copies into the slot have landed (cp.async.mbarrier.arrive), ``empty`` when every consumer has
finished its two wgmmas on the slot. Selected-index tails (n_sel not a multiple of BLOCK_N) gather key row 0 and
mask the scores to -inf; query rows past the sequence end compute on zeros and are never stored.

Supported here: CUDA capability 9.x, bf16/fp16, head dim 64 or 128 (q, k, v, base, out alike), unit stride on the
last dim and 16-byte aligned rows, group_size a multiple of 64 up to 192. Anything else takes the Triton kernel
(``supports`` says which).
"""
from __future__ import annotations


from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from chipmunk_compile.kernels.kv_ring_gluon import kv_ring_producer as _producer
from chipmunk_compile.kernels.kv_ring_gluon import allocate_kv_ring as _allocate_ring
from chipmunk_compile.kernels.kv_ring_gluon import attention_unsupported_reason
from chipmunk_compile.kernels.kv_ring_gluon import load_query_tile_rows as _load_query_tile
from chipmunk_compile.kernels.launch import CachedLaunch

_LOG2E = 1.4426950408889634
_ROWS = 64  # query rows per consumer warpgroup (one wgmma M tile)


@gluon.jit
def _consumer(Q, KB, IDX, BASE, OUT, PERM, q_smem, k_bufs, v_bufs, ready_bars, empty_bars,
              b, h, idx_row, row0, row_end, n_sel, kb_off, qk_scale, sign,
              stride_qb, stride_qh, stride_qn, stride_bb, stride_bh, stride_bn, stride_ob, stride_oh, stride_on,
              D: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_KB: gl.constexpr,
              OVERLAP: gl.constexpr, HAS_PERM: gl.constexpr):
    ROWS: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    _load_query_tile(Q, q_smem, b, h, row0, row_end, stride_qb, stride_qh, stride_qn, PERM, D, HAS_PERM)

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    idx_base = IDX + idx_row * n_sel
    n_tiles = gl.cdiv(n_sel, BLOCK_N)
    s = s_zero
    if OVERLAP:  # S of tile 0 up front; each iteration then issues the next tile's S behind its own P @ V
        mbarrier.wait(ready_bars.index(0), 0)
        fence_async_shared()
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    for i in range(n_tiles):
        slot = i % NUM_STAGES
        if not OVERLAP:
            mbarrier.wait(ready_bars.index(slot), (i // NUM_STAGES) & 1)
            # The gathers were generic-proxy writes; wgmma reads shared memory through the async proxy.
            fence_async_shared()
            s = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        cols = i * BLOCK_N + offs_n
        if HAS_KB:
            idx = gl.load(idx_base + cols, mask=cols < n_sel, other=0)
            s = s + gl.load(KB + kb_off + idx)[None, :]
        if (i + 1) * BLOCK_N > n_sel:  # ragged last tile: its tail columns gathered key row 0
            s = gl.where((cols < n_sel)[None, :], s, float("-inf"))
        # log2 units: one FMA (scale, subtract the running max) and one exp2 per score.
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        acc = warpgroup_mma(p_op, v_bufs.index(slot), acc, is_async=True)
        if OVERLAP:
            # Next tile's S runs on the tensor cores behind this P @ V. After the last tile the wait is skipped
            # and the product (of a slot nobody writes any more) is discarded.
            nxt = i + 1
            nslot = nxt % NUM_STAGES
            mbarrier.wait(ready_bars.index(nslot), (nxt // NUM_STAGES) & 1, pred=nxt < n_tiles)
            fence_async_shared()
            s = warpgroup_mma(q_smem, k_bufs.index(nslot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc, s = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty_bars.index(slot), count=1)

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    row_ok = rows[:, None] < row_end
    rows64 = rows.to(gl.int64)[:, None]
    base = gl.load(BASE + b * stride_bb + h * stride_bh + rows64 * stride_bn + offs_d[None, :], mask=row_ok,
                   other=0.0)
    out = base.to(gl.float32) + sign * (acc / l_o[:, None])
    if HAS_PERM:  # row r's result belongs to query token PERM[r] (token_grid reordering)
        out_rows = gl.load(PERM + rows, mask=rows < row_end, other=0).to(gl.int64)[:, None]
    else:
        out_rows = rows64
    gl.store(OUT + b * stride_ob + h * stride_oh + out_rows * stride_on + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok)


@gluon.jit
def _sparse_attn_ws_kernel(Q, K, V, IDX, BASE, OUT, KB, PERM, stride_kbb,
                           stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_bb, stride_bh, stride_bn,
                           stride_ob, stride_oh, stride_on,
                           H, kv_group, Nq, num_groups, group_size, n_sel, qk_scale, sign,
                           D: gl.constexpr, HAS_KB: gl.constexpr, HAS_PERM: gl.constexpr, BLOCK_N: gl.constexpr,
                           NUM_STAGES: gl.constexpr, N_CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                           OVERLAP: gl.constexpr):
    g = gl.program_id(0)
    pid_bh = gl.program_id(1).to(gl.int64)  # 64-bit offsets: b * stride_qb can pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    hk = h // kv_group
    idx_row = pid_bh * num_groups + g
    row0 = g * group_size
    row_end = gl.minimum(row0 + group_size, Nq)
    kb_off = b * stride_kbb

    dtype: gl.constexpr = Q.dtype.element_ty
    k_bufs, v_bufs, q_bufs, ready_bars, empty_bars = _allocate_ring(dtype, D, BLOCK_N, NUM_STAGES, N_CONSUMERS, False)

    # Partition argument tuples are spelled out per call: held in a variable or concatenated, a tuple loses its
    # constexprs (they become runtime values or plain ints that warp_specialize cannot pass).
    if N_CONSUMERS == 3:
        gl.warp_specialize([
            (_producer, (K, V, IDX, k_bufs, v_bufs, ready_bars, empty_bars, b, hk, idx_row, n_sel, stride_kb,
                         stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, k_bufs, K, 0, 0, D, BLOCK_N,
                         NUM_STAGES, True, 0)),
            (_consumer, (Q, KB, IDX, BASE, OUT, PERM, q_bufs.index(0), k_bufs, v_bufs, ready_bars, empty_bars, b, h,
                         idx_row, row0, row_end, n_sel, kb_off, qk_scale, sign, stride_qb, stride_qh, stride_qn,
                         stride_bb, stride_bh, stride_bn, stride_ob, stride_oh, stride_on, D, BLOCK_N, NUM_STAGES,
                         HAS_KB, OVERLAP, HAS_PERM)),
            (_consumer, (Q, KB, IDX, BASE, OUT, PERM, q_bufs.index(1), k_bufs, v_bufs, ready_bars, empty_bars, b, h,
                         idx_row, row0 + 64, row_end, n_sel, kb_off, qk_scale, sign, stride_qb, stride_qh,
                         stride_qn, stride_bb, stride_bh, stride_bn, stride_ob, stride_oh, stride_on, D, BLOCK_N,
                         NUM_STAGES, HAS_KB, OVERLAP, HAS_PERM)),
            (_consumer, (Q, KB, IDX, BASE, OUT, PERM, q_bufs.index(2), k_bufs, v_bufs, ready_bars, empty_bars, b, h,
                         idx_row, row0 + 128, row_end, n_sel, kb_off, qk_scale, sign, stride_qb, stride_qh,
                         stride_qn, stride_bb, stride_bh, stride_bn, stride_ob, stride_oh, stride_on, D, BLOCK_N,
                         NUM_STAGES, HAS_KB, OVERLAP, HAS_PERM)),
        ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])
    elif N_CONSUMERS == 2:
        gl.warp_specialize([
            (_producer, (K, V, IDX, k_bufs, v_bufs, ready_bars, empty_bars, b, hk, idx_row, n_sel, stride_kb,
                         stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, k_bufs, K, 0, 0, D, BLOCK_N,
                         NUM_STAGES, True, 0)),
            (_consumer, (Q, KB, IDX, BASE, OUT, PERM, q_bufs.index(0), k_bufs, v_bufs, ready_bars, empty_bars, b, h,
                         idx_row, row0, row_end, n_sel, kb_off, qk_scale, sign, stride_qb, stride_qh, stride_qn,
                         stride_bb, stride_bh, stride_bn, stride_ob, stride_oh, stride_on, D, BLOCK_N, NUM_STAGES,
                         HAS_KB, OVERLAP, HAS_PERM)),
            (_consumer, (Q, KB, IDX, BASE, OUT, PERM, q_bufs.index(1), k_bufs, v_bufs, ready_bars, empty_bars, b, h,
                         idx_row, row0 + 64, row_end, n_sel, kb_off, qk_scale, sign, stride_qb, stride_qh,
                         stride_qn, stride_bb, stride_bh, stride_bn, stride_ob, stride_oh, stride_on, D, BLOCK_N,
                         NUM_STAGES, HAS_KB, OVERLAP, HAS_PERM)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (K, V, IDX, k_bufs, v_bufs, ready_bars, empty_bars, b, hk, idx_row, n_sel, stride_kb,
                         stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, k_bufs, K, 0, 0, D, BLOCK_N,
                         NUM_STAGES, True, 0)),
            (_consumer, (Q, KB, IDX, BASE, OUT, PERM, q_bufs.index(0), k_bufs, v_bufs, ready_bars, empty_bars, b, h,
                         idx_row, row0, row_end, n_sel, kb_off, qk_scale, sign, stride_qb, stride_qh, stride_qn,
                         stride_bb, stride_bh, stride_bn, stride_ob, stride_oh, stride_on, D, BLOCK_N, NUM_STAGES,
                         HAS_KB, OVERLAP, HAS_PERM)),
        ], [4], [CONSUMER_REGS])


# 16 warps per CTA under maxnreg 128 (one CTA per SM): the 4-warp producer gets (16 * 128 - 12 * CONSUMER_REGS) / 4
# registers per thread.
# Measured (benchmarks/attention_ws.py, HunyuanVideo 93 %): 144 registers per consumer thread (the producer then
# gets 80) beat 152 by 0.2-3.7 % on H100 and H200; 4 ring slots; OVERLAP (next S behind P @ V) gains ~1.4 %.
_CONFIG = dict(BLOCK_N=64, NUM_STAGES=4, CONSUMER_REGS=144, OVERLAP=True)
_MAXNREG = 128


_sparse_attn_ws_launch = CachedLaunch(_sparse_attn_ws_kernel)


def supports(q, k, v, base, out, group_size: int, capability: tuple | None = None) -> str | None:
    """None when this kernel handles the call, else why not (the caller then uses the Triton kernel).
    ``capability`` (tests) skips the device checks and takes that CUDA compute capability."""
    return attention_unsupported_reason(q, k, v, (base, out), group_size, capability)


def sparse_attention_delta_ws(q, k, v, scale: float, indices, group_size: int, base, sign: float, out,
                              key_bias_scaled=None, key_bias_stride: int = 0, config: dict | None = None,
                              token_perm=None):
    """Launch; the caller checked ``supports`` (and ``token_perm``) and prepared ``out`` and the scaled key bias."""
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    num_groups, n_sel = indices.shape[2], indices.shape[3]
    cfg = dict(_CONFIG, **(config or {}))
    kb = key_bias_scaled
    _sparse_attn_ws_launch(
        (num_groups, B * H),
        (q, k, v, indices, base, out, out if kb is None else kb, out if token_perm is None else token_perm,
         key_bias_stride,
         *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *base.stride()[:3], *out.stride()[:3],
         H, H // Hk, Nq, num_groups, group_size, n_sel, scale * _LOG2E, float(sign)),
        dict(D=D, HAS_KB=kb is not None, HAS_PERM=token_perm is not None, BLOCK_N=cfg["BLOCK_N"],
             NUM_STAGES=cfg["NUM_STAGES"], N_CONSUMERS=-(-group_size // _ROWS), CONSUMER_REGS=cfg["CONSUMER_REGS"],
             OVERLAP=cfg["OVERLAP"], num_warps=4, maxnreg=_MAXNREG))
    return out

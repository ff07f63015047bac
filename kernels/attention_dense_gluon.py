"""Warp-specialised dense attention with LSE and per-group column mass for Hopper (sm_90), written in Gluon.

Same result as ``attention_dense_triton.dense_attention_lse_colmass`` with ``lse_prev`` given (and the torch
reference ``attention_reference.dense_attention_lse_colmass``): O, the per-query LSE and, from the same scores,
the column mass cs[b, h, g, j] = sum over the queries i of group g of exp(s_ij - lse_prev_i).

    before (Triton, 64-row programs)                after (this kernel, persistent CTAs, one 192-query group at a time)
    prog r: S = Q_r K^T [queries, keys]             producer warpgroup: Q tiles and K/V tiles -> ring (TMA); adds
            p = exp(S - lse_prev), O += p V           the consumers' per-key partial sums of a slot, stores cs once
            cs[g] += colsum(p): a reduction         consumer warpgroups 0..2 (64 queries each), per shared tile:
            across lanes and warps, atomics (x3)      S^T = K Q_c^T [keys, queries] (wgmma)
                                                      P^T = exp2(S^T c - lse_prev)  (anchored: no max, no rescale)
                                                      partial cs = rowsum(P^T): in-thread + 2 shuffles -> smem
                                                      P^T -> smem; O^T += V^T P^T (wgmma, both transposed)

Scores are kept keys-major (S^T) so the column mass, a sum over queries, is a row sum inside each warp; the
three consumers' partial sums meet in shared memory and the producer writes each column-mass entry once (no
atomics, no zero-filled output). The per-query normaliser l (a sum over keys) is accumulated per thread and
reduced once at the end. The softmax is anchored on the previous dense step's LSE (p is at once the attention
weight and the column-mass term); LSE = lse_prev + log(l). Exact for any anchor: a group whose row normalisers
leave [2^-60, 2^100] (the logits moved by more than ~40 nats since the previous dense step) is flagged, and the
Triton kernel's online softmax recomputes O and LSE for the flagged groups only (a second launch that scans the
flags); the column mass is complete either way. Query rows past the sequence end get an infinite anchor, so
they add nothing to the column mass.

Data movement: K/V tiles and the query tiles come by TMA (descriptors over [B, H, N, D], any 16-byte-aligned
strides; rows past the end zero-filled): the first version's cp.async copies from the producer's threads were
half of the shared-memory (LSU) traffic that bounded it (Nsight Compute, H100). The CTAs are persistent (one per
SM, looping over the groups), so the next group's query and K/V tiles load while the consumers finish the last.

Tail (``split_count``, ``tail_pieces``): with one group per CTA-turn, the last, partial wave would leave SMs idle
for up to a group's time (576 groups = 4.4 waves on 132 SMs). The key tiles of those last groups are instead cut
into one equal range per SM (stream-K style); each piece writes its keys' column mass directly and its
unnormalised O^T and l to scratch; with the same anchor the pieces simply add, which the second launch does
(O = sum O_j / sum l_j, LSE = lse_prev + log(sum l_j), recomputed online if that sum is out of range).

Supported here: CUDA capability 9.x, bf16/fp16, head dim 64 or 128 (q, k, v alike, same head count), unit-stride
16-byte aligned rows, group_size 64, 128 or 192. Anything else takes the Triton kernel (``supports``).
"""
from __future__ import annotations


import torch

from triton.experimental import gluon
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from chipmunk_compile.kernels.kv_ring_gluon import allocate_kv_ring as _allocate_ring
from chipmunk_compile.kernels.kv_ring_gluon import attention_unsupported_reason
from chipmunk_compile.kernels.kv_ring_gluon import load_query_tile as _load_query_tile
from chipmunk_compile.kernels.kv_ring_gluon import kv_ring_producer as _producer
from chipmunk_compile.kernels.kv_ring_gluon import kv_ring_producer_tma as _producer_tma
from chipmunk_compile.kernels.kv_ring_gluon import kv_tile as _kv_tile
from chipmunk_compile.kernels.launch import sm_count

_LOG2E = 1.4426950408889634
_ROWS = 64


@gluon.jit
def _unit_coords(u, first_split, n_tail, num_groups, Nk, tail_ctas, BLOCK_N: gl.constexpr,
                 N_CONSUMERS: gl.constexpr):
    """Work unit u -> (pid_bh, g, key_lo, n_keys, part_row). Units below first_split are the work items t = g +
    num_groups * (b * H + h) in order; the n_tail items after them (the last, partial wave) are shared out as
    ``tail_pieces`` describes: unit first_split + j is piece j (n_keys <= 0: empty). part_row: the first scratch
    row of a piece's partial O and l, negative for whole items."""
    tail = u >= first_split
    j = gl.maximum(u - first_split, 0)
    n_t = gl.cdiv(Nk, BLOCK_N)
    c = (j % tail_ctas).to(gl.int64)
    w = n_tail.to(gl.int64) * n_t
    lo = c * w // tail_ctas
    hi = (c + 1) * w // tail_ctas
    item_rel = lo // n_t + j // tail_ctas
    tile_lo = gl.maximum(lo, item_rel * n_t) - item_rel * n_t
    tile_hi = gl.minimum(hi, (item_rel + 1) * n_t) - item_rel * n_t
    t = gl.where(tail, first_split + item_rel, u)
    key_lo = gl.where(tail, tile_lo * BLOCK_N, 0).to(gl.int32)
    n_keys = gl.where(tail, gl.minimum(tile_hi * BLOCK_N, Nk) - tile_lo * BLOCK_N, Nk).to(gl.int32)
    part_row = gl.where(tail, j * (N_CONSUMERS * 64), -1024)
    return (t // num_groups).to(gl.int64), (t % num_groups).to(gl.int32), key_lo, n_keys, part_row


@gluon.jit
def _colmass_consumer(Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_smem, k_bufs, v_bufs, ready_bars, empty_bars,
                      q_ready, q_empty, pt_smem, colbuf, wg, n_units, first_split, n_tail, tail_ctas, H, num_groups,
                      group_size, Nq, Nk, qk_scale,
                      stride_kbb, stride_qb, stride_qh, stride_qn, D: gl.constexpr, BLOCK_N: gl.constexpr,
                      NUM_STAGES: gl.constexpr, HAS_KB: gl.constexpr, TMA: gl.constexpr,
                      N_CONSUMERS: gl.constexpr):
    # Consumer warpgroup wg (queries 64 wg .. 64 wg + 63 of each group) of a persistent CTA: its units in order.
    first_tile = 0
    n_done = 0
    for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
        pid_bh, g, key_lo, n_keys, part_row = _unit_coords(u, first_split, n_tail, num_groups, Nk, tail_ctas, BLOCK_N,
                                                           N_CONSUMERS)
        if n_keys > 0:  # (an empty tail piece is skipped by the producer too)
            b = pid_bh // H
            row0 = g * group_size + 64 * wg
            _colmass_unit(Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_smem, k_bufs, v_bufs, ready_bars,
                          empty_bars, q_ready, q_empty, n_done & 1, pt_smem, colbuf, wg, b, pid_bh % H, pid_bh,
                          pid_bh * num_groups + g, gl.where(part_row >= 0, part_row + 64 * wg, part_row), row0,
                          gl.minimum(g * group_size + group_size, Nq), Nq, n_keys, b * stride_kbb + key_lo,
                          qk_scale, first_tile, stride_qb, stride_qh, stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB, TMA)
            first_tile += gl.cdiv(n_keys, BLOCK_N)
            n_done += 1


@gluon.jit
def _colmass_unit(Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_buf, k_bufs, v_bufs, ready_bars, empty_bars,
                  q_ready, q_empty, q_phase, pt_smem, colbuf, wg, b, h, pid_bh, redo_off, part_row, row0, row_end, Nq,
                  Nk, kb_off, qk_scale,
                  first_tile, stride_qb, stride_qh, stride_qn, D: gl.constexpr, BLOCK_N: gl.constexpr,
                  NUM_STAGES: gl.constexpr, HAS_KB: gl.constexpr, TMA: gl.constexpr):
    # One unit: Nk, KB + kb_off: its keys (all of them, or one half of a split group's); part_row < 0: a whole
    # group, else the first scratch row of this consumer's unnormalised partial O and l; first_tile: the ring
    # position of its first key tile. TMA: the producer loads the query tile too (q_ready, phase q_phase) and
    # may load the next unit's once this one's scores are done (q_empty); else it is loaded here.
    # Scores transposed, S^T = K Q^T [keys, queries]: the column mass (a sum over queries) is then a row sum
    # (in-thread adds and two shuffles, no cross-warp step), and O^T += V^T P^T with P^T staged in shared memory.
    ROWS: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    if TMA:
        q_smem = q_buf.reshape([ROWS, D])
        mbarrier.wait(q_ready, q_phase)
    else:
        q_smem = q_buf
        _load_query_tile(Q, q_smem, b, h, row0, row_end, stride_qb, stride_qh, stride_qn, D)

    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
    row_ok = rows < row_end
    anchor = gl.load(LSE_PREV + pid_bh * Nq + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    acc = gl.zeros([D, ROWS], gl.float32, layout=o_layout)  # O^T
    s_zero = gl.zeros([BLOCK_N, ROWS], gl.float32, layout=s_layout)
    # Per-thread partial row normalisers: key rows k = 16 w + 8 r + t (warp w, register r, lane group t) of a
    # tile; the r half is summed in-thread each tile, the rest once at the end.
    l_part = gl.sum(gl.reshape(s_zero, [BLOCK_N // 16, 2, 8, ROWS]), 1)
    offs_k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    n_tiles = gl.cdiv(Nk, BLOCK_N)
    for i in range(n_tiles):
        slot = (first_tile + i) % NUM_STAGES
        mbarrier.wait(ready_bars.index(slot), ((first_tile + i) // NUM_STAGES) & 1)
        if not TMA:  # cp.async wrote the slot through the generic proxy; the wgmma reads it through the async one
            fence_async_shared()
        st = warpgroup_mma(_kv_tile(k_bufs, slot, BLOCK_N, D, TMA), q_smem.permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)
        st = warpgroup_mma_wait(num_outstanding=0, deps=(st, ))
        keys = i * BLOCK_N + offs_k
        if HAS_KB:
            st = st + gl.load(KB + kb_off + keys, mask=keys < Nk, other=0.0)[:, None]
        if (i + 1) * BLOCK_N > Nk:  # ragged last tile: its tail rows read key 0
            st = gl.where((keys < Nk)[:, None], st, float("-inf"))
        pt = gl.exp2(st * qk_scale - anchor[None, :])
        pt_smem.store(pt.to(Q.dtype.element_ty))
        fence_async_shared()
        acc = warpgroup_mma(_kv_tile(v_bufs, slot, BLOCK_N, D, TMA).permute((1, 0)), pt_smem, acc, is_async=True)
        # The sums run on the CUDA cores while P^T V^T runs on the tensor cores.
        l_part = l_part + gl.sum(gl.reshape(pt, [BLOCK_N // 16, 2, 8, ROWS]), 1)
        colbuf.index(slot * 4 + wg).store(gl.sum(pt, 1))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty_bars.index(slot), count=1)
    if TMA:
        mbarrier.arrive(q_empty, count=1)

    l_i = gl.convert_layout(gl.sum(gl.sum(l_part, 1), 0), gl.SliceLayout(0, s_layout))  # lanes, then warps
    if part_row >= 0:
        # Half of a split group: the two halves' partials add up (same anchor), combined by the redo launch.
        prow = part_row + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
        gl.store(PART_L + prow, l_i)
        prow_o = part_row + gl.arange(0, ROWS, layout=gl.SliceLayout(0, o_layout))
        offs_do = gl.arange(0, D, layout=gl.SliceLayout(1, o_layout))
        gl.store(PART_O + prow_o.to(gl.int64)[None, :] * D + offs_do[:, None], acc)
    else:
        gl.store(LSE + pid_bh * Nq + rows, (anchor + gl.log2(l_i)) * 0.6931471805599453, mask=row_ok)
        bad = row_ok & ((l_i < 8.7e-19) | (l_i > 1.2e30) | (l_i != l_i))
        # This consumer's flag of the item, written either way (no zero-filled buffer to launch).
        gl.store(REDO + redo_off * 4 + wg, gl.max(bad.to(gl.int32), 0))
        o_t = acc / gl.convert_layout(l_i, gl.SliceLayout(0, o_layout))[None, :]
        # O^T -> O rows: head dim fastest per thread for 16-byte stores.
        st_layout: gl.constexpr = gl.BlockedLayout([8, 1], [D // 8, 32 // (D // 8)], [1, 4], [0, 1])
        o_t = gl.convert_layout(o_t.to(O.dtype.element_ty), st_layout)
        o_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, st_layout))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(1, st_layout))
        gl.store(O + (pid_bh * Nq + o_rows.to(gl.int64))[None, :] * D + offs_d[:, None], o_t,
                 mask=(o_rows < row_end)[None, :])


@gluon.jit
def _dense_producer(K, V, K_DESC, V_DESC, Q_DESC, k_bufs, v_bufs, q_bufs, ready_bars, empty_bars, q_ready, q_empty,
                    colbuf, CS, n_units, first_split, n_tail, tail_ctas, H, num_groups, group_size, Nk, stride_kb,
                    stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    D: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, N_CONSUMERS: gl.constexpr,
                    TMA: gl.constexpr):
    # The persistent CTA's units in order, K/V tiles by TMA or by cp.async from these threads; each unit's column
    # mass is flushed before the next unit's tiles enter the ring (the consumers' epilogue overlaps that refill).
    first_tile = 0
    n_done = 0
    for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
        pid_bh, g, key_lo, n_keys, part_row = _unit_coords(u, first_split, n_tail, num_groups, Nk, tail_ctas, BLOCK_N,
                                                           N_CONSUMERS)
        if n_keys > 0:
            b = pid_bh // H
            h = pid_bh % H
            cs_off = (pid_bh * num_groups + g) * Nk + key_lo
            if TMA:
                for c in gl.static_range(N_CONSUMERS):  # query tiles (rows past the end zero-filled)
                    mbarrier.wait(q_empty.index(c), (n_done & 1) ^ 1)
                    mbarrier.expect(q_ready.index(c), 64 * D * K.dtype.element_ty.primitive_bitwidth // 8)
                    tma.async_copy_global_to_shared(Q_DESC, [b.to(gl.int32), h.to(gl.int32),
                                                             g * group_size + 64 * c, 0],
                                                    q_ready.index(c), q_bufs.index(c))
                _producer_tma(K_DESC, V_DESC, k_bufs, v_bufs, ready_bars, empty_bars, b, h, key_lo, n_keys, colbuf,
                              CS, cs_off, first_tile, BLOCK_N * D * K.dtype.element_ty.primitive_bitwidth // 8,
                              BLOCK_N, NUM_STAGES, N_CONSUMERS)
            else:
                _producer(K + key_lo.to(gl.int64) * stride_kn, V + key_lo.to(gl.int64) * stride_vn, K, k_bufs,
                          v_bufs, ready_bars, empty_bars, b, h, 0, n_keys, stride_kb, stride_kh, stride_kn, stride_vb,
                          stride_vh, stride_vn, colbuf, CS, cs_off, first_tile, D, BLOCK_N, NUM_STAGES, False,
                          N_CONSUMERS)
            first_tile += gl.cdiv(n_keys, BLOCK_N)
            n_done += 1


@gluon.jit
def _dense_colmass_ws_kernel(Q, K, V, Q_DESC, K_DESC, V_DESC, O, LSE, LSE_PREV, CS, KB, REDO, PART_O, PART_L,
                             stride_kbb, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn,
                             H, Nq, Nk, num_groups, group_size, first_split, n_tail, tail_ctas, n_units, qk_scale,
                             D: gl.constexpr, HAS_KB: gl.constexpr, BLOCK_N: gl.constexpr,
                             NUM_STAGES: gl.constexpr, N_CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                             TMA: gl.constexpr):
    # Persistent: CTA c runs units c, c + grid, ... (see _unit_coords); one consumer warpgroup per 64 queries.
    dtype: gl.constexpr = Q.dtype.element_ty
    k_bufs, v_bufs, q_bufs, ready_bars, empty_bars = _allocate_ring(dtype, D, BLOCK_N, NUM_STAGES, N_CONSUMERS, TMA)
    pt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], dtype)
    pt_bufs = gl.allocate_shared_memory(dtype, [N_CONSUMERS, BLOCK_N, 64], pt_layout)  # each consumer's P^T
    # Per ring slot, each consumer's per-key partial column sums (row 4 * slot + consumer; power-of-two shape).
    colbuf = gl.allocate_shared_memory(gl.float32, [NUM_STAGES * 4, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # TMA: the query tiles' barriers (loaded: one arrival with the byte count; free: the consumer's arrival).
    q_ready = gl.allocate_shared_memory(gl.int64, [N_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [N_CONSUMERS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(N_CONSUMERS):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)

    # Partition argument tuples are spelled out per call: held in a variable or concatenated, a tuple loses its
    # constexprs (they become runtime values or plain ints that warp_specialize cannot pass).
    if N_CONSUMERS == 3:
        gl.warp_specialize([
            (_dense_producer, (K, V, K_DESC, V_DESC, Q_DESC, k_bufs, v_bufs, q_bufs, ready_bars, empty_bars,
                               q_ready, q_empty, colbuf, CS, n_units, first_split, n_tail, tail_ctas, H, num_groups,
                               group_size, Nk,
                               stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, D, BLOCK_N,
                               NUM_STAGES, N_CONSUMERS, TMA)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_bufs.index(0), k_bufs, v_bufs,
                                 ready_bars, empty_bars, q_ready.index(0), q_empty.index(0), pt_bufs.index(0),
                                 colbuf, 0, n_units, first_split, n_tail, tail_ctas, H,
                                 num_groups, group_size, Nq, Nk, qk_scale, stride_kbb, stride_qb, stride_qh,
                                 stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB, TMA, N_CONSUMERS)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_bufs.index(1), k_bufs, v_bufs,
                                 ready_bars, empty_bars, q_ready.index(1), q_empty.index(1), pt_bufs.index(1),
                                 colbuf, 1, n_units, first_split, n_tail, tail_ctas, H,
                                 num_groups, group_size, Nq, Nk, qk_scale, stride_kbb, stride_qb, stride_qh,
                                 stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB, TMA, N_CONSUMERS)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_bufs.index(2), k_bufs, v_bufs,
                                 ready_bars, empty_bars, q_ready.index(2), q_empty.index(2), pt_bufs.index(2),
                                 colbuf, 2, n_units, first_split, n_tail, tail_ctas, H,
                                 num_groups, group_size, Nq, Nk, qk_scale, stride_kbb, stride_qb, stride_qh,
                                 stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB, TMA, N_CONSUMERS)),
        ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])
    elif N_CONSUMERS == 2:
        gl.warp_specialize([
            (_dense_producer, (K, V, K_DESC, V_DESC, Q_DESC, k_bufs, v_bufs, q_bufs, ready_bars, empty_bars,
                               q_ready, q_empty, colbuf, CS, n_units, first_split, n_tail, tail_ctas, H, num_groups,
                               group_size, Nk,
                               stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, D, BLOCK_N,
                               NUM_STAGES, N_CONSUMERS, TMA)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_bufs.index(0), k_bufs, v_bufs,
                                 ready_bars, empty_bars, q_ready.index(0), q_empty.index(0), pt_bufs.index(0),
                                 colbuf, 0, n_units, first_split, n_tail, tail_ctas, H,
                                 num_groups, group_size, Nq, Nk, qk_scale, stride_kbb, stride_qb, stride_qh,
                                 stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB, TMA, N_CONSUMERS)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_bufs.index(1), k_bufs, v_bufs,
                                 ready_bars, empty_bars, q_ready.index(1), q_empty.index(1), pt_bufs.index(1),
                                 colbuf, 1, n_units, first_split, n_tail, tail_ctas, H,
                                 num_groups, group_size, Nq, Nk, qk_scale, stride_kbb, stride_qb, stride_qh,
                                 stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB, TMA, N_CONSUMERS)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_dense_producer, (K, V, K_DESC, V_DESC, Q_DESC, k_bufs, v_bufs, q_bufs, ready_bars, empty_bars,
                               q_ready, q_empty, colbuf, CS, n_units, first_split, n_tail, tail_ctas, H, num_groups,
                               group_size, Nk,
                               stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, D, BLOCK_N,
                               NUM_STAGES, N_CONSUMERS, TMA)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, PART_O, PART_L, q_bufs.index(0), k_bufs, v_bufs,
                                 ready_bars, empty_bars, q_ready.index(0), q_empty.index(0), pt_bufs.index(0),
                                 colbuf, 0, n_units, first_split, n_tail, tail_ctas, H,
                                 num_groups, group_size, Nq, Nk, qk_scale, stride_kbb, stride_qb, stride_qh,
                                 stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB, TMA, N_CONSUMERS)),
        ], [4], [CONSUMER_REGS])


# Measured on H200 (benchmarks/attention_ws.py): 3 stages (4 need 232 KiB of shared memory with the P^T and
# column-sum buffers); 152 registers per consumer thread (160 leaves the producer 32 and is slower).
# K/V tiles come by TMA (TMA=0: cp.async from the producer's threads, which the first version used).
# PERSISTENT: one CTA per SM looping over the work (0: one CTA per work unit, as the first version).
_CONFIG = dict(BLOCK_N=64, NUM_STAGES=4, CONSUMER_REGS=160, TMA=1, PERSISTENT=1)
_MAXNREG = 128


def supports(q, k, v, group_size: int, capability: tuple | None = None) -> str | None:
    """None when this kernel handles the call, else why not (the caller then uses the Triton kernel).
    ``capability`` (tests) skips the device checks and takes that CUDA compute capability."""
    why = attention_unsupported_reason(q, k, v, (), group_size, capability)
    if why is None and k.shape[1] != q.shape[1]:
        why = "needs as many K/V heads as query heads"
    return why




_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def kv_tile_descriptor(t: torch.Tensor, block_n: int) -> TensorDescriptor:
    """TMA descriptor of a [B, H, N, D] key or value tensor (any 16-byte-aligned strides), blocks [1, 1, block_n,
    D]. Unit dimensions get a nominal aligned stride (the copy engine checks every stride, used or not)."""
    shape = list(t.shape)
    strides = list(t.stride())
    for i in range(len(shape) - 2, -1, -1):
        if shape[i] == 1:
            strides[i] = strides[i + 1] * shape[i + 1]
    block = [1, 1, block_n, shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, shape, strides, block, layout)


def split_count(work_items: int, key_tiles: int, num_sms: int, forced: int | None = None) -> int:
    """How many of the last work items (query groups) are shared out over all SMs (``tail_pieces``).

    One CTA per group fills the SMs in waves; the last, partial wave would leave SMs idle for up to a whole group's
    time, while its groups' key tiles spread evenly over every SM finish in a fraction of it (576 groups on 132 SMs:
    4 full waves + 48 groups -> 4.36 group-times instead of 5). ``forced`` (tests) shares that many (at most one
    per SM)."""
    if key_tiles < 2:
        return 0
    if forced is not None:
        return max(0, min(forced, work_items, num_sms))
    return work_items % num_sms


def tail_pieces(n_tail: int, key_tiles: int, ctas: int):
    """The pieces of the n_tail last work items: their key tiles in order (item by item) are cut into ``ctas``
    ranges [c * W // ctas, (c + 1) * W // ctas), W = n_tail * key_tiles; piece j = s * ctas + c is the part of
    range c in its first (s = 0) or second (s = 1) item (a range is shorter than an item, as n_tail <= ctas).
    Returns the non-empty pieces as (j, item index in the tail, first tile, end tile) - the Gluon kernel's unit
    first_split + j and the scratch slot of its partial O and l (kept in Python for the tests)."""
    w = n_tail * key_tiles
    pieces = []
    for j in range(2 * ctas):
        c, s = j % ctas, j // ctas
        lo, hi = c * w // ctas, (c + 1) * w // ctas
        item = lo // key_tiles + s
        t0, t1 = max(lo, item * key_tiles) - item * key_tiles, min(hi, (item + 1) * key_tiles) - item * key_tiles
        if t1 > t0:
            pieces.append((j, item, t0, t1))
    return pieces


def dense_colmass_ws(q, k, v, scale: float, lse_prev, group_size: int, o, lse, cs, redo,
                     key_bias_scaled=None, key_bias_stride: int = 0, config: dict | None = None):
    """Launch into the caller's o [B,H,Nq,D] (contiguous), lse [B,H,Nq], cs [B,H,G,Nk] and redo [B*H*G, 4] int32
    (uninitialised: column c of a whole group is set to 1 when the caller must recompute the group with the
    online softmax, else 0, for c < ceil(group_size / 64); tail groups and the other columns are left as they are).

    Returns (first_split, part_o, part_l, part_rows, tail_ctas, key_tiles): work items t = g + G * (b * H + h)
    from first_split on ran in pieces (``tail_pieces(items - first_split, key_tiles, tail_ctas)``); piece j left
    its unnormalised O and l in part_o [2 * tail_ctas * part_rows, D] / part_l rows j * part_rows + row in group
    (fp32), and o / lse of those groups to the caller (the redo launch of ``attention_dense_triton`` adds them)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    num_groups = cs.shape[2]
    cfg = dict(_CONFIG, **(config or {}))
    kb = key_bias_scaled
    items = B * H * num_groups
    n_consumers = -(-group_size // _ROWS)
    part_rows = n_consumers * _ROWS
    key_tiles = -(-Nk // cfg["BLOCK_N"])
    sms = sm_count(q.device.index or 0)
    n_tail = split_count(items, key_tiles, sms, cfg.get("SPLIT"))
    first_split = items - n_tail
    tail_ctas = max(1, min(sms, n_tail * key_tiles))  # no empty ranges: each SM gets at least one key tile
    n_units = first_split + (2 * tail_ctas if n_tail else 0)
    part_o = torch.empty((max(1, 2 * tail_ctas * part_rows if n_tail else 1), D), dtype=torch.float32,
                         device=q.device)
    part_l = torch.empty((part_o.shape[0],), dtype=torch.float32, device=q.device)
    use_tma = bool(cfg["TMA"])
    if use_tma:
        q_desc, k_desc, v_desc = (kv_tile_descriptor(t, n) for t, n in ((q, _ROWS), (k, cfg["BLOCK_N"]),
                                                                        (v, cfg["BLOCK_N"])))
    else:
        q_desc, k_desc, v_desc = q, k, v
    grid = n_units if not cfg["PERSISTENT"] else min(n_units, sms)
    _dense_colmass_ws_kernel[(grid,)](
        q, k, v, q_desc, k_desc, v_desc, o, lse, lse_prev, cs, lse if kb is None else kb, redo, part_o, part_l,
        key_bias_stride, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, Nq, Nk, num_groups, group_size, first_split, n_tail, tail_ctas, n_units, scale * _LOG2E,
        D=D, HAS_KB=kb is not None, BLOCK_N=cfg["BLOCK_N"], NUM_STAGES=cfg["NUM_STAGES"],
        N_CONSUMERS=n_consumers, CONSUMER_REGS=cfg["CONSUMER_REGS"], TMA=use_tma, num_warps=4, maxnreg=_MAXNREG)
    return first_split, part_o, part_l, part_rows, tail_ctas, key_tiles

"""Warp-specialised dense attention with LSE and per-group column mass for Hopper (sm_90), written in Gluon.

Same result as ``attention_dense_triton.dense_attention_lse_colmass`` with ``lse_prev`` given (and the torch
reference ``attention_reference.dense_attention_lse_colmass``): O, the per-query LSE and, from the same scores,
the column mass cs[b, h, g, j] = sum over the queries i of group g of exp(s_ij - lse_prev_i).

    before (Triton, 64-row programs)                after (this kernel, one CTA per 192-query group)
    prog r: S = Q_r K^T [queries, keys]             producer warpgroup: K/V tiles -> ring (cp.async); adds the
            p = exp(S - lse_prev), O += p V           consumers' per-key partial sums of a slot, stores cs once
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
Triton kernel's online softmax recomputes O and LSE for the flagged groups only (a second launch whose other
programs return at once); the column mass is complete either way. Query rows past the sequence end get an
infinite anchor, so they add nothing to the column mass.

Supported here: CUDA capability 9.x, bf16/fp16, head dim 64 or 128 (q, k, v alike, same head count), unit-stride
16-byte aligned rows, group_size 64, 128 or 192. Anything else takes the Triton kernel (``supports``).
"""
from __future__ import annotations


from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from chipmunk_compile.kernels.kv_ring_gluon import PRODUCER_THREADS
from chipmunk_compile.kernels.kv_ring_gluon import attention_unsupported_reason
from chipmunk_compile.kernels.kv_ring_gluon import load_query_tile as _load_query_tile
from chipmunk_compile.kernels.kv_ring_gluon import kv_ring_producer as _producer

_LOG2E = 1.4426950408889634
_ROWS = 64


@gluon.jit
def _colmass_consumer(Q, KB, LSE_PREV, O, LSE, REDO, q_smem, k_bufs, v_bufs, ready_bars, empty_bars, pt_smem,
                      colbuf, wg, b, h, pid_bh, redo_off, row0, row_end, Nq, Nk, kb_off, qk_scale,
                      stride_qb, stride_qh, stride_qn, D: gl.constexpr, BLOCK_N: gl.constexpr,
                      NUM_STAGES: gl.constexpr, HAS_KB: gl.constexpr):
    # Scores transposed, S^T = K Q^T [keys, queries]: the column mass (a sum over queries) is then a row sum
    # (in-thread adds and two shuffles, no cross-warp step), and O^T += V^T P^T with P^T staged in shared memory.
    ROWS: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
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
        slot = i % NUM_STAGES
        mbarrier.wait(ready_bars.index(slot), (i // NUM_STAGES) & 1)
        fence_async_shared()
        st = warpgroup_mma(k_bufs.index(slot), q_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=0, deps=(st, ))
        keys = i * BLOCK_N + offs_k
        if HAS_KB:
            st = st + gl.load(KB + kb_off + keys, mask=keys < Nk, other=0.0)[:, None]
        if (i + 1) * BLOCK_N > Nk:  # ragged last tile: its tail rows read key 0
            st = gl.where((keys < Nk)[:, None], st, float("-inf"))
        pt = gl.exp2(st * qk_scale - anchor[None, :])
        pt_smem.store(pt.to(Q.dtype.element_ty))
        fence_async_shared()
        acc = warpgroup_mma(v_bufs.index(slot).permute((1, 0)), pt_smem, acc, is_async=True)
        # The sums run on the CUDA cores while P^T V^T runs on the tensor cores.
        l_part = l_part + gl.sum(gl.reshape(pt, [BLOCK_N // 16, 2, 8, ROWS]), 1)
        colbuf.index(slot * 4 + wg).store(gl.sum(pt, 1))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty_bars.index(slot), count=1)

    l_i = gl.convert_layout(gl.sum(gl.sum(l_part, 0), 0), gl.SliceLayout(0, s_layout))
    gl.store(LSE + pid_bh * Nq + rows, (anchor + gl.log2(l_i)) * 0.6931471805599453, mask=row_ok)
    bad = row_ok & ((l_i < 8.7e-19) | (l_i > 1.2e30) | (l_i != l_i))
    if gl.sum(bad.to(gl.int32), 0) > 0:
        gl.store(REDO + redo_off, 1)
    o_t = acc / gl.convert_layout(l_i, gl.SliceLayout(0, o_layout))[None, :]
    # O^T -> O rows: head dim fastest per thread for 16-byte stores.
    st_layout: gl.constexpr = gl.BlockedLayout([8, 1], [D // 8, 32 // (D // 8)], [1, 4], [0, 1])
    o_t = gl.convert_layout(o_t.to(O.dtype.element_ty), st_layout)
    o_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, st_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(1, st_layout))
    gl.store(O + (pid_bh * Nq + o_rows.to(gl.int64))[None, :] * D + offs_d[:, None], o_t,
             mask=(o_rows < row_end)[None, :])


@gluon.jit
def _dense_colmass_ws_kernel(Q, K, V, O, LSE, LSE_PREV, CS, KB, REDO, stride_kbb,
                             stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn,
                             H, Nq, Nk, num_groups, group_size, qk_scale,
                             D: gl.constexpr, HAS_KB: gl.constexpr, BLOCK_N: gl.constexpr,
                             NUM_STAGES: gl.constexpr, N_CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    g = gl.program_id(0)
    pid_bh = gl.program_id(1).to(gl.int64)
    b = pid_bh // H
    h = pid_bh % H
    row0 = g * group_size
    row_end = gl.minimum(row0 + group_size, Nq)
    kb_off = b * stride_kbb
    redo_off = pid_bh * num_groups + g
    cs_off = redo_off * Nk

    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, D], dtype)
    pt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D], kv_layout)
    q_bufs = gl.allocate_shared_memory(dtype, [N_CONSUMERS, 64, D], q_layout)
    pt_bufs = gl.allocate_shared_memory(dtype, [N_CONSUMERS, BLOCK_N, 64], pt_layout)  # each consumer's P^T
    # Per ring slot, each consumer's per-key partial column sums (row 4 * slot + consumer; power-of-two shape).
    colbuf = gl.allocate_shared_memory(gl.float32, [NUM_STAGES * 4, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready_bars.index(i), count=PRODUCER_THREADS)
        mbarrier.init(empty_bars.index(i), count=N_CONSUMERS)

    # Partition argument tuples are spelled out per call: held in a variable or concatenated, a tuple loses its
    # constexprs (they become runtime values or plain ints that warp_specialize cannot pass).
    if N_CONSUMERS == 3:
        gl.warp_specialize([
            (_producer, (K, V, REDO, k_bufs, v_bufs, ready_bars, empty_bars, b, h, redo_off, Nk, stride_kb,
                         stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, colbuf, CS, cs_off, D, BLOCK_N,
                         NUM_STAGES, False, N_CONSUMERS)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, q_bufs.index(0), k_bufs, v_bufs, ready_bars, empty_bars,
                                 pt_bufs.index(0), colbuf, 0, b, h, pid_bh, redo_off, row0, row_end, Nq, Nk,
                                 kb_off, qk_scale, stride_qb, stride_qh, stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, q_bufs.index(1), k_bufs, v_bufs, ready_bars, empty_bars,
                                 pt_bufs.index(1), colbuf, 1, b, h, pid_bh, redo_off, row0 + 64, row_end, Nq, Nk,
                                 kb_off, qk_scale, stride_qb, stride_qh, stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, q_bufs.index(2), k_bufs, v_bufs, ready_bars, empty_bars,
                                 pt_bufs.index(2), colbuf, 2, b, h, pid_bh, redo_off, row0 + 128, row_end, Nq, Nk,
                                 kb_off, qk_scale, stride_qb, stride_qh, stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB)),
        ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])
    elif N_CONSUMERS == 2:
        gl.warp_specialize([
            (_producer, (K, V, REDO, k_bufs, v_bufs, ready_bars, empty_bars, b, h, redo_off, Nk, stride_kb,
                         stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, colbuf, CS, cs_off, D, BLOCK_N,
                         NUM_STAGES, False, N_CONSUMERS)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, q_bufs.index(0), k_bufs, v_bufs, ready_bars, empty_bars,
                                 pt_bufs.index(0), colbuf, 0, b, h, pid_bh, redo_off, row0, row_end, Nq, Nk,
                                 kb_off, qk_scale, stride_qb, stride_qh, stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, q_bufs.index(1), k_bufs, v_bufs, ready_bars, empty_bars,
                                 pt_bufs.index(1), colbuf, 1, b, h, pid_bh, redo_off, row0 + 64, row_end, Nq, Nk,
                                 kb_off, qk_scale, stride_qb, stride_qh, stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (K, V, REDO, k_bufs, v_bufs, ready_bars, empty_bars, b, h, redo_off, Nk, stride_kb,
                         stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, colbuf, CS, cs_off, D, BLOCK_N,
                         NUM_STAGES, False, N_CONSUMERS)),
            (_colmass_consumer, (Q, KB, LSE_PREV, O, LSE, REDO, q_bufs.index(0), k_bufs, v_bufs, ready_bars, empty_bars,
                                 pt_bufs.index(0), colbuf, 0, b, h, pid_bh, redo_off, row0, row_end, Nq, Nk,
                                 kb_off, qk_scale, stride_qb, stride_qh, stride_qn, D, BLOCK_N, NUM_STAGES, HAS_KB)),
        ], [4], [CONSUMER_REGS])


# Measured on H200 (benchmarks/attention_ws.py): 3 stages (4 need 232 KiB of shared memory with the P^T and
# column-sum buffers); 152 registers per consumer thread (160 leaves the producer 32 and is slower).
_CONFIG = dict(BLOCK_N=64, NUM_STAGES=3, CONSUMER_REGS=152)
_MAXNREG = 128


def supports(q, k, v, group_size: int, capability: tuple | None = None) -> str | None:
    """None when this kernel handles the call, else why not (the caller then uses the Triton kernel).
    ``capability`` (tests) skips the device checks and takes that CUDA compute capability."""
    why = attention_unsupported_reason(q, k, v, (), group_size, capability)
    if why is None and k.shape[1] != q.shape[1]:
        why = "needs as many K/V heads as query heads"
    return why


def dense_colmass_ws(q, k, v, scale: float, lse_prev, group_size: int, o, lse, cs, redo,
                     key_bias_scaled=None, key_bias_stride: int = 0, config: dict | None = None):
    """Launch into the caller's o [B,H,Nq,D] (contiguous), lse [B,H,Nq], cs [B,H,G,Nk] (zeros) and redo
    [B*H*G] int32 (zeros; set to 1 for groups the caller must recompute with the online softmax)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    num_groups = cs.shape[2]
    cfg = dict(_CONFIG, **(config or {}))
    kb = key_bias_scaled
    _dense_colmass_ws_kernel[(num_groups, B * H)](
        q, k, v, o, lse, lse_prev, cs, lse if kb is None else kb, redo, key_bias_stride,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, Nq, Nk, num_groups, group_size, scale * _LOG2E,
        D=D, HAS_KB=kb is not None, BLOCK_N=cfg["BLOCK_N"], NUM_STAGES=cfg["NUM_STAGES"],
        N_CONSUMERS=-(-group_size // _ROWS), CONSUMER_REGS=cfg["CONSUMER_REGS"], num_warps=4, maxnreg=_MAXNREG)

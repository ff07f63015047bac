"""Shared pieces of the Gluon attention kernels (Hopper): the producer streaming K/V row tiles into a
shared-memory ring, and the consumers' query-tile load.

    global K, V  --(indices or 0..n-1, cp.async 16 B per thread)-->  k_bufs[s], v_bufs[s]  (NUM_STAGES slots)
    empty[s] (consumers done with slot s)  ->  producer refills s  ->  ready[s] (all its copies landed)

Runs as the 4-warp default partition of a ``gl.warp_specialize`` region; each producer thread's
``cp.async.mbarrier.arrive.noinc`` counts one arrival on ``ready[s]``, so ready barriers are initialised with
count 128. Consumers arrive once per warpgroup on ``empty[s]`` after their wgmmas on the slot have completed.
Tail rows (past n) read row 0, which is always valid memory; consumers mask those columns.
"""
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, mbarrier, tma

PRODUCER_THREADS = gl.constexpr(128)  # the 4-warp default partition


@gluon.constexpr_function
def row_layout(D):
    """Rows of D 16-bit elements in 16-byte vectors; a 4-warp partition's warps split the rows."""
    threads_d = getattr(D, "value", D) // 8
    return gl.BlockedLayout([1, 8], [32 // threads_d, threads_d], [4, 1], [1, 0])


@gluon.jit
def kv_ring_producer(K, V, IDX, k_bufs, v_bufs, ready_bars, empty_bars, b, hk, idx_row, n_sel,
                     stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     colbuf, CS, cs_off, first_tile,
                     D: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, GATHER: gl.constexpr,
                     N_COLSUMS: gl.constexpr):
    """Fills the ring with K/V row tiles: the rows named by IDX[idx_row, :n_sel] (GATHER) or rows 0..n_sel-1.
    first_tile: how many tiles earlier calls (a persistent CTA's previous work) put through the ring; every call
    ends with its tiles consumed, when it flushes column sums.

    N_COLSUMS > 0: each consumer c leaves its per-key partial sums for the slot's tile in colbuf[4 * slot + c]
    before releasing the slot; once all have, the producer adds them and stores CS[cs_off + key] (one plain
    store per key: no atomics, no zero-initialised output). colbuf, CS and cs_off are unused otherwise."""
    layout: gl.constexpr = row_layout(D)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    idx_base = IDX + idx_row * n_sel
    n_tiles = gl.cdiv(n_sel, BLOCK_N)
    for i in range(n_tiles):
        slot = (first_tile + i) % NUM_STAGES
        phase = ((first_tile + i) // NUM_STAGES) & 1
        cols = i * BLOCK_N + offs_n
        # Tail indices read key row 0 (always valid memory); the consumers mask their scores.
        if GATHER:
            idx = gl.load(idx_base + cols, mask=cols < n_sel, other=0).to(gl.int64)
        else:
            idx = gl.where(cols < n_sel, cols, 0).to(gl.int64)
        k_ptrs = k_base + idx[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + idx[:, None] * stride_vn + offs_d[None, :]
        # Slots start free: the first wait on each passes (phase 1 of a fresh barrier counts as complete).
        mbarrier.wait(empty_bars.index(slot), phase ^ 1)
        if N_COLSUMS > 0:
            if i >= NUM_STAGES:  # the slot held tile i - NUM_STAGES, which every consumer has finished
                _flush_colsums(colbuf, slot * 4, CS, cs_off, (i - NUM_STAGES) * BLOCK_N, n_sel, BLOCK_N, N_COLSUMS)
        async_copy.async_copy_global_to_shared(k_bufs.index(slot), k_ptrs)
        async_copy.async_copy_global_to_shared(v_bufs.index(slot), v_ptrs)
        async_copy.mbarrier_arrive(ready_bars.index(slot), increment_count=False)
    if N_COLSUMS > 0:  # the last tiles still in the ring
        _drain_colsums(empty_bars, colbuf, CS, cs_off, first_tile, n_tiles, n_sel, BLOCK_N, NUM_STAGES, N_COLSUMS)


@gluon.jit
def kv_ring_producer_tma(k_desc, v_desc, k_bufs, v_bufs, ready_bars, empty_bars, b, hk, key_lo, n_keys,
                         colbuf, CS, cs_off, first_tile, TILE_BYTES: gl.constexpr, BLOCK_N: gl.constexpr,
                         NUM_STAGES: gl.constexpr, N_COLSUMS: gl.constexpr):
    """kv_ring_producer for contiguous key ranges through TMA: keys key_lo .. key_lo + n_keys - 1 of (b, hk), one
    bulk copy per tile of K and of V (descriptors over [B, H, N, D], blocks [1, 1, BLOCK_N, D]), rows past the end
    of the keys zero-filled by the copy engine. The ready barriers count one arrival (the expected bytes); the
    column-sum flush is kv_ring_producer's."""
    n_tiles = gl.cdiv(n_keys, BLOCK_N)
    b = b.to(gl.int32)  # TMA coordinates are 32-bit
    hk = hk.to(gl.int32)
    for i in range(n_tiles):
        slot = (first_tile + i) % NUM_STAGES
        mbarrier.wait(empty_bars.index(slot), (((first_tile + i) // NUM_STAGES) & 1) ^ 1)
        if N_COLSUMS > 0:
            if i >= NUM_STAGES:
                _flush_colsums(colbuf, slot * 4, CS, cs_off, (i - NUM_STAGES) * BLOCK_N, n_keys, BLOCK_N, N_COLSUMS)
        bar = ready_bars.index(slot)
        mbarrier.expect(bar, 2 * TILE_BYTES)
        tma.async_copy_global_to_shared(k_desc, [b, hk, key_lo + i * BLOCK_N, 0], bar, k_bufs.index(slot))
        tma.async_copy_global_to_shared(v_desc, [b, hk, key_lo + i * BLOCK_N, 0], bar, v_bufs.index(slot))
    if N_COLSUMS > 0:
        _drain_colsums(empty_bars, colbuf, CS, cs_off, first_tile, n_tiles, n_keys, BLOCK_N, NUM_STAGES, N_COLSUMS)


@gluon.jit
def kv_tile(bufs, slot, BLOCK_N: gl.constexpr, D: gl.constexpr, TMA: gl.constexpr):
    """Ring slot ``slot`` as the [BLOCK_N, D] wgmma operand (TMA rings hold [1, 1, BLOCK_N, D] blocks)."""
    if TMA:
        return bufs.index(slot).reshape([BLOCK_N, D])
    else:
        return bufs.index(slot)


@gluon.jit
def _drain_colsums(empty_bars, colbuf, CS, cs_off, first_tile, n_tiles, n, BLOCK_N: gl.constexpr,
                   NUM_STAGES: gl.constexpr, N_COLSUMS: gl.constexpr):
    # The column sums of the last tiles still in the ring, once the consumers release them.
    for j in range(gl.maximum(n_tiles - NUM_STAGES, 0), n_tiles):
        slot = (first_tile + j) % NUM_STAGES
        mbarrier.wait(empty_bars.index(slot), ((first_tile + j) // NUM_STAGES) & 1)
        _flush_colsums(colbuf, slot * 4, CS, cs_off, j * BLOCK_N, n, BLOCK_N, N_COLSUMS)


@gluon.jit
def _flush_colsums(colbuf, first, CS, cs_off, start, n, BLOCK_N: gl.constexpr, N_COLSUMS: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    total = colbuf.index(first).load(layout)
    for c in gl.static_range(1, N_COLSUMS):
        total += colbuf.index(first + c).load(layout)
    cols = start + gl.arange(0, BLOCK_N, layout=layout)
    gl.store(CS + cs_off + cols, total, mask=cols < n)


@gluon.jit
def allocate_kv_ring(dtype: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                     N_CONSUMERS: gl.constexpr, TMA: gl.constexpr):
    """Shared memory of the ring and the consumers' query tiles, barriers initialised:
    (k_bufs, v_bufs [NUM_STAGES, BLOCK_N, D] or, for TMA, [NUM_STAGES, 1, 1, BLOCK_N, D] (``kv_tile`` gives the
    2-D operand), q_bufs [N_CONSUMERS, 64, D] (TMA: [N_CONSUMERS, 1, 1, 64, D]), ready_bars, empty_bars)."""
    if TMA:  # blocks as the [B, H, N, D] descriptors copy them
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, D], dtype)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, 64, D], dtype)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, D], kv_layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, D], kv_layout)
        q_bufs = gl.allocate_shared_memory(dtype, [N_CONSUMERS, 1, 1, 64, D], q_layout)
    else:
        kv_layout2: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
        q_layout2: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, D], dtype)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D], kv_layout2)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D], kv_layout2)
        q_bufs = gl.allocate_shared_memory(dtype, [N_CONSUMERS, 64, D], q_layout2)
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        # ready: one (asynchronous) arrival per producer thread, or the TMA byte count; empty: one arrival per
        # consumer warpgroup.
        mbarrier.init(ready_bars.index(i), count=1 if TMA else PRODUCER_THREADS)
        mbarrier.init(empty_bars.index(i), count=N_CONSUMERS)
    return k_bufs, v_bufs, q_bufs, ready_bars, empty_bars


@gluon.jit
def load_query_tile(Q, q_smem, b, h, row0, row_end, stride_qb, stride_qh, stride_qn, D: gl.constexpr):
    """A consumer warpgroup's 64 query rows (zeros past row_end) -> q_smem, the wgmma A operand."""
    load_query_tile_rows(Q, q_smem, b, h, row0, row_end, stride_qb, stride_qh, stride_qn, Q, D, False)


@gluon.jit
def load_query_tile_rows(Q, q_smem, b, h, row0, row_end, stride_qb, stride_qh, stride_qn, PERM,
                         D: gl.constexpr, HAS_PERM: gl.constexpr):
    """load_query_tile; with HAS_PERM, row r of the tile is query token PERM[r] (token_grid reordering)."""
    io_layout: gl.constexpr = row_layout(D)
    rows_io = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, io_layout))
    offs_d_io = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    row_ok = rows_io < row_end
    if HAS_PERM:
        tokens = gl.load(PERM + rows_io, mask=row_ok, other=0).to(gl.int64)
    else:
        tokens = rows_io.to(gl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + tokens[:, None] * stride_qn + offs_d_io[None, :]
    q_smem.store(gl.load(q_ptrs, mask=row_ok[:, None], other=0.0))
    fence_async_shared()


def attention_unsupported_reason(q, k, v, others, group_size: int, capability: tuple | None) -> str | None:
    """Why a Gluon attention kernel cannot take this call (None: it can). ``others``: further 16-bit tensors
    read or written row by row; ``capability`` (tests) skips the device checks and takes that compute capability."""
    if capability is None:
        if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("CHIPMUNK_GLUON", "1") == "0":
            return "disabled (interpreter or CHIPMUNK_GLUON=0)"
        if not q.is_cuda:
            return "needs a Hopper (sm_90) GPU"
        capability = torch.cuda.get_device_capability(q.device)
    if capability[0] != 9:
        return "needs a Hopper (sm_90) GPU"
    tensors = (q, k, v, *others)
    if q.dtype not in (torch.bfloat16, torch.float16) or any(t.dtype != q.dtype for t in tensors):
        return "needs bf16/fp16 throughout"
    D = q.shape[-1]
    if D not in (64, 128) or k.shape[-1] != D or v.shape[-1] != D:
        return "needs head dim 64 or 128 for q, k and v"
    if group_size % 64 or not 0 < group_size <= 192:
        return "needs group_size in (64, 128, 192)"
    for t in tensors:
        # Triton specialises integer arguments divisible by 16: the 16-byte cp.async copies need that proof.
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s % 16 for s, n in zip(t.stride()[:-1], t.shape) if n > 1):
            return "needs unit-stride rows, 16-byte aligned, with strides divisible by 16"
    return None

"""Persistent ping-pong sparse MLP down-projection (mm2) for Hopper (sm_90), written in Gluon.

Same result as ``mlp_sparse_triton``'s mm2: y_cache[rows, :] += delta[rows, :K] @ W2^T[S, :] for each token
block (S its K kept units, rows of W2^T gathered through ``indices``), summed in fp32 and rounded once into
y_cache's dtype; ``out`` (optional) receives the new y tile too.

    before (Triton, one 128 x BLOCK_D tile per program)   after (this kernel, one program per SM)
    load pipeline fill -> K loop (wgmma) -> y RMW           producer warpgroup: the program's tiles in order,
    -> next program: the tensor cores idle during the         k-step by k-step, cp.async of the delta tile
    fill and the epilogue (at 90 % sparsity K = 1280:         [128, BLOCK_K] and the gathered W2^T rows
    20 k-steps, the y read-modify-write + out store           [BLOCK_K, BLOCK_D] into one NUM_STAGES ring,
    is ~1/3 of a tile's time)                                 running ahead across tile boundaries
                                                            consumer warpgroups 0 / 1: the even / odd tiles:
                                                              K loop (wgmma over the ring), then y RMW + out
                                                              while the other consumer runs its K loop

The ping-pong schedule of CUTLASS's Hopper GEMMs: an order barrier lets a consumer start its K loop only when the
other's is over, so the K loops take turns on the tensor cores and each epilogue overlaps the next K loop; no
ring wait is ever more than one phase ahead of its barrier.

Tails: unit-list tails (K not a multiple of BLOCK_K) gather W2^T row 0 against zero-filled delta columns; rows
past the sequence end are zero-filled and never stored. Supported here: CUDA 9.x, bf16/fp16 weights and
deltas, y_cache in float32 or the deltas' dtype with unit stride on its last dim, W2^T rows contiguous (w2
passed as ``w2t.t()``), token blocks of 128. Anything else takes the Triton kernel (``supports``).
"""
from __future__ import annotations

import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from chipmunk_compile.kernels.kv_ring_gluon import PRODUCER_THREADS

_BLOCK_T = 128


@gluon.jit
def _tile_origin(t, n_d, nb, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_T: gl.constexpr):
    """Tile t -> (batch, token block, first row in the block, first output column). Output tiles of one block are
    adjacent (its deltas stay in L2 while they are read once per output tile), and so are its row tiles of one
    output column (they gather the same W2^T rows)."""
    N_H: gl.constexpr = BLOCK_T // BLOCK_M
    per_block = n_d * N_H
    per_batch = nb * per_block
    rem = t % per_batch
    r2 = rem % per_block
    return (t // per_batch).to(gl.int64), rem // per_block, (r2 % N_H) * BLOCK_M, (r2 // N_H) * BLOCK_D


@gluon.jit
def _step_units(IDX, g, total, n_steps, n_d, nb, n_sel, kk, BLOCK_D: gl.constexpr, BLOCK_K: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_T: gl.constexpr):
    """The unit list of the program's step g (tile g // n_steps, k-step g % n_steps); zeros past its last step."""
    t = gl.program_id(0) + (g // n_steps) * gl.num_programs(0)
    b, blk, _, _ = _tile_origin(t, n_d, nb, BLOCK_D, BLOCK_M, BLOCK_T)
    k0 = (g % n_steps) * BLOCK_K
    ok = ((k0 + kk) < n_sel) & (g < total)
    return gl.load(IDX + (b * nb + blk) * n_sel + k0 + kk, mask=ok, other=0).to(gl.int64)


@gluon.jit
def _mm2_producer(DELTA, IDX, W2, a_bufs, b_bufs, ready_bars, empty_bars, N, Dout, nb, n_sel, n_tiles, stride_w2f,
                  BLOCK_T: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr,
                  NUM_STAGES: gl.constexpr):
    # delta rows: BLOCK_K 16-bit values per row; W2^T rows: BLOCK_D values per gathered unit (16 B per thread).
    a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [4, 1], [1, 0])
    b_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_D // 8), BLOCK_D // 8], [4, 1], [1, 0])
    tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))
    kk_a = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
    kk_b = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
    cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, b_layout))
    n_d = gl.cdiv(Dout, BLOCK_D)
    n_steps = gl.cdiv(n_sel, BLOCK_K)
    # One flat loop over the program's (tile, k-step) pairs, so the unit lists (whose loads the W2^T addresses wait
    # for) are fetched two steps ahead, across tile boundaries too: a load per step in line costs its full latency.
    total = gl.cdiv(n_tiles - gl.program_id(0), gl.num_programs(0)) * n_steps
    units = _step_units(IDX, 0, total, n_steps, n_d, nb, n_sel, kk_b, BLOCK_D, BLOCK_K, BLOCK_M,
                          BLOCK_T)
    units_next = _step_units(IDX, 1, total, n_steps, n_d, nb, n_sel, kk_b, BLOCK_D, BLOCK_K, BLOCK_M,
                               BLOCK_T)
    for g in range(total):
        units_later = _step_units(IDX, g + 2, total, n_steps, n_d, nb, n_sel, kk_b, BLOCK_D, BLOCK_K, BLOCK_M,
                                  BLOCK_T)
        b, blk, r0, o0 = _tile_origin(gl.program_id(0) + (g // n_steps) * gl.num_programs(0), n_d, nb, BLOCK_D,
                                      BLOCK_M, BLOCK_T)
        rows = r0 + tile_rows
        k0 = (g % n_steps) * BLOCK_K
        sel_base = (b * nb + blk) * n_sel
        row_ok = rows < gl.minimum(N - blk * BLOCK_T, BLOCK_T)
        offs_o = o0 + cols
        slot = g % NUM_STAGES
        mbarrier.wait(empty_bars.index(slot), ((g // NUM_STAGES) & 1) ^ 1)
        # delta is [B, nb, 128, n_sel]
        a_ptrs = DELTA + sel_base * BLOCK_T + rows.to(gl.int64)[:, None] * n_sel + (k0 + kk_a)[None, :]
        async_copy.async_copy_global_to_shared(a_bufs.index(slot), a_ptrs,
                                               mask=row_ok[:, None] & ((k0 + kk_a) < n_sel)[None, :])
        async_copy.async_copy_global_to_shared(b_bufs.index(slot), W2 + units[:, None] * stride_w2f + offs_o[None, :],
                                               mask=(offs_o < Dout)[None, :])
        async_copy.mbarrier_arrive(ready_bars.index(slot), increment_count=False)
        units = units_next
        units_next = units_later


@gluon.jit
def _mm2_consumer(Y, OUT, a_bufs, b_bufs, ready_bars, empty_bars, order_bars, N, Dout, nb, n_sel, n_tiles,
                  stride_yb, stride_yn, stride_ob, stride_on, PARITY: gl.constexpr, HAS_OUT: gl.constexpr,
                  BLOCK_T: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr,
                  NUM_STAGES: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_D, 16])
    tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, acc_layout))
    n_d = gl.cdiv(Dout, BLOCK_D)
    n_steps = gl.cdiv(n_sel, BLOCK_K)
    m = 0
    for t in range(gl.program_id(0) + PARITY * gl.num_programs(0), n_tiles, 2 * gl.num_programs(0)):
        # The other consumer's K loop on the previous tile must be over (its last ring phases consumed) before this
        # one waits on the ring: then no wait is ever two phases ahead. Consumer 0's first wait passes at once.
        mbarrier.wait(order_bars.index(PARITY), (m & 1) ^ (1 - PARITY))
        acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=acc_layout)
        for k in range(n_steps):
            g = (2 * m + PARITY) * n_steps + k  # the program's running step count (local tile 2m + PARITY)
            slot = g % NUM_STAGES
            mbarrier.wait(ready_bars.index(slot), (g // NUM_STAGES) & 1)
            fence_async_shared()  # the cp.async writes, visible to the wgmma (async proxy)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc, is_async=True)
            # Keep this wgmma in flight; the previous one is done, so its slot can be refilled.
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty_bars.index((g + NUM_STAGES - 1) % NUM_STAGES), count=1, pred=k > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty_bars.index(((2 * m + PARITY + 1) * n_steps - 1) % NUM_STAGES), count=1)
        mbarrier.arrive(order_bars.index(1 - PARITY), count=1)   # the other consumer's K loop may start
        # Epilogue (overlaps the other consumer's K loop): y_cache += acc, rounded once; the op's output.
        b, blk, r0, o0 = _tile_origin(t, n_d, nb, BLOCK_D, BLOCK_M, BLOCK_T)
        rows = r0 + tile_rows
        offs_o = o0 + cols
        grow = (blk * BLOCK_T + rows).to(gl.int64)
        mask = (rows < gl.minimum(N - blk * BLOCK_T, BLOCK_T))[:, None] & (offs_o < Dout)[None, :]
        y_ptrs = Y + b * stride_yb + grow[:, None] * stride_yn + offs_o[None, :]
        y_new = (gl.load(y_ptrs, mask=mask, other=0.0).to(gl.float32) + acc).to(Y.dtype.element_ty)
        gl.store(y_ptrs, y_new, mask=mask)
        if HAS_OUT:
            o_ptrs = OUT + b * stride_ob + grow[:, None] * stride_on + offs_o[None, :]
            gl.store(o_ptrs, y_new.to(OUT.dtype.element_ty), mask=mask)
        m += 1


@gluon.jit
def _mm2_pingpong_kernel(DELTA, IDX, W2, Y, OUT, stride_w2f, stride_yb, stride_yn, stride_ob, stride_on,
                         N, Dout, nb, n_sel, n_tiles, HAS_OUT: gl.constexpr,
                         BLOCK_T: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr,
                         NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = DELTA.dtype.element_ty
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_D], dtype)
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_K, BLOCK_D], b_layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    order_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready_bars.index(i), count=PRODUCER_THREADS)  # one asynchronous arrival per producer thread
        mbarrier.init(empty_bars.index(i), count=1)                 # the slot's consumer
    for i in gl.static_range(2):
        mbarrier.init(order_bars.index(i), count=1)                 # "the other consumer's K loop is over"
    gl.warp_specialize([
        (_mm2_producer, (DELTA, IDX, W2, a_bufs, b_bufs, ready_bars, empty_bars, N, Dout, nb, n_sel, n_tiles,
                         stride_w2f, BLOCK_T, BLOCK_M, BLOCK_K, BLOCK_D, NUM_STAGES)),
        (_mm2_consumer, (Y, OUT, a_bufs, b_bufs, ready_bars, empty_bars, order_bars, N, Dout, nb, n_sel, n_tiles,
                         stride_yb, stride_yn, stride_ob, stride_on, 0, HAS_OUT, BLOCK_T, BLOCK_M, BLOCK_K, BLOCK_D,
                         NUM_STAGES)),
        (_mm2_consumer, (Y, OUT, a_bufs, b_bufs, ready_bars, empty_bars, order_bars, N, Dout, nb, n_sel, n_tiles,
                         stride_yb, stride_yn, stride_ob, stride_on, 1, HAS_OUT, BLOCK_T, BLOCK_M, BLOCK_K, BLOCK_D,
                         NUM_STAGES)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


_CONFIG = dict(BLOCK_M=128, BLOCK_K=64, BLOCK_D=128, NUM_STAGES=6, CONSUMER_REGS=208)
_MAXNREG = 168  # 12 warps at 168 registers fill the register file: the producer keeps what the consumers leave


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def supports(delta, w2, y_cache, token_block: int, out=None) -> str | None:
    """None when this kernel handles the call, else why not (the caller then uses the Triton kernel)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("CHIPMUNK_GLUON", "1") == "0":
        return "disabled (interpreter or CHIPMUNK_GLUON=0)"
    if not delta.is_cuda or torch.cuda.get_device_capability(delta.device)[0] != 9:
        return "needs a Hopper (sm_90) GPU"
    if token_block != _BLOCK_T:
        return "needs 128-token blocks"
    if delta.dtype not in (torch.bfloat16, torch.float16) or w2.dtype != delta.dtype:
        return "needs bf16/fp16 weights and deltas"
    if y_cache.dtype not in (torch.float32, delta.dtype):
        return "needs a float32 y_cache or one in the deltas' dtype"
    if y_cache.stride(-1) != 1 or w2.stride(0) != 1 or (out is not None and out.stride(-1) != 1):
        return "needs W2^T rows, y_cache rows and output rows contiguous"
    if w2.stride(1) % 16 or w2.data_ptr() % 16 or delta.shape[-1] % 16 or delta.data_ptr() % 16:
        return "needs 16-byte aligned W2^T rows and unit lists of a multiple of 16"
    return None


def mm2_ws(delta, indices, w2, y_cache, out=None, config: dict | None = None):
    B, nb, _, n_sel = delta.shape
    N, Dout = y_cache.shape[1], y_cache.shape[2]
    cfg = dict(_CONFIG, **(config or {}))
    n_tiles = B * nb * (_BLOCK_T // cfg["BLOCK_M"]) * -(-Dout // cfg["BLOCK_D"])
    grid = (min(n_tiles, _sm_count(delta.device.index or 0)),)
    o = y_cache if out is None else out
    _mm2_pingpong_kernel[grid](delta, indices, w2, y_cache, o, w2.stride(1), y_cache.stride(0), y_cache.stride(1),
                               o.stride(0), o.stride(1), N, Dout, nb, n_sel, n_tiles, HAS_OUT=out is not None,
                               BLOCK_T=_BLOCK_T, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
                               NUM_STAGES=cfg["NUM_STAGES"], CONSUMER_REGS=cfg["CONSUMER_REGS"], num_warps=4,
                               maxnreg=_MAXNREG)

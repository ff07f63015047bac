"""Warp-specialised sparse MLP down-projection (mm2) for Hopper (sm_90), written in Gluon.

Same result as ``mlp_sparse_triton``'s mm2: y_cache[rows, :] += delta[rows, :K] @ W2^T[S, :] for each token
block, S its K kept units (rows of W2^T gathered through ``indices``).

    before (Triton, 128 x BLOCK_D programs)          after (this kernel, same tiles)
    every warp: pointer tiles for the delta rows     producer warpgroup: unit indices -> cp.async of the delta
    and the gathered W2^T rows (register cap,          tile [128, BLOCK_K] and the gathered W2^T rows
    255 per thread), wgmma, y += acc                   [BLOCK_K, BLOCK_D] into a NUM_STAGES ring (mbarriers)
                                                     consumer warpgroups 0, 1 (64 token rows each): wgmma
                                                       over the ring, then y += acc (relaxed atomics; one
                                                       writer per element)

Tails: unit-list tails (K not a multiple of BLOCK_K) gather W2^T row 0 against zero-filled delta columns; rows
past the sequence end are zero-filled and never stored. Supported here: CUDA 9.x, bf16/fp16 weights and
deltas, fp32 y_cache with unit stride on its last dim, W2^T rows contiguous (w2 passed as ``w2t.t()``), token
blocks of 128. Anything else takes the Triton kernel (``supports``).
"""
from __future__ import annotations

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from chipmunk_compile.kernels.kv_ring_gluon import PRODUCER_THREADS

_BLOCK_T = 128


@gluon.jit
def _mm2_producer(DELTA, IDX, W2, a_bufs, b_bufs, ready_bars, empty_bars, d_base, sel_base, row_end_local, n_sel,
                  o0, Dout, stride_w2f,
                  BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr, NUM_STAGES: gl.constexpr):
    # delta rows: BLOCK_K 16-bit values (128 B) per row; W2^T rows: BLOCK_D values per gathered unit.
    a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [4, 1], [1, 0])
    b_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    rows = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, a_layout))
    kk_a = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
    kk_b = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
    offs_o = o0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, b_layout))
    row_ok = rows < row_end_local
    o_ok = offs_o < Dout
    n_steps = gl.cdiv(n_sel, BLOCK_K)
    for i in range(n_steps):
        slot = i % NUM_STAGES
        k0 = i * BLOCK_K
        k_ok_b = (k0 + kk_b) < n_sel
        units = gl.load(IDX + sel_base + k0 + kk_b, mask=k_ok_b, other=0).to(gl.int64)
        a_ptrs = DELTA + d_base + rows.to(gl.int64)[:, None] * n_sel + (k0 + kk_a)[None, :]
        b_ptrs = W2 + units[:, None] * stride_w2f + offs_o[None, :]
        mbarrier.wait(empty_bars.index(slot), ((i // NUM_STAGES) & 1) ^ 1)
        async_copy.async_copy_global_to_shared(a_bufs.index(slot), a_ptrs,
                                               mask=row_ok[:, None] & ((k0 + kk_a) < n_sel)[None, :])
        async_copy.async_copy_global_to_shared(b_bufs.index(slot), b_ptrs, mask=o_ok[None, :])
        async_copy.mbarrier_arrive(ready_bars.index(slot), increment_count=False)


@gluon.jit
def _mm2_consumer(Y, a_bufs, b_bufs, ready_bars, empty_bars, y_base, row0_local, row_end_local, n_sel, o0, Dout,
                  stride_yn,
                  BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr, NUM_STAGES: gl.constexpr, PIPELINE: gl.constexpr):
    ROWS: gl.constexpr = 64
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_D, 16])
    acc = gl.zeros([ROWS, BLOCK_D], gl.float32, layout=acc_layout)
    n_steps = gl.cdiv(n_sel, BLOCK_K)
    for i in range(n_steps):
        slot = i % NUM_STAGES
        mbarrier.wait(ready_bars.index(slot), (i // NUM_STAGES) & 1)
        fence_async_shared()
        acc = warpgroup_mma(a_bufs.index(slot).slice(row0_local, ROWS, dim=0), b_bufs.index(slot), acc,
                            is_async=True)
        if PIPELINE:  # keep this wgmma in flight; the previous one is done, so its slot can be refilled
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty_bars.index((i + NUM_STAGES - 1) % NUM_STAGES), count=1, pred=i > 0)
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty_bars.index(slot), count=1)
    if PIPELINE:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty_bars.index((n_steps + NUM_STAGES - 1) % NUM_STAGES), count=1)
    rows = row0_local + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    offs_o = o0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, acc_layout))
    y_ptrs = Y + y_base + rows.to(gl.int64)[:, None] * stride_yn + offs_o[None, :]
    gl.atomic_add(y_ptrs, acc, mask=(rows < row_end_local)[:, None] & (offs_o < Dout)[None, :], sem="relaxed")


@gluon.jit
def _mm2_ws_kernel(DELTA, IDX, W2, Y, stride_w2f, stride_yb, stride_yn, N, Dout, nb, n_sel,
                   BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr, NUM_STAGES: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PIPELINE: gl.constexpr):
    n_d = gl.cdiv(Dout, BLOCK_D)
    pid = gl.program_id(0)
    blk = pid // n_d  # output tiles of one token block are adjacent: its delta rows stay in L2
    o0 = (pid % n_d) * BLOCK_D
    b = gl.program_id(1).to(gl.int64)
    sel_base = (b * nb + blk) * n_sel
    d_base = sel_base * BLOCK_T  # delta is [B, nb, BLOCK_T, n_sel]
    row_end_local = gl.minimum(N - blk * BLOCK_T, BLOCK_T)
    y_base = b * stride_yb + blk.to(gl.int64) * BLOCK_T * stride_yn

    dtype: gl.constexpr = DELTA.dtype.element_ty
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_K], dtype)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_D], dtype)
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_T, BLOCK_K], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_K, BLOCK_D], b_layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready_bars.index(i), count=PRODUCER_THREADS)  # one asynchronous arrival per producer thread
        mbarrier.init(empty_bars.index(i), count=2)    # one per consumer warpgroup
    gl.warp_specialize([
        (_mm2_producer, (DELTA, IDX, W2, a_bufs, b_bufs, ready_bars, empty_bars, d_base, sel_base, row_end_local,
                         n_sel, o0, Dout, stride_w2f, BLOCK_T, BLOCK_K, BLOCK_D, NUM_STAGES)),
        (_mm2_consumer, (Y, a_bufs, b_bufs, ready_bars, empty_bars, y_base, 0, row_end_local, n_sel, o0, Dout,
                         stride_yn, BLOCK_K, BLOCK_D, NUM_STAGES, PIPELINE)),
        (_mm2_consumer, (Y, a_bufs, b_bufs, ready_bars, empty_bars, y_base, 64, row_end_local, n_sel, o0, Dout,
                         stride_yn, BLOCK_K, BLOCK_D, NUM_STAGES, PIPELINE)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


_CONFIG = dict(BLOCK_K=64, BLOCK_D=256, NUM_STAGES=4, CONSUMER_REGS=208, PIPELINE=True)
_MAXNREG = 168  # 12 warps at 168 registers fill the register file: the producer keeps what the consumers leave


def supports(delta, w2, y_cache, token_block: int) -> str | None:
    """None when this kernel handles the call, else why not (the caller then uses the Triton kernel)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("CHIPMUNK_GLUON", "1") == "0":
        return "disabled (interpreter or CHIPMUNK_GLUON=0)"
    if not delta.is_cuda or torch.cuda.get_device_capability(delta.device)[0] != 9:
        return "needs a Hopper (sm_90) GPU"
    if token_block != _BLOCK_T:
        return "needs 128-token blocks"
    if delta.dtype not in (torch.bfloat16, torch.float16) or w2.dtype != delta.dtype:
        return "needs bf16/fp16 weights and deltas"
    if y_cache.dtype != torch.float32:
        return "needs a float32 y_cache"
    if y_cache.stride(-1) != 1 or w2.stride(0) != 1:
        return "needs W2^T rows and y_cache rows contiguous"
    if w2.stride(1) % 16 or w2.data_ptr() % 16 or delta.shape[-1] % 16 or delta.data_ptr() % 16:
        return "needs 16-byte aligned W2^T rows and unit lists of a multiple of 16"
    return None


def mm2_ws(delta, indices, w2, y_cache, config: dict | None = None):
    B, nb, _, n_sel = delta.shape
    N, Dout = y_cache.shape[1], y_cache.shape[2]
    cfg = dict(_CONFIG, **(config or {}))
    grid = (nb * -(-Dout // cfg["BLOCK_D"]), B)
    _mm2_ws_kernel[grid](delta, indices, w2, y_cache, w2.stride(1), y_cache.stride(0), y_cache.stride(1),
                         N, Dout, nb, n_sel, BLOCK_T=_BLOCK_T, BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
                         NUM_STAGES=cfg["NUM_STAGES"], CONSUMER_REGS=cfg["CONSUMER_REGS"],
                         PIPELINE=cfg["PIPELINE"], num_warps=4,
                         maxnreg=_MAXNREG)

"""Experiment (session 10): can TMA gather the weight rows of the sparse mm1 on Hopper, one row per copy?

Session 9 found that Triton's GEMMs reach ~700 TFLOP/s on Hopper only when every operand comes through TMA,
and that TMA's gather (gather4) is sm_100-only. This probe issues one 2-D TMA copy per gathered W1 row (box
[1, 64], 128 B, 128-byte swizzle) into its row of the [BLOCK_N, 64] shared tile (the copy engine swizzles by
shared address, so row-wise copies build the same tile as one box copy), in a warp-specialised Gluon GEMM:

    producer (default partition): per K step, x tile [128, 64] by one TMA; W1 rows S[j*BN .. j*BN+BN) by BN
        one-row TMAs (GATHER=1) or one [BN, 64] box of contiguous rows (GATHER=0: the no-gather ceiling)
    consumers (2 warpgroups): 64 token rows each, wgmma m64nBNk16 over the ring, then h (bf16) stored

GEMM only (no bias / activation / cache epilogue): it times the main loop against the same kernel without the
gather, Triton's shipped mm1 kernels and cuBLAS on the same FLOPs.
Usage: python benchmarks/_exp_rowtma_mm1.py --compile-only   (any machine)
       python benchmarks/_exp_rowtma_mm1.py                  (H100: checks and times, JSON under $OUT)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_T = gl.constexpr(128)
BLOCK_K = 64


@gluon.jit
def _producer(x_desc, w_desc, IDX, a_bufs, b_bufs, ready, empty, row0, sel_base, u_first, n_k,
              GATHER: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, STAGE_BYTES: gl.constexpr,
              IDX_PER_LOAD: gl.constexpr):
    for i in range(n_k):
        slot = i % NUM_STAGES
        mbarrier.wait(empty.index(slot), ((i // NUM_STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, STAGE_BYTES)
        k0 = i * 64
        tma.async_copy_global_to_shared(x_desc, [row0, k0], bar, a_bufs.index(slot))
        if GATHER:
            # The ring seen as rows: [NUM_STAGES * BLOCK_N, 1, 64] (same bytes; the copy engine applies the
            # 128-byte swizzle by shared address, so each one-row copy lands where the [BLOCK_N, 64] tile has it).
            row_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
            b_rows = b_bufs._reinterpret(b_bufs.dtype, [NUM_STAGES * BLOCK_N, 1, 64], row_layout)
            for r in range(BLOCK_N):
                u = gl.load(IDX + sel_base + r)
                tma.async_copy_global_to_shared(w_desc, [u, k0], bar, b_rows.index(slot * BLOCK_N + r))
        else:
            tma.async_copy_global_to_shared(w_desc, [u_first, k0], bar, b_bufs.index(slot))


@gluon.jit
def _consumer(OUT, a_bufs, b_bufs, ready, empty, row0_local, out_row0, out_col0, n_rows, n_cols, n_k,
              stride_o, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    acc = gl.zeros([64, BLOCK_N], gl.float32, layout=acc_layout)
    for i in range(n_k):
        slot = i % NUM_STAGES
        mbarrier.wait(ready.index(slot), (i // NUM_STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(slot).slice(row0_local, 64, dim=0), b_bufs.index(slot).permute((1, 0)),
                            acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index((i + NUM_STAGES - 1) % NUM_STAGES), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(empty.index((n_k + NUM_STAGES - 1) % NUM_STAGES), count=1)
    rows = out_row0 + row0_local + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    cols = out_col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    ptrs = OUT + rows.to(gl.int64)[:, None] * stride_o + cols[None, :]
    gl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@gluon.jit
def _rowtma_mm1_kernel(x_desc, w_desc, IDX, OUT, N, n_sel, C, stride_o,
                       GATHER: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr):
    # OUT[b*128 + t, j*BN + c] = x[b*128 + t] . W1[IDX[b, j*BN + c]]  (GATHER=0: W1[j*BN + c])
    j = gl.program_id(0)
    blk = gl.program_id(1)
    row0 = blk * BLOCK_T
    sel_base = blk.to(gl.int64) * n_sel + j * BLOCK_N
    dtype: gl.constexpr = x_desc.dtype
    a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_T, 64], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, 64], a_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    n_k = gl.cdiv(C, 64)
    STAGE_BYTES: gl.constexpr = (BLOCK_T + BLOCK_N) * 64 * 2
    gl.warp_specialize([
        (_producer, (x_desc, w_desc, IDX, a_bufs, b_bufs, ready, empty, row0, sel_base, j * BLOCK_N, n_k, GATHER,
                     BLOCK_N, NUM_STAGES, STAGE_BYTES, 1)),
        (_consumer, (OUT, a_bufs, b_bufs, ready, empty, 0, row0, j * BLOCK_N, N, n_sel, n_k, stride_o, BLOCK_N,
                     NUM_STAGES)),
        (_consumer, (OUT, a_bufs, b_bufs, ready, empty, 64, row0, j * BLOCK_N, N, n_sel, n_k, stride_o, BLOCK_N,
                     NUM_STAGES)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
_LAYOUT3 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
MAXNREG = 168


def descriptors(x, w1, gather: bool, block_n: int):
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [128, 64], _LAYOUT)
    w_desc = TensorDescriptor(w1, list(w1.shape), list(w1.stride()), [1 if gather else block_n, 64], _LAYOUT)
    return x_desc, w_desc


def rowtma_mm1(x, w1, idx, out, gather=True, block_n=256, stages=4, consumer_regs=232):
    """x [N, C], w1 [F, C], idx [nb, n_sel] int32 (n_sel a multiple of block_n), out [N, n_sel]."""
    N, C = x.shape
    nb, n_sel = idx.shape
    x_desc, w_desc = descriptors(x, w1, gather, block_n)
    grid = (n_sel // block_n, nb)
    _rowtma_mm1_kernel[grid](x_desc, w_desc, idx, out, N, n_sel, C, out.stride(0), GATHER=gather, BLOCK_N=block_n,
                             NUM_STAGES=stages, CONSUMER_REGS=consumer_regs, num_warps=4, maxnreg=MAXNREG)


def compile_only():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    x = torch.empty(300, 3072, dtype=torch.bfloat16)
    w = torch.empty(1024, 3072, dtype=torch.bfloat16)
    for gather in (True, False):
        for block_n, stages, regs in ((256, 4, 232), (128, 6, 232)):
            xd, wd = descriptors(x, w, gather, block_n)
            fn = _rowtma_mm1_kernel
            sig = {"x_desc": mangle_type(xd), "w_desc": mangle_type(wd), "IDX": "*i32", "OUT": "*bf16", "N": "i32",
                   "n_sel": "i32", "C": "i32", "stride_o": "i32"}
            consts = dict(GATHER=gather, BLOCK_N=block_n, NUM_STAGES=stages, CONSUMER_REGS=regs)
            sig.update({k: "constexpr" for k in consts})
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if n in ("IDX", "OUT", "n_sel", "C", "stride_o")}
            try:
                k = triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=4, maxnreg=MAXNREG))
                n_tma = k.asm["ptx"].count("cp.async.bulk.tensor")
                print(f"ok   gather={gather} BN={block_n} s{stages}: smem {k.metadata.shared // 1024} KiB, "
                      f"{n_tma} TMA copies in PTX", flush=True)
            except Exception as exc:  # noqa: BLE001
                import traceback; traceback.print_exc(); print("FAIL")


def gpu_main(out_dir):
    import triton
    from triton.testing import do_bench_cudagraph
    torch.manual_seed(0)
    dev = "cuda"
    C, F = 3072, 12288
    records = []

    def timed(fn):
        return do_bench_cudagraph(fn, rep=200)

    for N, keep in ((16896, 0.3), (16896, 0.1), (4608, 0.3)):
        nb = -(-N // BLOCK_T)
        x = torch.randn(N, C, device=dev, dtype=torch.bfloat16)
        w1 = torch.randn(F, C, device=dev, dtype=torch.bfloat16) / C ** 0.5
        for block_n in (256, 128):
            n_sel = -(-int(F * keep) // block_n) * block_n
            idx = torch.stack([torch.randperm(F, device=dev)[:n_sel].sort().values for _ in range(nb)]).int()
            out = torch.full((N, n_sel), float("nan"), device=dev, dtype=torch.bfloat16)
            flops = 2.0 * N * n_sel * C
            for gather in (True, False):
                for stages in ((4, 3) if block_n == 256 else (6, 4)):
                    name = f"N{N} keep{keep} BN{block_n} s{stages} {'gather' if gather else 'contiguous'}"
                    try:
                        out.fill_(float("nan"))
                        rowtma_mm1(x, w1, idx, out, gather, block_n, stages)
                        torch.cuda.synchronize()
                        if gather:
                            ref = torch.cat([(x[b * 128:(b + 1) * 128].float() @ w1[idx[b].long()].float().t())
                                             for b in range(nb)])
                        else:
                            ref = (x.float() @ w1[:n_sel].float().t())
                        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                        ms = timed(lambda: rowtma_mm1(x, w1, idx, out, gather, block_n, stages))
                        rec = dict(name=name, N=N, keep=keep, block_n=block_n, stages=stages, gather=gather, ms=ms,
                                   tflops=flops / ms / 1e9, rel_err=err)
                    except Exception as exc:  # noqa: BLE001
                        rec = dict(name=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    print(rec, flush=True)
                    records.append(rec)
            wsub = w1[:n_sel]
            ms = timed(lambda: torch.mm(x, wsub.t()))
            records.append(dict(name=f"N{N} keep{keep} BN{block_n} cuBLAS dense same FLOPs", ms=ms,
                                tflops=flops / ms / 1e9))
            print(records[-1], flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  results=records)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "rowtma_mm1.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'variant':60s} {'ms':>8s} {'TFLOP/s':>8s} {'err':>9s}")
    for r in records:
        if "ms" in r:
            print(f"{r['name']:60s} {r['ms']:8.3f} {r['tflops']:8.0f} {r.get('rel_err', float('nan')):9.2e}")
        else:
            print(f"{r['name']:60s} {r['error']}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--compile-only", action="store_true")
    a = p.parse_args()
    if a.compile_only:
        compile_only()
    else:
        gpu_main(os.environ.get("OUT", "/tmp/out"))

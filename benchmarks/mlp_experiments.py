"""Where a sparse MLP refresh step's GPU time goes, and which kernel variants shorten it (H100 experiments).

All times are CUDA-graph replays (GPU time, no Python launch overhead), medians:
- selection parts: block means of x, the scoring GEMM, the noise draw, the selection kernel as shipped and the
  two earlier versions it replaced (``_exp_radix_selection.py``: byte histograms over streamed chunks;
  ``_exp_old_selection.py``: bisection with whole-row scans), on MLP refresh rows and attention query-group rows
  (the generic call, against torch.topk). The earlier kernels are not kept in the tree; to rerun their rows:
  ``git show 3b7bd17:kernels/selection_triton.py > benchmarks/_exp_radix_selection.py`` and
  ``git show 398fc83:kernels/selection_triton.py > benchmarks/_exp_old_selection.py``;
- mm1: every autotuner candidate, epilogue-split and two-programs-per-SM configs (outputs checked against the
  default config's), x tiles through TMA, and (``--only persistent``) a persistent (grid-stride) variant with and
  without loop flattening;
- mm2: every autotuner candidate plus deeper software pipelines (num_stages 5 / 7: the gathered W2^T rows are
  addressed through the unit list loaded in the same loop, and Triton 3.6 only double-buffers such indirect loads
  when num_stages >= 5), epilogue-split configs, delta tiles through TMA; each new config's output is checked
  against the default's.
- ceilings (``--only ceiling``): Triton's own dense GEMM with mm1's tile (no gather) next to cuBLAS, and the
  scoring GEMM / noise draw variants; (``--only tiles``) the same dense GEMM per tile shape with its operand bytes
  per FLOP and the L2 rate they imply; (``--only autows``) dense GEMMs through TMA descriptors with and without
  Triton's automatic warp specialisation, persistent or not, at mm1's and mm2's shapes; (``--only ptma``) mm1 / mm2
  as persistent kernels with the non-gathered operand through TMA, against the shipped kernels.
Usage: python benchmarks/mlp_experiments.py [--only sel,mm1,mm2,persistent,ceiling,tiles,autows,ptma] [--shapes N:sp,...]   (prints a table; JSON via results_io)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import graph_ms, kept, rel_err  # noqa: E402
from results_io import write_results  # noqa: E402
try:  # the two earlier selection kernels, from git history (see the docstring); their rows are skipped without them
    import _exp_old_selection as old_sel  # noqa: E402
    import _exp_radix_selection as radix_sel  # noqa: E402
except ImportError:
    old_sel = radix_sel = None
from chipmunk_compile.kernels import selection_reference as sel_ref  # noqa: E402

from chipmunk_compile.kernels import mlp_op  # noqa: E402
from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr  # noqa: E402
from chipmunk_compile.kernels import selection_triton as sel_tr  # noqa: E402
from chipmunk_compile.kernels.mlp_sparse_triton import (_activation, _column_halves, _mm1_epilogue,  # noqa: E402
                                                        _mm2_epilogue, _tile_coords)
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

DEV, BF16, T = "cuda", torch.bfloat16, 128
ROWS: list[dict] = []
ONLY = {"sel", "mm1", "mm2"}


def rec(shape, what, t, **extra):
    ROWS.append(dict(shape=shape, what=what, ms=t, **extra))
    print(f"{shape:14s} {what:70s} {t:8.4f} ms {extra if extra else ''}", flush=True)


def timed_variant(shape, what, launch, check=lambda: None, setup=lambda: None, extra=lambda t: {}):
    """``setup()``, one ``launch()`` checked by ``check()`` (its error against the reference), then the variant's
    CUDA-graph time, recorded with ``extra(t)``; a variant that fails to compile or run records a FAILED row."""
    try:
        setup()
        launch()
        err = check()
        t = graph_ms(launch, False)
    except Exception as e:  # noqa: BLE001 (report every failing variant)
        rec(shape, f"{what} FAILED {type(e).__name__}: {str(e).splitlines()[0][:80]}", -1.0)
        return
    rec(shape, what, t, err=err, **extra(t))


@triton.jit
def _mm1_persistent(X, WG, BG, IDX, ACACHE, DELTA, stride_xn, stride_wgf, stride_an, stride_af,
                    N, C, nb, n_sel, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
                    BLOCK_C: tl.constexpr, FLATTEN: tl.constexpr, GROUP_T: tl.constexpr):
    # batch 1, full token blocks of BLOCK_T, n_sel % BLOCK_F == 0, C % BLOCK_C == 0 (the benchmark shapes)
    n_f = n_sel // BLOCK_F
    for tile in tl.range(tl.program_id(0), nb * n_f, tl.num_programs(0), flatten=FLATTEN):
        blk, pid_f = _tile_coords(tile, nb, n_f, GROUP_T)
        local = tl.arange(0, BLOCK_T)
        rows = blk * BLOCK_T + local
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        units = tl.load(IDX + blk * n_sel + offs_f).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        x_ptrs = X + rows[:, None] * stride_xn + offs_c[None, :]
        w_ptrs = WG + units[None, :] * stride_wgf + offs_c[:, None]
        acc = tl.zeros([BLOCK_T, BLOCK_F], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
            x_ptrs += BLOCK_C
            w_ptrs += BLOCK_C
        a = _activation(acc + tl.load(BG + units).to(tl.float32)[None, :], ACT)
        a_ptrs = ACACHE + rows[:, None] * stride_an + units[None, :] * stride_af
        a_new = a.to(ACACHE.dtype.element_ty)
        delta = a_new.to(tl.float32) - tl.load(a_ptrs).to(tl.float32)
        tl.store(DELTA + blk * n_sel * BLOCK_T + local[:, None] * n_sel + offs_f[None, :], delta.to(DELTA.dtype.element_ty))
        tl.store(a_ptrs, a_new)


@triton.jit
def _mm1_gathered_tile(IDX, WG, blk, pid_f, stride_wgf, n_sel, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """An mm1 tile's rows within the token block, global rows, and pointers to its gathered W1 rows' first
    K step (batch 1, full blocks)."""
    local = tl.arange(0, BLOCK_T)
    units = tl.load(IDX + blk * n_sel + pid_f * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    w_ptrs = WG + units[None, :] * stride_wgf + tl.arange(0, BLOCK_C)[:, None]
    return local, blk * BLOCK_T + local, w_ptrs


@triton.jit
def _mm1_tma_x(X_DESC, WG, BG, IDX, ACACHE, DELTA, stride_wgf, stride_an, stride_af, N, C, nb, n_sel,
               ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
               GROUP_T: tl.constexpr, EPI_SPLIT: tl.constexpr):
    # mm1 with x tiles through TMA (descriptor) and the gathered W1 rows through cp.async; batch 1, full token
    # blocks of BLOCK_T, n_sel % BLOCK_F == 0, C % BLOCK_C == 0 (the benchmark shapes).
    blk, pid_f = _tile_coords(tl.program_id(0), nb, n_sel // BLOCK_F, GROUP_T)
    local, rows, w_ptrs = _mm1_gathered_tile(IDX, WG, blk, pid_f, stride_wgf, n_sel, BLOCK_T, BLOCK_F, BLOCK_C)
    acc = tl.zeros([BLOCK_T, BLOCK_F], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        acc = tl.dot(X_DESC.load([blk * BLOCK_T, c0]), tl.load(w_ptrs), acc)
        w_ptrs += BLOCK_C
    row_ok = local < BLOCK_T
    b = 0
    sel_base = blk * n_sel
    first = pid_f * BLOCK_F
    if EPI_SPLIT == 1:
        _mm1_epilogue(acc, acc, first, BLOCK_F, rows, local, row_ok, b, sel_base, IDX, BG, BG, ACACHE, DELTA, 0,
                      stride_an, stride_af, n_sel, BLOCK_T, True, False, False, ACT)
    else:
        h0, h1 = _column_halves(acc, BLOCK_T, BLOCK_F)
        _mm1_epilogue(h0, h0, first, BLOCK_F // 2, rows, local, row_ok, b, sel_base, IDX, BG, BG, ACACHE, DELTA, 0,
                      stride_an, stride_af, n_sel, BLOCK_T, True, False, False, ACT)
        _mm1_epilogue(h1, h1, first + BLOCK_F // 2, BLOCK_F // 2, rows, local, row_ok, b, sel_base, IDX, BG, BG,
                      ACACHE, DELTA, 0, stride_an, stride_af, n_sel, BLOCK_T, True, False, False, ACT)


@triton.jit
def _mm2_tma_delta_tile(D_DESC, IDX, W2, Y, OUT, blk, pid_d, stride_w2f, stride_yn, stride_on, Dout, nb, n_sel,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    # One mm2 tile (token block blk, output columns pid_d): the packed delta tiles through TMA, the gathered W2^T
    # rows through cp.async; batch 1, full blocks, n_sel % BLOCK_K == 0, Dout % BLOCK_D == 0; epilogue in
    # column halves.
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for k0 in range(0, n_sel, BLOCK_K):
        units = tl.load(IDX + blk * n_sel + k0 + offs_k).to(tl.int64)
        w = tl.load(W2 + units[:, None] * stride_w2f + offs_o[None, :])
        acc = tl.dot(D_DESC.load([blk * BLOCK_T, k0]), w, acc)
    acc0, acc1 = _column_halves(acc, BLOCK_T, BLOCK_D)
    row_ok = rows < nb * BLOCK_T
    _mm2_epilogue(acc0, pid_d * BLOCK_D, BLOCK_D // 2, rows, row_ok, 0, Y, OUT, 0, stride_yn, 1, 0, stride_on, 1,
                  Dout, False, True)
    _mm2_epilogue(acc1, pid_d * BLOCK_D + BLOCK_D // 2, BLOCK_D // 2, rows, row_ok, 0, Y, OUT, 0, stride_yn, 1, 0,
                  stride_on, 1, Dout, False, True)


@triton.jit
def _mm2_tma_delta(D_DESC, IDX, W2, Y, OUT, stride_w2f, stride_yn, stride_on, Dout, nb, n_sel,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr):
    blk, pid_d = _tile_coords(tl.program_id(0), nb, Dout // BLOCK_D, GROUP_T)
    _mm2_tma_delta_tile(D_DESC, IDX, W2, Y, OUT, blk, pid_d, stride_w2f, stride_yn, stride_on, Dout, nb, n_sel,
                        BLOCK_T, BLOCK_D, BLOCK_K)


@triton.jit
def _dense_gemm_bt(A, B, Cout, M, N, K, stride_am, stride_bn, stride_cm, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # C = A @ B^T with the mm1 tile (128 x 256 x 64), no gather and no epilogue work: Triton's own ceiling for
    # this tile on this GPU (M % BLOCK_M == N % BLOCK_N == K % BLOCK_K == 0).
    pid_m, pid_n = _tile_coords(tl.program_id(0), M // BLOCK_M, N // BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = B + rn[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(Cout + rm[:, None] * stride_cm + rn[None, :], acc.to(Cout.dtype.element_ty))


def dense_gemm(x, w, out, bm=128, bn=256, group=8, warps=8, stages=3):
    """out = x @ w^T with ``_dense_gemm_bt`` (shapes multiples of the tile)."""
    M, K = x.shape
    N = w.shape[0]
    _dense_gemm_bt[(M // bm * (N // bn),)](x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=group, num_warps=warps,
                                          num_stages=stages)


@triton.jit
def _dense_gemm_tma_ws(A_DESC, B_DESC, Cout, M, N, K, stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr):
    # C = A @ B^T with both operands through TMA descriptors and (WS) Triton 3.6's automatic warp specialisation,
    # which on Hopper splits the K loop into a TMA producer warpgroup and num_warps-sized consumer groups (it only
    # takes descriptor loads: a pointer-gathered operand fails the pass). Dense, no gather, no epilogue work.
    pid_m, pid_n = _tile_coords(tl.program_id(0), M // BLOCK_M, N // BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WS):
        acc = tl.dot(A_DESC.load([pid_m * BLOCK_M, k0]), B_DESC.load([pid_n * BLOCK_N, k0]).T, acc)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(Cout + rm[:, None] * stride_cm + rn[None, :], acc.to(Cout.dtype.element_ty))


@triton.jit
def _dense_gemm_tma_ws_persistent(A_DESC, B_DESC, Cout, M, N, K, stride_cm, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                  WS: tl.constexpr, PROGRAMS: tl.constexpr):
    # The same with one program per SM looping over tiles (warp specialisation on the tile loop).
    n_m = M // BLOCK_M
    n_n = N // BLOCK_N
    for tile in tl.range(tl.program_id(0), n_m * n_n, PROGRAMS, warp_specialize=WS):
        pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(A_DESC.load([pid_m * BLOCK_M, k0]), B_DESC.load([pid_n * BLOCK_N, k0]).T, acc)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(Cout + rm[:, None] * stride_cm + rn[None, :], acc.to(Cout.dtype.element_ty))


@triton.jit
def _mm1_persistent_tma(X_DESC, W_DESC, WG, BG, IDX, ACACHE, DELTA, stride_wgf, stride_an, stride_af, N, C, nb,
                        n_sel, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
                        BLOCK_C: tl.constexpr, GROUP_T: tl.constexpr, PROGRAMS: tl.constexpr, GATHER: tl.constexpr):
    # mm1, one program per SM looping over (token block, unit tile) tiles, x tiles through TMA, the gathered W1
    # rows through cp.async (GATHER=False: W1 rows first..first+BLOCK_F through TMA instead -- the cost of the
    # gather, timing only, its result is not mm1's); batch 1, full blocks, n_sel % BLOCK_F == C % BLOCK_C == 0.
    n_f = n_sel // BLOCK_F
    for tile in tl.range(tl.program_id(0), nb * n_f, PROGRAMS):
        blk, pid_f = _tile_coords(tile, nb, n_f, GROUP_T)
        local, rows, w_ptrs = _mm1_gathered_tile(IDX, WG, blk, pid_f, stride_wgf, n_sel, BLOCK_T, BLOCK_F, BLOCK_C)
        acc = tl.zeros([BLOCK_T, BLOCK_F], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            if GATHER:
                w = tl.load(w_ptrs)
            else:
                w = W_DESC.load([pid_f * BLOCK_F, c0]).T
            acc = tl.dot(X_DESC.load([blk * BLOCK_T, c0]), w, acc)
            w_ptrs += BLOCK_C
        _mm1_epilogue(acc, acc, pid_f * BLOCK_F, BLOCK_F, rows, local, local < BLOCK_T, 0, blk * n_sel, IDX, BG, BG,
                      ACACHE, DELTA, 0, stride_an, stride_af, n_sel, BLOCK_T, True, False, False, ACT)


@triton.jit
def _mm2_persistent_tma(D_DESC, IDX, W2, Y, OUT, stride_w2f, stride_yn, stride_on, Dout, nb, n_sel,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
                        PROGRAMS: tl.constexpr):
    # mm2, one program per SM looping over (token block, output tile) tiles.
    n_d = Dout // BLOCK_D
    for tile in tl.range(tl.program_id(0), nb * n_d, PROGRAMS):
        blk, pid_d = _tile_coords(tile, nb, n_d, GROUP_T)
        _mm2_tma_delta_tile(D_DESC, IDX, W2, Y, OUT, blk, pid_d, stride_w2f, stride_yn, stride_on, Dout, nb, n_sel,
                            BLOCK_T, BLOCK_D, BLOCK_K)


def persistent_tma(N, sp, C=3072, Fh=12288):
    """The persistent + TMA schedule that lifts Triton's dense GEMM from ~540 to ~700 TFLOP/s, applied to the
    gathered GEMMs (x / delta tiles through TMA, gathered weight rows through cp.async, full epilogues, bf16
    y_cache as shipped), against the shipped kernels on the same inputs; outputs checked against them."""
    torch.manual_seed(3)
    shape = f"N{N} sp{sp}"
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEV))
    x = torch.randn(1, N, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
    w2_t = w2.t().contiguous().t()
    a_cache = F.gelu(F.linear(x, w1, b1), approximate="tanh")[0].t().contiguous().unsqueeze(0).transpose(1, 2)
    y_cache = torch.randn(1, N, C, device=DEV).to(BF16)
    out = torch.empty(1, N, C, device=DEV, dtype=BF16)
    nb, k = N // T, kept(Fh, sp, 256)
    indices = torch.stack([torch.randperm(Fh, device=DEV)[:k].sort().values for _ in range(nb)]).int().unsqueeze(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def run(m1=True, m2=True, delta=None):
        return mlp_tr._launch(x, w1, b1, None, None, w2_t, "gelu_tanh", indices, a_cache, y_cache, T, None,
                              run_mm1=m1, run_mm2=m2, delta=delta, out=out)
    a0, y0 = a_cache.clone(), y_cache.clone()
    delta = run(m2=False)
    a_ref, d_ref = a_cache.clone(), delta.clone()
    rec(shape, "ptma: mm1 shipped", graph_ms(lambda: run(m2=False, delta=delta), False))
    x_desc = TensorDescriptor.from_tensor(x[0], [128, 64])
    w_desc = TensorDescriptor.from_tensor(w1, [256, 64])
    for stages, group, gather in ((3, 8, True), (4, 8, True), (3, 0, True), (3, 32, True), (3, 8, False)):
        dt = torch.empty_like(delta)

        def mm1():
            _mm1_persistent_tma[(sms,)](x_desc, w_desc, w1, b1, indices, a_cache, dt, w1.stride(0), a_cache.stride(1),
                                       a_cache.stride(2), N, C, nb, k, ACT=1, BLOCK_T=128, BLOCK_F=256, BLOCK_C=64,
                                       GROUP_T=group, PROGRAMS=sms, GATHER=gather, num_warps=8, num_stages=stages)
        timed_variant(shape, f"ptma: mm1 persistent TMA-x stages={stages} group={group} gather={gather}", mm1,
                      check=lambda: max(rel_err(dt, d_ref), rel_err(a_cache, a_ref)) if gather else None,
                      setup=lambda: a_cache.copy_(a0))
    a_cache.copy_(a0)
    y_cache.copy_(y0)
    run(m1=False, delta=d_ref)
    y_ref, o_ref = y_cache.clone(), out.clone()
    rec(shape, "ptma: mm2 shipped", graph_ms(lambda: run(m1=False, delta=d_ref), False))
    d_desc = TensorDescriptor.from_tensor(d_ref.reshape(nb * T, k), [128, 64])
    for bd, warps, stages, group in ((256, 8, 5, 8), (256, 8, 4, 8), (256, 8, 3, 8), (256, 8, 5, 32), (128, 4, 5, 8)):
        def mm2():
            _mm2_persistent_tma[(sms,)](d_desc, indices, w2_t, y_cache, out, w2_t.stride(1), y_cache.stride(1),
                                       out.stride(1), C, nb, k, BLOCK_T=128, BLOCK_D=bd, BLOCK_K=64, GROUP_T=group,
                                       PROGRAMS=sms, num_warps=warps, num_stages=stages)
        timed_variant(shape, f"ptma: mm2 persistent TMA-delta {bd}x64 w{warps} s{stages} group={group}", mm2,
                      check=lambda: max(rel_err(y_cache.float() - y0.float(), y_ref.float() - y0.float()),
                                        rel_err(out, o_ref)),
                      setup=lambda: y_cache.copy_(y0))


AUTOWS_CONFIGS = ((False, 128, 256, 8, 3, False), (False, 128, 256, 4, 3, True), (False, 128, 256, 4, 4, True),
                  (False, 128, 128, 4, 4, True), (False, 128, 128, 4, 5, True), (True, 128, 256, 4, 3, True),
                  (True, 128, 256, 4, 4, True), (True, 128, 256, 8, 3, False))


def autows_ceilings(N, sp, C=3072, Fh=12288, configs=None, baselines=True, gemms=("mm1", "mm2")):
    """Does Triton 3.6's automatic warp specialisation (TMA producer + consumer warpgroups) lift the dense GEMM
    above the ~550 TFLOP/s of the software-pipelined kernels? mm1's shape (N x k x C) and mm2's (N x C x k).
    ``configs``: indices into AUTOWS_CONFIGS (the first warp-specialised config hung on the H100, so the driver
    runs one config per process under a timeout)."""
    torch.manual_seed(3)
    k = kept(Fh, sp, 256)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEV))
    for name, (M, Nn, K) in (("mm1", (N, k, C)), ("mm2", (N, C, k))):
        if name not in gemms:
            continue
        shape = f"N{N} sp{sp} {name}"
        a = torch.randn(M, K, device=DEV, dtype=BF16)
        b = torch.randn(Nn, K, device=DEV, dtype=BF16) * K ** -0.5
        out = torch.empty(M, Nn, device=DEV, dtype=BF16)
        flops = 2 * M * Nn * K
        want = a @ b.t()
        if baselines:
            t = graph_ms(lambda: torch.mm(a, b.t(), out=out), False)
            rec(shape, "autows: cuBLAS", t, tflops=flops / t / 1e9)
            t = graph_ms(lambda: dense_gemm(a, b, out), False)
            rec(shape, "autows: Triton pointer loads 128x256 w8 s3", t, tflops=flops / t / 1e9,
                err=rel_err(out, want))
        for i, (persistent, bm, bn, warps, stages, ws) in enumerate(AUTOWS_CONFIGS):
            if configs is not None and i not in configs:
                continue
            a_desc = TensorDescriptor.from_tensor(a, [bm, 64])
            b_desc = TensorDescriptor.from_tensor(b, [bn, 64])
            programs = torch.cuda.get_device_properties(0).multi_processor_count

            def tri():
                if persistent:
                    _dense_gemm_tma_ws_persistent[(programs,)](
                        a_desc, b_desc, out, M, Nn, K, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8,
                        WS=ws, PROGRAMS=programs, num_warps=warps, num_stages=stages)
                else:
                    _dense_gemm_tma_ws[(M // bm * (Nn // bn),)](
                        a_desc, b_desc, out, M, Nn, K, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8,
                        WS=ws, num_warps=warps, num_stages=stages)
            timed_variant(shape, f"autows: TMA {'persistent ' if persistent else ''}{bm}x{bn} w{warps} s{stages} "
                          f"ws={ws}", tri, check=lambda: rel_err(out, want), setup=lambda: out.fill_(float("nan")),
                          extra=lambda t: dict(tflops=flops / t / 1e9))


def ceilings(N, sp, C=3072, Fh=12288):
    """Triton's dense GEMM with the mm1 tile (no gather) vs cuBLAS on mm1's FLOPs; the scoring GEMM as
    F.linear (nb x F output) vs the transposed product (F x nb) cuBLAS may tile across more SMs."""
    torch.manual_seed(3)
    shape = f"N{N} sp{sp}"
    k = kept(Fh, sp, 256)
    x = torch.randn(N, C, device=DEV, dtype=BF16)
    w1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5
    b1 = torch.randn(Fh, device=DEV, dtype=BF16)
    w1k = w1[:k].contiguous()
    out = torch.empty(N, k, device=DEV, dtype=BF16)
    rec(shape, "cuBLAS x @ W1[:k]^T", graph_ms(lambda: torch.mm(x, w1k.t(), out=out), False))
    for group, stages in ((0, 3), (8, 3), (32, 3), (8, 4)):
        def tri():
            dense_gemm(x, w1k, out, group=group, stages=stages)
        tri()
        err = rel_err(out, x @ w1k.t())
        rec(shape, f"Triton dense 128x256x64 GEMM (no gather) group={group} stages={stages}", graph_ms(tri, False),
            err=err)
    nb = N // T
    mb = x.reshape(nb, T, C).mean(dim=1).to(BF16)
    rec(shape, "scoring GEMM F.linear(means, W1, b1) [nb x F]", graph_ms(lambda: F.linear(mb, w1, b1), False))
    rec(shape, "scoring GEMM addmm(b1, W1, means^T) [F x nb]",
        graph_ms(lambda: torch.addmm(b1[:, None], w1, mb.t()), False))
    noise = torch.empty(nb, Fh, device=DEV)
    rec(shape, "noise uniform_", graph_ms(lambda: noise.uniform_(), False))
    rec(shape, "noise torch.rand", graph_ms(lambda: torch.rand(nb, Fh, device=DEV), False))


def tile_ceilings(N, sp, C=3072, Fh=12288):
    """Triton's dense GEMM (no gather) on mm1's FLOPs per tile shape: if the L2 -> SM operand traffic bounds this
    GEMM family, the implied L2 rate (TFLOP/s x operand bytes per FLOP, (BM + BN) / (BM * BN) for 16-bit tiles)
    stays about constant across tiles while the FLOP rate follows the tile's bytes per FLOP."""
    torch.manual_seed(3)
    shape = f"N{N} sp{sp}"
    k = kept(Fh, sp, 256)
    x = torch.randn(N, C, device=DEV, dtype=BF16)
    w1k = torch.randn(k, C, device=DEV, dtype=BF16) * C ** -0.5
    out = torch.empty(N, k, device=DEV, dtype=BF16)
    flops = 2 * N * k * C
    t = graph_ms(lambda: torch.mm(x, w1k.t(), out=out), False)
    rec(shape, "tiles: cuBLAS", t, tflops=flops / t / 1e9)
    want = x @ w1k.t()
    for bm, bn, warps, stages in ((128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4),
                                  (64, 256, 4, 4), (64, 128, 4, 5)):
        def tri():
            dense_gemm(x, w1k, out, bm, bn, warps=warps, stages=stages)
        bytes_per_flop = (bm + bn) / (bm * bn)
        timed_variant(shape, f"tiles: Triton {bm}x{bn}x64 w{warps} s{stages}", tri, check=lambda: rel_err(out, want),
                      extra=lambda t: dict(tflops=flops / t / 1e9, operand_bytes_per_flop=bytes_per_flop,
                                           implied_l2_tb_s=flops / t / 1e9 * bytes_per_flop))


def bench(N, sp, C=3072, Fh=12288):
    torch.manual_seed(3)
    shape = f"N{N} sp{sp}"
    x = torch.randn(1, N, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
    b2 = torch.randn(C, device=DEV, dtype=BF16)
    rec(shape, "dense torch MLP", graph_ms(lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2), False))
    w2_t = w2.t().contiguous().t()
    a_cache = F.gelu(F.linear(x, w1, b1), approximate="tanh")[0].t().contiguous().unsqueeze(0).transpose(1, 2)
    y_cache = torch.randn(1, N, C, device=DEV)
    nb = N // T
    k = kept(Fh, sp, 256)
    n_rand = min(k, -(-Fh // 20))
    hbar_cache = torch.randn(1, nb, Fh, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    out = torch.empty(1, N, C, device=DEV, dtype=BF16)

    # ---- selection parts
    means = x.reshape(1, nb, T, C).mean(dim=2, dtype=torch.float32)
    rec(shape, "sel: block means", graph_ms(lambda: x.reshape(1, nb, T, C).mean(dim=2, dtype=torch.float32), False))
    mb = means.to(BF16)
    rec(shape, "sel: scoring GEMM", graph_ms(lambda: F.linear(mb, w1, b1), False))
    hbar_new = mlp_ref.block_mean_preactivation(x, w1, b1, None, None, T, weight_dtype_out=True)
    noise = torch.empty(nb, Fh, device=DEV).uniform_()
    rec(shape, "sel: noise draw (uniform_)", graph_ms(lambda: noise.uniform_(), False))
    idx = torch.empty(1, nb, k, device=DEV, dtype=torch.int32)
    # Each call refreshes the references of the units it selects (their scores become 0): restore them in every
    # timed call, as a real refresh sees a new x (timing the copy too, below), so no call runs on tied zeros.
    hbar0 = hbar_cache.clone()
    rec(shape, "sel: reference restore copy (timing aid)", graph_ms(lambda: hbar_cache.copy_(hbar0), False))
    def timed(name, launch):
        def fn():
            hbar_cache.copy_(hbar0)
            launch()
        try:
            rec(shape, f"sel: {name}", graph_ms(fn, False))
        except Exception as e:  # noqa: BLE001
            rec(shape, f"sel: {name} FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)

    def sets(launch, out):
        hbar_cache.copy_(hbar0)
        launch()
        return [set(r.tolist()) for r in out[0].cpu()]

    def radix(chunk=2048, warps=8):
        radix_sel._select_kernel[(nb,)](hbar_new, hbar_new, hbar_cache, noise, idx, Fh, nb, k - n_rand, n_rand, 0, 0,
                                        FROM_HBAR=True, PATHS=1, CHUNK=chunk, num_warps=warps)
    hb = hbar_new.float()
    idx2 = torch.empty(1, nb, k, device=DEV, dtype=torch.int64)

    def bisect_whole_row(warps=32):
        old_sel._select_kernel[(nb,)](hb, hb, hbar_cache, noise, idx2, Fh, nb, k - n_rand, n_rand, 0, 0,
                                      FROM_HBAR=True, PATHS=1, BLOCK=16384, num_warps=warps)
    idx3 = torch.empty(1, nb, k, device=DEV, dtype=torch.int32)

    def shipped(warps=32):
        sel_tr._select_kernel[(nb,)](hbar_new, hbar_new, hbar_cache, noise, idx3, Fh, nb, k - n_rand, n_rand, 0, 0,
                                     FROM_HBAR=True, PATHS=1, BLOCK=16384, LOG2_BLOCK=14, LANES=32 * warps,
                                     num_warps=warps)
    if "sel" in ONLY:
        if radix_sel is not None:
            timed("radix (streamed byte histograms) chunk 2048 w8", radix)
            timed("bisection with whole-row scans w32", bisect_whole_row)
        for warps in (32, 16, 8):
            timed(f"shipped (register bisection, one-entry scans) w{warps}", lambda: shipped(warps))
        timed("shipped on tied zero scores (no restore)", shipped)
        if radix_sel is not None:
            want = sets(radix, idx)
            rec(shape, "sel: rows where shipped == radix (count)",
                float(sum(a == b for a, b in zip(sets(shipped, idx3), want))), rows=nb)
            rec(shape, "sel: rows where whole-row bisection == radix (count)",
                float(sum(a == b for a, b in zip(sets(bisect_whole_row, idx2), want))), rows=nb)
        rec(shape, "sel: op refresh path (means + GEMM + noise + kernel)",
            graph_ms(lambda: (hbar_cache.copy_(hbar0), mlp_op.refresh_indices(x, w1, b1, None, None, hbar_cache, idx3,
                                                                               k - n_rand, n_rand, T, gen)), False))
        rec(shape, "sel: op refresh path, torch", graph_ms(lambda: (hbar_cache.copy_(hbar0), mlp_op.refresh_indices(
            x, w1, b1, None, None, hbar_cache, idx3, k - n_rand, n_rand, T, gen, "torch")), False))
    if "mm1" not in ONLY and "mm2" not in ONLY:
        return

    # ---- mm1
    indices = torch.stack([torch.randperm(Fh, device=DEV)[:k].sort().values for _ in range(nb)]).int().unsqueeze(0)
    def run(c1=None, c2=None, m1=True, m2=True, delta=None):
        cfg = None if c1 is None and c2 is None else {"mm1": c1 or mlp_tr._MM1_DEFAULT, "mm2": c2 or mlp_tr._MM2_DEFAULT}
        return mlp_tr._launch(x, w1, b1, None, None, w2_t, "gelu_tanh", indices, a_cache, y_cache, T, cfg,
                              run_mm1=m1, run_mm2=m2, delta=delta, out=out)
    a0, y0 = a_cache.clone(), y_cache.clone()
    delta = run(m2=False)
    a_cache.copy_(a0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    d_ref = torch.empty_like(delta)
    a_cache.copy_(a0)
    mlp_tr._launch(x, w1, b1, None, None, w2_t, "gelu_tanh", indices, a_cache, y_cache, T, None, run_mm2=False, delta=d_ref)
    a_ref = a_cache.clone()
    # Epilogue in column halves (spills: 96 B -> 0 at 128x256, sm_90 compile), other depths / K steps.
    c1 = mlp_tr._c1
    mm1_new = [c1(256, 64, 8, 3, g, 2) for g in (0, 8, 32)] + [c1(256, 128, 8, 2, 8, 2), c1(256, 64, 8, 4, 8, 2)]
    for c in (mlp_tr._MM1_CONFIGS + mm1_new if "mm1" in ONLY else []):
        c1 = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        try:
            a_cache.copy_(a0)
            dd = run(c1=c1, m2=False)
            err = max(rel_err(dd, d_ref), rel_err(a_cache, a_ref))
            rec(shape, f"mm1 {c1}", graph_ms(lambda: run(c1=c1, m2=False, delta=delta), False), err=err)
        except Exception as e:  # noqa: BLE001
            rec(shape, f"mm1 {c1} FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)
    x_desc = TensorDescriptor.from_tensor(x[0], [128, 64])
    for group, split, stages in (((0, 2, 3), (8, 2, 4)) if "mm1" in ONLY else ()):
        dt = torch.empty_like(delta)
        def tma_x():
            _mm1_tma_x[(nb * (k // 256),)](x_desc, w1, b1, indices, a_cache, dt, w1.stride(0), a_cache.stride(1),
                                           a_cache.stride(2), N, C, nb, k, ACT=1, BLOCK_T=128, BLOCK_F=256,
                                           BLOCK_C=64, GROUP_T=group, EPI_SPLIT=split, num_warps=8, num_stages=stages)
        try:
            a_cache.copy_(a0)
            tma_x()
            err = max(rel_err(dt, d_ref), rel_err(a_cache, a_ref))
            rec(shape, f"mm1 TMA x tiles group={group} epi_split={split} stages={stages}", graph_ms(tma_x, False),
                err=err)
        except Exception as e:  # noqa: BLE001
            rec(shape, f"mm1 TMA x FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)
    a_cache.copy_(a0)
    for flatten in ((False, True) if "persistent" in ONLY else ()):
        for stages, group in ((3, 0), (3, 8)):
            for progs in (sms, 2 * sms):
                dp = torch.empty_like(delta)
                def pers():
                    _mm1_persistent[(min(progs, nb * (k // 256)),)](x, w1, b1, indices, a_cache, dp, x.stride(1), w1.stride(0),
                                                                   a_cache.stride(1), a_cache.stride(2), N, C, nb, k,
                                                                   ACT=1, BLOCK_T=128, BLOCK_F=256, BLOCK_C=64,
                                                                   FLATTEN=flatten, GROUP_T=group, num_warps=8,
                                                                   num_stages=stages)
                try:
                    a_cache.copy_(a0)
                    pers()
                    err = max(rel_err(dp, d_ref), rel_err(a_cache, a_ref))
                    rec(shape, f"mm1 persistent flatten={flatten} stages={stages} group={group} programs={progs}",
                        graph_ms(pers, False), err=err)
                except Exception as e:  # noqa: BLE001
                    rec(shape, f"mm1 persistent flatten={flatten} stages={stages} FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)

    # ---- mm2 (on mm1's deltas); outputs compared to the default config's
    y_cache.copy_(y0)
    run(m1=False, delta=delta)
    y_ref = (y_cache - y0).clone()
    c2_ = mlp_tr._c2
    new = [c2_(256, 64, 8, 5, 0, 0, 2), c2_(256, 64, 8, 5, 8, 0, 2), c2_(128, 64, 4, 5, 0, 0, 2), c2_(128, 128, 8, 5, 0, 0, 2),
           c2_(128, 128, 8, 5, 32, 1, 2), c2_(128, 32, 4, 5, 0, 0, 2), c2_(128, 32, 4, 6, 0, 0, 2), c2_(128, 32, 4, 5, 8, 0, 2),
           c2_(256, 32, 8, 5, 0, 0, 2), c2_(256, 32, 8, 6, 8, 0, 2), c2_(128, 64, 4, 5, 8, 0, 2)]
    for c in (mlp_tr._MM2_CONFIGS + new if "mm2" in ONLY else []):
        c2 = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        try:
            y_cache.copy_(y0)
            run(c2=c2, m1=False, delta=delta)
            err = rel_err(y_cache - y0, y_ref)
            rec(shape, f"mm2 {c2}", graph_ms(lambda: run(c2=c2, m1=False, delta=delta), False), err=err)
        except Exception as e:  # noqa: BLE001
            rec(shape, f"mm2 {c2} FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)
    # Ceilings: cuBLAS on the same FLOPs without gathers (x @ W1[:k]^T; a[:, :k] @ W2[:, :k]^T), and mm2 with a
    # bf16 output cache (half the read-modify-write traffic of the fp32 one).
    if "mm2" in ONLY:
        a_k = torch.randn(N, k, device=DEV, dtype=BF16)
        w1k, w2k = w1[:k].contiguous(), w2[:, :k].contiguous()
        rec(shape, "cuBLAS x @ W1[:k]^T (mm1's FLOPs, no gather, no epilogue)", graph_ms(lambda: F.linear(x, w1k), False))
        rec(shape, "cuBLAS a[:, :k] @ W2[:, :k]^T (mm2's FLOPs)", graph_ms(lambda: F.linear(a_k, w2k), False))
        y16 = y0.to(BF16)
        for c in (c2_(256, 64, 8, 5, 8, 0, 2), c2_(128, 64, 4, 5, 0, 0, 2), c2_(128, 32, 4, 5, 0, 0, 2)):
            meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            def bf16_y():
                mlp_tr._mm2[(nb * (C // meta["BLOCK_D"]), 1)](
                    delta, indices, w2_t, y16, out, *w2_t.stride(), *y16.stride(), *out.stride(), N, C, nb, k, T,
                    PRECISION="tf32", BLOCK_T=128, HAS_OUT=True, **meta)
            try:
                rec(shape, f"mm2 bf16 y_cache {meta}", graph_ms(bf16_y, False))
            except Exception as e:  # noqa: BLE001
                rec(shape, f"mm2 bf16 y_cache FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)
    d_desc_cache = {}
    for bd, bk, warps, stages, group in (((256, 64, 8, 5, 0), (256, 64, 8, 5, 8), (128, 64, 4, 5, 0), (128, 32, 4, 5, 0),
                                          (128, 64, 4, 4, 0), (256, 64, 8, 4, 8)) if "mm2" in ONLY else ()):
        d_desc = d_desc_cache.setdefault(bk, TensorDescriptor.from_tensor(delta.reshape(nb * T, k), [128, bk]))
        def tma_d():
            _mm2_tma_delta[(nb * (C // bd),)](d_desc, indices, w2_t, y_cache, out, w2_t.stride(1), y_cache.stride(1),
                                              out.stride(1), C, nb, k, BLOCK_T=128, BLOCK_D=bd, BLOCK_K=bk,
                                              GROUP_T=group, num_warps=warps, num_stages=stages)
        try:
            y_cache.copy_(y0)
            tma_d()
            err = rel_err(y_cache - y0, y_ref)
            rec(shape, f"mm2 TMA delta tiles {bd}x{bk} w{warps} s{stages} group={group} epi_split=2",
                graph_ms(tma_d, False), err=err)
        except Exception as e:  # noqa: BLE001
            rec(shape, f"mm2 TMA delta FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)


def attention_rows():
    """The generic selection on attention query-group rows (576 x 4608 at N4608, 2112 x 16896 at N16896; 93 %
    sparse, 5 % of the kept keys random) against torch.topk, same index sets checked."""
    for rows, n in ((576, 4608), (2112, 16896)):
        shape = f"attn {rows}x{n}"
        k = max(64, round(0.07 * n / 64) * 64)
        n_rand = k // 20
        scores = torch.rand(1, rows, n, device=DEV)
        gen = torch.Generator(DEV)
        saved = sel_tr.MAX_TRITON_ROW
        sel_tr.MAX_TRITON_ROW = max(saved, n)
        got = sel_tr.select_topk_with_random(scores, k - n_rand, n_rand, None, gen.manual_seed(1))
        want = sel_ref.select_topk_with_random(scores, k - n_rand, n_rand, None, gen.manual_seed(1))
        same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(got[0].cpu(), want[0].cpu()))
        for warps in (4, 8, 16):
            sel_tr.NUM_WARPS = warps
            rec(shape, f"sel: shipped generic w{warps}", graph_ms(
                lambda: sel_tr.select_topk_with_random(scores, k - n_rand, n_rand, None, gen), False), same_rows=same)
        sel_tr.NUM_WARPS = None
        sel_tr.MAX_TRITON_ROW = saved
        rec(shape, "sel: torch", graph_ms(lambda: sel_ref.select_topk_with_random(scores, k - n_rand, n_rand, None, gen),
                                          False))


def main():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="sel,mm1,mm2")
    parser.add_argument("--shapes", default="4608:0.7,4608:0.9,16896:0.7,16896:0.9", help="N:sparsity list")
    parser.add_argument("--autows-configs", default=None, help="indices into AUTOWS_CONFIGS (default: all)")
    parser.add_argument("--no-baselines", action="store_true", help="autows: skip the cuBLAS / pointer rows")
    parser.add_argument("--gemms", default="mm1,mm2", help="autows: which GEMM shapes")
    args = parser.parse_args()
    ONLY.clear()
    ONLY.update(args.only.split(","))
    for shape in args.shapes.split(","):
        n, sp = shape.split(":")
        if "ceiling" in ONLY:
            ceilings(int(n), float(sp))
        if "tiles" in ONLY:
            tile_ceilings(int(n), float(sp))
        if "ptma" in ONLY:
            persistent_tma(int(n), float(sp))
        if "autows" in ONLY:
            autows_ceilings(int(n), float(sp), configs=None if args.autows_configs is None else
                            [int(i) for i in args.autows_configs.split(",")], baselines=not args.no_baselines,
                            gemms=args.gemms.split(","))
        if ONLY & {"sel", "mm1", "mm2", "persistent"}:
            bench(int(n), float(sp))
    if "sel" in ONLY:
        attention_rows()
    write_results("mlp_experiments" + ("" if ONLY == {"sel", "mm1", "mm2"} else "_" + "_".join(sorted(ONLY)))
                  + os.environ.get("RESULTS_SUFFIX", ""),
                  dict(results=ROWS))


if __name__ == "__main__":
    main()

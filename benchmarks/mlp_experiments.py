"""Where a sparse MLP refresh step's GPU time goes, and which kernel variants shorten it (H100 experiments).

All times are CUDA-graph replays (GPU time, no Python launch overhead), medians:
- selection parts: block means of x, the scoring GEMM, the noise draw, the selection kernel as shipped and the
  two earlier versions it replaced (``_exp_radix_selection.py``: byte histograms over streamed chunks;
  ``_exp_old_selection.py``: bisection with whole-row scans), on MLP refresh rows and attention query-group rows
  (the generic call, against torch.topk). The earlier kernels are not kept in the tree; to rerun their rows:
  ``git show 3b7bd17:kernels/selection_triton.py > benchmarks/_exp_radix_selection.py`` and
  ``git show 398fc83:kernels/selection_triton.py > benchmarks/_exp_old_selection.py``;
- mm1: every autotuner candidate, and a persistent (grid-stride) variant with and without loop flattening;
- mm2: every autotuner candidate plus deeper software pipelines (num_stages 5 / 7: the gathered W2^T rows are
  addressed through the unit list loaded in the same loop, and Triton 3.6 only double-buffers such indirect loads
  when num_stages >= 5); each new config's output is checked against the default's.
Usage: python benchmarks/mlp_experiments.py [--only sel,mm1,mm2]   (prints a table; JSON via results_io)
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
from chipmunk_compile.kernels.mlp_sparse_triton import _activation, _tile_coords  # noqa: E402

DEV, BF16, T = "cuda", torch.bfloat16, 128
ROWS: list[dict] = []
ONLY = {"sel", "mm1", "mm2"}


def rec(shape, what, t, **extra):
    ROWS.append(dict(shape=shape, what=what, ms=t, **extra))
    print(f"{shape:14s} {what:70s} {t:8.4f} ms {extra if extra else ''}", flush=True)


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
    for c in (mlp_tr._MM1_CONFIGS if "mm1" in ONLY else []):
        c1 = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        try:
            rec(shape, f"mm1 {c1}", graph_ms(lambda: run(c1=c1, m2=False, delta=delta), False))
        except Exception as e:  # noqa: BLE001
            rec(shape, f"mm1 {c1} FAILED {type(e).__name__}", -1.0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    d_ref = torch.empty_like(delta)
    a_cache.copy_(a0)
    mlp_tr._launch(x, w1, b1, None, None, w2_t, "gelu_tanh", indices, a_cache, y_cache, T, None, run_mm2=False, delta=d_ref)
    a_ref = a_cache.clone()
    for flatten in ((False, True) if "mm1" in ONLY else ()):
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
    new = [mlp_tr._c2(128, 64, 4, 5), mlp_tr._c2(128, 64, 4, 7), mlp_tr._c2(128, 64, 4, 5, 32, 1),
           mlp_tr._c2(128, 64, 4, 7, 32, 1), mlp_tr._c2(128, 64, 8, 5, 32, 1), mlp_tr._c2(256, 64, 8, 5),
           mlp_tr._c2(256, 64, 8, 5, 32, 1), mlp_tr._c2(128, 128, 8, 5, 32, 1), mlp_tr._c2(128, 32, 4, 7, 32, 1)]
    for c in (mlp_tr._MM2_CONFIGS + new if "mm2" in ONLY else []):
        c2 = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        try:
            y_cache.copy_(y0)
            run(c2=c2, m1=False, delta=delta)
            err = rel_err(y_cache - y0, y_ref)
            rec(shape, f"mm2 {c2}", graph_ms(lambda: run(c2=c2, m1=False, delta=delta), False), err=err)
        except Exception as e:  # noqa: BLE001
            rec(shape, f"mm2 {c2} FAILED {type(e).__name__}: {str(e)[:80]}", -1.0)


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
    ONLY.clear()
    ONLY.update(parser.parse_args().only.split(","))
    for N in (4608, 16896):
        for sp in (0.7, 0.9):
            bench(N, sp)
    if "sel" in ONLY:
        attention_rows()
    write_results("mlp_experiments" + ("" if ONLY == {"sel", "mm1", "mm2"} else "_" + "_".join(sorted(ONLY))),
                  dict(results=ROWS))


if __name__ == "__main__":
    main()

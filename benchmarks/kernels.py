"""GPU benchmark of the Triton kernels against dense baselines measured in the same run (CUDA only).

First checks every kernel in bf16 against the torch reference (fp32 compute) at moderate shapes and asserts a
relative L2 error below 2e-2. Then times, with triton.testing.do_bench (median, random data):

- attention_hunyuan: column-sparse delta kernel as dispatched (the warp-specialised Gluon kernel on Hopper; the
  Triton kernel's time is recorded beside it), B1 H24 N118800 d128, 93/85/70% sparsity, vs SDPA; ideal =
  SDPA of all queries over only the K kept keys (k/v sliced);
- attention_flux: N4608 and N16896, 83.5% sparsity, same comparison;
- dense_step: the first dense step (O + LSE: cuDNN/flash through PyTorch where they apply, else Triton; the
  Triton time is recorded too) and the dense kernel with LSE + column mass as dispatched (the warp-specialised
  Gluon kernel on Hopper; the Triton kernel's time beside it) vs SDPA (the dense-step overhead);
- mlp: full refresh step as the op runs it (block means + scoring GEMM + the Triton selection kernel + mm1 +
  mm2 with fused write-back and the bf16 output from mm2's epilogue; y_cache in bf16 as by default; every timed
  refresh starts from the same references; the kernels-only, mm2-alone, torch-selection, CUDA-graph replay and
  float32-y_cache times recorded beside) vs the dense torch MLP; ideal = dense time x kept fraction;
- attention_selection: the selection over the column mass of a dense step (Triton kernel; torch.topk beside),
  and the share of the sparse step spent on the output-cache read/write (bytes / measured copy bandwidth).

Prints a table and writes kernels_<gpu>.json (and a speedup-vs-sparsity PNG) to $OUT or benchmarks/results.
Usage: python benchmarks/kernels.py [--quick | --sweep [dense,sparse,mlp]] [--only attention,dense,mlp]
(--only: those sections, JSON named kernels_<gpu>_only_<sections>.json; --sweep: every candidate config of
the named kernels timed explicitly, written to sweep.json; see benchmarks/KERNEL_NOTES.md)
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench


from chipmunk_compile.kernels import attention_dense_triton as dense_tr  # noqa: E402
from chipmunk_compile.kernels import attention_reference as attn_ref  # noqa: E402
from chipmunk_compile.kernels import attention_sparse_triton as sparse_tr  # noqa: E402
from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import mlp_op  # noqa: E402
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr  # noqa: E402
from chipmunk_compile.kernels import selection_reference as select_ref  # noqa: E402
from chipmunk_compile.kernels import selection_triton as select_tr  # noqa: E402

ws_kernel = sparse_tr._warp_specialized_kernel()

DEV = "cuda"
BF16 = torch.bfloat16
GROUP = 192
TOKEN_BLOCK = 128
RESULTS: list[dict] = []


def ms(fn, quick):
    fn()  # compile and autotune outside the timed region (do_bench sizes its repetitions from the first calls)
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def graph_ms(fn, quick):
    """Median ms of replaying ``fn`` captured in a CUDA graph: the GPU time of its launches without the Python
    launch overhead (which do_bench's eager timing includes whenever the host is slower than the GPU). Falls back
    to eager timing (and says so) when the capture fails."""
    fn()
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        print(f"  (graph capture failed, eager timing: {type(exc).__name__}: {str(exc)[:120]})", flush=True)
        return ms(fn, quick)
    return do_bench(graph.replay, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def rel_err(actual, expected):
    a, e = actual.float(), expected.float()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def kept(n, sparsity, multiple=64):
    return max(multiple, min(n, round((1 - sparsity) * n / multiple) * multiple))


def random_indices(rows, n, k, chunk=2048):
    """Uniformly random sorted column lists [rows, k] (int32), built in chunks to bound memory."""
    out = torch.empty(rows, k, dtype=torch.int32, device=DEV)
    for r in range(0, rows, chunk):
        noise = torch.rand(min(chunk, rows - r), n, device=DEV)
        out[r:r + chunk] = noise.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values.int()
    return out


def record(bench, shape, sparsity, dense_ms, chipmunk_ms, ideal_ms=None, **extra):
    rec = dict(bench=bench, shape=shape, sparsity=sparsity, dense_ms=dense_ms, chipmunk_ms=chipmunk_ms,
               speedup=dense_ms / chipmunk_ms, ideal_ms=ideal_ms,
               fraction_of_ideal=None if ideal_ms is None else ideal_ms / chipmunk_ms, **extra)
    RESULTS.append(rec)
    ideal = "" if ideal_ms is None else f"{ideal_ms:9.3f} {rec['fraction_of_ideal']:6.2f}"
    print(f"{bench:20s} {shape:28s} {sparsity:6.3f} {dense_ms:9.3f} {chipmunk_ms:9.3f} {rec['speedup']:7.2f}x {ideal}",
          flush=True)


# ----------------------------------------------------------------------------------------------- correctness
def check_correctness():
    torch.manual_seed(0)
    B, H, N, D = 2, 4, 3000, 128
    q, k, v = (torch.randn(B, N, H, D, device=DEV, dtype=BF16).transpose(1, 2) for _ in range(3))
    scale = D ** -0.5
    lse_prev = torch.randn(B, H, N, device=DEV) * 0.2 + 9.0
    # Autotuned calls twice: the second launches the cached binary directly (kernels/launch.py).
    for _ in range(2):
        o, lse, cs = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse_prev, GROUP)
    ro, rlse, rcs = attn_ref.dense_attention_lse_colmass(q.float(), k.float(), v.float(), scale, lse_prev, GROUP)
    errs = {"dense o": rel_err(o, ro), "dense lse": rel_err(lse, rlse), "dense colmass": rel_err(cs, rcs)}
    if dense_tr._warp_specialized_kernel() is not None:
        o, lse, cs = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse_prev, GROUP, kernel="triton")
        errs.update({"dense triton o": rel_err(o, ro), "dense triton lse": rel_err(lse, rlse),
                     "dense triton colmass": rel_err(cs, rcs)})
    for a in (0, 1):
        for mode, bm, w in ((1, 64, 4), (2, 128, 8)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=64, num_warps=w, num_stages=3, CS_MODE=mode, ANCHOR=a)
            o, lse, cs = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse_prev, GROUP, config=cfg)
            errs[f"dense cs{mode} anchor{a} o"] = rel_err(o, ro)
            errs[f"dense cs{mode} anchor{a} lse"] = rel_err(lse, rlse)
            errs[f"dense cs{mode} anchor{a} colmass"] = rel_err(cs, rcs)

    vendor = dense_tr.vendor_attention_with_lse(q, k, v, scale)
    if vendor is not None:
        errs["vendor (cuDNN/flash) o"] = rel_err(vendor[0], ro)
        errs["vendor (cuDNN/flash) lse"] = rel_err(vendor[1], rlse)
    print(f"first dense step (LSE only) uses: {dense_tr._vendor_choice}")
    num_groups = -(-N // GROUP)
    for n_sel in (kept(N, 0.93), 77):
        idx = random_indices(B * H * num_groups, N, n_sel).view(B, H, num_groups, n_sel)
        # A zero base isolates P^S from the bf16 rounding of a large cache value.
        zero = torch.zeros(B, H, N, D, device=DEV, dtype=BF16)
        out = sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, zero, -1.0)
        out = sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, zero, -1.0)
        ref = attn_ref.sparse_attention_delta(q.float(), k.float(), v.float(), scale, idx, GROUP, zero.float(), -1.0)
        errs[f"sparse K={n_sel}"] = rel_err(out, ref)
        out = sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, zero, -1.0, kernel="triton")
        errs[f"sparse triton K={n_sel}"] = rel_err(out, ref)
        # Same shapes, but q 2 bytes off 16-byte alignment: must not reuse the aligned binary.
        q_off = torch.empty(B, H, N, D + 8, device=DEV, dtype=BF16)[..., 1:D + 1].copy_(q)
        out = sparse_tr.sparse_attention_delta(q_off, k, v, scale, idx, GROUP, zero, -1.0)
        errs[f"sparse unaligned q K={n_sel}"] = rel_err(out, ref)
        base = torch.randn(B, H, N, D, device=DEV, dtype=BF16)
        ref = attn_ref.sparse_attention_delta(q.float(), k.float(), v.float(), scale, idx, GROUP, base.float(), 1.0)
        sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, base, 1.0, out=base)
        errs[f"sparse in place K={n_sel}"] = rel_err(base, ref)

    Bm, Nm, C, Fh, T = 2, 1000, 256, 1024, TOKEN_BLOCK
    x = torch.randn(Bm, Nm, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
    nb = -(-Nm // T)
    idx = random_indices(Bm * nb, Fh, kept(Fh, 0.7)).view(Bm, nb, -1)
    a0 = torch.randn(Bm, Nm, Fh, device=DEV, dtype=BF16)
    y0 = torch.randn(Bm, Nm, C, device=DEV)
    w2_t = w2.t().contiguous().t()
    # float32 and bf16 (the default, mlp_output_cache_dtype='model') y_cache; the reference rounds y once, as the
    # kernel does.
    for y_dtype, names in ((torch.float32, ("mlp a_cache", "mlp y delta", "mlp out = y_cache")),
                           (BF16, (None, "mlp bf16 y_cache delta", "mlp bf16 out = y_cache"))):
        a_ref, y_ref = a0.float(), y0.to(y_dtype, copy=True)
        mlp_ref.sparse_mlp_update(x.float(), w1.float(), b1.float(), None, None, w2.float(), "gelu_tanh", idx,
                                  a_ref, y_ref, T)
        for _ in range(2):  # the second call launches the cached binaries
            a = a0.transpose(1, 2).contiguous().transpose(1, 2)
            y = y0.to(y_dtype, copy=True)
            out = torch.full_like(y, float("nan"), dtype=BF16)
            mlp_tr.sparse_mlp_update(x, w1, b1, None, None, w2_t, "gelu_tanh", idx, a, y, T, out=out)
        if names[0] is not None:
            errs[names[0]] = rel_err(a, a_ref)
        errs[names[1]] = rel_err(y.float() - y0, y_ref.float() - y0)
        errs[names[2]] = rel_err(out, y)
    # Selection: the same index sets as the torch reference (continuous random scores: no ties).
    for shape, n_top, n_rand in (((1, 24, 24, 4608), 300, 30), ((2, 36, 12288), 3000, 600)):
        scores = torch.rand(shape, device=DEV)
        got = select_tr.select_topk_with_random(scores, n_top, n_rand, None, torch.Generator(DEV).manual_seed(1))
        want = select_ref.select_topk_with_random(scores, n_top, n_rand, None, torch.Generator(DEV).manual_seed(1))
        same = (got.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
        errs[f"selection sets {shape[-1]} (1 - rows equal)"] = 1.0 - same

    for name, err in errs.items():
        print(f"check {name:24s} rel err {err:.2e}")
    bad = {n: e for n, e in errs.items() if not e < 2e-2}
    assert not bad, f"kernels disagree with the reference: {bad}"
    return errs


# ------------------------------------------------------------------------------------------------- attention
def bench_attention(bench, N, sparsities, quick, H=24, D=128):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=BF16) for _ in range(3))
    scale = D ** -0.5
    dense_ms = ms(lambda: F.scaled_dot_product_attention(q, k, v), quick)
    num_groups = -(-N // GROUP)
    base = torch.randn(1, H, N, D, device=DEV, dtype=BF16)
    copy_ms = ms(lambda: base.clone(), quick)         # one read + one write of the output cache
    points = []
    for sp in sparsities:
        n_sel = kept(N, sp)
        idx = random_indices(H * num_groups, N, n_sel).view(1, H, num_groups, n_sel)
        out = base.clone()
        # Default dispatch: the warp-specialised Gluon kernel on Hopper; the Triton kernel timed beside it.
        ours = ms(lambda: sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, out, 1.0, out=out), quick)
        triton_ms = ms(lambda: sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, out, 1.0, out=out,
                                                                kernel="triton"), quick)
        ks, vs = k[:, :, :n_sel].contiguous(), v[:, :, :n_sel].contiguous()
        ideal = ms(lambda: F.scaled_dot_product_attention(q, ks, vs), quick)
        uses_ws = ws_kernel is not None and ws_kernel.supports(q, k, v, out, out, GROUP) is None
        record(bench, f"B1 H{H} N{N} d{D}", sp, dense_ms, ours, ideal, keys=n_sel,
               cache_traffic_share=copy_ms / ours, kernel="gluon_ws" if uses_ws else "triton",
               config=str(ws_kernel._CONFIG if uses_ws else sparse_tr._sparse_attn_tuned.best_config),
               triton_ms=triton_ms, triton_speedup=dense_ms / triton_ms,
               triton_config=str(sparse_tr._sparse_attn_tuned.best_config))
        points.append((sp, dense_ms / ours, dense_ms / ideal))
        del idx, out, ks, vs
    return points


def bench_dense_step(N, quick, H=24, D=128):
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=BF16) for _ in range(3))
    scale = D ** -0.5
    sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v), quick)
    _, lse, _ = dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, GROUP)
    plain = ms(lambda: dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, GROUP), quick)
    dense_tr.USE_VENDOR_LSE = False
    triton_plain = ms(lambda: dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, GROUP), quick)
    dense_tr.USE_VENDOR_LSE = True
    plain_cfg = str(dense_tr._dense_attn_tuned.best_config)
    # Default dispatch (the warp-specialised Gluon kernel on Hopper) and the Triton kernel beside it. The
    # column-mass step against SDPA as GPU time (CUDA-graph replays, 3 interleaved rounds, median of the per-round
    # ratios): eager timing adds the Python launch overhead of the two launches (~0.1 ms) at N4608.
    fused_fn = lambda: dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse, GROUP)  # noqa: E731
    sdpa_fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    fused_eager = ms(fused_fn, quick)
    rounds = [(graph_ms(sdpa_fn, quick), graph_ms(fused_fn, quick)) for _ in range(3)]
    sdpa_graph = sorted(r[0] for r in rounds)[1]
    fused = sorted(r[1] for r in rounds)[1]
    graph_ratio = sorted(r[1] / r[0] for r in rounds)[1]
    triton_fused = ms(lambda: dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse, GROUP, kernel="triton"),
                      quick)
    dense_ws = dense_tr._warp_specialized_kernel()
    uses_ws = dense_ws is not None and dense_ws.supports(q, k, v, GROUP) is None
    shape = f"B1 H{H} N{N} d{D}"
    record("dense_step_lse", shape, 0.0, sdpa, plain, implementation=str(dense_tr._vendor_choice),
           triton_ms=triton_plain, triton_config=plain_cfg)
    record("dense_step_colmass", shape, 0.0, sdpa_graph, fused, kernel="gluon_ws" if uses_ws else "triton",
           timing="CUDA-graph replay, median of 3 interleaved rounds", overhead_vs_sdpa=graph_ratio,
           rounds_ms=rounds, eager_ms=fused_eager, eager_sdpa_ms=sdpa, eager_overhead_vs_sdpa=fused_eager / sdpa,
           triton_ms=triton_fused, triton_overhead_vs_sdpa=triton_fused / sdpa,
           triton_config=str(dense_tr._dense_attn_tuned.best_config))
    # Selection at a dense step: top 7% of each group's column mass ([1, H, G, N]), 5% of it at random, as
    # the op dispatches it (the Triton selection kernel up to MAX_ROW keys) and with torch.topk beside it.
    cs = torch.rand(1, H, -(-N // GROUP), N, device=DEV)
    n_sel = kept(N, 0.93)
    n_rand = n_sel // 20
    gen = torch.Generator(device=DEV).manual_seed(0)
    select_ms = ms(lambda: select_tr.select_topk_with_random(cs, n_sel - n_rand, n_rand, None, gen), quick)
    torch_ms = ms(lambda: select_ref.select_topk_with_random(cs, n_sel - n_rand, n_rand, None, gen), quick)
    record("attention_selection", shape, 0.93, fused, select_ms, share_of_dense_step=select_ms / fused,
           kernel="triton" if N <= select_tr.MAX_TRITON_ROW else "torch", torch_ms=torch_ms,
           speedup_vs_torch=torch_ms / select_ms)


# ------------------------------------------------------------------------------------------------------- mlp
def bench_mlp(N, sparsities, quick, C=3072, Fh=12288):
    torch.manual_seed(3)
    x = torch.randn(1, N, C, device=DEV, dtype=BF16)
    w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
    w2, b2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5, torch.randn(C, device=DEV, dtype=BF16)
    dense_ms = ms(lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2), quick)
    # Cache layouts the kernels gather from efficiently (one-time weight transform; unit-major activations).
    w2_t = w2.t().contiguous().t()
    a_cache = F.gelu(F.linear(x, w1, b1), approximate="tanh")[0].t().contiguous().unsqueeze(0).transpose(1, 2)
    # The output cache in the model's dtype (the default, mlp_output_cache_dtype='model'), and in float32.
    y_cache32 = torch.randn(1, N, C, device=DEV)
    y_cache = y_cache32.to(BF16)
    assert N % TOKEN_BLOCK == 0
    nb = N // TOKEN_BLOCK
    hbar_cache = torch.randn(1, nb, Fh, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    out = torch.empty(1, N, C, device=DEV, dtype=BF16)

    def select(k, kernels="auto", generator=gen):
        # What a refresh step of the op runs: block means of x, the scoring GEMM on nb rows, then the selection
        # (top k - 5% of F by |hbar change|, 5% of F at random, references refreshed): one Triton launch.
        indices = torch.empty(1, nb, k, device=DEV, dtype=torch.int64)
        n_rand = min(k, -(-Fh // 20))
        mlp_op.refresh_indices(x, w1, b1, None, None, hbar_cache, indices, k - n_rand, n_rand, TOKEN_BLOCK,
                               generator, kernels)
        return indices

    # A refresh sets the references of the units it selects to their current block means, so repeating it on the
    # same x would leave those units' scores at exactly 0 (ties the real steps never see: each refresh meets a new
    # x). Every timed refresh therefore starts from the same references (a 1.7 / 6.5 MB copy, timed on its own and
    # subtracted).
    hbar0 = hbar_cache.clone()
    restore_ms = graph_ms(lambda: hbar_cache.copy_(hbar0), quick)

    for sp in sparsities:
        k = kept(Fh, sp, 256)
        idx = select(k)

        def step(generator=gen):
            # A refresh step end to end with the default bf16 y_cache; mm2's epilogue also writes the op's output.
            hbar_cache.copy_(hbar0)
            mlp_tr.sparse_mlp_update(x, w1, b1, None, None, w2_t, "gelu_tanh", select(k, generator=generator),
                                     a_cache, y_cache, TOKEN_BLOCK, out=out)

        def refresh(kernels="auto"):
            hbar_cache.copy_(hbar0)
            select(k, kernels)

        total = ms(step, quick) - restore_ms
        total_graph = graph_ms(lambda: step(None), quick) - restore_ms  # default generator: capturable
        select_ms = ms(refresh, quick) - restore_ms
        select_torch_ms = ms(lambda: refresh("torch"), quick) - restore_ms
        # The selection kernel alone (with its noise draw), on the scoring GEMM's output.
        hbar_new = mlp_ref.block_mean_preactivation(x, w1, b1, None, None, TOKEN_BLOCK, weight_dtype_out=True)
        n_rand = min(k, -(-Fh // 20))

        def select_kernel():
            hbar_cache.copy_(hbar0)
            select_tr.mlp_refresh_selection(hbar_new, hbar_cache, Fh, k - n_rand, n_rand, None)

        select_kernel_ms = graph_ms(select_kernel, quick) - restore_ms
        kernels_ms = ms(lambda: mlp_tr.sparse_mlp_update(x, w1, b1, None, None, w2_t, "gelu_tanh", idx, a_cache,
                                                         y_cache, TOKEN_BLOCK), quick)

        def step_fp32_cache(generator=gen):
            # The same step with option mlp_output_cache_dtype='float32'.
            hbar_cache.copy_(hbar0)
            mlp_tr.sparse_mlp_update(x, w1, b1, None, None, w2_t, "gelu_tanh", select(k, generator=generator),
                                     a_cache, y_cache32, TOKEN_BLOCK, out=out)
        fp32_cache_ms = ms(step_fp32_cache, quick) - restore_ms
        fp32_cache_graph_ms = graph_ms(lambda: step_fp32_cache(None), quick) - restore_ms
        # mm2 alone on mm1's packed deltas.
        delta = mlp_tr._launch(x, w1, b1, None, None, w2_t, "gelu_tanh", idx, a_cache, y_cache, TOKEN_BLOCK, None,
                               run_mm2=False)
        mm2_ms = ms(lambda: mlp_tr._launch(x, w1, b1, None, None, w2_t, "gelu_tanh", idx, a_cache, y_cache,
                                           TOKEN_BLOCK, None, run_mm1=False, delta=delta), quick)
        # Re-timed per sparsity on purpose: next to the sparse step it is compared with (the card's clock drifts).
        dense_graph_ms = graph_ms(lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2), quick)
        record("mlp", f"N{N} {C}-{Fh}-{C} gelu_tanh", sp, dense_ms, total, dense_ms * k / Fh, units=k,
               selection_ms=select_ms, selection_torch_ms=select_torch_ms, selection_kernel_ms=select_kernel_ms,
               kernels_ms=kernels_ms,
               selection_share=select_ms / total,
               mm2_ms=mm2_ms,
               speedup_kernels_only=dense_ms / kernels_ms,
               graph_dense_ms=dense_graph_ms, graph_chipmunk_ms=total_graph,
               graph_speedup=dense_graph_ms / total_graph,
               y_cache_dtype="bfloat16 (default)",
               fp32_cache_ms=fp32_cache_ms, fp32_cache_speedup=dense_ms / fp32_cache_ms,
               graph_fp32_cache_ms=fp32_cache_graph_ms, graph_fp32_cache_speedup=dense_graph_ms / fp32_cache_graph_ms,
               config=f"mm1 {mlp_tr._mm1_tuned.best_config} mm2 {mlp_tr._mm2_tuned.best_config}")
        print(f"{'':20s} {'  graph replay / fp32 y_cache':28s} {'':6s} {dense_graph_ms:9.3f} {total_graph:9.3f} "
              f"{dense_graph_ms / total_graph:7.2f}x | fp32 y_cache {fp32_cache_ms:.3f} ms "
              f"{dense_ms / fp32_cache_ms:.2f}x, graph {fp32_cache_graph_ms:.3f} ms "
              f"{dense_graph_ms / fp32_cache_graph_ms:.2f}x", flush=True)


# ------------------------------------------------------------------------------------------- config sweep
def sweep(out_dir, sections=("dense", "sparse", "mlp")):
    """Times every candidate configuration of every kernel explicitly (for tuning the autotuner lists)."""
    import time
    t0 = time.time()
    rows = []

    def rec(kind, shape, variant, ms_, base_ms=None, **extra):
        r = dict(kind=kind, shape=shape, variant=variant, ms=ms_, base_ms=base_ms,
                 ratio=None if (base_ms is None or ms_ is None) else ms_ / base_ms, **extra)
        rows.append(r)
        rt = "" if r["ratio"] is None else f"{r['ratio']:7.3f}"
        print(f"{kind:14s} {shape:16s} {variant:44s} {ms_ if ms_ is None else round(ms_, 4)!s:>9s} {rt} "
              f"[{time.time() - t0:5.0f}s]", flush=True)

    def safe(fn):
        try:
            return ms(fn, True)
        except Exception as e:  # noqa: BLE001 (out of resources and the like: record and go on)
            print("   failed:", type(e).__name__, str(e)[:120])
            return None

    def dump():
        with open(os.path.join(out_dir, "sweep.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1, default=str)

    H, D = 24, 128
    scale = D ** -0.5
    # Dense step: LSE only and LSE + column mass, per config, column-mass formulation and anchoring.
    dcfgs = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 16, 3)]
    for N in (4608, 16896) if "dense" in sections else ():
        q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=BF16) for _ in range(3))
        sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v), True)
        rec("dense", f"N{N}", "sdpa", sdpa, sdpa)
        vendor = dense_tr.vendor_attention_with_lse(q, k, v, scale)
        if vendor is not None:
            rec("dense", f"N{N}", f"lse via {dense_tr._vendor_choice}",
                ms(lambda: dense_tr.vendor_attention_with_lse(q, k, v, scale), True), sdpa)
        o_ref, lse = F.scaled_dot_product_attention(q, k, v), vendor[1] if vendor is not None else None
        if lse is None:
            lse = dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, GROUP, config=dict(
                BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))[1]
        cs_ref = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse, GROUP, config=dict(
            BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, CS_MODE=0, ANCHOR=0))[2]
        for bm, bn, w, st in dcfgs:
            base = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            tag = f"BM{bm} BN{bn} w{w} s{st}"
            rec("dense", f"N{N}", f"lse {tag}",
                safe(lambda: dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, GROUP, config=base)), sdpa)
            for mode in (1, 2):
                for anchor in (0, 1):
                    cfg = dict(base, CS_MODE=mode, ANCHOR=anchor)
                    try:
                        o_, _, cs_ = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse, GROUP, config=cfg)
                        print(f"   err o {rel_err(o_, o_ref):.1e} cs {rel_err(cs_, cs_ref):.1e}")
                    except Exception as e:  # noqa: BLE001
                        print("   check failed:", type(e).__name__, str(e)[:120])
                    rec("dense", f"N{N}", f"cs{mode} anchor{anchor} {tag}", safe(
                        lambda: dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse, GROUP, config=cfg)), sdpa)
        del q, k, v, lse
    print(f"dense sweep done {time.time() - t0:.0f}s", flush=True)
    dump()

    # Sparse attention: every candidate config at three shapes.
    def scfg(bm, bm1, bm2, bn, w, st):
        return dict(BLOCK_M=bm, BLOCK_M1=bm1, BLOCK_M2=bm2, BLOCK_N=bn, num_warps=w, num_stages=st)
    scfgs = [scfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_M1"], c.kwargs["BLOCK_M2"], c.kwargs["BLOCK_N"], c.num_warps,
                  c.num_stages) for c in sparse_tr._CONFIGS]
    scfgs += [scfg(64, 64, 64, 64, 8, 3), scfg(128, 64, 0, 64, 16, 3), scfg(128, 64, 0, 32, 8, 4),
              scfg(64, 0, 0, 128, 4, 2)]
    for N, sp in ((118800, 0.93), (16896, 0.835), (4608, 0.835)) if "sparse" in sections else ():
        q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=BF16) for _ in range(3))
        n_sel = kept(N, sp)
        ks, vs = k[:, :, :n_sel].contiguous(), v[:, :, :n_sel].contiguous()
        ideal = ms(lambda: F.scaled_dot_product_attention(q, ks, vs), True)
        rec("sparse", f"N{N}", f"ideal sdpa over {n_sel} keys", ideal, ideal)
        num_groups = -(-N // GROUP)
        idx = random_indices(H * num_groups, N, n_sel).view(1, H, num_groups, n_sel)
        out = torch.randn(1, H, N, D, device=DEV, dtype=BF16)
        zero = torch.zeros_like(out)
        ref_o = sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, zero, 1.0, config=scfgs[0])
        for cfg in scfgs:
            tag = (f"BM{cfg['BLOCK_M']}+{cfg['BLOCK_M1']}+{cfg['BLOCK_M2']} BN{cfg['BLOCK_N']} "
                   f"w{cfg['num_warps']} s{cfg['num_stages']}")
            rec("sparse", f"N{N}", tag, safe(lambda: sparse_tr.sparse_attention_delta(
                q, k, v, scale, idx, GROUP, out, 1.0, out=out, config=cfg)), ideal)
            try:
                got = sparse_tr.sparse_attention_delta(q, k, v, scale, idx, GROUP, zero, 1.0, config=cfg)
                print(f"   err vs first config {rel_err(got, ref_o):.1e}")
            except Exception as e:  # noqa: BLE001
                print("   check failed:", type(e).__name__, str(e)[:120])
        del q, k, v, ks, vs, idx, out, zero, ref_o
    print(f"sparse sweep done {time.time() - t0:.0f}s", flush=True)
    dump()
    if "mlp" not in sections:
        return

    # MLP: selection pieces, then mm1 and mm2 separately per config, sorted vs unsorted unit lists.
    C, Fh = 3072, 12288
    for N in (4608, 16896):
        x = torch.randn(1, N, C, device=DEV, dtype=BF16)
        w1, b1 = torch.randn(Fh, C, device=DEV, dtype=BF16) * C ** -0.5, torch.randn(Fh, device=DEV, dtype=BF16)
        w2 = torch.randn(C, Fh, device=DEV, dtype=BF16) * Fh ** -0.5
        dense_ms = ms(lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2), True)
        rec("mlp", f"N{N}", "dense", dense_ms, dense_ms)
        w2_t = w2.t().contiguous().t()
        a_cache = torch.randn(1, Fh, N, device=DEV, dtype=BF16).transpose(1, 2)
        y_cache = torch.randn(1, N, C, device=DEV)
        nb = N // TOKEN_BLOCK
        hbar_cache = torch.randn(1, nb, Fh, device=DEV)
        rec("mlp", f"N{N}", "sel: x.float().mean", ms(lambda: x.float().view(1, nb, TOKEN_BLOCK, C).mean(dim=2), True), dense_ms)
        rec("mlp", f"N{N}", "sel: mean(dtype=f32)", ms(lambda: x.view(1, nb, TOKEN_BLOCK, C).mean(dim=2, dtype=torch.float32), True), dense_ms)
        means = x.view(1, nb, TOKEN_BLOCK, C).mean(dim=2, dtype=torch.float32).to(BF16)
        rec("mlp", f"N{N}", "sel: scoring gemm", ms(lambda: F.linear(means, w1, b1), True), dense_ms)
        hbar = F.linear(means, w1, b1).float()
        for sp in (0.7, 0.9):
            kk = kept(Fh, sp, 256)
            sc = (hbar - hbar_cache).abs()
            rec("mlp", f"N{N}", f"sel: topk k={kk}", ms(lambda: sc.topk(kk, dim=-1, sorted=False), True), dense_ms)
            ti = sc.topk(kk, dim=-1, sorted=False).indices
            rec("mlp", f"N{N}", f"sel: sort k={kk}", ms(lambda: ti.sort(dim=-1), True), dense_ms)
            idx_sorted = ti.sort(dim=-1).values
            delta = torch.empty(1, nb, TOKEN_BLOCK, kk, device=DEV, dtype=BF16)
            args = (x, w1, b1, None, None, w2_t, "gelu_tanh")
            for c in mlp_tr._MM1_CONFIGS + [mlp_tr._c1(128, 64, 8, 3, 8), mlp_tr._c1(128, 64, 8, 3, 1)]:
                cfg = {"mm1": dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages),
                       "mm2": mlp_tr._MM2_DEFAULT}
                for name, idx in (("sorted", idx_sorted), ("unsorted", ti)):
                    if name == "unsorted" and c is not mlp_tr._MM1_CONFIGS[0]:
                        continue
                    rec("mlp", f"N{N} sp{sp}", f"mm1 {name} {cfg['mm1']}", safe(lambda: mlp_tr._launch(
                        *args, idx, a_cache, y_cache, TOKEN_BLOCK, cfg, run_mm2=False, delta=delta)),
                        dense_ms * kk / Fh / 2)
            for c in mlp_tr._MM2_CONFIGS + [mlp_tr._c2(128, 64, 8, 3, 8), mlp_tr._c2(128, 128, 8, 3), mlp_tr._c2(128, 32, 8, 5)]:
                cfg = {"mm1": mlp_tr._MM1_DEFAULT, "mm2": dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)}
                for name, idx in (("sorted", idx_sorted), ("unsorted", ti)):
                    if name == "unsorted" and c is not mlp_tr._MM2_CONFIGS[0]:
                        continue
                    rec("mlp", f"N{N} sp{sp}", f"mm2 {name} {cfg['mm2']}", safe(lambda: mlp_tr._launch(
                        *args, idx, a_cache, y_cache, TOKEN_BLOCK, cfg, run_mm1=False, delta=delta)),
                        dense_ms * kk / Fh / 2)
        del x, w1, w2, w2_t, a_cache, y_cache
    print(f"mlp sweep done {time.time() - t0:.0f}s", flush=True)
    dump()


# ------------------------------------------------------------------------------------------------------ main
def plot(points, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    sp = [100 * p[0] for p in points]
    plt.figure(figsize=(5, 3.5))
    plt.plot(sp, [p[1] for p in points], "o-", label="chipmunk sparse kernel")
    plt.plot(sp, [p[2] for p in points], "s--", label="ideal (SDPA over kept keys)")
    plt.plot(sp, [1 / (1 - p[0]) for p in points], ":", label="FLOP bound")
    plt.xlabel("sparsity (%)")
    plt.ylabel("speedup vs dense SDPA")
    plt.title("HunyuanVideo attention B1 H24 N118800 d128 bf16")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and shorter timing (< 2 minutes)")
    parser.add_argument("--sweep", nargs="?", const="dense,sparse,mlp", default=None, metavar="SECTIONS",
                        help="time every candidate kernel configuration instead (comma list of dense, sparse, mlp)")
    parser.add_argument("--only", default="attention,dense,mlp", metavar="SECTIONS",
                        help="run only these sections (comma list of attention, dense, mlp); the JSON name gets them")
    args = parser.parse_args()
    only = set(args.only.split(","))
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    quick = args.quick
    gpu = torch.cuda.get_device_name()
    print(f"device {gpu}, torch {torch.__version__}, triton {triton.__version__}, quick={quick}")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    if args.sweep:  # per-config timings only (each section prints its own error checks)
        sweep(out_dir, tuple(args.sweep.split(",")))
        return
    errs = check_correctness()
    print(f"{'bench':20s} {'shape':28s} {'spars':>6s} {'dense ms':>9s} {'ours ms':>9s} {'speedup':>8s} "
          f"{'ideal ms':>9s} {'frac':>6s}")
    points = None
    if "attention" in only:
        points = bench_attention("attention_hunyuan", 118800, (0.93,) if quick else (0.93, 0.85, 0.70), quick)
        for n in (4608, 16896):
            bench_attention("attention_flux", n, (0.835,), quick)
    for n in ((4608, 16896) if quick else (4608, 16896, 118800)) if "dense" in only else ():
        bench_dense_step(n, quick)
    for n in (4608, 16896) if "mlp" in only else ():
        bench_mlp(n, (0.7, 0.9), quick)

    tag = "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()
    if only != {"attention", "dense", "mlp"}:
        tag += "_only_" + "_".join(sorted(only))
    path = os.path.join(out_dir, f"kernels_{tag}.json")
    with open(path, "w") as f:
        json.dump(dict(device=gpu, torch=torch.__version__, triton=triton.__version__, quick=quick,
                       correctness_rel_err=errs, results=RESULTS), f, indent=1, default=str)
    print(f"wrote {path}")
    if points is not None:
        plot(points, os.path.join(out_dir, f"kernels_{tag}_hunyuan_speedup.png"))


if __name__ == "__main__":
    main()

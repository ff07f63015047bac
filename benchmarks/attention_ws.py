"""GPU check and timing of the warp-specialised (Gluon) attention kernels against the Triton ones.

Sparse delta kernel: bf16/fp16, head dims 64/128, query groups of 64/128/192, batch 2, grouped-query heads,
ragged N, index-list tails, key-padding bias, (B, N, H, D)-strided q/k/v, in-place update; each against the
float32 torch reference, with the output poisoned (NaN) beforehand. Dense column-mass kernel: O, LSE and column
mass against the reference, including groups whose anchor is off by +100 / -75 nats (the redo path).
Timing (do_bench medians, same process): SDPA, the ideal (SDPA over only the kept keys), the Triton kernel and
the Gluon kernel at HunyuanVideo and FLUX shapes, plus a few Gluon configurations; the dense step with column
mass (Gluon, Triton) against SDPA. Prints a table; writes attention_ws_<gpu>.json to $OUT or benchmarks/results.
``--sparse-only``: the sparse kernel alone, and its token_perm (reordering inside the kernel) against gathers
around it.
Usage: python benchmarks/attention_ws.py [--quick] [--sparse-only] [--dense-only] [--diagnose]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import graph_ms, kept, ms, random_indices, rel_err  # noqa: E402  (benchmarks/kernels.py helpers)
from results_io import write_results  # noqa: E402

from chipmunk_compile.kernels import attention_dense_gluon as dense_ws  # noqa: E402
from chipmunk_compile.kernels import attention_dense_triton as dense_tr  # noqa: E402
from chipmunk_compile.kernels import attention_reference as attn_ref  # noqa: E402
from chipmunk_compile.kernels import attention_sparse_gluon as ws  # noqa: E402
from chipmunk_compile.kernels import attention_sparse_triton as sparse_tr  # noqa: E402

DEV = "cuda"


def check(results, overrides=None):
    torch.manual_seed(0)
    cases = [  # B, H, Hk, N, D, group, n_sel, dtype, kb, layout
        (2, 4, 4, 3000, 128, 192, 210, torch.bfloat16, False, "bnhd"),
        (2, 4, 4, 3000, 128, 192, 77, torch.bfloat16, True, "bhnd"),
        (1, 4, 2, 1000, 128, 192, 256, torch.float16, False, "bhnd"),
        (2, 2, 2, 777, 64, 192, 130, torch.bfloat16, True, "bnhd"),
        (1, 2, 2, 700, 128, 128, 64, torch.bfloat16, False, "bhnd"),
        (1, 2, 1, 500, 64, 64, 100, torch.float16, False, "bhnd"),
    ]
    errs = {}
    for B, H, Hk, N, D, G, n_sel, dt, use_kb, layout in cases:
        if layout == "bnhd":
            q = torch.randn(B, N, H, D, device=DEV, dtype=dt).transpose(1, 2)
            k, v = (torch.randn(B, N, Hk, D, device=DEV, dtype=dt).transpose(1, 2) for _ in range(2))
        else:
            q = torch.randn(B, H, N, D, device=DEV, dtype=dt)
            k, v = (torch.randn(B, Hk, N, D, device=DEV, dtype=dt) for _ in range(2))
        scale = D ** -0.5
        ng = -(-N // G)
        idx = random_indices(B * H * ng, N, n_sel).view(B, H, ng, n_sel)
        kb = None
        if use_kb:  # padded keys at the end get -inf (never selected by the method, but must stay masked here)
            kb = torch.zeros(B, N, device=DEV)
            kb[:, N - 50:] = float("-inf")
            kb[:, :40] = 1.5
            idx = torch.where(idx >= N - 50, idx % 40, idx)
        base = torch.randn(B, H, N, D, device=DEV, dtype=dt)
        ref = attn_ref.sparse_attention_delta(q.float(), k.float(), v.float(), scale, idx, G, base.float(), -1.0,
                                              key_bias=kb)
        name = f"B{B} H{H}/{Hk} N{N} d{D} g{G} K{n_sel} {str(dt)[6:]} kb={use_kb} {layout} {overrides or ''}"
        why = ws.supports(q, k, v, base, base, G)
        assert why is None, (name, why)
        # token_perm (token_grid reordering inside the kernel), into a token-major output as the op allocates it
        perm = torch.randperm(N, device=DEV)
        ref_perm = attn_ref.sparse_attention_delta(q.float(), k.float(), v.float(), scale, idx, G, base.float(),
                                                   -1.0, key_bias=kb, token_perm=perm)
        out = torch.full((B, N, H, D), float("nan"), device=DEV, dtype=dt).transpose(1, 2)
        sparse_tr.sparse_attention_delta(q, k, v, scale, idx, G, base, -1.0, out=out, key_bias=kb, kernel="gluon",
                                         config=overrides, token_perm=perm)
        torch.cuda.synchronize()
        errs[name + " token_perm"] = rel_err(out, ref_perm)
        out = torch.full_like(base, float("nan"))
        sparse_tr.sparse_attention_delta(q, k, v, scale, idx, G, base, -1.0, out=out, key_bias=kb, kernel="gluon",
                                         config=overrides)
        torch.cuda.synchronize()
        errs[name] = rel_err(out, ref)
        inplace = base.clone()
        sparse_tr.sparse_attention_delta(q, k, v, scale, idx, G, inplace, -1.0, out=inplace, key_bias=kb,
                                         kernel="gluon", config=overrides)
        errs[name + " in place"] = rel_err(inplace, ref)
        print(f"check {name:60s} rel err {errs[name]:.2e} / in place {errs[name + ' in place']:.2e} / "
              f"token_perm {errs[name + ' token_perm']:.2e}", flush=True)
    bad = {n: e for n, e in errs.items() if not e < 2e-2}
    results.setdefault("correctness_rel_err", {}).update(errs)
    assert not bad, f"Gluon kernel disagrees with the reference: {bad}"


def check_dense(results):
    torch.manual_seed(3)
    cases = [  # B, H, N, D, group, dtype, kb, layout, anchor offsets {group: nats}
        (2, 4, 3000, 128, 192, torch.bfloat16, False, "bnhd", {}),
        (2, 4, 3000, 128, 192, torch.bfloat16, True, "bhnd", {}),
        (1, 3, 777, 64, 128, torch.float16, False, "bhnd", {}),
        (1, 2, 1000, 128, 192, torch.bfloat16, False, "bhnd", {1: 100.0, 3: -75.0}),
    ]
    errs = {}
    for B, H, N, D, G, dt, use_kb, layout, offsets in cases:
        if layout == "bnhd":
            q, k, v = (torch.randn(B, N, H, D, device=DEV, dtype=dt).transpose(1, 2) for _ in range(3))
        else:
            q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=dt) for _ in range(3))
        scale = D ** -0.5
        kb = None
        if use_kb:
            kb = torch.zeros(B, N, device=DEV)
            kb[:, N - 50:] = float("-inf")
            kb[:, :40] = 1.5
        _, lse_true = attn_ref.dense_attention_with_lse(q.float(), k.float(), v.float(), scale, kb)
        lse_prev = lse_true + 0.3 * torch.randn_like(lse_true)
        for g, off in offsets.items():
            lse_prev[:, :, g * G:(g + 1) * G] += off
        ro, rlse, rcs = attn_ref.dense_attention_lse_colmass(q.float(), k.float(), v.float(), scale, lse_prev, G,
                                                             key_bias=kb)
        assert dense_ws.supports(q, k, v, G) is None
        n_items = B * H * -(-N // G)
        # The last partial wave shared out over the SMs (default), no tail handling, and every group in the tail
        # (pieces added afterwards; with the offset anchors that includes tail groups recomputed online); K/V by
        # TMA (default) and by cp.async; persistent CTAs (default) and one CTA per work unit; 4 ring slots.
        for cfg in (dict(), dict(SPLIT=0), dict(SPLIT=n_items), dict(PERSISTENT=0), dict(TMA=0),
                    dict(TMA=0, PERSISTENT=0, SPLIT=n_items), dict(NUM_STAGES=4)):
            o, lse, cs = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse_prev, G, key_bias=kb,
                                                              kernel="gluon", ws_config=cfg)
            torch.cuda.synchronize()
            name = (f"dense B{B} H{H} N{N} d{D} g{G} {str(dt)[6:]} kb={use_kb} {layout} anchor offsets {offsets} "
                    + (",".join(f"{a}={b}" for a, b in cfg.items()) or "default"))
            # Column mass in float64: the +/-75-nat anchors make its float32 norm overflow.
            cs_err = ((cs.double() - rcs.double()).norm() / rcs.double().norm()).item()
            errs[name + " o"], errs[name + " lse"] = rel_err(o, ro), rel_err(lse, rlse)
            errs[name + " colmass"] = cs_err
            print(f"check {name:96s} o {errs[name + ' o']:.2e} lse {errs[name + ' lse']:.2e} "
                  f"colmass {errs[name + ' colmass']:.2e}", flush=True)
    bad = {n: e for n, e in errs.items() if not e < 2e-2}
    results.setdefault("correctness_rel_err", {}).update(errs)
    assert not bad, f"Gluon dense kernel disagrees with the reference: {bad}"


def bench_dense(results, N, quick, H=24, D=128, configs=()):
    """SDPA, the Triton kernel and each Gluon configuration timed in interleaved rounds (medians over rounds of
    do_bench medians; ratios per round, then their median): the card's clock drifts over a run by more than the
    differences measured here. GPU time from CUDA-graph replays (eager do_bench would add the Python launch
    overhead wherever it exceeds the kernel time: ~0.1 ms per call here); the default's eager time beside."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    _, lse, _ = dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, 192)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
           "triton": lambda: dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse, 192, kernel="triton")}
    for cfg in configs or ({},):
        name = ",".join(f"{a}={b}" for a, b in cfg.items()) or "default"
        fns[name] = (lambda cfg=cfg: dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse, 192, kernel="gluon",
                                                                          ws_config=cfg))
    # The default twice: their difference is the noise floor of this comparison.
    fns["default again"] = fns.get("default", fns[name])
    times = {name: [] for name in fns}
    for _ in range(5):
        for name, fn in list(fns.items()):
            try:
                times[name].append(graph_ms(fn, True))
            except Exception as exc:  # noqa: BLE001 (a config that cannot launch is reported, not fatal)
                print(f"  config {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                del fns[name], times[name]
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    # Ratios to SDPA per round (measured back to back), then the median over rounds.
    ratio = {name: sorted(a / b for a, b in zip(t, times["sdpa"]))[len(t) // 2] for name, t in times.items()}
    sdpa, tri = med.pop("sdpa"), med.pop("triton")
    ratio.pop("sdpa")
    row = dict(bench="dense_colmass", shape=f"B1 H{H} N{N} d{D}", sdpa_ms=sdpa, triton_ms=tri, gluon=med,
               rounds={n: t for n, t in times.items()})
    best = min(med.values())
    row.update(gluon_ms=best, gluon_overhead_vs_sdpa=best / sdpa, triton_overhead_vs_sdpa=ratio.pop("triton"),
               overhead_vs_sdpa_per_round_median=ratio, default_overhead_vs_sdpa=ratio.get("default"))
    if "default" in fns:
        row["default_eager_ms"] = ms(fns["default"], quick)
    results["rows"].append(row)
    cfgs = " ".join(f"{n}:{t:.3f}({ratio[n]:.3f}x)" for n, t in med.items())
    print(f"dense+colmass {row['shape']:22s} sdpa {sdpa:8.3f} triton {tri:8.3f} ({tri / sdpa:4.2f}x sdpa) "
          f"gluon best {best:8.3f} ({best / sdpa:4.3f}x sdpa) | {cfgs} | default eager "
          f"{row.get('default_eager_ms', float('nan')):.3f}", flush=True)


def diagnose_dense(results, N, configs, H=24, D=128):
    """The dense step's two launches timed apart (the Gluon kernel; the pass that adds up the tail groups' pieces
    and redoes flagged groups), with how many groups were flagged (online recomputation in the second pass)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    _, lse, _ = dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, 192)
    G = -(-N // 192)
    for cfg in configs:
        o = torch.empty_like(q)
        lse_out = torch.empty_like(lse)
        cs = torch.zeros(1, H, G, N, device=DEV)
        state = {}
        redo = torch.zeros(H * G, 4, dtype=torch.int32, device=DEV)

        def first():
            state["out"] = dense_ws.dense_colmass_ws(q, k, v, scale, lse, 192, o, lse_out, cs, redo, config=cfg)

        t_kernel = ms(first, True)
        first_split, part_o, part_l, part_rows, tail_ctas, key_tiles = state["out"]
        n_flag = int(redo[:first_split, :3].amax(1).sum())
        n_tail = redo.shape[0] - first_split
        t_finish = ms(lambda: dense_tr.finish_gluon_dense_step(q, k, v, scale, lse, 192, o, lse_out, redo, first_split,
                                                               part_o, part_l, part_rows, tail_ctas, key_tiles), True)
        name = ",".join(f"{a}={b}" for a, b in cfg.items()) or "default"
        print(f"diagnose N{N} {name:32s} kernel {t_kernel:.3f} ms finish {t_finish:.3f} ms flagged {n_flag} "
              f"tail items {n_tail}", flush=True)
        results.setdefault("diagnose", []).append(dict(N=N, config=name, kernel_ms=t_kernel, finish_ms=t_finish,
                                                       flagged=n_flag, tail_items=n_tail))


def bench(results, N, sparsities, quick, H=24, D=128, configs=()):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v), quick)
    ng = -(-N // 192)
    base = torch.randn(1, H, N, D, device=DEV, dtype=torch.bfloat16)
    for sp in sparsities:
        n_sel = kept(N, sp)
        idx = random_indices(H * ng, N, n_sel).view(1, H, ng, n_sel)
        out = base.clone()
        ks, vs = k[:, :, :n_sel].contiguous(), v[:, :, :n_sel].contiguous()
        ideal = ms(lambda: F.scaled_dot_product_attention(q, ks, vs), quick)
        tri = ms(lambda: sparse_tr.sparse_attention_delta(q, k, v, scale, idx, 192, out, 1.0, out=out,
                                                          kernel="triton"), quick)
        row = dict(shape=f"B1 H{H} N{N} d{D}", sparsity=sp, keys=n_sel, sdpa_ms=sdpa, ideal_ms=ideal,
                   triton_ms=tri, gluon={})
        for cfg in configs or ({},):
            name = ",".join(f"{a}={b}" for a, b in cfg.items()) or "default"
            try:
                t = ms(lambda: sparse_tr.sparse_attention_delta(q, k, v, scale, idx, 192, out, 1.0, out=out,
                                                                kernel="gluon", config=cfg or None), quick)
            except Exception as exc:  # noqa: BLE001 (a config that cannot launch is reported, not fatal)
                print(f"  config {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            row["gluon"][name] = t
        best = min(row["gluon"].values())
        row.update(gluon_ms=best, speedup_gluon=sdpa / best, speedup_triton=sdpa / tri, fraction_of_ideal=ideal / best)
        row["bench"] = "sparse_attention"
        results["rows"].append(row)
        cfgs = " ".join(f"{n}:{t:.3f}" for n, t in row["gluon"].items())
        print(f"{row['shape']:22s} {sp:5.3f} sdpa {sdpa:8.3f} ideal {ideal:7.3f} triton {tri:7.3f} "
              f"({sdpa / tri:5.2f}x) gluon {best:7.3f} ({sdpa / best:5.2f}x, {ideal / best:4.2f} of ideal) | {cfgs}",
              flush=True)
        del idx, out, ks, vs


def bench_token_perm(results, N, sp, quick, H=24, D=128):
    """The sparse step's token_grid reordering: gathers around the kernel (what the op did up to session 10:
    q through its token-major view, the token-major output back) against token_perm inside the kernel."""
    from chipmunk_compile.kernels.attention_op import empty_token_major, select_tokens
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, N, H, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    ng, n_sel = -(-N // 192), kept(N, sp)
    idx = random_indices(H * ng, N, n_sel).view(1, H, ng, n_sel)
    base = torch.randn(1, H, N, D, device=DEV, dtype=torch.bfloat16)
    perm = torch.randperm(N, device=DEV)
    unperm = torch.argsort(perm)
    scale = D ** -0.5

    def around():
        o = sparse_tr.sparse_attention_delta(select_tokens(q, 2, perm), k, v, scale, idx, 192, base, 1.0,
                                             out=empty_token_major(q, D))
        return select_tokens(o, 2, unperm)

    def inside():
        return sparse_tr.sparse_attention_delta(q, k, v, scale, idx, 192, base, 1.0, out=empty_token_major(q, D),
                                                token_perm=perm)

    err = rel_err(inside(), around())
    row = dict(bench="sparse_attention_token_perm", shape=f"B1 H{H} N{N} d{D}", sparsity=sp, gathers_ms=ms(around,
               quick), in_kernel_ms=ms(inside, quick), no_perm_ms=ms(lambda: sparse_tr.sparse_attention_delta(
                   q, k, v, scale, idx, 192, base, 1.0, out=empty_token_major(q, D)), quick), rel_err=err)
    results["rows"].append(row)
    print(f"token_perm {row['shape']:22s} {sp:5.3f} gathers around {row['gathers_ms']:7.3f}  in kernel "
          f"{row['in_kernel_ms']:7.3f}  no reordering {row['no_perm_ms']:7.3f}  rel diff {err:.1e}", flush=True)
    assert err < 2e-2, err


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dense-only", action="store_true", help="only the dense column-mass kernel")
    parser.add_argument("--diagnose", action="store_true", help="the dense step's launches timed apart, then exit")
    parser.add_argument("--sparse-only", action="store_true",
                        help="only the sparse kernel: checks, timings, token_perm")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    print(f"device {gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    results = dict(device=gpu, torch=torch.__version__, triton=triton.__version__, rows=[])
    if args.diagnose:
        for n in (4608, 16896):
            diagnose_dense(results, n, [{}, dict(PERSISTENT=0), dict(SPLIT=0)])
        write_results("attention_ws_diagnose", results)
        return
    if args.sparse_only:
        check(results)
        for n in (4352, 4608, 16896):
            bench(results, n, (0.835,), args.quick)
            bench_token_perm(results, n, 0.835, args.quick)
        bench(results, 118800, (0.93, 0.7), args.quick)
        write_results("attention_ws_sparse", results)
        return
    if not args.dense_only:
        check(results)
    check_dense(results)
    for n in (4608, 16896, 118800):
        bench_dense(results, n, args.quick, configs=[{}, dict(SPLIT=0), dict(PERSISTENT=0)])
    if not args.dense_only:
        bench(results, 118800, (0.93,), args.quick, configs=[{}, dict(CONSUMER_REGS=152)])
        for n in (4608, 16896):
            bench(results, n, (0.835,), args.quick)
    write_results("attention_ws", results)


if __name__ == "__main__":
    main()

"""Fidelity vs FLOPs (and speed on a GPU) of chipmunk configs on the reference DiT, against step caching.

    python benchmarks/fidelity.py                       # GPU: 32 samples x 50 steps, ~10 configs, bf16
    python benchmarks/fidelity.py --quick --device cpu  # CI smoke: 2 samples x 10 steps, 3 configs

For every config: PSNR / SSIM of the final images vs the same-seed dense output (plain torch.compile, mean over
the samples), attention+MLP FLOPs saved over the whole schedule (chipmunk_compile.flops, every site counted)
and on a GPU the wall-clock speedup (dense generation time / method generation time, same batch, the second
generation after a warm-up one, torch.cuda.synchronize around it).

Noise floor: dense eager, dense compiled and mode="dense" chipmunk, compared pairwise.
Baseline: fixed-schedule step caching: on skipped steps the sampler reuses the last computed transformer output
(the velocity) instead of calling the model, as a reference step cache does. Its FLOPs saved = skipped / steps.

Writes fidelity_<device>.json (`results`: records with config, default, method, psnr, ssim, flops_saved,
speedup on GPU) and fidelity_<device>.png (Pareto: PSNR vs FLOPs saved, and vs speedup on GPU) into --out-dir
($OUT, else benchmarks/results). Prints a verdict line per target:
  - default options: PSNR >= 32 dB, SSIM >= 0.95, >= 50% attention+MLP FLOPs saved;
  - at equal FLOPs saved, chipmunk >= 3 dB above step caching (step-cache PSNR interpolated at the config's
    FLOPs saved; configs outside the step-cache range are not compared).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional

import torch

import chipmunk_compile
from chipmunk_compile.demo import one_call_kwargs
from chipmunk_compile.flops import flops_saved, records_for_options, shape_records
from chipmunk_compile.image_metrics import mean_finite, psnr, ssim, to_unit_range
from chipmunk_compile.reference_model.data import IMAGE_SIZE
from chipmunk_compile.reference_model.model import PACK

PSNR_CAP = 100.0  # identical images (PSNR inf) count as 100 dB in means

# The reference step cache's skipped steps of a 50-step schedule.
REFERENCE_SKIPS_50 = (7, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 31, 33, 34, 35, 37, 38, 39, 41,
                      42, 43)

REFERENCE_GRID = (1, IMAGE_SIZE // PACK, IMAGE_SIZE // PACK)  # the reference model's image tokens (1, 32, 32)

# (name, options); options other than num_steps. ``dense_every`` sets both attention and MLP.
CHIPMUNK_CONFIGS = [
    ("default", {}),
    ("attn0.7", {"attn_sparsity": 0.7}),
    ("attn0.9", {"attn_sparsity": 0.9}),
    ("attn0.95", {"attn_sparsity": 0.95}),
    ("mlp0.5", {"mlp_sparsity": 0.5}),
    ("mlp0.9", {"mlp_sparsity": 0.9}),
    ("dense_every5", {"attn_dense_every": 5, "mlp_dense_every": 5}),
    ("fdl0", {"first_dense_layers": 0}),
    ("fdl0_dense_every5", {"first_dense_layers": 0, "attn_dense_every": 5, "mlp_dense_every": 5}),
    ("fdl0_attn0.9_mlp0.9", {"first_dense_layers": 0, "attn_sparsity": 0.9, "mlp_sparsity": 0.9}),
    ("fdl0_attn0.95_mlp0.9", {"first_dense_layers": 0, "attn_sparsity": 0.95, "mlp_sparsity": 0.9}),
    # Token reordering: groups and token blocks of 8x8 tiles of the reference model's 32x32 token grid.
    ("tiles", {"token_grid": REFERENCE_GRID}),
    ("fdl0_tiles", {"first_dense_layers": 0, "token_grid": REFERENCE_GRID}),
    ("fdl0_dense_every5_tiles", {"first_dense_layers": 0, "attn_dense_every": 5, "mlp_dense_every": 5,
                                 "token_grid": REFERENCE_GRID}),
    # The MLP output cache in float32 instead of the model's dtype (the default). (The session-7 run that chose
    # the default, fidelity_cuda_session7_y_cache_dtype.json, ran while float32 was the default: its
    # "*_bf16_y_cache" rows are the model-dtype cache.)
    ("fp32_y_cache", {"mlp_output_cache_dtype": "float32"}),
    ("mlp0.9_fp32_y_cache", {"mlp_sparsity": 0.9, "mlp_output_cache_dtype": "float32"}),
    ("fdl0_fp32_y_cache", {"first_dense_layers": 0, "mlp_output_cache_dtype": "float32"}),
]
QUICK_CONFIGS = ("default", "fdl0", "fdl0_attn0.9_mlp0.9")


QUICK_STEP_CACHE = ("reference", "skip_2of3", "skip_4of5")


def step_cache_schedules(n: int, names=None) -> list[tuple[str, list[int]]]:
    """Skip schedules for an n-step generation, from light to heavy (only ``names`` if given). Step 0 is never
    skipped."""

    def pattern(lo, hi, period, keep_phase=0):
        lo, hi = max(1, round(lo * n)), min(n - 1, round(hi * n))
        return [i for i in range(lo, hi) if (i - lo) % period != keep_phase]

    if n == 50:
        ref = list(REFERENCE_SKIPS_50)
    else:  # the reference schedule at n steps: skip step i where its position on the 50-step grid is skipped
        ref = [i for i in range(1, n) if round(i * 50 / n) in REFERENCE_SKIPS_50]
    scheds = [
        ("reference", ref),  # first: it wins over an identical pattern below
        ("skip_1of3_middle", [i for i in pattern(0.2, 0.8, 3) if (i - round(0.2 * n)) % 3 == 1]),
        ("skip_1of2_middle", pattern(0.2, 0.8, 2)),
        ("skip_1of2_wide", pattern(0.1, 0.9, 2)),
        ("skip_2of3", pattern(0.08, 0.96, 3)),
        ("skip_3of4", pattern(0.08, 0.96, 4)),
        ("skip_4of5", pattern(0.06, 0.98, 5)),
    ]
    out, seen = [], set()
    for name, skips in scheds:
        skips = sorted(set(s for s in skips if 0 < s < n))
        if skips and tuple(skips) not in seen and (names is None or name in names):
            seen.add(tuple(skips))
            out.append((name, skips))
    return sorted(out, key=lambda item: len(item[1]))


class StepCache:
    """transformer_call for reference_model.sample: skipped steps return the last computed output."""

    def __init__(self, model: Callable, skip_steps):
        self.model, self.skip = model, set(skip_steps)
        self.calls, self.last = 0, None

    def reset(self):
        self.calls, self.last = 0, None

    def __call__(self, **kwargs):
        step = self.calls
        self.calls += 1
        if step in self.skip and self.last is not None:
            return (self.last,)
        out = self.model(**kwargs)
        self.last = out[0]
        return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Harness:
    def __init__(self, args, transformer, conditioner):
        self.args, self.tr, self.cond = args, transformer, conditioner
        self.device = args.device
        n = args.samples
        self.class_ids = [i % conditioner.num_classes for i in range(n)]
        self.chunks = [(k, self.class_ids[s:s + args.batch]) for k, s in enumerate(range(0, n, args.batch))]

    def generate(self, model, steps=None, call=None, chipmunk_model=False, reset_call=None):
        """All samples (chunked; chunk k uses seed base+k). Returns (images [n,3,64,64] in [-1,1] float32 cpu,
        seconds)."""
        from chipmunk_compile.reference_model import sample

        steps = steps or self.args.steps
        outs = []
        _sync(self.device)
        t0 = time.perf_counter()
        for k, cls in self.chunks:
            if chipmunk_model:
                chipmunk_compile.reset(model)
            if reset_call is not None:
                reset_call()
            outs.append(sample(model, self.cond, cls, seed=self.args.seed + k, num_steps=steps, device=self.device,
                               transformer_call=call))
        _sync(self.device)
        dt = time.perf_counter() - t0
        return torch.cat([o.float().cpu() for o in outs]), dt

    def run(self, model, timed: bool, **kw):
        """Warm-up + timed generation on timed runs (GPU), else one generation. Returns (images, seconds|None,
        first_seconds)."""
        images, first = self.generate(model, **kw)
        if not timed:
            return images, None, first
        images, dt = self.generate(model, **kw)
        return images, dt, first


def compare(a, b) -> dict:
    a01, b01 = to_unit_range(a), to_unit_range(b)
    p, s = psnr(a01, b01), ssim(a01, b01)
    return {"psnr": mean_finite(p.tolist(), PSNR_CAP), "psnr_min": min(min(p.tolist()), PSNR_CAP),
            "ssim": s.mean().item(), "ssim_min": s.min().item()}


def interpolate(points, x) -> Optional[float]:
    """Piecewise-linear y(x) through (x, y) points sorted by x; None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 - 1e-9 <= x <= x1 + 1e-9:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def pareto_plot(path, results, noise_floor, gpu: bool, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if gpu else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    for ax_i, xkey in enumerate(["flops_saved", "speedup"][:panels]):
        ax = axes[0][ax_i]
        for method, style in (("step_cache", dict(color="tab:gray", marker="s", linestyle="--")),
                              ("chipmunk", dict(color="tab:green", marker="o", linestyle="none"))):
            pts = sorted((r[xkey], min(r["psnr"], PSNR_CAP), r["name"], r["default"]) for r in results
                         if r["method"] == method and r.get(xkey) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method.replace("_", " "), **style)
            for x, y, name, default in pts:
                ax.annotate(name, (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points",
                            fontweight="bold" if default else "normal")
            for x, y, name, default in pts:
                if default:
                    ax.plot([x], [y], marker="*", markersize=14, color="tab:red", linestyle="none",
                            label="chipmunk default")
        floor = [n for n in noise_floor if n["a"] == "dense_eager" and n["b"] == "dense_compiled"]
        if floor and floor[0]["psnr"] < PSNR_CAP:
            ax.axhline(floor[0]["psnr"], color="tab:blue", linestyle=":", linewidth=1,
                       label="noise floor (eager vs compiled)")
        ax.axhline(32.0, color="tab:red", linestyle=":", linewidth=1, label="target 32 dB")
        ax.set_xlabel("attention+MLP FLOPs saved (fraction)" if xkey == "flops_saved"
                      else "wall-clock speedup vs dense compiled")
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    import textwrap
    fig.suptitle("\n".join(textwrap.wrap(title, 70 * panels)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=None, help="default 32 (quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="default 50 (quick: 10)")
    p.add_argument("--batch", type=int, default=None, help="samples per generation call (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="2 samples, 10 steps, 3 configs (CI / CPU smoke)")
    p.add_argument("--compiler", choices=("inductor", "aot_eager", "eager"), default=None,
                   help="dense torch.compile backend and chipmunk inner_backend (default inductor; eager with "
                        "--quick on CPU, where Inductor's compile alone takes ~40 s)")
    p.add_argument("--configs", default=None, help="comma-separated chipmunk config names (default: all, quick: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="default $OUT, else benchmarks/results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--time", action="store_true", help="also time (warm-up + timed generation) on the CPU")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="skip the remaining chipmunk configs once this many seconds have passed (default 450)")
    args = p.parse_args(argv)
    cpu = torch.device(args.device).type == "cpu"
    args.samples = args.samples or (2 if args.quick else 32)
    args.steps = args.steps or (10 if args.quick else 50)
    args.batch = args.batch or args.samples
    if args.samples % args.batch:
        p.error("--samples must be a multiple of --batch (every chunk must have the same shape)")
    args.compiler = args.compiler or ("eager" if (args.quick and cpu) else "inductor")
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if cpu else torch.bfloat16)
    names = [n for n, _ in CHIPMUNK_CONFIGS]
    if args.configs:
        args.config_names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = set(args.config_names) - set(names)
        if unknown:
            p.error(f"unknown configs {sorted(unknown)}; known: {names}")
    else:
        args.config_names = list(QUICK_CONFIGS) if args.quick else names
    args.out_dir = args.out_dir or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    return args


def main(argv=None) -> dict:
    from chipmunk_compile.reference_model import load_reference_model

    args = _parse(argv)
    t_start = time.perf_counter()
    device, dtype = args.device, args.dtype
    gpu = torch.device(device).type == "cuda"
    timed = gpu or args.time
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    os.makedirs(args.out_dir, exist_ok=True)
    tag = "cuda" if gpu else "cpu"

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    tr, cond, _ = load_reference_model(device, dtype)
    h = Harness(args, tr, cond)
    steps = args.steps
    log(f"{args.samples} samples x {steps} steps, batch {args.batch}, {device} {str(dtype)[6:]}, "
        f"compiler {args.compiler}")

    # Shapes of every site at the generation's batch: traced once, re-derived per config.
    shaped = shape_records(tr, **one_call_kwargs(cond, h.chunks[0][1], device, dtype))
    torch._dynamo.reset()

    # --- dense references and the noise floor ---
    eager, _, _ = h.run(tr, timed=False)
    log("dense eager done")
    dense_model = torch.compile(tr, backend=args.compiler)
    dense, dense_time, dense_first = h.run(dense_model, timed=timed)
    log(f"dense compiled done (first {dense_first:.1f}s" + (f", timed {dense_time:.3f}s)" if timed else ")"))

    # step caching reuses the dense compiled model (same graph, same kernels)
    results = []
    for name, skips in step_cache_schedules(steps, QUICK_STEP_CACHE if args.quick else None):
        sc = StepCache(dense_model, skips)
        imgs, dt, _ = h.run(dense_model, timed=timed, call=sc, reset_call=sc.reset)
        rec = {"method": "step_cache", "name": name, "default": False,
               "config": {"skip_steps": skips, "num_steps": steps}, **compare(imgs, dense),
               "flops_saved": len(skips) / steps, "attention_flops_saved": len(skips) / steps,
               "mlp_flops_saved": len(skips) / steps}
        if timed:
            rec.update(time_s=dt, speedup=dense_time / dt)
        results.append(rec)
        log(f"step_cache {name}: {len(skips)}/{steps} skipped, PSNR {rec['psnr']:.2f}")
    torch._dynamo.reset()

    chip_dense_model = torch.compile(tr, backend="chipmunk", options={"num_steps": steps, "mode": "dense",
                                                                      "inner_backend": args.compiler})
    chip_dense, chip_dense_time, _ = h.run(chip_dense_model, timed=timed, chipmunk_model=True)
    torch._dynamo.reset()
    log("chipmunk mode=dense done")
    noise_floor = []
    for (na, a), (nb, b) in (((f"dense_eager", eager), ("dense_compiled", dense)),
                             (("chipmunk_mode_dense", chip_dense), ("dense_compiled", dense)),
                             (("chipmunk_mode_dense", chip_dense), ("dense_eager", eager))):
        noise_floor.append({"a": na, "b": nb, **compare(a, b)})
    if timed:
        noise_floor.append({"a": "chipmunk_mode_dense", "b": "dense_compiled", "time_ratio":
                            dense_time / chip_dense_time, "note": "speedup of mode='dense' (rewrite overhead)"})

    # --- chipmunk configs ---
    configs = dict(CHIPMUNK_CONFIGS)
    skipped = []
    for name in args.config_names:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(name)
            log(f"chipmunk {name}: skipped (over --budget-s {args.budget_s:.0f})")
            continue
        opts = {**configs[name], "num_steps": steps}
        if args.compiler != "inductor":
            opts["inner_backend"] = args.compiler
        fl = flops_saved(records_for_options(shaped, opts), opts, steps)
        model = torch.compile(tr, backend="chipmunk", options=opts)
        imgs, dt, first = h.run(model, timed=timed, chipmunk_model=True)
        rec = {"method": "chipmunk", "name": name, "default": name == "default", "config": opts,
               **compare(imgs, dense), "flops_saved": fl["total_saved_fraction"],
               "attention_flops_saved": fl["attention_saved_fraction"],
               "mlp_flops_saved": fl["mlp_saved_fraction"], "sites_rewritten": fl["sites_rewritten"],
               "first_generation_s": first}
        if timed:
            rec.update(time_s=dt, speedup=dense_time / dt)
        results.append(rec)
        del model
        torch._dynamo.reset()
        log(f"chipmunk {name}: PSNR {rec['psnr']:.2f} SSIM {rec['ssim']:.4f} FLOPs saved {rec['flops_saved']:.1%}"
            + (f" speedup {rec['speedup']:.2f}x" if timed else ""))

    # --- comparisons at equal FLOPs saved ---
    sc_points = [(r["flops_saved"], r["psnr"]) for r in results if r["method"] == "step_cache"]
    for r in results:
        if r["method"] == "chipmunk":
            sc_psnr = interpolate(sc_points, r["flops_saved"])
            r["step_cache_psnr_at_equal_flops"] = sc_psnr
            r["db_above_step_cache"] = None if sc_psnr is None else r["psnr"] - sc_psnr

    verdicts = []
    default = next((r for r in results if r["method"] == "chipmunk" and r["default"]), None)

    def verdict(name, ok, detail):
        verdicts.append({"target": name, "pass": ok, "detail": detail})

    if default is not None:
        verdict("default PSNR >= 32 dB", default["psnr"] >= 32.0, f"{default['psnr']:.2f} dB")
        verdict("default SSIM >= 0.95", default["ssim"] >= 0.95, f"{default['ssim']:.4f}")
        verdict("default saves >= 50% attention+MLP FLOPs", default["flops_saved"] >= 0.5,
                f"{default['flops_saved']:.1%} (attention {default['attention_flops_saved']:.1%}, "
                f"MLP {default['mlp_flops_saved']:.1%})")
        d = default["db_above_step_cache"]
        verdict("default >= 3 dB above step caching at equal FLOPs saved", None if d is None else d >= 3.0,
                "outside the step-cache FLOPs range" if d is None else
                f"{default['psnr']:.2f} vs {default['step_cache_psnr_at_equal_flops']:.2f} dB ({d:+.2f} dB)")
    compared = [r for r in results if r["method"] == "chipmunk" and r.get("db_above_step_cache") is not None]
    if compared:
        good = [r["name"] for r in compared if r["db_above_step_cache"] >= 3.0]
        verdict("all configs >= 3 dB above step caching at equal FLOPs saved", len(good) == len(compared),
                f"{len(good)}/{len(compared)} configs: " + ", ".join(
                    f"{r['name']} {r['db_above_step_cache']:+.1f}" for r in compared))

    out = {
        "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
        "triton": triton_version, "dtype": str(dtype).replace("torch.", ""), "compiler": args.compiler,
        "samples": args.samples, "steps": steps, "batch": args.batch, "seed": args.seed, "quick": args.quick,
        "psnr_cap_db": PSNR_CAP, "reference": "dense_compiled (same seeds)",
        "dense_time_s": dense_time, "noise_floor": noise_floor, "results": results, "verdicts": verdicts,
        "skipped_configs": skipped, "total_wall_s": None,
    }

    # --- report ---
    lines = [f"reference DiT, {args.samples} samples x {steps} steps, {out['device']}, {out['dtype']}, "
             f"compiler {args.compiler}; PSNR/SSIM vs dense compiled, same seeds"]
    lines.append("noise floor: " + "; ".join(f"{n['a']} vs {n['b']}: {n['psnr']:.2f} dB / {n['ssim']:.4f}"
                                             for n in noise_floor if "psnr" in n))
    hdr = f"{'method':<11}{'config':<22}{'PSNR':>7}{'min':>7}{'SSIM':>8}{'FLOPs saved':>12}{'attn':>7}{'mlp':>7}"
    hdr += f"{'speedup':>9}" if timed else ""
    hdr += f"{'vs step cache':>15}"
    lines.append(hdr)
    for r in sorted(results, key=lambda r: (r["method"], r["flops_saved"])):
        row = (f"{r['method']:<11}{r['name'] + (' *' if r['default'] else ''):<22}{r['psnr']:>7.2f}"
               f"{r['psnr_min']:>7.2f}{r['ssim']:>8.4f}{r['flops_saved']:>12.1%}{r['attention_flops_saved']:>7.1%}"
               f"{r['mlp_flops_saved']:>7.1%}")
        if timed:
            row += f"{r['speedup']:>8.2f}x"
        d = r.get("db_above_step_cache")
        row += f"{'' if d is None else f'{d:+.2f} dB':>15}"
        lines.append(row)
    if skipped:
        lines.append(f"skipped (time budget): {', '.join(skipped)}")
    for v in verdicts:
        status = "n/a " if v["pass"] is None else ("PASS" if v["pass"] else "FAIL")
        lines.append(f"VERDICT {status} {v['target']}: {v['detail']}")
    json_path = os.path.join(args.out_dir, f"fidelity_{tag}{'_quick' if args.quick else ''}.json")
    png_path = json_path[:-5] + ".png"
    if not args.no_plot:
        try:
            pareto_plot(png_path, results, noise_floor, timed, lines[0])
            out["plot"] = png_path
        except ImportError as e:
            lines.append(f"(no plot: {e})")
    out["total_wall_s"] = time.perf_counter() - t_start
    with open(json_path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    lines.append(f"wrote {json_path}" + (f" and {png_path}" if "plot" in out else "")
                 + f" in {out['total_wall_s']:.0f} s")
    print("\n".join(lines))
    out["json"] = json_path
    return out


if __name__ == "__main__":
    main()

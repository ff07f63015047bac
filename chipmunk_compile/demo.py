"""Dense vs chipmunk on the shipped reference DiT: pictures, fidelity, FLOPs, wall time.

    python -m chipmunk_compile.demo                       # 4 samples, 50 steps, CUDA if present else CPU
    python -m chipmunk_compile.demo --quick               # 2 samples, 8 steps (CI smoke)
    python -m chipmunk_compile.demo --options '{"attn_sparsity": 0.9}' --out demo.png

Generates the same seeds with plain ``torch.compile`` (Inductor, dense) and with ``backend="chipmunk"`` in a
diffusers FlowMatchEulerDiscreteScheduler loop (progress bar on stderr), writes a PNG with one row per sample
(dense | chipmunk | |difference| amplified) and prints per-sample PSNR / SSIM vs dense, the attention and MLP
FLOPs saved over the schedule, the sites rewritten and the wall time of each (compile + first generation, and
a second, steady generation).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

import chipmunk_compile
from chipmunk_compile.flops import collect_site_records, flops_saved
from chipmunk_compile.image_metrics import psnr, ssim, to_unit_range

__all__ = ["main", "one_call_kwargs", "spread_classes", "timed_generation", "save_comparison", "default_device"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def spread_classes(n: int, num_classes: int) -> list[int]:
    """n class ids spread over the classes (all different while n <= num_classes)."""
    return [(i * num_classes // n) % num_classes if n <= num_classes else i % num_classes for i in range(n)]


@torch.no_grad()
def one_call_kwargs(conditioner, class_ids, device, dtype) -> dict:
    """Keyword arguments of one transformer call of ``reference_model.sample`` (no CFG), for explain/FLOPs."""
    from chipmunk_compile.reference_model import IMAGE_SIZE, image_ids, initial_noise, pack, text_ids

    cls = torch.as_tensor(class_ids, dtype=torch.long, device=device)
    ehs, pooled = conditioner(cls)
    return dict(hidden_states=pack(initial_noise(len(class_ids), 0)).to(device, dtype),
                encoder_hidden_states=ehs.to(dtype), pooled_projections=pooled.to(dtype),
                timestep=torch.full((len(class_ids),), 0.5, device=device, dtype=dtype),
                img_ids=image_ids(IMAGE_SIZE // 2, device=device), txt_ids=text_ids(ehs.shape[1], device=device),
                return_dict=False)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_generation(model, conditioner, class_ids, seed, steps, device, progress=False, transformer_call=None,
                     chipmunk_model: bool = False):
    """One generation; returns (images [B,3,64,64] in [-1,1], seconds). Resets chipmunk state first."""
    from chipmunk_compile.reference_model import sample

    if chipmunk_model:
        chipmunk_compile.reset(model)
    _sync(device)
    start = time.perf_counter()
    images = sample(model, conditioner, class_ids, seed=seed, num_steps=steps, device=device, progress=progress,
                    transformer_call=transformer_call)
    _sync(device)
    return images, time.perf_counter() - start


def save_comparison(dense: torch.Tensor, chip: torch.Tensor, path: str, amplify: float = 5.0,
                    labels: Optional[list[str]] = None, dense_name: str = "dense (Inductor)") -> None:
    """PNG with one row per sample: dense | chipmunk | |dense - chipmunk| * amplify (in [0,1] image units)."""
    d, c = to_unit_range(dense), to_unit_range(chip)
    diff = ((d - c).abs() * amplify).clamp(0, 1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plain grid without titles
        from chipmunk_compile.reference_model import save_grid
        rows = torch.stack([d, c, diff], dim=1).flatten(0, 1).float() * 2 - 1
        save_grid(rows, path, nrow=3, scale=3)
        return
    n = d.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.3 * n + 0.3), squeeze=False)
    titles = (dense_name, "chipmunk", f"|difference| x{amplify:g}")
    for i in range(n):
        for j, img in enumerate((d[i], c[i], diff[i])):
            ax = axes[i][j]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
        if labels:
            axes[i][0].set_ylabel(labels[i], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m chipmunk_compile.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--samples", type=int, default=None, help="number of samples, different classes (default 4)")
    p.add_argument("--steps", type=int, default=None, help="scheduler steps (default 50)")
    p.add_argument("--out", default="chipmunk_demo.png", help="side-by-side PNG path")
    p.add_argument("--options", default="{}", help="chipmunk options as a JSON object (num_steps is set to --steps)")
    p.add_argument("--quick", action="store_true", help="2 samples, 8 steps (CI smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="compiler of the dense baseline and the chipmunk inner backend (aot_eager: fast compile, "
                        "for tests)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.samples = args.samples or (2 if args.quick else 4)
    args.steps = args.steps or (8 if args.quick else 50)
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    from chipmunk_compile.reference_model import CLASS_NAMES, NUM_CLASSES, load_reference_model

    args = _parse(argv)
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    user_options = json.loads(args.options)
    if not isinstance(user_options, dict):
        raise SystemExit("--options must be a JSON object")
    options = {**user_options, "num_steps": args.steps}
    if args.compiler != "inductor":
        options.setdefault("inner_backend", args.compiler)
    progress = not args.no_progress

    transformer, conditioner, _ = load_reference_model(device, dtype)
    class_ids = spread_classes(args.samples, NUM_CLASSES)
    names = [CLASS_NAMES[c] for c in class_ids]

    # FLOPs over the whole schedule, from the sites the backend finds at this batch size
    records = collect_site_records(transformer, options, **one_call_kwargs(conditioner, class_ids, device, dtype))
    fl = flops_saved(records, options, args.steps)
    torch._dynamo.reset()

    timings = {}
    print(f"dense: torch.compile(backend={args.compiler!r}), {args.samples} samples x {args.steps} steps on "
          f"{device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    dense_model = torch.compile(transformer, backend=args.compiler)
    _, first = timed_generation(dense_model, conditioner, class_ids, args.seed, args.steps, device, progress)
    dense, steady = timed_generation(dense_model, conditioner, class_ids, args.seed, args.steps, device, progress)
    timings["dense"] = (first, steady)
    torch._dynamo.reset()

    print(f"chipmunk: torch.compile(backend='chipmunk', options={options})", file=sys.stderr)
    chip_model = torch.compile(transformer, backend="chipmunk", options=options)
    _, first = timed_generation(chip_model, conditioner, class_ids, args.seed, args.steps, device, progress,
                                chipmunk_model=True)
    chip, steady = timed_generation(chip_model, conditioner, class_ids, args.seed, args.steps, device, progress,
                                    chipmunk_model=True)
    timings["chipmunk"] = (first, steady)
    torch._dynamo.reset()

    d01, c01 = to_unit_range(dense), to_unit_range(chip)
    p, s = psnr(d01, c01), ssim(d01, c01)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    save_comparison(dense, chip, args.out,
                    labels=[f"{n}\n{pv:.1f} dB" for n, pv in zip(names, p.tolist())],
                    dense_name=f"dense ({args.compiler})")

    # --- table ---
    lines = [f"{'sample':>6}  {'class':<20}{'PSNR dB':>9}{'SSIM':>8}"]
    for i, (n, pv, sv) in enumerate(zip(names, p.tolist(), s.tolist())):
        lines.append(f"{i:>6}  {n:<20}{pv:>9.2f}{sv:>8.4f}")
    finite = p[torch.isfinite(p)]
    mean_p = finite.mean().item() if len(finite) == len(p) else float("inf")
    lines.append(f"{'mean':>6}  {'':<20}{mean_p:>9.2f}{s.mean().item():>8.4f}")
    lines.append(f"FLOPs saved over the {args.steps}-step schedule: attention {fl['attention_saved_fraction']:.1%}, "
                 f"MLP {fl['mlp_saved_fraction']:.1%}, attention+MLP {fl['total_saved_fraction']:.1%}")
    n_attn = sum(r.kind == "attention" for r in records)
    n_mlp = sum(r.kind == "mlp" for r in records)
    lines.append(f"sites rewritten: {fl['sites_rewritten']['attention']}/{n_attn} attention, "
                 f"{fl['sites_rewritten']['mlp']}/{n_mlp} mlp")
    lines.append(f"{'wall time':<22}{'compile+first':>14}{'steady':>10}")
    lines.append(f"{'dense (' + args.compiler + ')':<22}{timings['dense'][0]:>12.2f} s{timings['dense'][1]:>8.2f} s")
    lines.append(f"{'chipmunk':<22}{timings['chipmunk'][0]:>12.2f} s{timings['chipmunk'][1]:>8.2f} s"
                 f"   steady speedup {timings['dense'][1] / timings['chipmunk'][1]:.2f}x")
    lines.append(f"wrote {args.out}")
    print("\n".join(lines))

    result = {
        "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "compiler": args.compiler,
        "steps": args.steps, "classes": names, "options": options,
        "psnr": p.tolist(), "ssim": s.tolist(), "flops": fl,
        "time_dense_s": timings["dense"], "time_chipmunk_s": timings["chipmunk"],
        "png": os.path.abspath(args.out),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()

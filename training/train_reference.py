#!/usr/bin/env python
"""Train the reference DiT (chipmunk_compile.reference_model) with rectified-flow matching.

    x_t = (1 - s) x0 + s noise,  target v = noise - x0,  s = shift(sigmoid(N(0, 1)))   (SD3 logit-normal)

which is exactly what ``FlowMatchEulerDiscreteScheduler(shift=config.shift)`` integrates
(x_{s'} = x_s + (s' - s) v).  Data: procedural scenes rendered on the training device (infinite, never repeats).
AdamW, bf16 autocast on CUDA, EMA weights (saved), 10% label dropout (null label, enables CFG), cosine LR decay
over the wall-clock budget.  ``--minutes`` is the TOTAL wall budget: training stops early enough to leave time
for evaluation and saving.  Weights are also checkpointed periodically, so a killed run still leaves weights.

Output directory::

    OUT/weights/...        what load_reference_model reads (copy to chipmunk_compile/reference_model/weights/)
    OUT/samples_cfg1.png   4 samples per class (rows = classes), 50 steps, no guidance
    OUT/samples_cfg2.png   same with classifier-free guidance 2
    OUT/metrics.json       loss, throughput, classifier accuracy of generated samples (per class, mean)
    OUT/train_log.txt      the printed progress

GPU:   python training/train_reference.py --device cuda --minutes 9 --out $OUT/reference
Smoke: python training/train_reference.py --smoke --out /tmp/ref_smoke          (CPU, about a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _import_reference_model() -> None:
    """Import chipmunk_compile.reference_model even where the parent package cannot initialise (e.g. the
    backend's ``chipmunk_compile.passes`` is only importable once the repository is pip-installed): the
    reference model needs nothing from the backend, so fall back to a bare namespace for the parent."""
    try:
        import chipmunk_compile.reference_model  # noqa: F401
    except ImportError as e:
        import types

        print(f"note: `import chipmunk_compile` failed ({e}); loading reference_model standalone", flush=True)
        for name in [m for m in sys.modules if m == "chipmunk_compile" or m.startswith("chipmunk_compile.")]:
            del sys.modules[name]
        pkg = types.ModuleType("chipmunk_compile")
        pkg.__path__ = [os.path.join(ROOT, "chipmunk_compile")]
        sys.modules["chipmunk_compile"] = pkg
        import chipmunk_compile.reference_model  # noqa: F401


_import_reference_model()

from chipmunk_compile.reference_model.data import (  # noqa: E402
    CLASS_NAMES,
    NUM_CLASSES,
    classifier_accuracy,
    make_balanced_batch,
    make_batch,
    random_class_ids,
)
from chipmunk_compile.reference_model.model import (  # noqa: E402
    DEFAULT_CONFIG,
    ClassConditioner,
    build_transformer,
    image_ids,
    load_reference_model,
    pack,
    save_reference_model,
    text_ids,
)
from chipmunk_compile.reference_model.sampling import sample, save_grid  # noqa: E402


class Tee:
    def __init__(self, path):
        self.f = open(path, "a")

    def __call__(self, *args):
        msg = " ".join(str(a) for a in args)
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=12.0, help="total wall-clock budget incl. eval and saving")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer for training")
    p.add_argument("--eval-per-class", type=int, default=32, help="generated samples per class for accuracy")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-guidance", type=str, default="1.0,2.0")
    p.add_argument("--eval-reserve-s", type=float, default=None, help="seconds kept for eval+save (auto)")
    p.add_argument("--checkpoint-every-min", type=float, default=2.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (about a minute) to test the pipeline")
    a = p.parse_args(argv)
    if a.smoke:
        a.device = "cpu" if a.device.startswith("cuda") and not torch.cuda.is_available() else a.device
        a.batch = min(a.batch, 4)
        a.max_steps = a.max_steps or 6
        a.minutes = min(a.minutes, 2.0)
        a.eval_per_class = 1
        a.eval_steps = 3
        a.warmup = 2
        a.log_every = 1
        a.checkpoint_every_min = 0.05
    return a


def lr_at(step: int, frac: float, a) -> float:
    warm = min(1.0, (step + 1) / max(1, a.warmup))
    cos = a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return a.lr * warm * cos


def sample_sigmas(n: int, shift: float, device) -> torch.Tensor:
    u = torch.sigmoid(torch.randn(n, device=device))  # SD3 logit-normal(0, 1)
    return shift * u / (1 + (shift - 1) * u)


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    log = Tee(os.path.join(a.out, "train_log.txt"))
    t_start = time.perf_counter()
    budget_s = a.minutes * 60.0
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # torch 2.11 on H100: the cuDNN SDPA backward fails at these shapes (mha_graph.execute not good,
        # surfacing later as CUBLAS_STATUS_EXECUTION_FAILED); flash / memory-efficient attention train fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(a.seed)
    cfg = DEFAULT_CONFIG
    guidances = [float(g) for g in a.eval_guidance.split(",") if g]
    if a.eval_reserve_s is None:
        a.eval_reserve_s = 20.0 if a.smoke else 75.0
    log(f"args {vars(a)}")
    log(f"torch {torch.__version__} python {platform.python_version()} device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))

    transformer = build_transformer(cfg).to(device)
    conditioner = ClassConditioner(cfg).to(device)
    n_params = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in conditioner.parameters())
    log(f"config {cfg.to_json()}  parameters {n_params / 1e6:.2f} M")
    params = list(transformer.parameters()) + list(conditioner.parameters())
    ema_params = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay,
                            fused=cuda)
    fwd = torch.compile(transformer) if a.compile else transformer

    img_ids = image_ids(cfg.grid, device=device)
    txt_ids = text_ids(cfg.text_tokens, device=device)

    def train_step(step: int, batch: int) -> torch.Tensor:
        cls = random_class_ids(batch, a.seed, start_index=step * batch, device=device)
        x0 = make_batch(cls, a.seed, start_index=step * batch)
        drop = torch.rand(batch, device=device) < a.label_dropout
        labels = torch.where(drop, torch.full_like(cls, conditioner.null_label), cls)
        s = sample_sigmas(batch, cfg.shift, device)
        noise = torch.randn_like(x0)
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        target = pack(noise - x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            ehs, pooled = conditioner(labels)
            pred = fwd(hidden_states=pack(xt), encoder_hidden_states=ehs, pooled_projections=pooled,
                       timestep=s, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        return loss.detach()

    # find a batch size that fits (halve on OOM)
    batch = a.batch
    while True:
        try:
            train_step(0, batch)
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch //= 2
            log(f"OOM; batch -> {batch}")
            if batch < 8:
                raise
    # restart the optimiser state cleanly after the probe step
    for p, e in zip(params, ema_params):
        p.data.copy_(e)
    opt.state.clear()

    def save(tag: str, extra: dict) -> None:
        # swap EMA weights in, save, swap back
        backup = [p.detach().clone() for p in params]
        for p, e in zip(params, ema_params):
            p.data.copy_(e)
        save_reference_model(transformer, conditioner, os.path.join(a.out, "weights"), cfg, extra=extra)
        for p, b in zip(params, backup):
            p.data.copy_(b)
        log(f"[{tag}] saved EMA weights to {os.path.join(a.out, 'weights')}")

    train_end = t_start + budget_s - a.eval_reserve_s
    t_train0 = time.perf_counter()
    last_ckpt = t_train0
    step, losses, loss_ema, seen = 0, [], None, 0
    recent: list[float] = []  # per-step losses of the last 200 steps -> final_loss
    log(f"training with batch {batch} for up to {(train_end - t_train0) / 60:.2f} min")
    while True:
        now = time.perf_counter()
        if now >= train_end or (a.max_steps is not None and step >= a.max_steps):
            break
        frac = (now - t_train0) / max(1e-6, train_end - t_train0)
        lr = lr_at(step, frac, a)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = train_step(step, batch)
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1 - decay)
        losses.append(loss)
        seen += batch
        step += 1
        if step % a.log_every == 0:
            vals = torch.stack(losses).float().cpu()
            losses = []
            recent = (recent + vals.tolist())[-200:]
            for v in vals.tolist():
                loss_ema = v if loss_ema is None else 0.98 * loss_ema + 0.02 * v
            el = time.perf_counter() - t_train0
            log(f"step {step:6d}  loss {vals.mean():.4f} (smoothed {loss_ema:.4f})  lr {lr:.2e}  "
                f"{seen / el:8.1f} img/s  {el / 60:5.2f} min")
            if not math.isfinite(float(vals.mean())):
                raise RuntimeError("loss is not finite")
        if time.perf_counter() - last_ckpt > a.checkpoint_every_min * 60:
            save(f"step {step}", {"partial": True, "steps": step})
            last_ckpt = time.perf_counter()
    if losses:
        recent = (recent + torch.stack(losses).float().cpu().tolist())[-200:]
    final_loss = sum(recent) / max(1, len(recent))
    train_s = time.perf_counter() - t_train0
    log(f"trained {step} steps, {seen} images in {train_s / 60:.2f} min; "
        f"final loss (mean of last {len(recent)} steps) {final_loss:.4f}")

    # ---------------- final: EMA weights -> save, reload through the public loader, evaluate ----------------
    for p, e in zip(params, ema_params):
        p.data.copy_(e)
    extra = {"partial": False, "steps": step, "batch": batch, "images_seen": seen, "final_loss": final_loss,
             "train_minutes": train_s / 60, "lr": a.lr, "ema": a.ema, "label_dropout": a.label_dropout,
             "seed": a.seed, "torch": torch.__version__}
    save("final", extra)
    del transformer, conditioner, opt, fwd
    if cuda:
        torch.cuda.empty_cache()
    eval_dtype = torch.bfloat16 if cuda else torch.float32
    tr, cond, _ = load_reference_model(device, eval_dtype, weights_dir=os.path.join(a.out, "weights"))

    real_imgs, real_cls = make_balanced_batch(max(a.eval_per_class, 16), seed=987654321, device=device)
    real_acc = classifier_accuracy(real_imgs, real_cls)
    log(f"classifier accuracy on real procedural images: {real_acc['mean']:.4f}")
    metrics = {
        "final_loss": final_loss,
        "final_loss_note": f"mean flow-matching MSE (packed tokens) over the last {len(recent)} training steps",
        "steps": step,
        "batch": batch,
        "images_seen": seen,
        "train_minutes": train_s / 60,
        "images_per_s": seen / max(train_s, 1e-9),
        "parameters": n_params,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "eval_dtype": str(eval_dtype),
        "eval_steps": a.eval_steps,
        "eval_per_class": a.eval_per_class,
        "classifier_accuracy_real": real_acc,
        "generated": {},
    }
    cls = torch.arange(NUM_CLASSES, device=device).repeat_interleave(a.eval_per_class)
    for gs in guidances:
        t0 = time.perf_counter()
        imgs = []
        chunk = 512 if cuda else 16
        for i, c in enumerate(cls.split(chunk)):
            imgs.append(sample(tr, cond, c, seed=1000 + i, num_steps=a.eval_steps, device=device,
                               guidance_scale=gs))
        imgs = torch.cat(imgs)
        acc = classifier_accuracy(imgs, cls)
        metrics["generated"][f"cfg{gs:g}"] = acc
        log(f"guidance {gs:g}: generated-sample accuracy {acc['mean']:.4f} ({time.perf_counter() - t0:.1f}s)  "
            + " ".join(f"{k}={v:.2f}" for k, v in acc["per_class"].items()))
        per = min(4, a.eval_per_class)
        grid = imgs.view(NUM_CLASSES, a.eval_per_class, *imgs.shape[1:])[:, :per].reshape(-1, *imgs.shape[1:])
        save_grid(grid, os.path.join(a.out, f"samples_cfg{gs:g}.png"), nrow=per, scale=2)
    first = metrics["generated"][f"cfg{guidances[0]:g}"] if guidances else {"mean": None}
    metrics["generated_accuracy_mean"] = first["mean"]
    metrics["class_names"] = list(CLASS_NAMES)
    metrics["total_minutes"] = (time.perf_counter() - t_start) / 60
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    log(f"done in {metrics['total_minutes']:.2f} min; metrics in {os.path.join(a.out, 'metrics.json')}")
    return metrics


if __name__ == "__main__":
    main()

"""Sampling from the reference DiT with diffusers' ``FlowMatchEulerDiscreteScheduler``."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import torch

from chipmunk_compile.reference_model.data import IMAGE_SIZE
from chipmunk_compile.reference_model.model import DEFAULT_CONFIG, image_ids, pack, text_ids, unpack

__all__ = ["sample", "make_scheduler", "initial_noise", "save_grid", "to_uint8"]


def make_scheduler(shift: float = DEFAULT_CONFIG.shift):
    """The scheduler the reference model was trained for (sigma = shifted t, x_t = (1-sigma) x0 + sigma noise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def initial_noise(batch: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Deterministic float32 CPU noise [batch, 3, size, size] from ``seed`` (same on every device)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float32)


def _progress(i: int, n: int, t0: float) -> None:
    width = 30
    done = int(width * i / n)
    el = time.perf_counter() - t0
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {el:6.1f}s")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


@torch.no_grad()
def sample(
    transformer,
    conditioner,
    class_ids,
    seed: int,
    num_steps: int = 50,
    device: Optional[torch.device | str] = None,
    progress: bool = False,
    transformer_call: Optional[Callable] = None,
    guidance_scale: float = 1.0,
    shift: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    return_tokens: bool = False,
):
    """Generate images of ``class_ids`` with ``num_steps`` Euler flow-matching steps.

    ``transformer`` is the (possibly ``torch.compile``'d) ``FluxTransformer2DModel``; it is called exactly once
    per step with keyword arguments and ``return_dict=False``.  ``transformer_call``, if given, is called instead
    with the same keyword arguments (e.g. a wrapper that records or times the calls).  With
    ``guidance_scale != 1`` the conditional and null-label halves are batched into that one call
    (classifier-free guidance, batch 2B).  The initial noise depends only on ``(seed, batch size)``.

    Returns float32 images ``[B, 3, 64, 64]`` in ``[-1, 1]`` on ``device`` (and the final tokens if
    ``return_tokens``).
    """
    if device is None:
        try:
            device = next(transformer.parameters()).device
        except (StopIteration, AttributeError):
            device = torch.device("cpu")
    if dtype is None:
        try:
            dtype = next(transformer.parameters()).dtype
        except (StopIteration, AttributeError):
            dtype = torch.float32
    if shift is None:
        shift = getattr(getattr(conditioner, "config", None), "shift", None) or DEFAULT_CONFIG.shift
    call = transformer_call if transformer_call is not None else transformer

    cls = torch.as_tensor(class_ids, dtype=torch.long).to(device)
    B = cls.shape[0]
    size = IMAGE_SIZE
    cfg = guidance_scale != 1.0
    labels = torch.cat([cls, torch.full_like(cls, conditioner.null_label)]) if cfg else cls
    ehs, pooled = conditioner(labels)
    ehs, pooled = ehs.to(dtype), pooled.to(dtype)
    img_ids = image_ids(size // 2, device=device)
    txt_ids = text_ids(ehs.shape[1], device=device)

    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(num_steps, device=device)
    latents = pack(initial_noise(B, seed, size).to(device))  # float32 state; the model sees ``dtype``

    t0 = time.perf_counter()
    if progress:
        _progress(0, num_steps, t0)
    for i, t in enumerate(scheduler.timesteps):
        model_in = latents.to(dtype)
        model_in = torch.cat([model_in, model_in]) if cfg else model_in
        timestep = (t / 1000.0).expand(model_in.shape[0]).to(dtype)
        out = call(
            hidden_states=model_in,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        if cfg:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(out.float(), t, latents, return_dict=False)[0]
        if progress:
            _progress(i + 1, num_steps, t0)
    images = unpack(latents, size, size).clamp(-1, 1)
    return (images, latents) if return_tokens else images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3] on the CPU."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 2, pad: int = 2) -> None:
    """Save images [B,3,H,W] in [-1,1] as a PNG grid with ``nrow`` images per row."""
    from PIL import Image

    x = to_uint8(images)
    B, H, W, _ = x.shape
    rows = (B + nrow - 1) // nrow
    canvas = torch.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        canvas[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = x[i]
    img = Image.fromarray(canvas.numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)

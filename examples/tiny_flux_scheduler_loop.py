"""Drive a small random-init diffusers Flux transformer through a real FlowMatchEulerDiscreteScheduler loop,
once with plain torch.compile (dense) and once with backend="chipmunk", and compare the final latents.

    python examples/tiny_flux_scheduler_loop.py [--steps 30] [--size 32] [--device cpu|cuda]

Random weights: the numbers show the rewrite works end to end (sites, schedule, relative error), not picture
quality — the trained reference model is what measures that.
"""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

import chipmunk_compile


def build(device, dtype):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                   pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))
    return model.to(device=device, dtype=dtype).eval()


def inputs(size, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(size * size, 3)
    ids[:, 1] = torch.arange(size).repeat_interleave(size)
    ids[:, 2] = torch.arange(size).repeat(size)
    text = 16
    return dict(latents=torch.randn(1, size * size, 16, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, text, 64, generator=g).to(device, dtype),
                pooled_projections=torch.randn(1, 64, generator=g).to(device, dtype),
                img_ids=ids.to(device), txt_ids=torch.zeros(text, 3, device=device))


@torch.no_grad()
def generate(transformer, scheduler, cond, steps):
    scheduler.set_timesteps(steps)
    latents = cond["latents"].clone()
    for t in scheduler.timesteps:
        timestep = (t / 1000).expand(latents.shape[0]).to(latents)
        velocity = transformer(hidden_states=latents, timestep=timestep,
                               encoder_hidden_states=cond["encoder_hidden_states"],
                               pooled_projections=cond["pooled_projections"], img_ids=cond["img_ids"],
                               txt_ids=cond["txt_ids"], return_dict=False)[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=32, help="latent grid side (tokens = size^2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(args.device, dtype)
    cond = inputs(args.size, args.device, dtype)
    call = dict(hidden_states=cond["latents"], timestep=torch.ones(1, device=args.device, dtype=dtype),
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"], img_ids=cond["img_ids"], txt_ids=cond["txt_ids"],
                return_dict=False)
    options = {"num_steps": args.steps}
    print(chipmunk_compile.explain(model, options=options, **call))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    results = {}
    for name, compiled in (("dense (inductor)", torch.compile(model)),
                           ("chipmunk", torch.compile(model, backend="chipmunk", options=options))):
        generate(compiled, scheduler, cond, args.steps)  # warm-up: compiles, runs one full generation
        start = time.perf_counter()
        results[name] = generate(compiled, scheduler, cond, args.steps)
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"{name:18s} {time.perf_counter() - start:7.2f} s for {args.steps} steps")
    dense, sparse = results["dense (inductor)"].float(), results["chipmunk"].float()
    print(f"relative L2 difference of the final latents, chipmunk vs dense: "
          f"{((sparse - dense).norm() / dense.norm()).item():.4f}")


if __name__ == "__main__":
    main()

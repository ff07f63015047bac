"""Shared test helpers: compile with chipmunk, run a slowly changing denoising loop, read plan counters."""
from __future__ import annotations

import torch

from chipmunk_compile import runtime

FAST = {"inner_backend": "aot_eager", "first_dense_layers": 0, "attn_query_group": 32, "mlp_token_block": 32,
        "attn_kv_tile": 16, "mlp_unit_tile": 16}


def compile_chipmunk(model, **options):
    return torch.compile(model, backend="chipmunk", options={**FAST, **options})


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else (out.sample if hasattr(out, "sample") else out)


@torch.no_grad()
def denoise_loop(fn, make_inputs, steps, batch=1, size=8, seed=0, step_size=0.02, driver=None):
    """Calls fn once per step with inputs whose latents move slowly (x -= step_size * output, as a sampler
    would). With ``driver`` (e.g. the eager model), the latents follow the driver's outputs instead, so fn
    sees exactly the inputs the driver sees. Returns the list of fn's outputs."""
    inputs = make_inputs(batch=batch, size=size, step=0, seed=seed)
    latent_key = next(iter(inputs))
    latents = inputs[latent_key]
    outs = []
    for step in range(steps):
        inputs = make_inputs(batch=batch, size=size, step=step, seed=seed, latents=latents)
        out = first_output(fn(**inputs))
        outs.append(out)
        drive = out if driver is None else first_output(driver(**inputs))
        if drive.shape == latents.shape:
            latents = latents - step_size * drive
    return outs


def newest_runtimes(before: set[int]):
    return [rt for rt in runtime.live_runtimes() if rt.id not in before]


def runtime_ids() -> set[int]:
    return {rt.id for rt in runtime.live_runtimes()}

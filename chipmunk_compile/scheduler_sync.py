"""Keeps a compiled model's generation boundaries in step with its sampler's scheduler.

The backend knows a generation only as ``num_steps`` calls. A sampler that runs another number of steps (28
instead of the default 50) would leave the counter out of line: the next generation would start in the
middle of the old one and its sparse steps would read the previous image's caches. ``follow_scheduler`` ties
the counter to the scheduler instead: each ``scheduler.set_timesteps(...)`` — which diffusers pipelines call
at the start of every generation — resets the model's caches and sets its steps per generation to the
number of timesteps the scheduler will run.

    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk")
    chipmunk_compile.follow_scheduler(pipe)        # or follow_scheduler(scheduler, model)
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

from chipmunk_compile import runtime


def follow_scheduler(pipe_or_scheduler, model=None) -> None:
    """Resets ``model``'s chipmunk state and sets its ``num_steps`` to ``len(scheduler.timesteps)`` each time
    ``scheduler.set_timesteps`` runs. ``pipe_or_scheduler``: a diffusers pipeline (its ``scheduler`` and, when
    ``model`` is None, its ``transformer``), or a scheduler with ``set_timesteps`` and ``timesteps``."""
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    if model is None:
        model = getattr(pipe_or_scheduler, "transformer", None)
    if model is None:
        raise ValueError("follow_scheduler: pass the model: the first argument has no `transformer`")
    if not callable(getattr(scheduler, "set_timesteps", None)):
        raise TypeError(f"follow_scheduler: {type(scheduler).__name__} has no set_timesteps(); pass a diffusers "
                        "pipeline or scheduler")
    weights = runtime._module_tensors(model)  # also validates the model
    if not weights:
        raise ValueError("follow_scheduler: the model has no parameters or buffers to recognise it by")
    model_ref = weakref.ref(getattr(model, "_orig_mod", model))
    original = scheduler.set_timesteps

    @functools.wraps(original)
    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        target = model_ref()
        if target is not None:
            begin_generation(target, len(scheduler.timesteps))
        return result

    set_timesteps.chipmunk_wrapped = original
    scheduler.set_timesteps = set_timesteps


def begin_generation(model, num_steps: int) -> int:
    """Resets every compiled graph of ``model`` and makes its generations ``num_steps`` steps long, for the graphs
    compiled so far and those compiled later (a first call, a new resolution). Returns how many graphs were
    reset."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"begin_generation: num_steps must be a positive int, got {num_steps!r}")
    tensors = runtime._module_tensors(model)
    for tensor in tensors:
        runtime.set_steps_override(tensor, num_steps)
    graphs = runtime._runtimes_of(model)
    for rt in graphs:
        rt.options = dataclasses.replace(rt.options, num_steps=num_steps)
        rt.reset()
    return len(graphs)

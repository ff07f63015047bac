"""Keeps a compiled model's generation boundaries in step with its sampler's scheduler.

The backend knows a generation only as ``num_steps`` calls. A sampler that runs another number of steps (28
instead of the default 50) would leave the counter out of line: the next generation would start in the
middle of the old one and its sparse steps would read the previous image's caches. ``follow_scheduler`` ties
the counter to the scheduler instead: each ``scheduler.set_timesteps(...)`` — which diffusers pipelines call
at the start of every generation — resets the model's caches and sets its steps per generation to the
number of timesteps the scheduler will run.

It also follows ``scheduler.step(...)``, which samplers call once per denoising step: once it has been seen, the
model's steps are counted by those calls and its invocations by the model calls between two of them, so separate
cond / uncond CFG calls (or cond / uncond graphs of different shapes) get their own caches without
``invocations_per_step``. (The first generation runs counted until the scheduler's first step; its caches are
then dropped once if its calls were counted as more than that one step.)

    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk")
    chipmunk_compile.follow_scheduler(pipe)        # or follow_scheduler(scheduler, model)
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import numbers
import weakref

from chipmunk_compile import runtime


def follow_scheduler(pipe_or_scheduler, model=None) -> None:
    """Resets ``model``'s chipmunk state and sets its ``num_steps`` to ``len(scheduler.timesteps)`` each time
    ``scheduler.set_timesteps`` runs. ``pipe_or_scheduler``: a diffusers pipeline (its ``scheduler`` and, when
    ``model`` is None, its ``transformer`` and ``transformer_2`` — Wan 2.2's two experts), or a scheduler with
    ``set_timesteps`` and ``timesteps``. A deep copy of the scheduler (as some pipelines make for a second set of
    latents) sets its own timesteps and does not follow the model."""
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    if model is None:
        models = [m for m in (getattr(pipe_or_scheduler, name, None) for name in _DENOISERS) if m is not None]
        if not models:
            raise ValueError("follow_scheduler: pass the model: the first argument has no `transformer`")
        for each in models:
            follow_scheduler(scheduler, each)
        return
    if not callable(getattr(scheduler, "set_timesteps", None)):
        raise TypeError(f"follow_scheduler: {type(scheduler).__name__} has no set_timesteps(); pass a diffusers "
                        "pipeline or scheduler")
    weights = runtime._module_tensors(model)  # also validates the model
    if not weights:
        raise ValueError("follow_scheduler: the model has no parameters or buffers to recognise it by")
    module = getattr(model, "_orig_mod", model)
    model_ref = weakref.ref(module)
    if not _already_follows(scheduler.set_timesteps, module):  # following twice must not count steps twice
        scheduler.set_timesteps = _FollowingSetTimesteps(scheduler, scheduler.set_timesteps, model_ref)
    if callable(getattr(scheduler, "step", None)) and not _already_follows(scheduler.step, module):
        scheduler.step = _FollowingStep(scheduler, scheduler.step, model_ref)


_DENOISERS = ("transformer", "transformer_2")


class _FollowingSetTimesteps:
    """``scheduler.set_timesteps`` that also begins a generation of the followed model. An object, not a closure:
    a closure would survive ``copy.deepcopy(scheduler)`` unchanged, so the copy's set_timesteps would set the
    original scheduler's timesteps and leave the copy's stale."""

    def __init__(self, scheduler, original, model_ref):
        functools.update_wrapper(self, original)  # name, doc, __wrapped__ (inspect.signature sees the original)
        self.scheduler, self.chipmunk_wrapped, self.model_ref = scheduler, original, model_ref

    def __call__(self, *args, **kwargs):
        result = self.chipmunk_wrapped(*args, **kwargs)
        target = self.model_ref()
        if target is not None:
            begin_generation(target, len(self.scheduler.timesteps))
        return result

    def __deepcopy__(self, memo):
        # The copy's plain set_timesteps: the original bound method deep-copies onto the copied scheduler (already
        # in memo when the scheduler is what is being copied).
        return copy.deepcopy(self.chipmunk_wrapped, memo)


class _FollowingStep(_FollowingSetTimesteps):
    """``scheduler.step`` that also ends the followed model's current step (the same deep-copy behaviour). A step
    call that leaves the scheduler's step_index where the previous one left it is a repeat of that step (Cosmos
    steps twice per iteration and rewinds the index in between), not a new step."""

    last_index = None

    def __call__(self, *args, **kwargs):
        before = getattr(self.scheduler, "step_index", None)
        result = self.chipmunk_wrapped(*args, **kwargs)
        after = getattr(self.scheduler, "step_index", None)
        repeated = before is not None and after is not None and after == self.last_index
        self.last_index = after
        target = self.model_ref()
        if target is not None and not repeated:
            end_step(target)
        return result


def end_step(model) -> int:
    """The sampler finished a denoising step of ``model``: its graphs (now and later ones) count steps by these calls
    from here on. Returns how many graphs were advanced."""
    for tensor in runtime._module_tensors(model):
        runtime.mark_stepped(tensor)
    graphs = runtime._runtimes_of(model)
    for rt in graphs:
        rt.end_step()
    return len(graphs)


def _already_follows(method, model) -> bool:
    """Whether ``method`` (a scheduler's step or set_timesteps) is already a follower of ``model``."""
    while isinstance(method, _FollowingSetTimesteps):
        if method.model_ref() is model:
            return True
        method = method.chipmunk_wrapped
    return False


def begin_generation(model, num_steps: int) -> int:
    """Resets every compiled graph of ``model`` and makes its generations ``num_steps`` steps long, for the graphs
    compiled so far and those compiled later (a first call, a new resolution). Returns how many graphs were
    reset."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"begin_generation: num_steps must be a positive int, got {num_steps!r}")
    num_steps = int(num_steps)
    tensors = runtime._module_tensors(model)
    for tensor in tensors:
        runtime.set_steps_override(tensor, num_steps)
    graphs = runtime._runtimes_of(model)
    for rt in graphs:
        rt.options = dataclasses.replace(rt.options, num_steps=num_steps)
        rt.reset(new_generation=True)
        rt.followed, rt.overran, rt.restarts = True, False, 0
    return len(graphs)

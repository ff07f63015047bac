"""Launches autotuned Triton kernels with little host work once their compiled kernel is known.

Before (every call)                                   After (calls after the first per launch key)
    Autotuner.run: arg dict, tuning key, cache           compiled_kernel[grid](*args, *constexpr values)
    Heuristics.run: arg dict per heuristic               (Triton's launcher for that exact binary)
    JITFunction.run: bind, specialise, look up, launch

The chipmunk ops launch their kernels once per transformer block per step. Measured with cProfile on the GPU
machine (torch 2.11, Triton 3.6), the autotuner + heuristics + JIT path costs ~130 us of Python per launch, which
adds up to milliseconds per denoising step. The launch key holds every non-tensor argument's value, each
tensor's dtype, device, shape and 16-byte alignment, and the meta-parameters: everything the tuning key, the
heuristics, the grid and Triton's specialisation (pointer alignment, integer value 1 / multiples of 16 / width)
are computed from. So a cached binary and grid are only reused for arguments that would have selected the same
binary and grid (the shapes matter for the grid: a batch size the kernel only sees through its grid, with the
same strides as another batch size's, must not reuse that one's grid). Plain (not autotuned) Triton and Gluon
kernels go through the same cache, with the launch options (num_warps, ...) in ``meta``. Where the
compiled kernel is not available (the CPU interpreter) or launch hooks are installed (profilers), every call goes
through JITFunction.run with the cached configuration instead (also with CHIPMUNK_DIRECT_LAUNCH=0).
"""
from __future__ import annotations

import functools
import os

import torch
from triton import knobs
from triton.runtime.autotuner import Autotuner, Heuristics


# CHIPMUNK_DIRECT_LAUNCH=0 keeps every launch on JITFunction.run (for A/B timing and as an escape hatch).
DIRECT = os.environ.get("CHIPMUNK_DIRECT_LAUNCH", "1") != "0"


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.get_device(), a.data_ptr() % 16 == 0, a.shape)
    return a


class CachedLaunch:
    """``kernel``: an autotuned kernel (Autotuner over a JITFunction or Heuristics) or a plain JITFunction."""

    def __init__(self, kernel):
        self.tuned = kernel if isinstance(kernel, Autotuner) else None
        inner = kernel.fn if self.tuned is not None else kernel
        self.heuristics = inner.values if isinstance(inner, Heuristics) else {}
        self.jit = inner.fn if isinstance(inner, Heuristics) else inner
        self.arg_names = self.jit.arg_names
        self._cache: dict = {}

    def __call__(self, grid_fn, args: tuple, meta: dict) -> None:
        # A grid given as a tuple is part of the key (a callable grid is computed from what the key holds).
        key = (tuple(map(_arg_key, args)), tuple(meta.items()), None if callable(grid_fn) else tuple(grid_fn))
        hit = self._cache.get(key)
        if hit is not None:
            grid, kwargs, runner, constexprs = hit
            if runner is not None and DIRECT and knobs.runtime.launch_enter_hook is None:
                runner(*args, *constexprs)
            else:
                self.jit.run(*args, grid=grid, warmup=False, **kwargs)
            return
        # First use of this key: tune (on the first use of the tuning key), launch, and remember the binary.
        if self.tuned is not None:
            kernel = self.tuned[grid_fn](*args, **meta)
            kwargs = {**meta, **self.tuned.best_config.all_kwargs()}
        else:
            kernel = self.jit[grid_fn](*args, **meta)
            kwargs = dict(meta)
        for name, heuristic in self.heuristics.items():
            kwargs[name] = heuristic({**dict(zip(self.arg_names, args)), **kwargs})
        grid = tuple(grid_fn(kwargs)) if callable(grid_fn) else tuple(grid_fn)
        trailing = self.arg_names[len(args):]   # the constexpr parameters, passed by keyword above
        runner = constexprs = None
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        if hasattr(kernel, "packed_metadata") and all(n in kwargs for n in trailing):
            runner = kernel[grid]
            constexprs = tuple(kwargs[n] for n in trailing)
        self._cache[key] = (grid, kwargs, runner, constexprs)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (persistent kernels launch one CTA per SM)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count

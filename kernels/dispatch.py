"""Chooses the implementation of each kernel-level function: Triton on CUDA, the torch reference elsewhere.

``kernels`` option: 'auto' (Triton where the tensors are on CUDA and the Triton module imports, else torch),
'torch' (always the reference) or 'triton' (always Triton; on the CPU only under TRITON_INTERPRET=1).
Triton modules are imported lazily so that importing the package never needs a GPU.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("chipmunk_compile")

# function name -> (reference module, triton module); both define the function with the same signature.
_IMPLEMENTATIONS = {
    "dense_attention_lse_colmass": ("attention_reference", "attention_dense_triton"),
    "sparse_attention_delta": ("attention_reference", "attention_sparse_triton"),
    "sparse_mlp_update": ("mlp_reference", "mlp_sparse_triton"),
    "select_topk_with_random": ("selection_reference", "selection_triton"),
    "mlp_refresh_selection": ("mlp_reference", "selection_triton"),
}


@functools.lru_cache(maxsize=None)
def _load(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except (ImportError, AttributeError) as exc:
        log.warning("chipmunk: Triton kernel %s.%s unavailable (%s); using the torch reference", module, name, exc)
        return None


def implementation(name: str, provider: str, device: torch.device):
    reference_module, triton_module = _IMPLEMENTATIONS[name]
    use_triton = provider == "triton" or (provider == "auto" and device.type == "cuda")
    if use_triton and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("chipmunk: kernels='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before "
                           "import; use kernels='auto' or 'torch' on the CPU.")
    if use_triton:
        fn = _load(triton_module, name)
        if fn is not None:
            return fn
    return _load(reference_module, name)


@functools.lru_cache(maxsize=None)
def gluon_module(module: str):
    """The Gluon kernel module ``module`` of this package, or None where this Triton has no Gluon (< 3.5)."""
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError:
        return None

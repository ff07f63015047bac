"""Registers the stateful chipmunk ops straight with the dispatcher (schema + one kernel per device type + fake).

``torch.library.custom_op`` wraps every call in Python autograd and ADInplaceOrView layers that re-bind the
arguments against the schema twice per call (``fill_defaults``: ~60 us for an op with a dozen arguments, measured
on the CPU). The ops run once per transformer block per step and are inference-only (the backend runs calls with
gradients enabled as plain Inductor), so they are registered without those layers: the dispatcher calls the
Python body directly. Mutations are declared in the schema (``Tensor(a!)``), which is what Inductor's
functionalization reads; ``cudagraph_unsafe`` makes Inductor partition CUDA graphs around the op, whose plan is
chosen on the host at every call.
"""
from __future__ import annotations

import torch


def register_stateful_op(qualname: str, schema: str, body, fake):
    """Defines ``qualname`` with ``schema`` ("(args) -> ret"), runs ``body`` for CPU and CUDA tensors and
    ``fake`` under fake tensors; returns the OpOverload ``torch.ops.<ns>.<name>.default``."""
    torch.library.define(qualname, schema, tags=(torch.Tag.cudagraph_unsafe,))
    torch.library.impl(qualname, ("cpu", "cuda"), body)
    torch.library.register_fake(qualname, fake)
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default

"""Registers per-site cache tensors as buffers of the Dynamo GraphModule and reads them with get_attr.

Buffers (rather than Python-held tensors or extra graph inputs) make the caches ordinary module state for
AOTAutograd and Inductor, so CUDA graphs keep working. AOTAutograd looks every module attribute up in the
private ``gm._param_name_to_source``; a buffer added after tracing needs an entry there (a ConstantSource), or
it asserts. tests/test_state_buffers.py covers that private contract.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource


def add_state_buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Registers ``tensor`` as buffer ``name`` and returns a get_attr node placed before ``before``."""
    if hasattr(gm, name):
        raise RuntimeError(f"chipmunk: the graph already has an attribute named {name!r}")
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        sources = gm._param_name_to_source = {}
    sources[name] = ConstantSource(name)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["example_value"] = torch.empty_like(tensor, device="meta")
    return node


def tensors_nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(gm: fx.GraphModule, prefix: str = "chipmunk_") -> int:
    return tensors_nbytes(b for n, b in gm.named_buffers() if n.startswith(prefix))

"""Small helpers for reading the torch-level Dynamo graph: call targets, argument binding, fake values."""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR_TARGETS = {torch._C._nn.linear, F.linear}
SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm}
SOFTMAX_TARGETS = {torch.softmax, F.softmax}
GELU_TARGETS = {torch._C._nn.gelu, F.gelu}
SILU_TARGETS = {F.silu, torch.nn.functional.silu, torch.ops.aten.silu.default}
RELU_TARGETS = {torch.relu, F.relu}
DROPOUT_TARGETS = {F.dropout, torch.dropout}
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}
CHUNK_TARGETS = {torch.chunk}


def fake(node: Any):
    """The FakeTensor Dynamo recorded for a node (None for non-nodes or unknown)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def is_call(node: Any, targets: Iterable, methods: Iterable[str] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in methods
    return False


def bind(node: fx.Node, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional + keyword arguments of a call as one dict (for call_method, self is the first name)."""
    bound = dict(defaults)
    for name, value in zip(names, node.args):
        bound[name] = value
    bound.update(node.kwargs)
    return bound


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def unwrap_identity(node: Any) -> Any:
    """Skips dropout with p=0 (or training=False), identity casts to the same dtype and contiguous()."""
    while isinstance(node, fx.Node):
        if is_call(node, DROPOUT_TARGETS, ("dropout",)):
            bound = bind(node, ["input", "p", "training", "inplace"], {"p": 0.5, "training": True})
            if bound["p"] == 0 or bound["training"] is False:
                node = bound["input"]
                continue
            return node
        if node.op == "call_method" and node.target == "contiguous":
            node = node.args[0]
            continue
        return node
    return node


def dim_index(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim

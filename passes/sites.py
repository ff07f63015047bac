"""Site records shared by detection, rewriting and reporting, and the block structure they are placed in.

A *site* is one attention or MLP computation found in the Dynamo graph. Its *block* is the repeated module
that contains it: the module path up to the first container index (``transformer_blocks.3``,
``single_transformer_blocks.0``, ``blocks.7``); its *layer* is the execution-order rank of that block among
all blocks of the graph (double and single blocks counted together). Module paths are used only as opaque
keys and labels: their spelling differs across torch versions.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch.fx as fx

_PATH_PIECES = [
    (re.compile(r"^L\['self'\]\.?"), ""),
    (re.compile(r"\.?__dict__\['_modules'\]\['([^']+)'\]"), r".\1"),
    (re.compile(r"\.?_modules\['([^']+)'\]"), r".\1"),
    (re.compile(r"\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
]


def clean_module_path(raw: str) -> str:
    path = raw
    for pattern, repl in _PATH_PIECES:
        path = pattern.sub(repl, path)
    return path.strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, type | str]]:
    """[(clean path, module class), ...] outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(clean_module_path(path), cls) for path, cls in stack.values()]


def innermost_module(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def _is_torch_builtin(cls) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module.startswith("torch.nn.modules")


def block_of(node: fx.Node) -> str | None:
    """The repeated block a node runs in: the outermost module on its stack that is an element of a container
    (its path ends in an index) and is not a torch.nn building block (``t_embed.2`` of an nn.Sequential of
    Linear/GELU/Linear is a layer, not a transformer block)."""
    for path, cls in module_stack(node):
        if path.split(".")[-1].isdigit() and not _is_torch_builtin(cls):
            return path
    return None


@dataclasses.dataclass
class Site:
    kind: str                      # "attention" | "mlp"
    module: str                    # module path of the computation (label)
    block: str | None              # repeated block containing it
    variant: str                   # attention: "sdpa" | "manual"; mlp: "plain" | "gated" | "fused_out"
    nodes: dict[str, Any]          # the matched FX nodes, by role
    rewritten: bool = False
    reason: str = ""               # why it was left dense (empty when rewritten)
    layer: int | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def record(self) -> "SiteRecord":
        return SiteRecord(kind=self.kind, module=self.module, rewritten=self.rewritten, reason=self.reason,
                          layer=self.layer, variant=self.variant, details=dict(self.details))


@dataclasses.dataclass(frozen=True)
class SiteRecord:
    """What explain() and the dump report about a site."""
    kind: str
    module: str
    rewritten: bool
    reason: str
    layer: int | None
    variant: str
    details: dict[str, Any]


def assign_layers(graph: fx.Graph, sites: list[Site]) -> list[str]:
    """Numbers the repeated blocks of the graph in execution order and sets each site's layer."""
    order: dict[str, int] = {}
    for node in graph.nodes:
        block = block_of(node)
        if block is not None and block not in order:
            order[block] = len(order)
    for site in sites:
        site.layer = order.get(site.block) if site.block is not None else None
    return list(order)

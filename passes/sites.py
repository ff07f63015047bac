"""Site records shared by detection, rewriting and reporting, and the block structure they are placed in.

A *site* is one attention or MLP computation found in the Dynamo graph. Its *block* is the repeated module
that contains it: the module path up to the first container index (``transformer_blocks.3``,
``single_transformer_blocks.0``, ``blocks.7``); its *layer* is the execution-order rank of that block among
all blocks of the graph (double and single blocks counted together). Module paths are used only as opaque
keys and labels: their spelling differs across torch versions.

A graph can also *be* one block: regional compilation (``compile_repeated_blocks``, ``block.compile()``) and
a graph break inside the transformer's block loop give each block its own Dynamo frame, whose module paths
start inside the block (``attn``, ``ff.net.2``). ``is_one_block_graph`` tells such a graph from a non-block part
of a model (an embedder, a pooler or cross-attention head left in its own graph by a graph break): no lists of
blocks, no site inside an indexed module, and a self-attention that only its place keeps dense; and not a whole
model holding its blocks as plain attributes (``sibling_blocks_outside_lists``). Its sites all
get the block ``GRAPH_BLOCK``; their layer is given by the caller (the backend numbers block instances in the
order they are first called, ``backend._BlockOrder``), not by the graph.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch.fx as fx

from chipmunk_compile.passes.graph_utils import fake

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


def _indexed_ancestors(node: fx.Node) -> list[str]:
    """Paths on the node's module stack (outermost first) that are elements of a container (the path ends in
    an index) and are not torch.nn building blocks (``t_embed.2`` of an nn.Sequential is a layer, not a block)."""
    return [path for path, cls in module_stack(node) if path.split(".")[-1].isdigit() and not _is_torch_builtin(cls)]


def repeated_containers(graph: fx.Graph) -> frozenset[str]:
    """Containers whose traced elements are at least two modules of one class: the lists of transformer blocks.
    A wrapper holding the transformer in a one-element list is not one; neither is a mixed list such as a
    feed-forward's [activation projection, dropout, linear]. Computed once per graph."""
    cached = getattr(graph, "_chipmunk_repeated_containers", None)
    if cached is not None:
        return cached
    members: dict[str, dict[str, set]] = {}
    for node in graph.nodes:
        for path, cls in module_stack(node):
            container, _, index = path.rpartition(".")
            if index.isdigit() and not _is_torch_builtin(cls):
                members.setdefault(container, {}).setdefault(index, set()).add(cls)
    repeated = frozenset(container for container, elements in members.items()
                         if len(elements) >= 2 and len(set().union(*elements.values())) == 1)
    graph._chipmunk_repeated_containers = repeated
    return repeated


GRAPH_BLOCK = "<this graph's block>"
OUTSIDE_BLOCKS = "outside the repeated transformer blocks"


def block_of(node: fx.Node) -> str | None:
    """The repeated module a node runs in, as detection compares nodes (a site's nodes must share it): the
    innermost element of a list of same-class modules on its stack (``stages.1.blocks.2`` in a staged model,
    ``models.0.blocks.3`` for a transformer held in a wrapper list); without such a list (a model with one block
    per list), the outermost indexed module; in a graph marked as one block (``mark_one_block_graph``), that
    block (``GRAPH_BLOCK``) for every node. ``assign_layers`` then picks each site's transformer block from these
    lists."""
    if getattr(node.graph, "_chipmunk_one_block", False):
        return GRAPH_BLOCK
    ancestors = _indexed_ancestors(node)
    if not ancestors:
        return None
    repeated = repeated_containers(node.graph)
    in_lists = [path for path in ancestors if path.rpartition(".")[0] in repeated]
    return in_lists[-1] if in_lists else ancestors[0]


def is_one_block_graph(graph: fx.Graph, sites: list["Site"]) -> bool:
    """Whether the graph is one whole transformer block compiled alone (its own Dynamo frame), judged on the
    sites found with the ordinary block structure: the graph has no list of same-class blocks and no site inside
    an indexed module, and at least one attention site is a self-attention (queries and keys from one sequence,
    no unsupported mask, dtype or shape) left dense only for lying outside repeated blocks. A non-block part of a
    model compiled alone differs: an embedder or modulation MLP has no attention, a pooler or head attends from
    learned or few queries to other keys (cross-attention). A whole model compiled at once has lists of blocks
    (or indexed blocks) around its sites, so its embedders and heads keep their ordinary handling."""
    if repeated_containers(graph) or any(site.block is not None for site in sites):
        return False
    return any(site.kind == "attention" and site.reason == OUTSIDE_BLOCKS for site in sites)


def sibling_blocks_outside_lists(sites: list["Site"]) -> bool:
    """Whether two or more modules of one class under one parent each hold an attention and an MLP site: a whole
    model whose blocks are plain attributes (``self.b0``, ``self.b1``) rather than a list, which is not one block
    (a block's own submodules, e.g. SD3.5's ``attn`` and ``attn2``, do not each hold an MLP)."""
    kinds: dict[tuple[str, Any], set[str]] = {}
    for site in sites:
        for path, cls in module_stack(site.nodes["out"]):
            if path and not _is_torch_builtin(cls):
                kinds.setdefault((path, cls), set()).add(site.kind)
    groups: dict[tuple[str, Any], int] = {}
    for (path, cls), found in kinds.items():
        if found >= {"attention", "mlp"}:
            parent = path.rpartition(".")[0]
            groups[(parent, cls)] = groups.get((parent, cls), 0) + 1
    return any(count >= 2 for count in groups.values())


def mark_one_block_graph(graph: fx.Graph, one_block: bool = True) -> None:
    """From now on every node of ``graph`` runs in its one block (``block_of`` returns ``GRAPH_BLOCK``), or, with
    ``one_block=False``, in the blocks its module paths say again."""
    graph._chipmunk_one_block = one_block


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


def _pattern(path: str) -> str:
    """``stages.1.blocks.2`` -> ``stages.*.blocks``: the role of a list, whichever element holds it."""
    return ".".join("*" if part.isdigit() else part for part in path.rpartition(".")[0].split("."))


def _list_elements(path: str, repeated: frozenset[str]) -> list[str]:
    """The prefixes of a module path that are elements of repeated lists, outermost first."""
    parts = path.split(".")
    prefixes = (".".join(parts[:i + 1]) for i in range(len(parts)) if parts[i].isdigit())
    return [p for p in prefixes if p.rpartition(".")[0] in repeated]


def _token_rows(site: Site) -> int:
    """How many token rows a site processes (batch x tokens; 0 when the shapes are unknown or symbolic)."""
    node = site.nodes.get("q") if site.kind == "attention" else site.nodes.get("hidden", {}).get("x")
    shape = getattr(fake(node), "shape", None)
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape):
        return 0
    rows = math.prod(shape[:-1])
    return rows // shape[1] if site.kind == "attention" and len(shape) == 4 else rows  # [B, H, N, D]


def _most_rows(sites: list[Site]) -> int:
    return max((_token_rows(site) for site in sites), default=0)


def _site_group(site: Site, layer_lists: set[str], repeated: frozenset[str]) -> str | None:
    """The block list a site's block belongs to: the innermost layer list on its path, or else the list its
    detection block is an element of (a one-block list, e.g. a text refiner with a single block)."""
    elements = [e for e in _list_elements(site.module, repeated) if _pattern(e) in layer_lists]
    if elements:
        return _pattern(elements[-1])
    if site.block is not None and site.block.rpartition(".")[2].isdigit():
        return _pattern(site.block)
    return None


def _auxiliary_lists(sites: list[Site], groups: list[str | None]) -> dict[str, int]:
    """Block lists that prepare a small side sequence before the transformer's blocks run, e.g. a text refiner
    (HunyuanVideo's ``context_embedder.token_refiner.refiner_blocks``, Lumina2's ``context_refiner``) or text-only
    blocks (Kandinsky 5): at most half the token rows of the list with the graph's largest site, and every site
    before that list's first. They are conditioning stacks, not transformer layers: counting them would spend
    ``first_dense_layers`` on them and leave the transformer's first blocks sparse. (A smaller stage that runs
    between larger ones, as in an hourglass model, stays a layer.) ``sites`` are in graph order, ``groups`` their
    ``_site_group``s. {list pattern: its largest site's token rows}."""
    rows: dict[str, int] = {}
    last: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, (site, pattern) in enumerate(zip(sites, groups)):
        if pattern is not None:
            rows[pattern] = max(rows.get(pattern, 0), _token_rows(site))
            first.setdefault(pattern, index)
            last[pattern] = index
    if not rows:
        return {}
    main = max(rows, key=lambda p: (rows[p], -first[p]))
    return {p: r for p, r in rows.items() if 0 < 2 * r <= rows[main] and last[p] < first[main]}


def assign_layers(graph: fx.Graph, sites: list[Site]) -> list[str]:
    """Numbers the transformer blocks of the graph in execution order and sets each site's block and layer.

    A layer is an element of a list of same-class modules whose elements hold sites of every kind the graph
    has (attention and MLP): the innermost such list on a site's path, so ``stages.1.blocks.2`` in a staged
    model, but ``blocks.3`` and not ``blocks.3.ff.experts.5`` in a mixture-of-experts block. Without such a list
    the innermost list holding any site; without lists at all (one block of each kind), the outermost indexed
    module, as ``block_of`` gives it."""
    repeated = repeated_containers(graph)
    kinds_in: dict[str, set[str]] = {}
    for site in sites:
        for element in _list_elements(site.module, repeated):
            kinds_in.setdefault(_pattern(element), set()).add(site.kind)
    all_kinds = {site.kind for site in sites}
    layer_lists = {p for p, kinds in kinds_in.items() if kinds >= all_kinds} or set(kinds_in)
    groups = [_site_group(site, layer_lists, repeated) for site in sites]
    auxiliary = _auxiliary_lists(sites, groups)
    layer_lists -= set(auxiliary)

    def layer_block(path: str) -> str | None:
        elements = [e for e in _list_elements(path, repeated) if _pattern(e) in layer_lists]
        return elements[-1] if elements else None

    mlp_only = {p for p, kinds in kinds_in.items() if kinds == {"mlp"} and p not in layer_lists}
    for site, group in zip(sites, groups):
        site.block = layer_block(site.module) or site.block
        aux = group if group in auxiliary else None
        if aux is not None and layer_block(site.module) is None:
            site.block = None
            site.reason = site.reason or (f"outside the transformer blocks: {aux} runs at most {auxiliary[aux]} "
                                          f"token rows where the transformer's blocks run {_most_rows(sites)} (a "
                                          "text refiner or other conditioning stack, not a layer)")
        elif layer_block(site.module) is None and "attention" in all_kinds and any(
                _pattern(e) in mlp_only for e in _list_elements(site.module, repeated)):
            # A stack of MLPs beside attention blocks is a conditioning network (Chroma's approximator turning
            # the timestep into modulation vectors), not transformer layers.
            site.block = None
            site.reason = site.reason or ("outside the transformer blocks (a list of MLPs without attention: an "
                                          "embedder or modulation network, not a layer)")
    # Only blocks that are layers (or hold a site) are counted: another indexed module, such as the first
    # element of an nn.Sequential embedder holding a custom norm (Z-Image's cap_embedder.0), or a conditioning
    # stack's block (its sites have no block now), is not a layer.
    site_blocks = {site.block for site in sites if site.block is not None}
    seen: dict[str, None] = {}
    for node in graph.nodes:
        stack = module_stack(node)
        block = layer_block(stack[-1][0]) if stack else None
        if block is None:
            fallback = block_of(node)
            block = fallback if fallback in site_blocks else None
        if block is not None:
            seen.setdefault(block)
    # A module around other blocks (the one element of a wrapper list holding the transformer, whose embedding
    # nodes fall back to it) is not a layer itself.
    order: dict[str, int] = {}
    for block in seen:
        if not any(other.startswith(block + ".") for other in seen):
            order[block] = len(order)
    for site in sites:
        site.layer = order.get(site.block) if site.block is not None else None
    return list(order)

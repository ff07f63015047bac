"""Turns the per-site cache buffers of a rewritten graph into trailing graph inputs, so that one compiled graph
serves every module instance (each instance passes its own caches).

Before (rewrite_* output, caches baked into the graph)      After
    x, w, ... = placeholders                                   x, w, ..., chipmunk_s3_o_cache, ... = placeholders
    o_cache = get_attr chipmunk_s3_o_cache                     (the buffer is gone from the GraphModule)
    o = chipmunk.attention(q, k, v, o_cache, ...)              o = chipmunk.attention(q, k, v, chipmunk_s3_o_cache,
                                                                                      ...)

Only per-site state (``chipmunk_s{index}_*``) moves; constants every instance shares (the token permutations,
``chipmunk_token_perm_*``) stay buffers. Dynamo graphs need every placeholder to carry ``_dynamo_source``
(AOTAutograd asserts it); the new ones have none (None: not user inputs, not static for CUDA graphs).
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

PER_SITE_STATE = re.compile(r"chipmunk_s\d+_")


def lift_site_state(gm: fx.GraphModule) -> tuple[list[str], list[torch.Tensor]]:
    """Moves every per-site state buffer of ``gm`` to a new trailing placeholder (in place; recompiles ``gm``).
    Returns (names, tensors) of the lifted buffers in placeholder order."""
    graph = gm.graph
    reads: dict[str, list[fx.Node]] = {}
    for node in graph.find_nodes(op="get_attr"):
        if PER_SITE_STATE.match(str(node.target)):
            reads.setdefault(str(node.target), []).append(node)
    placeholders = graph.find_nodes(op="placeholder")
    last = placeholders[-1] if placeholders else None
    names, tensors = [], []
    for name, nodes in reads.items():
        tensor = getattr(gm, name)
        if last is None:
            with graph.inserting_before(next(iter(graph.nodes), None)):
                new = graph.placeholder(name)
        else:
            with graph.inserting_after(last):
                new = graph.placeholder(name)
        new.meta.update(nodes[0].meta)
        new._dynamo_source = None
        for node in nodes:
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        delattr(gm, name)
        sources = getattr(gm, "_param_name_to_source", None)
        if sources is not None:
            sources.pop(name, None)
        names.append(name)
        tensors.append(tensor)
        last = new
    graph.lint()
    gm.recompile()
    return names, tensors

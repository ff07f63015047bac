"""Token layout of an attention site: which key columns belong to a short segment of a joint sequence.

MM-DiTs (Flux, SD3, HunyuanVideo) attend over one sequence built by concatenating text and image tokens:

    k = rope(cat([k_text, k_image], dim=token))        (double blocks: the cat is on the per-head keys)
    h = cat([text, image], dim=token); k = proj(norm(h))  (single blocks: the cat is upstream of the block)

Walking back from k (breadth first, nearest first) to the first concatenation along an axis whose size is
the key count finds the segments. The shortest segment, when it is shorter than half the keys, is taken as
the static columns that every query group always keeps (the text tokens, per the method).
"""
from __future__ import annotations

import torch.fx as fx

from chipmunk_compile.passes.dataflow import producers_by_distance
from chipmunk_compile.passes.graph_utils import CAT_TARGETS, bind, dim_index, fake, is_call

_MAX_DEPTH = 60


def static_key_segment(dag, k: fx.Node, num_keys: int) -> tuple[int, int] | None:
    """(start, end) of the short segment of the key sequence, or None when no concatenation is found."""
    for node in producers_by_distance(dag, k, _MAX_DEPTH):
        if not (is_call(node, CAT_TARGETS, ("cat",)) and fake(node) is not None):
            continue
        bound = bind(node, ["tensors", "dim"], {"dim": 0})
        out = fake(node)
        axis = dim_index(bound["dim"], out.dim())
        if out.shape[axis] != num_keys or len(bound["tensors"]) < 2:
            continue
        sizes = [fake(t).shape[axis] for t in bound["tensors"]]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        shortest = min(range(len(sizes)), key=lambda i: sizes[i])
        if 0 < sizes[shortest] * 2 < num_keys:
            return starts[shortest], starts[shortest] + sizes[shortest]
        return None
    return None

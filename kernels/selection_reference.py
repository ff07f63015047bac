"""Torch reference for top-k selection with a random extra fraction and forced (static) entries.

``select_topk_with_random(scores [B, ..., N], num_top, num_random, forced (start, end) or None, generator)``
returns int64 indices [..., K], K = n_forced + num_top + num_random (clipped to N), in no particular order
(the kernels gather in any order; sorting cost more than it saved): every forced entry, then the ``num_top`` highest-scoring remaining entries, then ``num_random``
uniformly random entries among the rest. The random draw is the same for every sample of the batch (one draw
of shape scores.shape[1:] from ``generator``, on the scores' device), so a sample's result never depends on
its position in the batch or on the other samples.
"""
from __future__ import annotations

import torch


def selection_size(n: int, num_top: int, num_random: int, num_forced: int) -> int:
    return min(n, num_top + num_random + num_forced)


def select_topk_with_random(scores: torch.Tensor, num_top: int, num_random: int,
                            forced: tuple[int, int] | None, generator: torch.Generator | None, out=None):
    """``out`` (optional): written with the indices (any integer dtype) and returned."""
    selected = _select(scores, num_top, num_random, forced, generator)
    return selected if out is None else out.copy_(selected)


def _select(scores, num_top, num_random, forced, generator):
    # The forced entries are a static range, so their count is known without reading the device (no sync).
    n = scores.shape[-1]
    num_forced = 0 if forced is None else forced[1] - forced[0]
    k_total = selection_size(n, num_top, num_random, num_forced)
    if k_total == n:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n).contiguous()
    s = scores.float()
    if forced is not None:
        s = s.clone()  # the caller's scores stay untouched
        s[..., forced[0]:forced[1]] = float("inf")
    num_top_total = min(n, num_forced + num_top)
    num_random = k_total - num_top_total
    top = torch.topk(s, num_top_total, dim=-1, sorted=False).indices
    if num_random > 0:
        noise = torch.empty(s.shape[1:], dtype=torch.float32, device=scores.device)
        noise = noise.uniform_(generator=generator).expand_as(s).clone()
        noise.scatter_(-1, top, -1.0)  # already taken
        extra = torch.topk(noise, num_random, dim=-1, sorted=False).indices
        top = torch.cat([top, extra], dim=-1)
    return top

"""Token reordering: which permutation of a site's sequence puts spatially close image tokens next to each other.

Query groups (attention) and token blocks (MLP) share one selection among consecutive tokens. In raster order a
group of 192 tokens of a 64-wide latent is a 3-row strip; ordered tile by tile (8x8 tiles) it is a compact
24x8 region whose tokens attend to similar keys and activate similar hidden units (the method's reordering).

    sequence (raster)   [text | image t,h,w raster]          perm: position in the reordered sequence -> token
    reordered           [text | tile 0 (raster) | tile 1 | …]

The permutation leaves non-image tokens where they are. The ops gather their queries / inputs with ``perm``
and scatter their outputs back with ``unperm``, so the graph around them never sees the reordering; dense steps
stay exact.
"""
from __future__ import annotations

import torch


def image_segment(num_tokens: int, grid: tuple[int, int, int], short_segment: tuple[int, int] | None):
    """Start of the image tokens in a site's sequence of ``num_tokens``, or None when the sequence is not the
    image grid alone or the image grid plus one known short (text) segment at either end."""
    num_image = grid[0] * grid[1] * grid[2]
    if num_tokens == num_image:
        return 0
    if short_segment is None or num_tokens - num_image != short_segment[1] - short_segment[0]:
        return None
    if short_segment[0] == 0:
        return short_segment[1]
    if short_segment[1] == num_tokens:
        return 0
    return None


def tile_permutation(num_tokens: int, image_start: int, grid: tuple[int, int, int],
                     tile: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, unperm), int64 [num_tokens]: reordered position -> token, and its inverse. Image tokens (raster
    order t, h, w from ``image_start``) are sorted by tile (tiles in raster order), then raster order inside the
    tile; edge tiles may be smaller when the grid is not a multiple of the tile."""
    frames, height, width = grid
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    tile_t, tile_h, tile_w = t // tile[0], h // tile[1], w // tile[2]
    tiles_h, tiles_w = -(-height // tile[1]), -(-width // tile[2])
    tile_index = (tile_t * tiles_h + tile_h) * tiles_w + tile_w
    inner = ((t % tile[0]) * tile[1] + h % tile[1]) * tile[2] + w % tile[2]
    key = tile_index.flatten() * (tile[0] * tile[1] * tile[2]) + inner.flatten()
    image_order = torch.argsort(key, stable=True) + image_start
    perm = torch.arange(num_tokens)
    perm[image_start:image_start + key.numel()] = image_order
    unperm = torch.empty_like(perm)
    unperm[perm] = torch.arange(num_tokens)
    return perm, unperm


def site_permutation(gm, dag, sequence_node, num_tokens: int, options, before, device):
    """get_attr nodes (perm, unperm) of a site whose token axis has ``num_tokens`` and flows through
    ``sequence_node`` (keys for attention, the input for an MLP), registered as buffers; (None, None) when
    ``token_grid`` is off or the site's sequence is not the image grid (plus a text segment)."""
    from chipmunk_compile.passes.state_buffers import add_state_buffer
    from chipmunk_compile.passes.token_layout import static_key_segment

    if options.token_grid is None:
        return None, None
    short = static_key_segment(dag, sequence_node, num_tokens) if dag is not None else None
    start = image_segment(num_tokens, options.token_grid, short)
    if start is None:
        return None, None
    # One buffer pair per distinct permutation, shared by every site with it (less memory, and per-permutation
    # derived data such as the MLP's block-averaging matrix is then built once per graph, not once per site).
    names = (f"chipmunk_token_perm_n{num_tokens}_s{start}", f"chipmunk_token_unperm_n{num_tokens}_s{start}")
    if hasattr(gm, names[0]):
        nodes = []
        for name in names:
            with gm.graph.inserting_before(before):
                node = gm.graph.get_attr(name)
            node.meta["example_value"] = torch.empty_like(getattr(gm, name), device="meta")
            nodes.append(node)
        return tuple(nodes)
    perm, unperm = tile_permutation(num_tokens, start, options.token_grid, options.token_tile)
    return (add_state_buffer(gm, names[0], perm.to(device), before),
            add_state_buffer(gm, names[1], unperm.to(device), before))

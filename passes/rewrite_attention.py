"""Rewrites an attention site into ``torch.ops.chipmunk.attention`` with its cache buffers.

Before                                         After
    o = sdpa(q, k, v, [mask], scale=s)             o_cache   = get_attr chipmunk_s3_o_cache     [I, B, H, N, Dv]
      (or softmax(q @ k^T * s) @ v)                lse_cache = get_attr chipmunk_s3_lse          [I, B, H, N] f32
                                                   indices   = get_attr chipmunk_s3_indices      [I, B, H, G, K]
                                                   o = chipmunk.attention(q, k, v, o_cache, lse_cache, indices,
                                                                          bias, s, static_lo, static_hi, rt, 3)
A key-padding ``mask`` [B|1, 1, 1, Nk] becomes ``bias = key_bias_from_mask(mask, B, Nk)`` (float32 [B, Nk]), one
node per mask shared by all sites (None without a mask); with token_grid set, the op also gets the site's token
permutation buffers (passes/token_order.py; else None, None).

3-D attention ([B, N, D]) is viewed as one head: q.unsqueeze(1) ... o.squeeze(1).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from chipmunk_compile.kernels.attention_op import attention_selection_counts
from chipmunk_compile.kernels.attention_reference import key_bias_from_mask
from chipmunk_compile.passes.graph_utils import fake
from chipmunk_compile.passes.sites import Site
from chipmunk_compile.passes.state_buffers import add_state_buffer
from chipmunk_compile.passes.token_order import site_permutation
from chipmunk_compile.passes.token_layout import static_key_segment


def _key_bias_node(graph: fx.Graph, mask, batch: int, num_keys: int):
    """The key-padding mask as a float32 per-key bias [B, Nk], computed once in the graph right after the mask
    (every site sharing the mask reuses that node); None without a mask."""
    if mask is None:
        return None
    for user in mask.users:
        if user.target is key_bias_from_mask and user.args[1:] == (batch, num_keys):
            return user
    with graph.inserting_after(mask):
        return graph.call_function(key_bias_from_mask, (mask, batch, num_keys))


def rewrite_attention(gm: fx.GraphModule, site: Site, site_index: int, runtime_id: int, options, dag,
                      cache_device=None) -> None:
    graph = gm.graph
    q, k, v, out = (site.nodes[r] for r in ("q", "k", "v", "out"))
    fq, fk, fv = fake(q), fake(k), fake(v)
    three_d = fq.dim() == 3
    B, H, N = (fq.shape[0], 1, fq.shape[1]) if three_d else tuple(fq.shape[:3])
    num_keys, dv = fk.shape[-2], fv.shape[-1]

    segment = static_key_segment(dag, k, num_keys) if options.attn_static_columns == "auto" else None
    static_lo, static_hi = segment if segment else (0, 0)
    num_top, num_random, total = attention_selection_counts(num_keys, static_hi - static_lo, options)
    groups = -(-N // options.attn_query_group)
    inv = options.invocations_per_step
    dev = cache_device or fq.device
    prefix = f"chipmunk_s{site_index}"
    with torch.no_grad():
        o_cache = add_state_buffer(gm, f"{prefix}_o_cache", torch.zeros(inv, B, H, N, dv, dtype=fq.dtype,
                                                                        device=dev), out)
        lse_cache = add_state_buffer(gm, f"{prefix}_lse_cache",
                                     torch.zeros(inv, B, H, N, dtype=torch.float32, device=dev), out)
        indices = add_state_buffer(gm, f"{prefix}_indices",
                                   torch.zeros(inv, B, H, groups, total, dtype=torch.int32, device=dev), out)
        perm, unperm = site_permutation(gm, dag, k, N, options, out, dev)
    with graph.inserting_before(out):
        if three_d:
            q, k, v = (graph.call_method("unsqueeze", (t, 1)) for t in (q, k, v))
        key_bias = _key_bias_node(graph, site.nodes.get("key_mask"), B, num_keys)
        new = graph.call_function(torch.ops.chipmunk.attention.default,
                                  (q, k, v, o_cache, lse_cache, indices, key_bias, perm, unperm,
                                   float(site.details["scale"]), static_lo, static_hi, runtime_id, site_index))
        result = graph.call_method("squeeze", (new, 1)) if three_d else new
    new.meta.update(out.meta)
    out.replace_all_uses_with(result)
    graph.erase_node(out)
    site.details.update({"batch": B, "heads": H, "queries": N, "head_dim": fq.shape[-1], "value_dim": dv,
                         "keys": num_keys, "kept_keys": total, "top": num_top, "random": num_random,
                         "static_columns": [static_lo, static_hi] if segment else None,
                         "query_groups": groups, "token_order": "tiles" if perm is not None else "raster"})

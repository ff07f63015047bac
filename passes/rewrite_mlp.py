"""Rewrites an MLP site into ``torch.ops.chipmunk.mlp`` with its cache buffers.

plain / gated:
    y = linear(act(linear(x, W1, b1)) [* up], W2, b2)     ->   y = chipmunk.mlp(x, Wg, bg, Wu, bu, W2, b2, caches..)
    GEGLU/SwiGLU chunk form: Wu = W[:F], Wg = W[F:] (narrow views of the one projection weight)

fused_out (single-stream blocks):
    y = linear(cat([o, act(linear(x, W1, b1))], -1), W, b)
 -> y = linear(o, W[:, :Do], b) + chipmunk.mlp(x, W1, b1, None, None, W[:, Do:], None, caches..)
    (the bias stays with the dense part, so it is counted once)

With token_grid set, the op also gets the site's token permutation buffers (perm, unperm; else None, None).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from chipmunk_compile.kernels.mlp_op import mlp_selection_counts
from chipmunk_compile.passes.graph_utils import fake
from chipmunk_compile.passes.sites import Site
from chipmunk_compile.passes.state_buffers import add_state_buffer
from chipmunk_compile.passes.token_order import site_permutation


def _projection(graph: fx.Graph, proj: dict, num_units: int):
    """(weight, bias) nodes of one gated factor; chunk halves become narrow views."""
    weight, bias, half = proj["weight"], proj["bias"], proj["half"]
    if half is None:
        return weight, bias
    start = half * num_units
    weight = graph.call_function(torch.narrow, (weight, 0, start, num_units))
    if bias is not None:
        bias = graph.call_function(torch.narrow, (bias, 0, start, num_units))
    return weight, bias


def rewrite_mlp(gm: fx.GraphModule, site: Site, site_index: int, runtime_id: int, options, cache_device=None,
                dag=None) -> None:
    graph = gm.graph
    hidden, out, fused = site.nodes["hidden"], site.nodes["out"], site.nodes["fused"]
    x = hidden["x"]
    fx_ = fake(x)
    tokens = fx_.shape[-2] if fx_.dim() >= 3 else fx_.shape[0]
    batch = 1
    for size in fx_.shape[:-2]:
        batch *= size
    w_out_shape = fake(site.nodes["w_out"]).shape
    gate_fake = fake(hidden["gate"]["weight"])
    num_units = gate_fake.shape[0] // 2 if hidden["gate"]["half"] is not None else gate_fake.shape[0]
    d_out = w_out_shape[0]
    paths = 2 if hidden["up"] is not None else 1
    _, _, kept = mlp_selection_counts(num_units, options)
    blocks = -(-tokens // options.mlp_token_block)
    inv, dev = options.invocations_per_step, cache_device or fx_.device
    prefix = f"chipmunk_s{site_index}"
    with torch.no_grad():
        y_dtype = torch.float32 if options.mlp_output_cache_dtype == "float32" else fx_.dtype
        y_cache = add_state_buffer(gm, f"{prefix}_y_cache",
                                   torch.zeros(inv, batch, tokens, d_out, dtype=y_dtype, device=dev), out)
        # Unit-major [.., F, N]: the sparse kernels gather whole units (rows here) for a token block.
        a_cache = add_state_buffer(gm, f"{prefix}_a_cache",
                                   torch.zeros(inv, batch, num_units, tokens, dtype=fx_.dtype, device=dev), out)
        hbar = add_state_buffer(gm, f"{prefix}_hbar_cache",
                                torch.zeros(inv, batch, blocks, paths * num_units, dtype=torch.float32,
                                            device=dev), out)
        indices = add_state_buffer(gm, f"{prefix}_indices",
                                   torch.zeros(inv, batch, blocks, kept, dtype=torch.int32, device=dev), out)
        perm, unperm = site_permutation(gm, dag, x, tokens, options, out, dev) if fx_.dim() >= 3 else (None, None)
    with graph.inserting_before(out):
        w_gate, b_gate = _projection(graph, hidden["gate"], num_units)
        w_up, b_up = _projection(graph, hidden["up"], num_units) if hidden["up"] else (None, None)
        w2, b2 = site.nodes["w_out"], site.nodes["b_out"]
        if fused:
            other_width, mlp_width = (fused["sizes"][1 - fused["position"]], fused["sizes"][fused["position"]])
            other_start = 0 if fused["position"] == 1 else mlp_width
            mlp_start = other_width if fused["position"] == 1 else 0
            w_other = graph.call_function(torch.narrow, (w2, 1, other_start, other_width))
            w2 = graph.call_function(torch.narrow, (w2, 1, mlp_start, mlp_width))
            dense_part = graph.call_function(torch._C._nn.linear, (fused["other"], w_other, b2))
            b2 = None
        new = graph.call_function(torch.ops.chipmunk.mlp.default,
                                  (x, w_gate, b_gate, w_up, b_up, w2, b2, y_cache, a_cache, hbar, indices, perm,
                                   unperm, site.details["activation"], runtime_id, site_index))
        result = graph.call_function(torch.add, (dense_part, new)) if fused else new
    new.meta.update(out.meta)
    out.replace_all_uses_with(result)
    graph.erase_node(out)
    site.details.update({"batch": batch, "tokens": tokens, "d_in": fx_.shape[-1], "d_out": d_out,
                         "hidden_units": num_units, "kept_units": kept, "token_blocks": blocks,
                         "gated": paths == 2, "token_order": "tiles" if perm is not None else "raster"})

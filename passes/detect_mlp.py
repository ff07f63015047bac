"""Finds MLP sites: a second Linear fed by activated hidden units that a first Linear computed from x.

    plain:      y = linear(act(linear(x, W1, b1)), W2, b2)                      act: gelu, gelu-tanh, silu, relu
    gated:      y = linear(act(g) * u, W2, b2)    g, u = linear(x, W1).chunk(2, -1)   (GEGLU / SwiGLU: u first)
                                                  or g = linear(x, Wg), u = linear(x, Wu)  (LLaMA-style)
    fused_out:  y = linear(cat([other, act(linear(x, W1, b1))], -1), W, b)       (Flux / HunyuanVideo single
                blocks: the output projection of attention and MLP share one Linear; the rewrite splits W)

Dropout with p=0 (or training=False) may sit between the activation and the second Linear. Every intermediate
must have no other user. Only Linear-act-Linear inside repeated transformer blocks are sites: the timestep and
text embedders outside the blocks are not.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from chipmunk_compile.passes.graph_utils import (CAT_TARGETS, CHUNK_TARGETS, GELU_TARGETS, LINEAR_TARGETS,
                                                 RELU_TARGETS, SILU_TARGETS, bind, dim_index, fake, is_call,
                                                 single_user, unwrap_identity)
from chipmunk_compile.passes.detect_attention import SUPPORTED_DEVICES, SUPPORTED_DTYPES
from chipmunk_compile.passes.sites import Site, block_of, innermost_module


def _is_dtype_cast(node) -> bool:
    """x.float(), x.to(dtype) or x.to(dtype=...): a change of dtype only (no device move, no copy flags)."""
    if not (isinstance(node, fx.Node) and node.op == "call_method"):
        return False
    if node.target == "float":
        return len(node.args) == 1 and not node.kwargs
    if node.target == "to":
        rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "dtype"]
        return len(rest) == 1 and set(node.kwargs) <= {"dtype"} and isinstance(rest[0], torch.dtype)
    return False


def _peel_casts(node) -> tuple[fx.Node, list[fx.Node]]:
    """(the node under any dtype casts, the casts)."""
    casts = []
    while _is_dtype_cast(node):
        casts.append(node)
        node = node.args[0]
    return node, casts


def _activation(node) -> tuple[str, fx.Node, list[fx.Node]] | None:
    """(activation name, its input, the dtype casts around it) for gelu / gelu-tanh / silu / relu nodes. An
    activation computed in float32 between 16-bit linears (``silu(h.float()).to(h.dtype)``, Lumina2's FP32SiLU)
    is what the chipmunk op's float32 epilogue computes, so the casts are part of the pattern."""
    node, casts = _peel_casts(node)
    if is_call(node, GELU_TARGETS, ("gelu",)):
        bound = bind(node, ["input", "approximate"], {"approximate": "none"})
        name, pre = ("gelu_tanh" if bound["approximate"] == "tanh" else "gelu"), bound["input"]
    elif is_call(node, SILU_TARGETS, ("silu",)):
        name, pre = "silu", node.args[0]
    elif is_call(node, RELU_TARGETS, ("relu",)):
        name, pre = "relu", node.args[0]
    else:
        return None
    pre, inner = _peel_casts(pre)
    return name, pre, [*casts, node, *inner]


def _linear_parts(node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(x, weight, bias) of a linear call whose weight is a graph input (a parameter), else None."""
    if not is_call(node, LINEAR_TARGETS):
        return None
    bound = bind(node, ["input", "weight", "bias"], {"bias": None})
    weight = bound["weight"]
    if not isinstance(weight, fx.Node) or fake(weight) is None or fake(weight).dim() != 2:
        return None
    return bound["input"], weight, bound["bias"]


def _chunk_half(node) -> tuple[fx.Node, int] | None:
    """(the linear node, half index) for getitem(chunk(linear(x), 2, dim=-1), i)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    chunk, half = node.args
    if not is_call(chunk, CHUNK_TARGETS, ("chunk",)):
        return None
    bound = bind(chunk, ["input", "chunks", "dim"], {"dim": 0})
    src = bound["input"]
    if bound["chunks"] != 2 or fake(src) is None or dim_index(bound["dim"], fake(src).dim()) != fake(src).dim() - 1:
        return None
    return src, half


def _gate_projection(node) -> dict | None:
    """Resolves one factor of a gated product to {weight, bias, half} (half: None, 0 or 1 of a chunk)."""
    half = _chunk_half(node)
    lin = half[0] if half else node
    parts = _linear_parts(lin)
    if parts is None:
        return None
    return {"x": parts[0], "weight": parts[1], "bias": parts[2], "half": half[1] if half else None,
            "linear": lin}


def _hidden(node) -> dict | None:
    """Matches the activated hidden units feeding the second linear."""
    act = _activation(node)
    if act is not None:
        name, pre, act_nodes = act
        parts = _linear_parts(pre)
        if parts is None:
            return None
        return {"variant": "plain", "activation": name, "x": parts[0],
                "gate": {"weight": parts[1], "bias": parts[2], "half": None, "linear": pre}, "up": None,
                "internal": [pre, *act_nodes]}
    if is_call(node, {operator.mul, torch.mul}, ("mul",)) and len(node.args) == 2:
        for act_side, up_side in ((0, 1), (1, 0)):
            act = _activation(node.args[act_side])
            if act is None:
                continue
            gate, up = _gate_projection(act[1]), _gate_projection(node.args[up_side])
            if gate is None or up is None or gate["x"] is not up["x"]:
                continue
            if (gate["half"] is None) != (up["half"] is None):
                continue
            if gate["half"] is not None and (gate["linear"] is not up["linear"] or gate["half"] == up["half"]):
                continue
            internal = [*act[2], act[1], node.args[up_side], gate["linear"], up["linear"]]
            return {"variant": "gated", "activation": act[0], "x": gate["x"], "gate": gate, "up": up,
                    "internal": internal}
    return None


def _intermediates_private(hidden: dict, out: fx.Node) -> bool:
    """Every node between x and the output is used only inside the pattern."""
    allowed = set(hidden["internal"]) | {out}
    for node in hidden["internal"]:
        for user in node.users:
            if user in allowed:
                continue
            # chunk -> getitem pairs of a gated projection are internal too
            if user.op in ("call_method", "call_function") and all(u in allowed for u in user.users):
                continue
            return False
    return True


# A 2-D MLP input with fewer rows than this is a batch of conditioning vectors, not flattened tokens.
_MIN_FLAT_TOKENS = 64


def _site_reason(x, w_out) -> str:
    fx_ = fake(x)
    if fx_ is None:
        return "no shape information for x"
    if fx_.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {fx_.dtype}"
    if fx_.device.type not in SUPPORTED_DEVICES:
        return f"unsupported device {fx_.device}"
    if any(isinstance(s, torch.SymInt) for s in fx_.shape):
        return "symbolic (dynamic) shapes; compile with dynamic=False"
    if fx_.dim() < 2 or (fx_.dim() == 2 and fx_.shape[0] < _MIN_FLAT_TOKENS):
        # [batch, features]: a conditioning vector (e.g. the timestep embedder DiT's AdaLayerNormZero holds in
        # every block), not a token sequence; it changes completely at every step, so cached units go stale.
        # (Tokens flattened to [batch * tokens, features] stay sites.)
        return f"no token axis (input of shape {tuple(fx_.shape)}, e.g. a timestep embedding)"
    return ""


def _mlp_site(out: fx.Node) -> Site | None:
    parts = _linear_parts(out)
    if parts is None:
        return None
    feed, w_out, b_out = parts
    feed = unwrap_identity(feed)
    fused = None
    if is_call(feed, CAT_TARGETS, ("cat",)):
        bound = bind(feed, ["tensors", "dim"], {"dim": 0})
        pieces = list(bound["tensors"])
        if len(pieces) != 2 or dim_index(bound["dim"], fake(feed).dim()) != fake(feed).dim() - 1:
            return None
        for pos in (1, 0):
            hidden = _hidden(unwrap_identity(pieces[pos]))
            if hidden is not None:
                sizes = [fake(p).shape[-1] for p in pieces]
                fused = {"cat": feed, "position": pos, "other": pieces[1 - pos], "sizes": sizes}
                break
        else:
            return None
        hidden["internal"] += [pieces[fused["position"]]]
    else:
        hidden = _hidden(feed)
        if hidden is None:
            return None
        hidden["internal"] += [feed]
    module = innermost_module(out)
    site = Site(kind="mlp", module=module, block=block_of(out),
                variant="fused_out" if fused else hidden["variant"],
                nodes={"x": hidden["x"], "out": out, "w_out": w_out, "b_out": b_out, "hidden": hidden,
                       "fused": fused},
                details={"activation": hidden["activation"]})
    if site.block is None or block_of(hidden["gate"]["linear"]) != site.block:
        return None  # embedders, heads, and chains that cross a block boundary are not MLP sites
    internal_ok = _intermediates_private(hidden, fused["cat"] if fused else out)
    internal_ok = internal_ok and (fused is None or single_user(fused["cat"]))
    site.reason = "" if internal_ok else "intermediate activations are used elsewhere"
    site.reason = site.reason or _site_reason(hidden["x"], w_out)
    return site


def site_nodes(site: Site) -> set:
    """The nodes an MLP site's op replaces: its linears, activations and products, up to the output."""
    hidden = site.nodes["hidden"]
    nodes = set(hidden["internal"]) | {site.nodes["out"], hidden["gate"]["linear"]}
    if hidden["up"] is not None:
        nodes.add(hidden["up"]["linear"])
    return nodes


def find_mlp_sites(graph: fx.Graph) -> list[Site]:
    """MLP sites in graph order. A chain Linear-act-Linear-act-Linear matches twice, sharing the middle linear:
    the first match is the site and the second is reported as overlapping (rewriting both would keep the first
    op's work while the second recomputes the shared activations densely)."""
    sites = []
    claimed: dict = {}
    for node in graph.nodes:
        site = _mlp_site(node)
        if site is None:
            continue
        nodes = site_nodes(site)
        overlap = next((claimed[n] for n in nodes if n in claimed), None)
        if overlap is not None:
            site.reason = site.reason or f"overlaps the MLP site at {overlap.module}"
        elif not site.reason:
            claimed.update((n, site) for n in nodes)
        sites.append(site)
    return sites

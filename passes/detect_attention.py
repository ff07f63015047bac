"""Finds attention sites in the Dynamo graph and decides whether each can take the delta-cache form.

Two shapes are recognised (both produce a ``Site(kind="attention")`` whose nodes are q, k, v and the output):

    SDPA:    o = scaled_dot_product_attention(q, k, v, [attn_mask], [dropout_p], [is_causal], [scale], [enable_gqa])
             (positional or keyword arguments, as diffusers' processors and dispatch_attention_fn pass them)
    manual:  s = q @ k.transpose(-2, -1) [* c | / c];  p = softmax(s, dim=-1) [.to(dtype)];  o = p @ v

A site is left dense (``reason`` says why) for an attention mask other than a key-padding mask [B|1, 1, 1, Nk]
(which is kept as the site's ``key_mask`` node), dropout, causal attention, cross-attention (keys from another
sequence than the queries), an unsupported dtype/device or a non-constant scale.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from chipmunk_compile.passes.graph_utils import (MATMUL_TARGETS, SDPA_TARGETS, SOFTMAX_TARGETS, bind, fake,
                                                 is_call, single_user)
from chipmunk_compile.passes.sites import OUTSIDE_BLOCKS, Site, block_of, innermost_module

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DEVICES = ("cpu", "cuda")

_SDPA_ARGS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _tensor_reason(q, k, v) -> str:
    fq, fk, fv = fake(q), fake(k), fake(v)
    if fq is None or fk is None or fv is None:
        return "no shape information for q/k/v"
    if not (fq.dim() == fk.dim() == fv.dim() and fq.dim() in (3, 4)):
        return f"q/k/v must be [B, H, N, D] or [B, N, D] (got {fq.dim()}/{fk.dim()}/{fv.dim()}-D)"
    if fq.dtype not in SUPPORTED_DTYPES or fk.dtype != fq.dtype or fv.dtype != fq.dtype:
        return f"unsupported dtype {fq.dtype}/{fk.dtype}/{fv.dtype} (float16, bfloat16, float32 supported)"
    if fq.device.type not in SUPPORTED_DEVICES:
        return f"unsupported device {fq.device}"
    symbolic = [s for t in (fq, fk, fv) for s in t.shape if isinstance(s, torch.SymInt)]
    if symbolic:
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
        if any(free_unbacked_symbols(s) for s in symbolic):
            return ("data-dependent sequence length (e.g. tokens selected with torch.nonzero / boolean indexing); "
                    "a key-padding attn_mask [B, 1, 1, N] takes the sparse path instead")
        return "symbolic (dynamic) shapes; compile with dynamic=False"
    if fk.shape[-2] != fq.shape[-2]:
        return f"cross-attention ({fq.shape[-2]} queries over {fk.shape[-2]} keys from another sequence)"
    if fq.dim() == 4 and fq.shape[1] % fk.shape[1] != 0:
        return "key/value heads do not divide query heads"
    return ""


def _key_padding_reason(mask, q, k) -> str:
    """'' for a key-padding mask (one row of keys per sample, shared by every head and query: [B|1, 1, 1, Nk],
    bool or additive float); otherwise why the masked site stays dense."""
    fm, fq, fk = fake(mask) if isinstance(mask, fx.Node) else None, fake(q), fake(k)
    if fm is None:
        return "attention mask without shape information (stays dense)"
    if fq.dim() != 4:
        return "attention mask on 3-D attention (stays dense)"
    batch, num_keys = fq.shape[0], fk.shape[-2]
    if fm.dim() != 4 or tuple(fm.shape[1:]) != (1, 1, num_keys) or fm.shape[0] not in (1, batch):
        return (f"attention mask of shape {tuple(fm.shape)}: only key-padding masks [B, 1, 1, {num_keys}] take the "
                "sparse path (other masks stay dense)")
    if fm.dtype != torch.bool and not fm.dtype.is_floating_point:
        return f"attention mask of dtype {fm.dtype} (bool or floating masks supported)"
    return ""


def _sdpa_site(node: fx.Node) -> Site:
    args = bind(node, _SDPA_ARGS, _SDPA_DEFAULTS)
    q, k, v = args["query"], args["key"], args["value"]
    reason = _tensor_reason(q, k, v)
    mask = args["attn_mask"]
    if not reason and mask is not None:
        reason = _key_padding_reason(mask, q, k)
    if not reason and args["dropout_p"] != 0.0:
        reason = "dropout in attention"
    if not reason and args["is_causal"] is not False:
        reason = "causal attention"
    if not reason and not (args["scale"] is None or isinstance(args["scale"], (int, float))):
        reason = "scale is not a constant"
    if not reason and fake(k).shape[:-2] != fake(q).shape[:-2] and not args["enable_gqa"]:
        reason = "key/value heads differ from query heads without enable_gqa"
    scale = args["scale"] if not reason and args["scale"] is not None else None
    if not reason and scale is None:
        scale = 1.0 / math.sqrt(fake(q).shape[-1])
    module = innermost_module(node)
    nodes = {"q": q, "k": k, "v": v, "out": node}
    if mask is not None and not reason:
        nodes["key_mask"] = mask
    return Site(kind="attention", module=module, block=block_of(node), variant="sdpa", nodes=nodes, reason=reason,
                details={"scale": scale} if scale is not None else {})


_TRANSPOSE_METHODS = ("transpose", "permute", "mT")


def _untransposed_key(kt: fx.Node):
    """k for kT = k.transpose(-2, -1) / k.transpose(2, 3) / k.mT / torch.transpose(k, -2, -1), else None."""
    if not isinstance(kt, fx.Node):
        return None
    if kt.op == "call_function" and kt.target is getattr and kt.args[1] == "mT":
        return kt.args[0]
    is_transpose = (kt.op == "call_method" and kt.target == "transpose") or (
        kt.op == "call_function" and kt.target is torch.transpose)
    if is_transpose:
        src, d0, d1 = kt.args[0], kt.args[1], kt.args[2]
        ndim = fake(src).dim() if fake(src) is not None else 0
        if sorted([d0 % ndim, d1 % ndim]) == [ndim - 2, ndim - 1]:
            return src
    return None


def _manual_site(softmax: fx.Node) -> Site | None:
    dim = bind(softmax, ["input", "dim"], {"dim": None})
    ndim = fake(softmax).dim() if fake(softmax) is not None else 0
    if dim["dim"] is None or dim["dim"] % max(ndim, 1) != ndim - 1:
        return None
    scores = dim["input"]
    while scores.op == "call_method" and scores.target in ("float", "to") and single_user(scores):
        scores = scores.args[0]
    scale = 1.0
    if is_call(scores, {operator.mul, torch.mul}, ("mul",)) and isinstance(scores.args[1], (int, float)):
        scale, scores = float(scores.args[1]), scores.args[0]
    elif is_call(scores, {operator.truediv, torch.div}, ("div",)) and isinstance(scores.args[1], (int, float)):
        scale, scores = 1.0 / float(scores.args[1]), scores.args[0]
    if not is_call(scores, MATMUL_TARGETS, ("matmul",)) or not single_user(scores):
        return None
    q, k = scores.args[0], _untransposed_key(scores.args[1])
    if k is None:
        return None
    probs = softmax
    users = list(probs.users)
    if len(users) == 1 and users[0].op == "call_method" and users[0].target in ("to", "type_as"):
        probs = users[0]
        users = list(probs.users)
    if len(users) != 1 or not is_call(users[0], MATMUL_TARGETS, ("matmul",)) or users[0].args[0] is not probs:
        return None
    out = users[0]
    module = innermost_module(softmax)
    reason = "" if single_user(softmax) else "softmax probabilities used elsewhere"
    reason = reason or _tensor_reason(q, k, out.args[1])
    return Site(kind="attention", module=module, block=block_of(softmax), variant="manual",
                nodes={"q": q, "k": k, "v": out.args[1], "out": out}, reason=reason,
                details={"scale": scale})


def find_attention_sites(graph: fx.Graph) -> list[Site]:
    sites = []
    for node in graph.nodes:
        if is_call(node, SDPA_TARGETS):
            sites.append(_sdpa_site(node))
        elif is_call(node, SOFTMAX_TARGETS, ("softmax",)):
            site = _manual_site(node)
            if site is not None:
                sites.append(site)
    for site in sites:
        if not site.reason and site.block is None:
            site.reason = OUTSIDE_BLOCKS
    return sites

"""Finds attention sites in the Dynamo graph and decides whether each can take the delta-cache form.

Two shapes are recognised (both produce a ``Site(kind="attention")`` whose nodes are q, k, v and the output):

    SDPA:    o = scaled_dot_product_attention(q, k, v, [attn_mask], [dropout_p], [is_causal], [scale], [enable_gqa])
             (positional or keyword arguments, as diffusers' processors and dispatch_attention_fn pass them)
    manual:  s = q @ k.transpose(-2, -1) [* c | / c];  p = softmax(s, dim=-1) [.to(dtype)];  o = p @ v

A site is left dense (``reason`` says why) for an attention mask, dropout, causal attention, cross-attention
(keys from another sequence than the queries), an unsupported dtype/device or a non-constant scale.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from chipmunk_compile.passes.graph_utils import (MATMUL_TARGETS, SDPA_TARGETS, SOFTMAX_TARGETS, bind, fake,
                                                 is_call, single_user)
from chipmunk_compile.passes.sites import Site, block_of, innermost_module

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
    if any(isinstance(s, torch.SymInt) for t in (fq, fk, fv) for s in t.shape):
        return "symbolic (dynamic) shapes; compile with dynamic=False"
    if fk.shape[-2] != fq.shape[-2]:
        return f"cross-attention ({fq.shape[-2]} queries over {fk.shape[-2]} keys from another sequence)"
    if fq.dim() == 4 and fq.shape[1] % fk.shape[1] != 0:
        return "key/value heads do not divide query heads"
    return ""


def _sdpa_site(node: fx.Node) -> Site:
    args = bind(node, _SDPA_ARGS, _SDPA_DEFAULTS)
    q, k, v = args["query"], args["key"], args["value"]
    reason = _tensor_reason(q, k, v)
    if not reason and args["attn_mask"] is not None:
        reason = "attention mask (masked attention stays dense)"
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
    return Site(kind="attention", module=module, block=block_of(node), variant="sdpa",
                nodes={"q": q, "k": k, "v": v, "out": node}, reason=reason,
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
            site.reason = "outside the repeated transformer blocks"
    return sites

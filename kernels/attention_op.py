"""``torch.ops.chipmunk.attention``: the stateful delta-cache attention op that replaces an SDPA site.

Before (Dynamo graph)                       After
    o = sdpa(q, k, v, [mask], scale=s)          o = chipmunk.attention(q, k, v, o_cache, lse_cache, indices, bias,
                                                                       perm, unperm, s, static_start, static_end,
                                                                       rt, site)

``bias`` is None or a key-padding mask as a per-key score bias, float32 [B, Nk] (0 / -inf for a bool mask, the
values of an additive mask; computed once in the graph), applied by every plan; masked keys are never selected. ``perm`` / ``unperm`` (token_grid
option) reorder the queries into spatial tiles before everything else and the output back after (at sparse
steps inside the kernel: it reads each query row at its token and writes the result there).

The caches (GraphModule buffers, or graph inputs of a graph shared by module instances: passes/lift_state.py) have a
leading invocation axis ([I, B, H, ...]); the op mutates only the
slice of the current invocation. What it does at a call depends on the host-side runtime (step, flags):

    plan          when                                  computes
    dense         mode="dense"                          plain SDPA
    dense_lse     first dense step (no LSE yet)         O, LSE                         -> lse_cache
    dense_select  later dense steps                     O, LSE, column mass(LSE_prev)  -> indices, lse_cache,
                                                        O_cache = O - P^S              -> o_cache
    dense_cache   dense step, attn_recompute_mask=False O, LSE, O_cache = O - P^S (old indices)
    sparse        sparse steps                          O_cache + P^S (P^S over the selected columns only)

A scheduled sparse step whose caches are not filled yet runs the matching dense plan instead, so a schedule
can never read an empty cache. Every plan returns O laid out token-major ([B, N, H, D] memory seen as
[B, H, N, D]), as CUDA's SDPA does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chipmunk_compile import runtime
from chipmunk_compile.kernels.dispatch import implementation
from chipmunk_compile.kernels.op_registration import register_stateful_op


def attention_selection_counts(num_keys: int, num_static: int, options) -> tuple[int, int, int]:
    """(num_top, num_random, total) key columns kept per query group; total is a multiple of attn_kv_tile
    (unless it is all keys) and all three are fixed at compile time so the index buffer has a static shape."""
    num_random = math.ceil(options.attn_random_fraction * num_keys)
    num_keep = math.ceil((1.0 - options.attn_sparsity) * num_keys - 1e-9)
    tile = options.attn_kv_tile
    total = min(num_keys, -(-(num_static + num_keep + num_random) // tile) * tile)
    num_random = min(num_random, total - num_static)
    return total - num_static - num_random, num_random, total


def choose_plan(rt, flags) -> str:
    if rt.options.mode == "dense":
        return "dense"
    if rt.cache_slot is None:
        runtime.no_cache_slot(rt)
        return "dense"
    if rt.options.attention_dense_at(rt.step) or not flags.has_cache:
        if not flags.has_lse:
            return "dense_lse"
        if rt.options.attn_recompute_mask or not flags.has_indices:
            return "dense_select"
        return "dense_cache"
    return "sparse"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_cache: torch.Tensor, lse_cache: torch.Tensor,
              indices: torch.Tensor, key_bias: torch.Tensor | None, token_perm: torch.Tensor | None,
              token_unperm: torch.Tensor | None, scale: float, static_start: int, static_end: int, runtime_id: int,
              site_index: int) -> torch.Tensor:
    rt = runtime.lookup(runtime_id)
    plan = choose_plan(rt, rt.site_flags(site_index))
    rt.count(f"attention:{plan}")
    if token_perm is None or plan in ("dense", "sparse"):
        # Sparse steps reorder inside the kernel (queries read, outputs written at their tokens); plain SDPA
        # needs no reordering at all.
        return _attention(plan, rt, q, k, v, o_cache, lse_cache, indices, key_bias, token_perm, scale,
                          static_start, static_end, site_index)
    # Dense steps: queries (and so the query groups and caches) in tile order; keys need no reordering.
    o = _attention(plan, rt, select_tokens(q, 2, token_perm), k, v, o_cache, lse_cache, indices, key_bias, None,
                   scale, static_start, static_end, site_index)
    return select_tokens(o, 2, token_unperm)


def empty_token_major(q: torch.Tensor, head_dim: int) -> torch.Tensor:
    """An output [B, H, N, head_dim] laid out token-major ([B, N, H, head_dim] memory), as CUDA's SDPA returns
    it: the model's usual ``o.transpose(1, 2).reshape(B, N, H * D)`` is then a view, not a copy, and the
    token reordering's gather of the output copies whole rows."""
    B, H, N = q.shape[:3]
    return q.new_empty((B, N, H, head_dim)).transpose(1, 2)


def as_token_major(o: torch.Tensor) -> torch.Tensor:
    """o itself when token-major, else a token-major copy (the op's outputs all have that layout)."""
    return o if o.transpose(1, 2).is_contiguous() else o.transpose(1, 2).contiguous().transpose(1, 2)


def select_tokens(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """t.index_select(dim, index), gathered through the token-major view when t is one ([B, H, N, D] as a
    transpose of contiguous [B, N, H, D], the layout the projections give q): there PyTorch copies whole
    contiguous rows, at twice the speed of its strided gather (H100: 0.026 vs 0.050 ms at FLUX 1280x768,
    benchmarks/token_gather.py). The result keeps t's layout, which the kernels accept."""
    token_major = t.transpose(1, dim)
    if dim != 1 and token_major.is_contiguous():
        return token_major.index_select(1, index).transpose(1, dim)
    return t.index_select(dim, index)


def _attention(plan: str, rt, q, k, v, o_cache, lse_cache, indices, key_bias, token_perm, scale: float,
               static_start: int, static_end: int, site_index: int) -> torch.Tensor:
    flags = rt.site_flags(site_index)
    if plan == "dense":
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        return as_token_major(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                             enable_gqa=k.shape[1] != q.shape[1]))

    opts, inv = rt.options, rt.cache_slot
    group = opts.attn_query_group
    dense_fn = implementation("dense_attention_lse_colmass", opts.kernels, q.device)
    delta_fn = implementation("sparse_attention_delta", opts.kernels, q.device)

    if plan == "sparse":
        return delta_fn(q, k, v, scale, indices[inv], group, o_cache[inv], 1.0, key_bias=key_bias,
                        out=empty_token_major(q, v.shape[-1]), token_perm=token_perm)

    lse_prev = lse_cache[inv] if plan == "dense_select" else None
    o, lse, colmass = dense_fn(q, k, v, scale, lse_prev, group, key_bias=key_bias)
    if plan == "dense_select":
        if key_bias is not None:  # masked keys rank last (their mass is 0 already; ties must not pick them)
            colmass = colmass.masked_fill(key_bias[:, None, None, :] == float("-inf"), float("-inf"))
        num_keys = k.shape[2]
        forced = (static_start, static_end) if static_end > static_start else None
        num_top, num_random, _ = attention_selection_counts(num_keys, static_end - static_start, opts)
        select = implementation("select_topk_with_random", opts.kernels, q.device)
        select(colmass, num_top, num_random, forced, rt.generator(site_index, q.device), out=indices[inv])
        flags.has_indices = True
    lse_cache[inv].copy_(lse)
    flags.has_lse = True
    if plan in ("dense_select", "dense_cache"):
        delta_fn(q, k, v, scale, indices[inv], group, o, -1.0, out=o_cache[inv], key_bias=key_bias)
        flags.has_cache = True
    return as_token_major(o)


def _attention_fake(q, k, v, o_cache, lse_cache, indices, key_bias, token_perm, token_unperm, scale, static_start,
                    static_end, runtime_id, site_index):
    return empty_token_major(q, v.shape[-1])


# The plan is chosen on the host at every call: registered cudagraph_unsafe (see op_registration.py).
attention_op = register_stateful_op(
    "chipmunk::attention",
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) o_cache, Tensor(b!) lse_cache, Tensor(c!) indices, "
    "Tensor? key_bias, Tensor? token_perm, Tensor? token_unperm, float scale, int static_start, int static_end, "
    "int runtime_id, int site_index) -> Tensor",
    attention, _attention_fake)

"""``torch.ops.chipmunk.mlp``: the stateful delta-cache MLP op that replaces a Linear-act-Linear site.

Before (Dynamo graph)                          After
    h = linear(x, W1, b1)                          y = chipmunk.mlp(x, Wg, bg, Wu, bu, W2, b2,
    a = act(h)          [* linear(x, Wu, bu)]                       y_cache, a_cache, hbar_cache, indices,
    y = linear(a, W2, b2)                                           perm, unperm, act, rt, site)

Caches (GraphModule buffers, or graph inputs of a graph shared by module instances) have a leading invocation axis: y_cache [I, B, N, Dout] in the model's dtype (b2
included; float32 with mlp_output_cache_dtype='float32'),
a_cache [I, B, F, N] (the hidden activations, i.e. what multiplies W2; unit-major so
a unit's activations over a token block are contiguous for the kernels' gathers), hbar_cache [I, B, nb, P*F] float32
(block means of the pre-activations), indices [I, B, nb, K] (selected hidden units per token block).

    plan            when                                      computes
    dense           mode="dense"                              the plain MLP
    dense_fill      dense steps (and until caches exist)      the plain MLP; fills y, a and hbar caches
    sparse_refresh  sparse step that re-selects units         scores |hbar_new - hbar_cache| -> indices,
                                                              hbar_cache[S] = hbar_new[S], then as sparse
    sparse          other sparse steps                        y_cache += (act_new[S] - a_cache[S]) W2[:, S]^T,
                                                              a_cache[S] = act_new[S]; returns y_cache
x may have any number of leading axes: they are flattened into the batch axis of the caches. ``perm`` /
``unperm`` (token_grid option; else None) reorder the tokens into spatial tiles before everything else and the
output back after (at sparse steps inside the kernels: mm1 reads x rows at their tokens, mm2 writes the output
rows there).
"""
from __future__ import annotations

import math

import torch

from chipmunk_compile import runtime
from chipmunk_compile.kernels.dispatch import implementation
from chipmunk_compile.kernels.op_registration import register_stateful_op
from chipmunk_compile.kernels.mlp_reference import (ACTIVATIONS_INPLACE, block_averaging_matrix,
                                                   block_mean_preactivation, hidden_units)

import torch.nn.functional as F


def mlp_selection_counts(num_units: int, options) -> tuple[int, int, int]:
    """(num_top, num_random, total) hidden units kept per token block; total is a multiple of mlp_unit_tile
    unless it is all units."""
    num_random = math.ceil(options.mlp_random_fraction * num_units)
    num_keep = math.ceil((1.0 - options.mlp_sparsity) * num_units - 1e-9)
    tile = options.mlp_unit_tile
    total = min(num_units, -(-(num_keep + num_random) // tile) * tile)
    num_random = min(num_random, total)
    return total - num_random, num_random, total


def refresh_indices(xb, w_gate, b_gate, w_up, b_up, hbar_cache, indices, num_top: int, num_random: int,
                    token_block: int, generator, kernels: str = "auto", averaging=None):
    """A refresh step's selection, in place: indices [B, nb, K] <- the top ``num_top`` units by the change of
    their block-mean pre-activation plus ``num_random`` random ones; hbar_cache [B, nb, P*F] refreshed for them.
    ``averaging``: the token_grid blocks' averaging matrix (``block_averaging_matrix``) over xb in model order."""
    hbar_new = block_mean_preactivation(xb, w_gate, b_gate, w_up, b_up, token_block, weight_dtype_out=True,
                                        averaging=averaging)
    select = implementation("mlp_refresh_selection", kernels, xb.device)
    select(hbar_new, hbar_cache, w_gate.shape[0], num_top, num_random, generator, out=indices)


def choose_plan(rt, flags) -> str:
    opts = rt.options
    if opts.mode == "dense":
        return "dense"
    if rt.cache_slot is None:
        runtime.no_cache_slot(rt)
        return "dense"
    if opts.mlp_dense_at(rt.step) or not flags.has_cache:
        return "dense_fill"
    if opts.mlp_refresh_at(rt.step) or not flags.has_indices:
        return "sparse_refresh"
    return "sparse"


def _unit_major_hidden_into(out, x, w_gate, b_gate, w_up, b_up, activation):
    """out [F, N] = act(W x^T + b) for one sequence x [N, C] (the transposed hidden activations), computed in
    place in ``out`` (the activation cache: no temporary of the cache's size and no copy into it)."""
    def project(w, b, into=None):
        if b is None:
            return torch.mm(w, x.t(), out=into)
        return torch.addmm(b.unsqueeze(1), w, x.t(), out=into)
    # The activation cache is a contiguous slice in the activations' dtype (rewrite_mlp allocates it so).
    assert out.dtype == x.dtype and out.is_contiguous(), (out.dtype, x.dtype)
    ACTIVATIONS_INPLACE[activation](project(w_gate, b_gate, out))
    if w_up is not None:
        out.mul_(project(w_up, b_up))


def as_token_batches(x: torch.Tensor) -> torch.Tensor:
    """[*, N, C] -> [B, N, C] (2-D input is one sequence)."""
    return x.unsqueeze(0) if x.dim() == 2 else x.reshape(-1, x.shape[-2], x.shape[-1])


def mlp(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor | None,
        b_up: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, y_cache: torch.Tensor,
        a_cache: torch.Tensor, hbar_cache: torch.Tensor, indices: torch.Tensor, token_perm: torch.Tensor | None,
        token_unperm: torch.Tensor | None, activation: str, runtime_id: int, site_index: int) -> torch.Tensor:
    rt = runtime.lookup(runtime_id)
    flags = rt.site_flags(site_index)
    plan = choose_plan(rt, flags)
    rt.count(f"mlp:{plan}")
    if token_perm is None or plan in ("dense", "sparse", "sparse_refresh"):
        # Sparse steps reorder inside the kernels (x rows read, output rows written at their tokens); the plain
        # MLP needs no reordering at all.
        return _mlp(plan, rt, flags, x, w_gate, b_gate, w_up, b_up, w2, b2, y_cache, a_cache, hbar_cache, indices,
                    token_perm, activation, site_index)
    # Dense steps: token blocks (and the caches) in tile order; the output goes back to the model's order.
    y = _mlp(plan, rt, flags, x.index_select(-2, token_perm), w_gate, b_gate, w_up, b_up, w2, b2, y_cache, a_cache,
             hbar_cache, indices, None, activation, site_index)
    return y.index_select(-2, token_unperm)


def _mlp(plan: str, rt, flags, x, w_gate, b_gate, w_up, b_up, w2, b2, y_cache, a_cache, hbar_cache, indices,
         token_perm, activation: str, site_index: int) -> torch.Tensor:
    out_shape = (*x.shape[:-1], w2.shape[0])
    if plan == "dense":
        return F.linear(hidden_units(x, w_gate, b_gate, w_up, b_up, activation), w2, b2)
    opts, inv = rt.options, rt.cache_slot
    xb = as_token_batches(x)
    if plan == "dense_fill":
        # Computed unit-major (a^T = act(W x^T + b)), straight into the activation cache: no transposing copy.
        a_t = a_cache[inv]
        for b in range(xb.shape[0]):
            _unit_major_hidden_into(a_t[b], xb[b], w_gate, b_gate, w_up, b_up, activation)
        y = F.linear(a_t.transpose(-1, -2), w2, b2)
        y_cache[inv].copy_(y)
        hbar_cache[inv].copy_(block_mean_preactivation(xb, w_gate, b_gate, w_up, b_up, opts.mlp_token_block))
        flags.has_cache = True
        return y.reshape(out_shape)

    if plan == "sparse_refresh":
        num_top, num_random, _ = mlp_selection_counts(w_gate.shape[0], opts)
        # The block means are over the reordered token blocks: one averaging GEMM over x where that is exact,
        # else the mean of a reordered copy.
        x_blocks, averaging = xb, None
        if token_perm is not None:
            # Keyed by the token count: the sites of one token count share one permutation buffer.
            averaging = rt.derived(("block_averaging", token_perm.shape[0], x.dtype), token_perm,
                                   lambda perm: block_averaging_matrix(perm, opts.mlp_token_block, x.dtype))
            if averaging is None:
                x_blocks = xb.index_select(1, token_perm)
        refresh_indices(x_blocks, w_gate, b_gate, w_up, b_up, hbar_cache[inv], indices[inv], num_top, num_random,
                        opts.mlp_token_block, rt.generator(site_index, x.device), opts.kernels, averaging)
        flags.has_indices = True
    update = implementation("sparse_mlp_update", opts.kernels, x.device)
    if x.is_cuda:
        w2 = rt.derived(("w2_unit_major", site_index), w2, lambda w: w.t().contiguous().t())
    out = torch.empty(y_cache[inv].shape, dtype=x.dtype, device=x.device)
    update(xb, w_gate, b_gate, w_up, b_up, w2, activation, indices[inv], a_cache[inv].transpose(-1, -2),
           y_cache[inv], opts.mlp_token_block, out=out, token_perm=token_perm)
    return out.reshape(out_shape)


def _mlp_fake(x, w_gate, b_gate, w_up, b_up, w2, b2, y_cache, a_cache, hbar_cache, indices, token_perm, token_unperm,
              activation, runtime_id, site_index):
    return x.new_empty((*x.shape[:-1], w2.shape[0]))


# Host-side plan per call: registered cudagraph_unsafe (see op_registration.py).
mlp_op = register_stateful_op(
    "chipmunk::mlp",
    "(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor? w_up, Tensor? b_up, Tensor w2, Tensor? b2, "
    "Tensor(a!) y_cache, Tensor(b!) a_cache, Tensor(c!) hbar_cache, Tensor(d!) indices, Tensor? token_perm, "
    "Tensor? token_unperm, str activation, int runtime_id, int site_index) -> Tensor",
    mlp, _mlp_fake)

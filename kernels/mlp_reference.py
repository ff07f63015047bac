"""Torch reference for the MLP delta-cache math (the CPU path and the oracle for the Triton kernels).

An MLP site computes  a = hidden(x) = act(x Wg^T + bg) [* (x Wu^T + bu) when gated],  y = a W2^T + b2.
Tokens are the second-to-last axis of ``x [B, N, C]``; token blocks are ``[b*T, (b+1)*T)`` (last one ragged).

- ``hidden_units``: the activation for all or for a subset of hidden units.
- ``block_mean_preactivation``: W·mean_block(x) + b for the gate (and up) projections, float32 [B, nb, P*F]
  (P = 2 when gated). Because the projection is affine this equals the block mean of the pre-activation.
- ``mlp_refresh_selection``: scores, top-k + random units per token block, and the refreshed references.
- ``sparse_mlp_update``: for each token block with selected units S (``indices [B, nb, K]``), the incremental
  update  y_cache[block] += (a_new[:, S] - a_cache[block, S]) W2[:, S]^T  and  a_cache[block, S] = a_new[:, S].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chipmunk_compile.kernels.selection_reference import select_topk_with_random

ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}
# The same activations in place (same kernels, same results), for outputs written straight into a cache.
ACTIVATIONS_INPLACE = {
    "gelu": lambda h: torch.ops.aten.gelu_.default(h),
    "gelu_tanh": lambda h: torch.ops.aten.gelu_.default(h, approximate="tanh"),
    "silu": lambda h: F.silu(h, inplace=True),
    "relu": lambda h: F.relu(h, inplace=True),
}


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _linear(x, w, b):
    return F.linear(x, w, b)


def hidden_units(x, w_gate, b_gate, w_up, b_up, activation: str):
    """act(x Wg^T + bg) * (x Wu^T + bu) (or without the up factor), in the dtype of x, computed like eager."""
    a = ACTIVATIONS[activation](_linear(x, w_gate, b_gate))
    if w_up is not None:
        a = a * _linear(x, w_up, b_up)
    return a


AVERAGING_MAX_BYTES = 8 * 2**20


def block_averaging_matrix(token_perm: torch.Tensor, token_block: int, dtype: torch.dtype) -> torch.Tensor | None:
    """[nb, N] with 1 / token_block at (block of r, token_perm[r]): its product with x [B, N, C] is the block
    means of the reordered tokens in one GEMM pass over x (no gathered copy of x). Only where that is exact:
    whole blocks and a power-of-two block (1 / token_block exact in any float dtype); else None."""
    N = token_perm.shape[0]
    if N % token_block or token_block & (token_block - 1):
        return None
    nb = N // token_block
    # The matrix grows as N^2 / token_block (and is kept per graph runtime, so per block instance under regional
    # compilation): past the cap the gathered copy is cheaper in memory and in time (the GEMM does nb * N * C
    # MACs against the gather's N * C copy).
    if nb * N * torch.empty((), dtype=dtype).element_size() > AVERAGING_MAX_BYTES:
        return None
    blocks = torch.arange(nb, device=token_perm.device).repeat_interleave(token_block)
    averaging = torch.zeros(nb, N, dtype=dtype, device=token_perm.device)
    averaging[blocks, token_perm.long()] = 1.0 / token_block
    return averaging


def block_mean_preactivation(x, w_gate, b_gate, w_up, b_up, token_block: int, weight_dtype_out: bool = False,
                             averaging: torch.Tensor | None = None):
    """Block means of the pre-activations, float32 [B, nb, F] or [B, nb, 2F] (gate then up); in the weights'
    dtype (the scoring GEMM's own output, one conversion less) with ``weight_dtype_out``. ``averaging``
    (``block_averaging_matrix``): the blocks are those of the reordered tokens, averaged by one GEMM with
    float32 accumulation rounded once to the weights' dtype (the same rounding as the float32 mean then cast,
    up to the order of the sums)."""
    cd = _compute_dtype(x)
    B, N, C = x.shape
    nb = -(-N // token_block)
    pad = nb * token_block - N
    # Means in float32 (or 64); the nb-row scoring GEMM runs in the weights' dtype, so no converted copy of
    # the weights is made at every refresh. The ragged last block is rescaled with a Python scalar: writing a
    # host value into a device tensor would synchronise the stream at every call.
    if averaging is not None:
        means = torch.matmul(averaging.to(x.dtype), x).to(cd)
    elif pad:
        means = F.pad(x.to(cd), (0, 0, 0, pad)).reshape(B, nb, token_block, C).mean(dim=2)
        means[:, -1] *= token_block / (token_block - pad)
    else:  # accumulate in cd without a converted copy of x
        means = x.reshape(B, nb, token_block, C).mean(dim=2, dtype=cd)
    means = means.to(w_gate.dtype)
    parts = [_linear(means, w_gate, b_gate)]
    if w_up is not None:
        parts.append(_linear(means, w_up, b_up))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out if cd == torch.float64 or weight_dtype_out else out.float()


def unit_scores(hbar_new, hbar_cache, num_units: int):
    """|change| of the block-mean pre-activation per hidden unit, summed over gate/up paths: [B, nb, F]."""
    delta = (hbar_new - hbar_cache).abs()
    return delta.reshape(*delta.shape[:-1], -1, num_units).sum(dim=-2)


def mlp_refresh_selection(hbar_new, hbar_cache, num_units: int, num_top: int, num_random: int, generator,
                          out=None):
    """Indices [B, nb, K] of the units to recompute per token block (top ``num_top`` by ``unit_scores``, then
    ``num_random`` at random), into ``out`` when given; in place, each selected unit's reference
    hbar_cache[.., p*F + j] = hbar_new[..] (unselected units keep their older reference)."""
    selected = select_topk_with_random(unit_scores(hbar_new.float(), hbar_cache, num_units), num_top, num_random,
                                       None, generator)
    paths = hbar_new.shape[-1] // num_units
    cols = torch.cat([selected + p * num_units for p in range(paths)], dim=-1)
    hbar_cache.scatter_(-1, cols, hbar_new.gather(-1, cols).to(hbar_cache.dtype))
    return selected if out is None else out.copy_(selected)


def sparse_mlp_update(x, w_gate, b_gate, w_up, b_up, w2, activation: str, indices,
                      a_cache, y_cache, token_block: int, out=None, token_perm=None):
    """In place: y_cache += (a_new[S] - a_cache[S]) W2[:, S]^T and a_cache[S] = a_new[S], per token block;
    ``out`` (optional) receives the updated y_cache in its own dtype.

    ``token_perm`` (token_grid reordering; needs ``out``): row r of the token blocks and caches is token
    token_perm[r] of x, and its updated y_cache row is written to out[:, token_perm[r]]."""
    if token_perm is not None:
        check_mlp_token_perm(token_perm, x.shape[1], out)
        sparse_mlp_update(x.index_select(1, token_perm), w_gate, b_gate, w_up, b_up, w2, activation, indices,
                          a_cache, y_cache, token_block)
        out.index_copy_(1, token_perm.long(), y_cache.to(out.dtype))
        return
    cd = _compute_dtype(x)
    B, N, _ = x.shape
    nb = indices.shape[1]
    for blk in range(nb):
        rows = slice(blk * token_block, min(N, (blk + 1) * token_block))
        for b in range(B):
            sel = indices[b, blk].long()
            xb = x[b, rows].to(cd)
            a_new = hidden_units(
                xb, w_gate[sel].to(cd), None if b_gate is None else b_gate[sel].to(cd),
                None if w_up is None else w_up[sel].to(cd), None if b_up is None else b_up[sel].to(cd),
                activation)
            delta = a_new - a_cache[b, rows][:, sel].to(cd)
            # Summed in the compute dtype and rounded once into y_cache (any float dtype), as the kernel does.
            y_cache[b, rows] = (y_cache[b, rows].to(cd) + delta @ w2[:, sel].to(cd).t()).to(y_cache.dtype)
            a_cache[b, rows, sel] = a_new.to(a_cache.dtype)
    if out is not None:
        out.copy_(y_cache)


def check_mlp_token_perm(token_perm: torch.Tensor, num_tokens: int, out) -> None:
    """The shared argument checks of a ``token_perm`` call (reference and kernels alike)."""
    if token_perm.dim() != 1 or token_perm.shape[0] != num_tokens or token_perm.dtype not in (torch.int32,
                                                                                              torch.int64):
        raise ValueError(f"token_perm must be an int32/int64 permutation of the {num_tokens} tokens, got shape "
                         f"{tuple(token_perm.shape)} {token_perm.dtype}")
    if out is None:
        raise ValueError("token_perm needs out (the caches stay in the reordered order; out gets the tokens back)")

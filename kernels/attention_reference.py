"""Torch reference for the attention delta-cache math (the CPU path and the oracle for the Triton kernels).

All functions take attention-layout tensors ``q [B, H, Nq, D]``, ``k [B, Hk, Nk, D]``, ``v [B, Hk, Nk, Dv]``
(GQA: Hk divides H and query head h reads kv head h // (H // Hk), as SDPA's enable_gqa) and compute in float32 (float64 in, float64 out), returning
results in the input dtype where a result is an activation.

Query groups: queries ``[g*G, (g+1)*G)`` form group ``g``; the last group may be shorter (ragged N).

- ``dense_attention_with_lse``: exact softmax attention and the per-query log-sum-exp.
- ``column_mass``: cs[b, h, g, j] = sum over queries i of group g of exp(s_ij - lse_prev_i), where s = q k^T * scale.
- ``sparse_attention_delta``: base + sign * P^S, where P^S is softmax attention over the selected key columns
  only (renormalised within the selection) and ``indices [B, H, G, K]`` lists the columns of each group.
  With ``token_perm`` (a permutation of the queries) row r of the groups, of base and of P^S is query
  token_perm[r], and the result row r is written at out[..., token_perm[r], :] (the token_grid reordering done
  inside the kernel instead of two gathers around it).

Every function takes an optional ``key_bias [B, Nk]`` (float32): an additive score bias per key, shared by all
heads and queries (a key-padding mask is 0 for kept keys and -inf for padded ones; ``key_bias_from_mask``).
"""
from __future__ import annotations

import torch

# Queries processed per chunk in the reference, to keep the [chunk, Nk] score matrix small on the CPU.
_QUERY_CHUNK = 1024


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _match_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t if t.shape[1] == num_heads else t.repeat_interleave(num_heads // t.shape[1], dim=1)


def key_bias_from_mask(mask: torch.Tensor, batch: int, num_keys: int) -> torch.Tensor:
    """A key-padding attention mask broadcastable to [B, 1, 1, Nk] (bool: True = attend; float: additive) as
    the float32 ``key_bias [B, Nk]`` the kernels take."""
    m = mask.reshape(mask.shape[0], num_keys)
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    else:
        bias = m.to(torch.float32)
    return bias.expand(batch, num_keys)


def _biased(s: torch.Tensor, key_bias) -> torch.Tensor:
    return s if key_bias is None else s + key_bias.to(s.dtype)[:, None, None, :]


def dense_attention_with_lse(q, k, v, scale: float, key_bias=None):
    """Exact attention; returns (o in q.dtype, lse float32 [B, H, Nq])."""
    cd = _compute_dtype(q)
    kc, vc = _match_heads(k, q.shape[1]).to(cd), _match_heads(v, q.shape[1]).to(cd)
    outs, lses = [], []
    for start in range(0, q.shape[2], _QUERY_CHUNK):
        s = _biased(torch.matmul(q[:, :, start:start + _QUERY_CHUNK].to(cd), kc.transpose(-2, -1)) * scale,
                    key_bias)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vc))
        lses.append(lse)
    o = torch.cat(outs, dim=2).to(q.dtype)
    return o, torch.cat(lses, dim=2).to(torch.float64 if cd == torch.float64 else torch.float32)


def column_mass(q, k, scale: float, lse_prev: torch.Tensor, group_size: int, key_bias=None):
    """Per-query-group column mass under the previous dense step's LSE: float32 [B, H, ceil(Nq/G), Nk]."""
    cd = _compute_dtype(q)
    B, H, Nq, _ = q.shape
    num_groups = -(-Nq // group_size)
    kc = _match_heads(k, H).to(cd)
    cs = torch.zeros(B, H, num_groups, k.shape[2], dtype=cd, device=q.device)
    for g in range(num_groups):
        rows = slice(g * group_size, min(Nq, (g + 1) * group_size))
        s = _biased(torch.matmul(q[:, :, rows].to(cd), kc.transpose(-2, -1)) * scale, key_bias)
        cs[:, :, g] = torch.exp(s - lse_prev[:, :, rows].to(cd).unsqueeze(-1)).sum(dim=2)
    return cs if cd == torch.float64 else cs.float()


def dense_attention_lse_colmass(q, k, v, scale: float, lse_prev, group_size: int, key_bias=None):
    """The fused dense step: (o, lse, column mass or None when ``lse_prev`` is None)."""
    o, lse = dense_attention_with_lse(q, k, v, scale, key_bias)
    cs = None if lse_prev is None else column_mass(q, k, scale, lse_prev, group_size, key_bias)
    return o, lse, cs


def sparse_attention_delta(q, k, v, scale: float, indices: torch.Tensor, group_size: int,
                           base: torch.Tensor, sign: float, out: torch.Tensor | None = None, key_bias=None,
                           token_perm: torch.Tensor | None = None):
    """``base + sign * P^S`` with P^S renormalised over each group's selected columns; result in base.dtype,
    written into ``out`` when given (``out`` may be ``base``, except with ``token_perm``)."""
    if token_perm is not None:
        check_token_perm(token_perm, q.shape[2], base, out)
        delta = sparse_attention_delta(q.index_select(2, token_perm), k, v, scale, indices, group_size, base, sign,
                                       key_bias=key_bias)
        if out is None:
            out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        out.index_copy_(2, token_perm.long(), delta)
        return out
    cd = _compute_dtype(q)
    B, H, Nq, _ = q.shape
    num_groups = indices.shape[2]
    assert num_groups == -(-Nq // group_size), (num_groups, Nq, group_size)
    k, v = _match_heads(k, H), _match_heads(v, H)
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    for g in range(num_groups):
        rows = slice(g * group_size, min(Nq, (g + 1) * group_size))
        idx = indices[:, :, g].long()                                       # [B, H, K]
        k_sel = torch.gather(k, 2, idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])).to(cd)
        v_sel = torch.gather(v, 2, idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1])).to(cd)
        s = torch.matmul(q[:, :, rows].to(cd), k_sel.transpose(-2, -1)) * scale
        if key_bias is not None:
            s = s + torch.gather(key_bias.to(cd)[:, None, :].expand(B, H, -1), 2, idx).unsqueeze(2)
        p_s = torch.matmul(torch.softmax(s, dim=-1), v_sel)
        out[:, :, rows] = (base[:, :, rows].to(cd) + sign * p_s).to(base.dtype)
    return out


def check_token_perm(token_perm: torch.Tensor, num_queries: int, base: torch.Tensor, out) -> None:
    """The shared argument checks of a ``token_perm`` call (reference and kernels alike)."""
    if token_perm.dim() != 1 or token_perm.shape[0] != num_queries or token_perm.dtype not in (torch.int32,
                                                                                               torch.int64):
        raise ValueError(f"token_perm must be an int32/int64 permutation of the {num_queries} queries, got "
                         f"shape {tuple(token_perm.shape)} {token_perm.dtype}")
    if out is not None and out.data_ptr() == base.data_ptr():
        raise ValueError("with token_perm, out cannot be base (rows are written in another order than read)")

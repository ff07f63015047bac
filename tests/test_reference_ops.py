"""The torch reference math against direct float64 formulas (the reference is the oracle for the kernels)."""
import pytest
import torch
import torch.nn.functional as F

from chipmunk_compile.kernels import attention_reference as attn_ref
from chipmunk_compile.kernels import mlp_reference as mlp_ref
from chipmunk_compile.kernels.selection_reference import select_topk_with_random


def _qkv(B=2, H=3, N=101, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3)]


def test_dense_attention_lse_and_column_mass():
    q, k, v = _qkv()
    scale = 0.3
    o, lse, cs = attn_ref.dense_attention_lse_colmass(q, k, v, scale, None, 32)
    assert cs is None
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    assert torch.allclose(o.double(), torch.softmax(s, -1) @ v.double(), atol=1e-5)
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-5)
    lse_prev = lse + 0.1 * torch.randn_like(lse)
    _, _, cs = attn_ref.dense_attention_lse_colmass(q, k, v, scale, lse_prev, 32)
    p = torch.exp(s - lse_prev.double().unsqueeze(-1))
    for g in range(4):  # 101 queries = 3 full groups of 32 + a ragged group of 5
        rows = slice(32 * g, min(101, 32 * (g + 1)))
        assert torch.allclose(cs[:, :, g].double(), p[:, :, rows].sum(2), rtol=1e-4)


def test_sparse_delta_over_all_columns_is_dense_attention():
    q, k, v = _qkv()
    o, _, _ = attn_ref.dense_attention_lse_colmass(q, k, v, 0.25, None, 32)
    everything = torch.arange(101).expand(2, 3, 4, 101)
    zero = torch.zeros_like(o)
    assert torch.allclose(attn_ref.sparse_attention_delta(q, k, v, 0.25, everything, 32, zero, 1.0), o, atol=1e-5)
    cache = attn_ref.sparse_attention_delta(q, k, v, 0.25, everything, 32, o, -1.0)
    assert cache.abs().max() < 1e-5


def test_sparse_delta_renormalises_over_the_selection():
    q, k, v = _qkv(B=1, H=1, N=40, D=8)
    idx = torch.tensor([3, 7, 8, 20, 39]).expand(1, 1, 2, 5)
    out = attn_ref.sparse_attention_delta(q, k, v, 0.5, idx, 32, torch.zeros(1, 1, 40, 8), 1.0)
    s = (q[0, 0].double() @ k[0, 0, idx[0, 0, 0]].double().T) * 0.5
    assert torch.allclose(out[0, 0].double(), torch.softmax(s, -1) @ v[0, 0, idx[0, 0, 0]].double(), atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("gated", [False, True])
def test_sparse_mlp_update_with_all_units_gives_the_dense_mlp(activation, gated):
    g = torch.Generator().manual_seed(1)
    B, N, C, Fh, Do = 2, 70, 8, 24, 6
    x0, x1 = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    wg, bg, w2, b2 = (torch.randn(Fh, C, generator=g), torch.randn(Fh, generator=g),
                      torch.randn(Do, Fh, generator=g), torch.randn(Do, generator=g))
    wu, bu = (torch.randn(Fh, C, generator=g), torch.randn(Fh, generator=g)) if gated else (None, None)

    def dense(x):
        a = mlp_ref.hidden_units(x, wg, bg, wu, bu, activation)
        return a, F.linear(a, w2, b2)

    a0, y0 = dense(x0)
    a_cache, y_cache = a0.clone(), y0.clone()
    every = torch.arange(Fh).expand(B, 3, Fh)  # 70 tokens = 2 blocks of 32 + ragged 6
    mlp_ref.sparse_mlp_update(x1, wg, bg, wu, bu, w2, activation, every, a_cache, y_cache, 32)
    a1, y1 = dense(x1)
    assert torch.allclose(y_cache, y1, atol=1e-4) and torch.allclose(a_cache, a1, atol=1e-5)


def test_sparse_mlp_update_touches_only_selected_units():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 32, 4, generator=g)
    wg, w2 = torch.randn(10, 4, generator=g), torch.randn(3, 10, generator=g)
    a_cache, y_cache = torch.randn(1, 32, 10, generator=g), torch.zeros(1, 32, 3)
    before = a_cache.clone()
    sel = torch.tensor([[[1, 4]]])
    mlp_ref.sparse_mlp_update(x, wg, None, None, None, w2, "silu", sel, a_cache, y_cache, 32)
    new = F.silu(x @ wg[[1, 4]].T)
    assert torch.allclose(a_cache[0][:, [1, 4]], new[0], atol=1e-6)
    untouched = [i for i in range(10) if i not in (1, 4)]
    assert torch.equal(a_cache[0][:, untouched], before[0][:, untouched])
    assert torch.allclose(y_cache[0], (new[0] - before[0][:, [1, 4]]) @ w2[:, [1, 4]].T, atol=1e-5)


def test_block_mean_preactivation_equals_mean_of_preactivation():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 50, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    hbar = mlp_ref.block_mean_preactivation(x, w, b, None, None, 16)
    h = F.linear(x, w, b)
    for blk in range(4):
        assert torch.allclose(hbar[:, blk], h[:, 16 * blk:16 * (blk + 1)].mean(1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_means_of_reordered_tokens_by_one_averaging_gemm(dtype):
    """token_grid refresh: the block means of the reordered tokens from one GEMM over x in model order equal the
    means of the gathered copy (float32 accumulation, one rounding to the weights' dtype)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 8, generator=g).to(dtype)
    w, b = torch.randn(12, 8, generator=g).to(dtype), torch.randn(12, generator=g).to(dtype)
    perm = torch.randperm(64, generator=g)
    averaging = mlp_ref.block_averaging_matrix(perm, 16, dtype)
    assert averaging.shape == (4, 64) and (averaging.sum(1) == 1).all() and ((averaging > 0).sum(0) == 1).all()
    fused = mlp_ref.block_mean_preactivation(x, w, b, None, None, 16, averaging=averaging)
    gathered = mlp_ref.block_mean_preactivation(x[:, perm], w, b, None, None, 16)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fused, gathered, rtol=tol, atol=tol), (fused - gathered).abs().max()
    # Only where 1 / token_block is exact and every block is whole; the op then averages a gathered copy.
    assert mlp_ref.block_averaging_matrix(perm, 12, dtype) is None
    assert mlp_ref.block_averaging_matrix(perm[:60], 16, dtype) is None
    # Nor for long sequences: the matrix grows as N^2 / token_block (52 MB at N = 57600, block 128, bf16).
    assert mlp_ref.block_averaging_matrix(torch.randperm(57600), 128, torch.bfloat16) is None


def test_selection_forced_top_random():
    scores = torch.tensor([[[0.0, 5.0, 1.0, 4.0, 3.0, 2.0, 0.5, 0.1]]])
    forced = (7, 8)
    idx = select_topk_with_random(scores, 2, 1, forced, torch.Generator().manual_seed(0))
    assert idx.shape == (1, 1, 4)
    chosen = set(idx[0, 0].tolist())
    assert {1, 3, 7} <= chosen and len(chosen) == 4  # forced 7, top-2 {1, 3}, one random other
    batch = scores.expand(3, 1, 8)
    same = select_topk_with_random(batch, 2, 1, forced, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[b], idx[0]) for b in range(3))  # the draw does not depend on the batch


def test_reference_key_bias_matches_masked_sdpa():
    """A key-padding mask [B, 1, 1, N] as key_bias gives what SDPA gives with that mask, and the sparse delta with
    all columns selected equals it too."""
    gen = torch.Generator().manual_seed(2)
    B, H, N, D = 2, 3, 40, 8
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.arange(N)[None, :] < torch.tensor([N - 5, N - 11])[:, None]
    mask = keep[:, None, None, :]
    kb = attn_ref.key_bias_from_mask(mask, B, N).double()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o, _ = attn_ref.dense_attention_with_lse(q, k, v, D ** -0.5, kb)
    torch.testing.assert_close(o, expected)
    every = torch.arange(N).expand(B, H, 2, N)
    delta = attn_ref.sparse_attention_delta(q, k, v, D ** -0.5, every, 20, torch.zeros_like(q), 1.0, key_bias=kb)
    torch.testing.assert_close(delta, expected)
    float_mask = torch.randn(B, 1, 1, N, generator=gen, dtype=torch.float64)
    o, _ = attn_ref.dense_attention_with_lse(q, k, v, D ** -0.5, attn_ref.key_bias_from_mask(float_mask, B, N))
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=float_mask))

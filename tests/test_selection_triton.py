"""The Triton selection kernel (``kernels/selection_triton.py``) under the CPU interpreter against the torch
reference: the same index sets (scores drawn without ties), forced ranges, the random extras taken from the same
generator draw, ties broken without duplicates, batch rows sharing one draw, and the MLP refresh variant that
scores from block-mean pre-activations and refreshes the references of exactly the selected units."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import selection_reference as sel_ref  # noqa: E402
from chipmunk_compile.kernels import selection_triton as sel_tr  # noqa: E402
from chipmunk_compile.kernels.dispatch import implementation  # noqa: E402


def _sets(idx):
    return [set(row.tolist()) for row in idx.reshape(-1, idx.shape[-1])]


def _distinct_scores(shape, gen, negative=False):
    """Scores with no two equal entries in a row (a random permutation of a spread of values)."""
    n = shape[-1]
    base = torch.linspace(-3.0 if negative else 0.0, 5.0, n)
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(torch.Size(shape[:-1]).numel())])
    return base[perms].reshape(shape)


@pytest.mark.parametrize("shape,num_top,num_random,forced", [
    ((2, 3, 2, 77), 10, 5, None),          # batch 2: both samples use one draw
    ((1, 2, 3, 130), 7, 0, (120, 130)),    # a forced (static) range, no random part
    ((1, 1, 5, 64), 20, 9, (0, 4)),        # forced + top + random
    ((2, 4, 300), 64, 13, None),           # MLP-like [B, nb, F]
])
def test_select_matches_reference(shape, num_top, num_random, forced):
    gen = torch.Generator().manual_seed(5)
    scores = _distinct_scores(shape, gen, negative=True)
    got = sel_tr.select_topk_with_random(scores, num_top, num_random, forced, torch.Generator().manual_seed(11))
    want = sel_ref.select_topk_with_random(scores, num_top, num_random, forced, torch.Generator().manual_seed(11))
    assert got.shape == want.shape and got.dtype == torch.int64
    assert _sets(got) == _sets(want)
    # Into the op's int32 index buffer, in place.
    out = torch.full(got.shape, -1, dtype=torch.int32)
    same = sel_tr.select_topk_with_random(scores, num_top, num_random, forced, torch.Generator().manual_seed(11),
                                          out=out)
    assert same is out and _sets(out) == _sets(want)
    for row in got.reshape(-1, got.shape[-1]):
        assert len(set(row.tolist())) == row.numel()  # no index twice


def test_select_ties_infinities_and_masked_keys():
    """Equal scores at the threshold: exactly k distinct indices, every one at least the threshold; -inf (masked
    keys) never taken while enough others remain; +inf always taken."""
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, float("-inf"), 2.0, 0.5, float("inf"), -1.0, 2.0]])
    got = sel_tr.select_topk_with_random(scores, 4, 0, None, None)
    chosen = got[0].tolist()
    assert len(set(chosen)) == 4 and 7 in chosen and all(scores[0, i] >= 2.0 for i in chosen)
    got = sel_tr.select_topk_with_random(scores, 3, 5, None, torch.Generator().manual_seed(0))
    assert len(set(got[0].tolist())) == 8 and 4 not in got[0, :3].tolist()


@pytest.mark.parametrize("entries_per_thread", [1, 4])
def test_select_all_units_and_rows_over_many_chunks(monkeypatch, entries_per_thread):
    scores = torch.rand(1, 2, 40)
    got = sel_tr.select_topk_with_random(scores, 30, 10, None, torch.Generator().manual_seed(0))
    assert _sets(got) == [set(range(40))] * 2
    only_random = sel_tr.select_topk_with_random(scores, 0, 5, None, torch.Generator().manual_seed(0))
    assert only_random.shape == (1, 2, 5) and all(len(r) == 5 for r in _sets(only_random))
    # Rows stored in 35 chunks of 32 (one warp; 9 of 128 with 4 entries per thread) with ties spread over all of them:
    # exactly k distinct indices, all at or above the threshold, the lowest-index ties first.
    monkeypatch.setattr(sel_tr, "NUM_WARPS", 1)
    monkeypatch.setattr(sel_tr, "STORE_ENTRIES_PER_THREAD", entries_per_thread)
    scores = (torch.arange(1100) % 7).float().reshape(1, 1, 1100)  # 157 or 158 entries per value 0..6
    got = sel_tr.select_topk_with_random(scores, 200, 50, None, torch.Generator().manual_seed(1))
    top, extra = got[0, 0, :200].tolist(), got[0, 0, 200:].tolist()
    sixes = [i for i in range(1100) if i % 7 == 6]
    fives = [i for i in range(1100) if i % 7 == 5]
    assert sorted(top) == sorted(sixes + fives[:200 - len(sixes)])
    assert len(set(top + extra)) == 250
    gen = torch.Generator().manual_seed(5)
    scores = _distinct_scores((2, 3, 1000), gen, negative=True)
    got = sel_tr.select_topk_with_random(scores, 100, 40, (990, 1000), torch.Generator().manual_seed(2))
    want = sel_ref.select_topk_with_random(scores, 100, 40, (990, 1000), torch.Generator().manual_seed(2))
    assert _sets(got) == _sets(want)


@pytest.mark.parametrize("paths,dtype,index_dtype,entries_per_thread",
                         [(1, torch.float32, torch.int64, 1), (2, torch.float32, torch.int32, 2),
                          (1, torch.float16, torch.int32, 8)])
def test_mlp_refresh_matches_reference(monkeypatch, paths, dtype, index_dtype, entries_per_thread):
    """hbar_new comes in the scoring GEMM's dtype (fp16 here; bf16 on the GPU), the references are float32; store
    chunks of one to eight entries per thread."""
    gen = torch.Generator().manual_seed(7)
    B, nb, F, num_top, num_random = 2, 3, 200, 40, 12
    hbar_new = torch.randn(B, nb, paths * F, generator=gen).to(dtype)
    # Distinct scores: the change of each unit is a permutation of distinct magnitudes on path 0.
    cache = hbar_new.float().clone()
    cache[..., :F] -= _distinct_scores((B, nb, F), gen)
    cache_tr, cache_ref = cache.clone(), cache.clone()
    # The op's index buffers are int32: written by the kernel in place (the torch fallback must not run).
    out = torch.full((B, nb, num_top + num_random), -1, dtype=index_dtype)
    monkeypatch.setattr(mlp_ref, "mlp_refresh_selection", None)
    monkeypatch.setattr(sel_tr, "NUM_WARPS", 1)
    monkeypatch.setattr(sel_tr, "STORE_ENTRIES_PER_THREAD", entries_per_thread)
    got = sel_tr.mlp_refresh_selection(hbar_new, cache_tr, F, num_top, num_random, torch.Generator().manual_seed(3),
                                       out=out)
    monkeypatch.undo()
    want = mlp_ref.mlp_refresh_selection(hbar_new, cache_ref, F, num_top, num_random,
                                         torch.Generator().manual_seed(3))
    assert got is out and _sets(got) == _sets(want)
    assert torch.equal(cache_tr, cache_ref)  # refreshed exactly the selected units, on every path
    assert not torch.equal(cache_tr, cache)


def test_launch_shape_keeps_keys_per_thread_within_the_register_budget(monkeypatch):
    monkeypatch.setattr(sel_tr, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # An MLP refresh (few rows): 8 warps, store chunks of 8 entries per thread; wider rows take more warps.
    assert sel_tr._launch_shape(36, 16384, cuda) == (8, 2048)
    assert sel_tr._launch_shape(264, 32768, cuda) == (16, 4096)
    # Many rows (attention query groups) and the CPU: one entry per thread.
    assert sel_tr._launch_shape(576, 8192, cuda) == (4, 128)
    assert sel_tr._launch_shape(36, 16384, torch.device("cpu")) == (8, 256)
    for rows in (1, 36, 132, 265, 5000):
        for block in (32, 1024, 8192, 16384, 32768):
            warps, lanes = sel_tr._launch_shape(rows, block, cuda)
            assert block // (32 * warps) <= 64 and lanes <= block and lanes % (32 * warps) == 0 or lanes == block


def test_dispatch_picks_triton_selection_under_interpreter():
    assert implementation("select_topk_with_random", "triton", torch.device("cpu")) is sel_tr.select_topk_with_random
    assert implementation("mlp_refresh_selection", "torch", torch.device("cpu")) is mlp_ref.mlp_refresh_selection


def test_ties_in_the_random_draw(monkeypatch):
    """Noise with many equal values (the random part's threshold falls inside a tie): still exactly num_random
    distinct extra indices, none of them among the top ones."""
    monkeypatch.setattr(sel_tr, "_noise", lambda shape, device, generator, num_random:
                        (torch.arange(shape[-1]) % 3).float().div(4).expand(shape).contiguous())
    monkeypatch.setattr(sel_tr, "NUM_WARPS", 1)
    gen = torch.Generator().manual_seed(9)
    scores = _distinct_scores((1, 2, 500), gen)
    got = sel_tr.select_topk_with_random(scores, 50, 120, None, None)
    want_top = sel_ref.select_topk_with_random(scores, 50, 0, None, None)
    for row, top in zip(got.reshape(-1, 170), want_top.reshape(-1, 50)):
        assert set(row[:50].tolist()) == set(top.tolist())
        extra = row[50:].tolist()
        assert len(set(row.tolist())) == 170 and all(i % 3 == 2 for i in extra)  # the highest noise only


@pytest.mark.parametrize("gated", [False, True])
def test_op_refresh_path_on_triton_matches_torch(gated):
    """``mlp_op.refresh_indices`` as the backend calls it (int32 index buffer slice, float32 references): the Triton
    dispatch picks the same units and leaves the same references as the torch one."""
    from chipmunk_compile.kernels import mlp_op

    gen = torch.Generator().manual_seed(12)
    B, N, C, F, T = 2, 96, 16, 160, 32
    x = torch.randn(B, N, C, generator=gen)
    w_gate, b_gate = torch.randn(F, C, generator=gen), torch.randn(F, generator=gen)
    w_up, b_up = (torch.randn(F, C, generator=gen), torch.randn(F, generator=gen)) if gated else (None, None)
    paths = 2 if gated else 1
    hbar = torch.randn(3, B, N // T, paths * F, generator=gen)    # [invocations, B, nb, P*F] like the state buffers
    indices = torch.zeros(3, B, N // T, 48, dtype=torch.int32)
    results = {}
    for kernels in ("torch", "triton"):
        h, idx = hbar.clone(), indices.clone()
        mlp_op.refresh_indices(x, w_gate, b_gate, w_up, b_up, h[1], idx[1], 40, 8, T,
                               torch.Generator().manual_seed(4), kernels)
        results[kernels] = (h, idx)
    (h_ref, i_ref), (h_tr, i_tr) = results["torch"], results["triton"]
    assert _sets(i_tr[1]) == _sets(i_ref[1]) and torch.equal(i_tr[0], indices[0]) and torch.equal(i_tr[2], indices[2])
    assert torch.allclose(h_tr, h_ref) and not torch.equal(h_tr[1], hbar[1])

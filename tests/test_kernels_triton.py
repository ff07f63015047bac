"""The Triton kernels under the CPU interpreter against the float64 torch references.

Tiny ragged shapes (N not a multiple of any tile, several query groups or token blocks, batch 2, permuted
non-contiguous inputs, GQA), fp32 and fp16 (bf16 arithmetic is wrong in the interpreter). Every buffer a
kernel allocates with torch.empty is filled with NaN, and explicit outputs are NaN-filled, so an element the
kernel fails to write shows up as a mismatch.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module


import pytest
import torch

pytest.importorskip("triton")

# The interpreter itself trips a NumPy deprecation on every scalar index.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


from chipmunk_compile.kernels import attention_dense_triton as dense_tr  # noqa: E402
from chipmunk_compile.kernels import attention_reference as attn_ref  # noqa: E402
from chipmunk_compile.kernels import attention_sparse_triton as sparse_tr  # noqa: E402
from chipmunk_compile.kernels import mlp_reference as mlp_ref  # noqa: E402
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr  # noqa: E402
from chipmunk_compile.kernels.launch import CachedLaunch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 4e-3}


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors for the duration of a test."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _qkv(B, H, Hk, N, D, DV, dtype, gen):
    """Non-contiguous views like Dynamo hands over: q/k as permuted [B,N,H,D], v with D outermost."""
    q = torch.randn(B, N, H, D, generator=gen).to(dtype).permute(0, 2, 1, 3)
    k = torch.randn(B, N, Hk, D, generator=gen).to(dtype).permute(0, 2, 1, 3)
    v = torch.randn(B, Hk, DV, N, generator=gen).to(dtype).transpose(2, 3)
    return q, k, v


def _expand(t, H):
    return t.double().repeat_interleave(H // t.shape[1], dim=1)


def _close(actual, expected, dtype, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


DENSE_CASES = [
    # B, H, Hk, N, D, DV, G, dtype, config
    (2, 2, 1, 37, 16, 16, 16, torch.float32, None),
    (1, 2, 2, 200, 64, 64, 192, torch.float16, None),
    (2, 2, 2, 385, 16, 32, 192, torch.float32, None),
    (1, 2, 1, 150, 16, 16, 32, torch.float16, {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}),
    (1, 1, 1, 100, 24, 24, 48, torch.float32, {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}),
    # Column-mass formulations: a second exp per score (0) and the tensor-core reduction over rows (2).
    (1, 2, 1, 150, 16, 16, 32, torch.float16,
     {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "CS_MODE": 0}),
    (2, 2, 2, 385, 16, 32, 192, torch.float32,
     {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "CS_MODE": 2}),
    (1, 1, 1, 100, 24, 24, 16, torch.float16,
     {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "CS_MODE": 2}),
]


@pytest.mark.parametrize("B,H,Hk,N,D,DV,G,dtype,config", DENSE_CASES)
def test_dense_attention_lse_colmass(nan_empty, B, H, Hk, N, D, DV, G, dtype, config):
    gen = torch.Generator().manual_seed(N * 31 + D)
    q, k, v = _qkv(B, H, Hk, N, D, DV, dtype, gen)
    scale = D ** -0.5
    lse_prev = torch.randn(B, H, N, generator=gen) * 0.3 + 2.5
    o, lse, cs = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse_prev, G, config=config)
    ro, rlse, rcs = attn_ref.dense_attention_lse_colmass(q.double(), _expand(k, H), _expand(v, H), scale,
                                                         lse_prev.double(), G)
    assert o.dtype == dtype and o.is_contiguous() and lse.dtype == torch.float32 and cs.dtype == torch.float32
    assert cs.shape == rcs.shape == (B, H, -(-N // G), N)
    _close(o, ro, dtype, "o")
    _close(lse, rlse, dtype, "lse")
    _close(cs / rcs.abs().max(), rcs / rcs.abs().max(), dtype, "column mass")

    o2, lse2, cs2 = dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, G, config=config)
    assert cs2 is None
    _close(o2, ro, dtype, "o without colmass")
    _close(lse2, rlse, dtype, "lse without colmass")


def _indices(B, H, G, N, K, gen, dtype):
    rows = [torch.randperm(N, generator=gen)[:K].sort().values for _ in range(B * H * G)]
    return torch.stack(rows).view(B, H, G, K).to(dtype)


SPARSE_CASES = [
    # B, H, Hk, N, D, DV, G, K, dtype, index dtype, config
    (2, 2, 1, 37, 16, 16, 16, 5, torch.float32, torch.int64, None),
    (2, 2, 2, 200, 64, 64, 192, 70, torch.float16, torch.int32, None),
    (1, 2, 2, 385, 16, 32, 192, 1, torch.float32, torch.int32, None),
    (1, 2, 1, 150, 16, 16, 32, 40, torch.float32, torch.int64,
     {"BLOCK_M": 16, "BLOCK_N": 16, "M_SUB": 3, "num_warps": 4, "num_stages": 1}),
    (2, 1, 1, 385, 16, 16, 192, 100, torch.float16, torch.int32,
     {"BLOCK_M": 64, "BLOCK_N": 32, "M_SUB": 3, "num_warps": 4, "num_stages": 1}),
    (1, 1, 1, 200, 16, 16, 192, 77, torch.float32, torch.int32,
     {"BLOCK_M": 128, "BLOCK_N": 32, "M_SUB": 1, "num_warps": 4, "num_stages": 1}),
    # The 192-query group as one 128-row and one 64-row sub-tile (the H100 configuration).
    (1, 2, 1, 500, 16, 16, 192, 90, torch.float16, torch.int32,
     {"BLOCK_M": 128, "BLOCK_M1": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}),
    (1, 1, 1, 100, 16, 16, 48, 33, torch.float32, torch.int64,
     {"BLOCK_M": 32, "BLOCK_M1": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}),
]


@pytest.mark.parametrize("B,H,Hk,N,D,DV,G,K,dtype,idx_dtype,config", SPARSE_CASES)
def test_sparse_attention_delta(nan_empty, B, H, Hk, N, D, DV, G, K, dtype, idx_dtype, config):
    gen = torch.Generator().manual_seed(N * 17 + K)
    q, k, v = _qkv(B, H, Hk, N, D, DV, dtype, gen)
    scale = D ** -0.5
    indices = _indices(B, H, -(-N // G), N, K, gen, idx_dtype)
    base = torch.randn(B, N, H, DV, generator=gen).to(dtype).transpose(1, 2)
    kr, vr = _expand(k, H), _expand(v, H)
    for sign in (1.0, -1.0):
        expected = attn_ref.sparse_attention_delta(q.double(), kr, vr, scale, indices, G, base.double(), sign)
        out = torch.full(base.shape, float("nan"), dtype=dtype)
        sparse_tr.sparse_attention_delta(q, k, v, scale, indices, G, base, sign, out=out, config=config)
        _close(out, expected, dtype, f"out (sign {sign})")
        fresh = sparse_tr.sparse_attention_delta(q, k, v, scale, indices, G, base, sign, config=config)
        _close(fresh, expected, dtype, f"fresh out (sign {sign})")
    in_place = base.clone()
    sparse_tr.sparse_attention_delta(q, k, v, scale, indices, G, in_place, -1.0, out=in_place, config=config)
    _close(in_place, attn_ref.sparse_attention_delta(q.double(), kr, vr, scale, indices, G, base.double(), -1.0),
           dtype, "in place")


def test_sparse_all_columns_is_dense():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(1, 2, 2, 100, 16, 16, torch.float32, gen)
    indices = torch.arange(100).expand(1, 2, 1, 100)
    zero = torch.zeros(1, 2, 100, 16)
    out = sparse_tr.sparse_attention_delta(q, k, v, 0.25, indices, 192, zero, 1.0)
    o, _, _ = dense_tr.dense_attention_lse_colmass(q, k, v, 0.25, None, 192)
    _close(out, o, torch.float32, "all columns")


@pytest.mark.parametrize("config", [None, {"BLOCK_M": 32, "BLOCK_M1": 16, "BLOCK_N": 16, "num_warps": 4,
                                             "num_stages": 1}])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_sparse_attention_delta_with_token_perm(nan_empty, config, idx_dtype):
    """token_perm (the token_grid reordering inside the kernel): row r of the groups is query token perm[r] and
    its result lands at token perm[r]; base stays in row order. Checked against the reference's definition and
    against doing the two gathers around a call without the perm (what the op did before)."""
    gen = torch.Generator().manual_seed(11)
    B, H, Hk, N, D, G, K = 2, 2, 1, 150, 16, 48, 21
    q, k, v = _qkv(B, H, Hk, N, D, D, torch.float32, gen)
    perm = torch.randperm(N, generator=gen).to(idx_dtype)
    indices = _indices(B, H, -(-N // G), N, K, gen, torch.int32)
    base = torch.randn(B, N, H, D, generator=gen).transpose(1, 2)
    kr, vr = _expand(k, H), _expand(v, H)
    expected = attn_ref.sparse_attention_delta(q.double(), kr, vr, 0.3, indices, G, base.double(), 1.0,
                                               token_perm=perm)
    unperm = torch.argsort(perm.long())
    around = attn_ref.sparse_attention_delta(q.double()[:, :, perm.long()], kr, vr, 0.3, indices, G,
                                             base.double(), 1.0)[:, :, unperm]
    assert torch.equal(expected, around)
    out = torch.full((B, N, H, D), float("nan")).transpose(1, 2)  # token-major, as the op allocates it
    sparse_tr.sparse_attention_delta(q, k, v, 0.3, indices, G, base, 1.0, out=out, config=config, token_perm=perm)
    _close(out, expected, torch.float32, "out with token_perm")
    with pytest.raises(ValueError, match="out cannot be base"):
        sparse_tr.sparse_attention_delta(q, k, v, 0.3, indices, G, base, 1.0, out=base, token_perm=perm)
    with pytest.raises(ValueError, match="permutation of the 150 queries"):
        sparse_tr.sparse_attention_delta(q, k, v, 0.3, indices, G, base, 1.0, token_perm=perm[:-1])


def _anchor(lse, shift):
    """The softmax anchor handed to the kernels: the true LSE moved by ``shift`` nats (or a mix per row)."""
    if shift == "mixed":
        moves = torch.tensor([0.0, -100.0, 100.0, 2.0])
        return lse + moves[torch.arange(lse.shape[-1]) % 4]
    return lse + shift


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0, 100.0, -100.0, "mixed"])
def test_anchored_dense_step_is_exact_for_any_anchor(nan_empty, shift):
    """The anchored dense step (the previous dense step's LSE as the fixed softmax shift) gives the reference
    O, LSE and column mass whatever the anchor: rows whose normaliser would leave the safe range (logits moved by tens of nats; at 100 nats fp32
    overflows or underflows) are redone online. The column mass follows exp(s - anchor) in fp32 (checked where
    that is a normal fp32 number)."""
    gen = torch.Generator().manual_seed(11)
    B, H, N, D, G = 1, 2, 150, 16, 64
    q, k, v = _qkv(B, H, H, N, D, D, torch.float32, gen)
    scale = D ** -0.5
    ro, rlse = attn_ref.dense_attention_with_lse(q.double(), k.double(), v.double(), scale)
    anchor = _anchor(rlse.float(), shift)
    for cs_mode in (1, 2):
        cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "CS_MODE": cs_mode, "ANCHOR": 1}
        o, lse, cs = dense_tr.dense_attention_lse_colmass(q, k, v, scale, anchor, G, config=cfg)
        rcs = attn_ref.column_mass(q.double(), k.double(), scale, anchor.double(), G)
        _close(o, ro, torch.float32, f"dense o (mode {cs_mode})")
        _close(lse, rlse, torch.float32, f"dense lse (mode {cs_mode})")
        if torch.isfinite(rcs.float()).all() and rcs.abs().max() > 1e-30:  # fp32 normal range
            _close(cs / rcs.abs().max(), rcs / rcs.abs().max(), torch.float32, f"column mass (mode {cs_mode})")


@pytest.mark.parametrize("kind,n_tail,ctas", [(None, 5, 7), ("padding", 5, 7), (None, 1, 7), (None, 4, 4)])
def test_tail_pieces_added_and_flagged_groups_redone(kind, n_tail, ctas):
    """The launch behind the Gluon column-mass kernel (``finish_gluon_dense_step``), fed what that kernel leaves:
    O / LSE of whole groups, unnormalised pieces of the last n_tail groups (their key tiles shared out over
    ``ctas`` ranges by ``attention_dense_gluon.tail_pieces``, same anchor; with one tail group some ranges are
    empty), and redo flags. Tail groups get the exact O and LSE from their pieces (also one whose summed
    normaliser is out of range, recomputed online); a flagged whole group is recomputed; unflagged whole groups
    are left as they were."""
    from chipmunk_compile.kernels import attention_dense_gluon as dense_ws
    gen = torch.Generator().manual_seed(4)
    B, H, N, D, G = 2, 2, 300, 16, 64
    q, k, v = _qkv(B, H, H, N, D, D, torch.float32, gen)
    scale = D ** -0.5
    kb = None if kind is None else _key_bias(B, N, gen, kind)
    ro, rlse = attn_ref.dense_attention_with_lse(q.double(), k.double(), v.double(), scale, kb)
    num_groups = -(-N // G)
    items = B * H * num_groups
    part_rows, key_tiles = 64, -(-N // 64)
    first_split = items - n_tail
    anchor = rlse.double() + 0.5 * torch.randn(rlse.shape, generator=gen, dtype=torch.float64)
    far = items - 1  # its anchor is 100 nats off: the summed normaliser underflows -> recomputed online
    bh_far, g_far = divmod(far, num_groups)
    anchor.view(B * H, N)[bh_far, g_far * G:(g_far + 1) * G] += 100.0
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    if kb is not None:
        s = s + kb.double()[:, None, None, :]
    p = torch.exp(s - anchor[..., None]).view(B * H, N, N)
    part_o = torch.full((2 * ctas * part_rows, D), float("nan"))
    part_l = torch.full((2 * ctas * part_rows,), float("nan"))
    vv = v.double().reshape(B * H, N, D)
    pieces = dense_ws.tail_pieces(n_tail, key_tiles, ctas)
    assert sorted({item for _, item, _, _ in pieces}) == list(range(n_tail))
    for j, item, t0, t1 in pieces:
        bh, g = divmod(first_split + item, num_groups)
        rows = slice(g * G, min(N, (g + 1) * G))
        keys = slice(t0 * 64, min(N, t1 * 64))
        n_rows = rows.stop - rows.start
        r0 = j * part_rows
        part_o[r0:r0 + n_rows] = (p[bh, rows, keys] @ vv[bh, keys]).float()
        part_l[r0:r0 + n_rows] = p[bh, rows, keys].sum(-1).float()
    o = ro.float().contiguous().clone()
    lse = rlse.float().clone()
    o_flat, lse_flat = o.view(B * H, N, D), lse.view(B * H, N)
    for j in range(n_tail):  # what the Gluon kernel leaves unwritten
        bh, g = divmod(first_split + j, num_groups)
        o_flat[bh, g * G:(g + 1) * G] = float("nan")
        lse_flat[bh, g * G:(g + 1) * G] = float("nan")
    # One flag per 64 rows of a group (G = 64: column 0); the other columns and the split groups' rows are
    # not written by the Gluon kernel: garbage there must be ignored.
    redo = torch.zeros(items, 4, dtype=torch.int32)
    redo[:, 1:] = 1
    redo[first_split:] = 1
    flagged = 2
    redo[flagged, 0] = 1
    bh, g = divmod(flagged, num_groups)
    o_flat[bh, g * G:(g + 1) * G] = float("nan")
    lse_flat[bh, g * G:(g + 1) * G] = float("nan")
    untouched = 3
    bh, g = divmod(untouched, num_groups)
    o_flat[bh, g * G:(g + 1) * G] += 1.0  # a stale value the launch must not rewrite
    dense_tr.finish_gluon_dense_step(q, k, v, scale, anchor.float(), G, o, lse, redo, first_split, part_o, part_l,
                                     part_rows, ctas, key_tiles, *dense_tr.scaled_key_bias(kb, B, N, scale))
    expected = ro.float().clone()
    expected.view(B * H, N, D)[bh, g * G:(g + 1) * G] += 1.0
    _close(o, expected, torch.float32, "o")
    _close(lse, rlse, torch.float32, "lse")


def _key_bias(B, N, gen, kind):
    """Key-padding masks as the kernels take them: per sample a different number of trailing keys dropped
    (bool mask -> 0 / -inf), or an additive float bias."""
    if kind == "padding":
        keep = torch.arange(N)[None, :] < torch.tensor([N - 7 * (b + 1) for b in range(B)])[:, None]
        return attn_ref.key_bias_from_mask(keep[:, None, None, :], B, N)
    return torch.randn(B, N, generator=gen)


@pytest.mark.parametrize("kind", ["padding", "additive"])
@pytest.mark.parametrize("config", [
    {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "CS_MODE": 1, "ANCHOR": 1},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "CS_MODE": 2, "ANCHOR": 0},
])
def test_kernels_with_key_bias(nan_empty, kind, config):
    gen = torch.Generator().manual_seed(5)
    B, H, Hk, N, D, G, K = 2, 2, 1, 150, 16, 48, 40
    q, k, v = _qkv(B, H, Hk, N, D, D, torch.float32, gen)
    scale = D ** -0.5
    kb = _key_bias(B, N, gen, kind)
    kr, vr = _expand(k, H), _expand(v, H)
    ro, rlse = attn_ref.dense_attention_with_lse(q.double(), kr, vr, scale, kb.double())
    lse_prev = rlse.float() + 0.1
    o, lse, cs = dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse_prev, G, config=config, key_bias=kb)
    rcs = attn_ref.column_mass(q.double(), kr, scale, lse_prev.double(), G, kb.double())
    _close(o, ro, torch.float32, "o")
    _close(lse, rlse, torch.float32, "lse")
    _close(cs / rcs.abs().max(), rcs / rcs.abs().max(), torch.float32, "column mass")
    o2, lse2, _ = dense_tr.dense_attention_lse_colmass(q, k, v, scale, None, G, config=config, key_bias=kb)
    _close(o2, ro, torch.float32, "o without column mass")
    if kind == "padding":
        assert (cs[0, :, :, N - 7:] == 0).all() and (cs[1, :, :, N - 14:] == 0).all()
    indices = _indices(B, H, -(-N // G), N, K, gen, torch.int32)
    base = torch.randn(B, H, N, D, generator=gen)
    expected = attn_ref.sparse_attention_delta(q.double(), kr, vr, scale, indices, G, base.double(), 1.0,
                                               key_bias=kb.double())
    out = sparse_tr.sparse_attention_delta(q, k, v, scale, indices, G, base, 1.0, key_bias=kb,
                                           config={"BLOCK_M": 16, "BLOCK_M1": 16, "BLOCK_M2": 16, "BLOCK_N": 16,
                                                   "num_warps": 4, "num_stages": 1})
    _close(out, expected, torch.float32, "sparse delta")


MLP_CASES = [
    # B, N, C, F, Dout, T, K, activation, gated, dtype, unit-major a_cache and W2^T, config
    (2, 37, 24, 40, 20, 16, 9, "gelu_tanh", False, torch.float32, False, None),
    (1, 70, 32, 64, 48, 32, 33, "silu", True, torch.float16, True, None),
    (2, 50, 16, 32, 16, 48, 7, "gelu", False, torch.float32, True, None),
    (1, 20, 16, 32, 16, 16, 32, "relu", True, torch.float32, False, None),
    (2, 45, 48, 64, 40, 16, 20, "gelu_tanh", False, torch.float16, False,
     {"mm1": {"BLOCK_F": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
      "mm2": {"BLOCK_D": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}}),
    # Full token blocks and tile-multiple K / Dout: the unmasked main loops.
    (1, 64, 32, 64, 32, 16, 32, "gelu_tanh", False, torch.float32, True, None),
    (2, 64, 32, 64, 32, 32, 32, "silu", True, torch.float16, True, None),
    # Grouped program order (row tiles fastest inside groups of 2 row tiles).
    (2, 100, 48, 64, 40, 16, 20, "gelu_tanh", True, torch.float32, True,
     {"mm1": {"BLOCK_F": 16, "BLOCK_C": 16, "GROUP_T": 2, "num_warps": 4, "num_stages": 1},
      "mm2": {"BLOCK_D": 16, "BLOCK_K": 16, "GROUP_T": 3, "num_warps": 4, "num_stages": 1}}),
    # The output cache updated with atomic adds instead of read-modify-write (ragged and full tiles).
    (2, 45, 48, 64, 40, 16, 20, "gelu_tanh", False, torch.float16, True,
     {"mm1": {"BLOCK_F": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
      "mm2": {"BLOCK_D": 16, "BLOCK_K": 16, "Y_ATOMIC": 1, "num_warps": 4, "num_stages": 1}}),
    (1, 64, 32, 64, 32, 16, 32, "silu", True, torch.float32, True,
     {"mm1": {"BLOCK_F": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
      "mm2": {"BLOCK_D": 16, "BLOCK_K": 16, "Y_ATOMIC": 1, "GROUP_T": 2, "num_warps": 4, "num_stages": 1}}),
    # Epilogues in column halves, with ragged units / outputs in the last half.
    (2, 45, 48, 72, 40, 16, 41, "gelu_tanh", True, torch.float16, True,
     {"mm1": {"BLOCK_F": 32, "BLOCK_C": 16, "EPI_SPLIT": 2, "num_warps": 4, "num_stages": 1},
      "mm2": {"BLOCK_D": 32, "BLOCK_K": 16, "EPI_SPLIT": 2, "num_warps": 4, "num_stages": 1}}),
    (1, 64, 32, 80, 64, 32, 64, "gelu", False, torch.float32, True,
     {"mm1": {"BLOCK_F": 64, "BLOCK_C": 16, "EPI_SPLIT": 2, "GROUP_T": 2, "num_warps": 4, "num_stages": 1},
      "mm2": {"BLOCK_D": 32, "BLOCK_K": 16, "EPI_SPLIT": 2, "Y_ATOMIC": 1, "num_warps": 4, "num_stages": 1}}),
]


@pytest.mark.parametrize("B,N,C,F,Dout,T,K,act,gated,dtype,unit_major,config", MLP_CASES)
def test_sparse_mlp_update(nan_empty, B, N, C, F, Dout, T, K, act, gated, dtype, unit_major, config):
    gen = torch.Generator().manual_seed(N * 7 + K)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype)

    x = rnd(B, C, N).transpose(1, 2)
    w_gate, b_gate = rnd(F, C, s=C ** -0.5), rnd(F)
    w_up, b_up = (rnd(F, C, s=C ** -0.5), rnd(F)) if gated else (None, None)
    w2 = rnd(Dout, F, s=F ** -0.5)
    nb = -(-N // T)
    indices = torch.stack([torch.randperm(F, generator=gen)[:K].sort().values for _ in range(B * nb)]).view(B, nb, K)
    a0, y0 = rnd(B, N, F), torch.randn(B, N, Dout, generator=gen)
    a_ref, y_ref = a0.double(), y0.double()
    mlp_ref.sparse_mlp_update(x.double(), w_gate.double(), b_gate.double(), None if w_up is None else w_up.double(),
                              None if b_up is None else b_up.double(), w2.double(), act, indices, a_ref, y_ref, T)
    if unit_major:
        a, w2_arg = a0.transpose(1, 2).contiguous().transpose(1, 2), w2.t().contiguous().t()
    else:
        a, w2_arg = a0.clone(), w2
    y = y0.clone()
    # The op's output in the activations' dtype, written by mm2's epilogue (poisoned first).
    out = torch.full((B, N, Dout), float("nan"), dtype=dtype)
    mlp_tr.sparse_mlp_update(x, w_gate, b_gate, w_up, b_up, w2_arg, act, indices.int(), a, y, T, config=config,
                             out=out)
    _close(a, a_ref, dtype, "a_cache")
    _close(y, y_ref, dtype, "y_cache")
    assert torch.equal(out, y.to(dtype))


@pytest.mark.parametrize("gated,dtype", [(False, torch.float32), (True, torch.float16)])
def test_sparse_mlp_update_with_token_perm(nan_empty, gated, dtype):
    """token_perm (token_grid reordering inside mm1 / mm2): cache row r is token perm[r] of x and of out. Equal to
    gathering x, updating without the perm and scattering y_cache back (what the op did before), and to the
    reference's definition."""
    gen = torch.Generator().manual_seed(23)
    B, N, C, F, Dout, T, K = 2, 45, 24, 40, 20, 16, 9

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype)

    x = rnd(B, N, C)
    w_gate, b_gate = rnd(F, C, s=C ** -0.5), rnd(F)
    w_up, b_up = (rnd(F, C, s=C ** -0.5), rnd(F)) if gated else (None, None)
    w2 = rnd(Dout, F, s=F ** -0.5)
    nb = -(-N // T)
    indices = torch.stack([torch.randperm(F, generator=gen)[:K].sort().values for _ in range(B * nb)]).view(B, nb, K)
    perm = torch.randperm(N, generator=gen)
    a0, y0 = rnd(B, N, F), torch.randn(B, N, Dout, generator=gen)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    a_ref, y_ref = a0.double(), y0.double()
    mlp_ref.sparse_mlp_update(x.double()[:, perm], w_gate.double(), b_gate.double(), d(w_up), d(b_up), w2.double(),
                              "gelu_tanh", indices, a_ref, y_ref, T)
    a_def, y_def, out_def = a0.double(), y0.double(), torch.empty(B, N, Dout, dtype=torch.float64)
    mlp_ref.sparse_mlp_update(x.double(), w_gate.double(), b_gate.double(), d(w_up), d(b_up), w2.double(),
                              "gelu_tanh", indices, a_def, y_def, T, out=out_def, token_perm=perm)
    assert torch.equal(y_def, y_ref) and torch.equal(a_def, a_ref)
    assert torch.equal(out_def[:, perm], y_ref)
    a, y = a0.clone(), y0.clone()
    out = torch.full((B, N, Dout), float("nan"), dtype=dtype)
    mlp_tr.sparse_mlp_update(x, w_gate, b_gate, w_up, b_up, w2, "gelu_tanh", indices.int(), a, y, T, out=out,
                             token_perm=perm.int())
    _close(a, a_ref, dtype, "a_cache")
    _close(y, y_ref, dtype, "y_cache")
    assert torch.equal(out[:, perm], y.to(dtype))
    with pytest.raises(ValueError, match="token_perm needs out"):
        mlp_tr.sparse_mlp_update(x, w_gate, b_gate, w_up, b_up, w2, "gelu_tanh", indices.int(), a, y, T,
                                 token_perm=perm)


def test_sparse_mlp_without_biases():
    gen = torch.Generator().manual_seed(11)
    B, N, C, F, T, K = 1, 33, 16, 32, 16, 12
    x = torch.randn(B, N, C, generator=gen)
    w_gate, w_up = torch.randn(F, C, generator=gen), torch.randn(F, C, generator=gen)
    w2 = torch.randn(C, F, generator=gen)
    indices = torch.stack([torch.randperm(F, generator=gen)[:K] for _ in range(3)]).view(B, 3, K)
    a, y = torch.randn(B, N, F, generator=gen), torch.randn(B, N, C, generator=gen)
    a_ref, y_ref = a.double(), y.double()
    mlp_ref.sparse_mlp_update(x.double(), w_gate.double(), None, w_up.double(), None, w2.double(), "silu", indices,
                              a_ref, y_ref, T)
    mlp_tr.sparse_mlp_update(x, w_gate, None, w_up, None, w2, "silu", indices, a, y, T)
    _close(a, a_ref, torch.float32, "a_cache")
    _close(y, y_ref, torch.float32, "y_cache")


@triton.jit
def _scaled_copy(X, Y, n, factor, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        tl.store(Y + offs, tl.load(X + offs) * factor)
    else:
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * factor, mask=offs < n)


_scaled_copy_tuned = triton.autotune([triton.Config({"BLOCK": 16}, num_warps=1)], key=["n"])(
    triton.heuristics({"EVEN": lambda a: a["n"] % a["BLOCK"] == 0})(_scaled_copy))


def test_cached_launch_reuses_config_heuristics_and_grid_per_key():
    launch = CachedLaunch(_scaled_copy_tuned)
    for n, factor in ((40, 2.0), (40, 2.0), (48, 3.0), (40, 2.0), (7, -1.0)):
        x = torch.randn(n)
        y = torch.full((n,), float("nan"))
        launch(lambda m: (triton.cdiv(n, m["BLOCK"]),), (x, y, n, factor), {})
        torch.testing.assert_close(y, x * factor)
    # One entry per distinct (scalars, dtypes, meta): the repeats went through the cached launch.
    assert len(launch._cache) == 3
    (grid40, kwargs40, runner, _), = [v for k, v in launch._cache.items() if k[0][2] == 40]
    assert grid40 == (3,) and kwargs40["BLOCK"] == 16 and kwargs40["EVEN"] is False
    assert runner is None  # the interpreter has no compiled binary: repeats go through JITFunction.run


@triton.jit
def _row_scale(X, Y, n, factor, BLOCK: tl.constexpr):
    """Row program_id(0) of [rows, n]: the row count is only in the grid, not an argument."""
    offs = tl.arange(0, BLOCK)
    row = tl.program_id(0)
    tl.store(Y + row * n + offs, tl.load(X + row * n + offs, mask=offs < n) * factor, mask=offs < n)


def test_cached_launch_of_a_plain_kernel_keys_on_shapes():
    """A plain (not autotuned) kernel through the cache; a batch size the kernel sees only through its grid (same
    scalars and dtypes) must not reuse another batch size's grid: rows past the first would stay unwritten."""
    launch = CachedLaunch(_row_scale)
    for rows in (1, 3, 1, 3):
        x = torch.randn(rows, 16)
        y = torch.full((rows, 16), float("nan"))
        launch((rows,), (x, y, 16, 2.0), {"BLOCK": 16})
        torch.testing.assert_close(y, 2 * x)
    assert len(launch._cache) == 2


@pytest.mark.parametrize("name", ["hunyuan_video", "flux"])
def test_backend_with_triton_kernels_all_selected_equals_eager(name):
    """The whole backend on the Triton kernels (interpreter): with every column and unit selected the sparse steps
    are exact, including HunyuanVideo's key-padding masked attention (padded text tokens in the inputs)."""
    import tiny_models
    from helpers import compile_chipmunk, denoise_loop, newest_runtimes, rel_err, runtime_ids

    model, make_inputs = tiny_models.FACTORIES[name]()
    eager = denoise_loop(model, make_inputs, steps=6, batch=2)
    before = runtime_ids()
    compiled = compile_chipmunk(model, kernels="triton", attn_sparsity=0.0, mlp_sparsity=0.0,
                                attn_random_fraction=0.0, mlp_random_fraction=0.0)
    outs = denoise_loop(compiled, make_inputs, steps=6, batch=2)
    for step, (a, b) in enumerate(zip(outs, eager)):
        assert rel_err(a, b) < 2e-5, (step, rel_err(a, b))
    counters = newest_runtimes(before)[0].site_counters
    assert counters.get("attention:sparse", 0) > 0 and counters.get("mlp:sparse_refresh", 0) > 0, counters


@pytest.mark.parametrize("dtype,config", [
    (torch.float16, None),
    (torch.float16, {"mm1": {"BLOCK_F": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
                      "mm2": {"BLOCK_D": 32, "BLOCK_K": 16, "EPI_SPLIT": 2, "Y_ATOMIC": 1, "num_warps": 4,
                              "num_stages": 1}}),
])
def test_sparse_mlp_update_16bit_output_cache(nan_empty, dtype, config):
    """y_cache in the activations' dtype (option mlp_output_cache_dtype='model'): the correction is summed in fp32
    and y rounded once (Y_ATOMIC falls back to the read-modify-write), as the reference rounds once. (fp16: the
    interpreter has no bf16 arithmetic; the GPU check in benchmarks/kernels.py runs bf16.)"""
    B, N, C, F, Dout, T, K = 2, 45, 32, 48, 40, 16, 20
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, N, C, generator=gen).to(dtype)
    w_gate, b_gate = (torch.randn(F, C, generator=gen) * C ** -0.5).to(dtype), torch.randn(F, generator=gen).to(dtype)
    w2 = (torch.randn(Dout, F, generator=gen) * F ** -0.5).to(dtype)
    nb = -(-N // T)
    indices = torch.stack([torch.randperm(F, generator=gen)[:K].sort().values for _ in range(B * nb)]).view(B, nb, K)
    a0, y0 = torch.randn(B, N, F, generator=gen).to(dtype), (4 * torch.randn(B, N, Dout, generator=gen)).to(dtype)
    a_ref, y_ref = a0.double(), y0.clone()
    mlp_ref.sparse_mlp_update(x.double(), w_gate.double(), b_gate.double(), None, None, w2.double(), "gelu_tanh",
                              indices, a_ref, y_ref, T)
    assert y_ref.dtype == dtype
    a, y = a0.transpose(1, 2).contiguous().transpose(1, 2), y0.clone()
    out = torch.full((B, N, Dout), float("nan"), dtype=dtype)
    mlp_tr.sparse_mlp_update(x, w_gate, b_gate, None, None, w2.t().contiguous().t(), "gelu_tanh", indices.int(), a,
                             y, T, config=config, out=out)
    _close(a, a_ref, dtype, "a_cache")
    _close(y, y_ref, dtype, "y_cache")
    assert torch.equal(out, y)
    with pytest.raises(ValueError, match="y_cache must be float32 or the activations' dtype"):
        mlp_tr.sparse_mlp_update(x, w_gate, b_gate, None, None, w2, "gelu_tanh", indices.int(), a,
                                 y.to(torch.bfloat16), T)

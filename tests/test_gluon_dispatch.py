"""Which calls the warp-specialised Gluon kernels (Hopper only) take, and that every other call gets the Triton
kernel or a clear error. The Gluon kernels themselves run only on the GPU (``benchmarks/attention_ws.py`` checks
them against the reference there; ``test_kernels_compile_gpu.py`` compiles them for sm_90 here)."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from chipmunk_compile.kernels import attention_dense_gluon as dense_ws  # noqa: E402
from chipmunk_compile.kernels import attention_dense_triton as dense_tr  # noqa: E402
from chipmunk_compile.kernels import attention_reference as ref  # noqa: E402
from chipmunk_compile.kernels import attention_sparse_gluon as sparse_ws  # noqa: E402
from chipmunk_compile.kernels import attention_sparse_triton as sparse_tr  # noqa: E402
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr  # noqa: E402

HOPPER = (9, 0)


def _qkv(dtype=torch.bfloat16, D=128, H=2, Hk=2, N=300, layout="bhnd"):
    if layout == "bnhd":  # the (B, N, H, D) strides Dynamo hands over
        q = torch.randn(1, N, H, D, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(1, N, Hk, D, dtype=dtype).transpose(1, 2) for _ in range(2))
        return q, k, v
    return torch.randn(1, H, N, D, dtype=dtype), *(torch.randn(1, Hk, N, D, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [64, 128, 192])
def test_supported_calls(layout, D, group):
    q, k, v = _qkv(D=D, layout=layout)
    base = torch.randn(q.shape, dtype=q.dtype)
    assert sparse_ws.supports(q, k, v, base, base, group, capability=HOPPER) is None
    assert dense_ws.supports(q, k, v, group, capability=HOPPER) is None


def test_unsupported_calls_name_the_reason():
    q, k, v = _qkv()
    base = torch.randn(q.shape, dtype=q.dtype)
    cases = {
        "Hopper": dict(capability=(8, 0)),
        "bf16/fp16": dict(tensors=_qkv(dtype=torch.float32)),
        "head dim": dict(tensors=_qkv(D=96)),
        "group_size": dict(group=256),
        # Rows 136 elements apart: 16-byte aligned, but not a stride Triton proves divisible by 16.
        "strides": dict(tensors=tuple(torch.randn(1, 2, 300, 136, dtype=q.dtype)[..., :128] for _ in range(3))),
    }
    for word, case in cases.items():
        tq, tk, tv = case.get("tensors", (q, k, v))
        tb = torch.randn(tq.shape, dtype=tq.dtype)
        cap, group = case.get("capability", HOPPER), case.get("group", 192)
        for why in (sparse_ws.supports(tq, tk, tv, tb, tb, group, capability=cap),
                    dense_ws.supports(tq, tk, tv, group, capability=cap)):
            assert why is not None and word.split("/")[0].lower() in why.lower(), (word, why)
    # Grouped-query K/V: the sparse kernel takes it, the dense column-mass kernel leaves it to Triton.
    gq, gk, gv = _qkv(H=4, Hk=2)
    gb = torch.randn(gq.shape, dtype=gq.dtype)
    assert sparse_ws.supports(gq, gk, gv, gb, gb, 192, capability=HOPPER) is None
    assert "heads" in dense_ws.supports(gq, gk, gv, 192, capability=HOPPER)


def test_off_gpu_auto_uses_triton_and_forcing_gluon_is_a_clear_error():
    q, k, v = _qkv(dtype=torch.float32, N=200)
    scale = q.shape[-1] ** -0.5
    ng = -(-200 // 192)
    idx = torch.stack([torch.randperm(200)[:40].sort().values for _ in range(2 * ng)]).view(1, 2, ng, 40).int()
    base = torch.randn(q.shape)
    expected = ref.sparse_attention_delta(q, k, v, scale, idx, 192, base, 1.0)
    out = sparse_tr.sparse_attention_delta(q, k, v, scale, idx, 192, base, 1.0)  # auto: Triton here
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="warp-specialised sparse attention kernel does not apply"):
        sparse_tr.sparse_attention_delta(q, k, v, scale, idx, 192, base, 1.0, kernel="gluon")
    lse_prev = ref.dense_attention_with_lse(q, k, v, scale)[1]
    with pytest.raises(ValueError, match="warp-specialised column-mass kernel does not apply"):
        dense_tr.dense_attention_lse_colmass(q, k, v, scale, lse_prev, 192, kernel="gluon")


def test_gluon_mm2_is_opt_in_and_refuses_off_gpu():
    B, N, C, Fh, T = 1, 256, 32, 64, 128
    x = torch.randn(B, N, C)
    w1, w2 = torch.randn(Fh, C) * C ** -0.5, torch.randn(C, Fh) * Fh ** -0.5
    idx = torch.stack([torch.randperm(Fh)[:16] for _ in range(N // T)]).view(1, N // T, 16)
    a, y = torch.randn(B, N, Fh), torch.zeros(B, N, C)
    with pytest.raises(ValueError, match="warp-specialised mm2 kernel does not apply"):
        mlp_tr.sparse_mlp_update(x, w1, None, None, None, w2, "gelu", idx, a, y, T, kernel="gluon")


@pytest.mark.parametrize("items,tiles,sms,forced,expected", [
    (576, 72, 132, None, 48),     # FLUX 1024^2, 24 heads: 4 full waves + 48 groups -> the 48 shared out
    (2112, 264, 132, None, 0),    # exactly 16 waves: no tail
    (600, 72, 132, None, 72),     # a tail of 72 groups, spread over all 132 SMs
    (40, 10, 132, None, 40),      # one partial wave: all of it
    (576, 1, 132, None, 0),       # a single key tile cannot be shared
    (576, 72, 132, 1000, 132),    # forced (tests), at most one per SM
    (100, 72, 132, 1000, 100),    # ... and at most the item count
    (576, 72, 132, 0, 0),
])
def test_split_count(items, tiles, sms, forced, expected):
    assert dense_ws.split_count(items, tiles, sms, forced) == expected


@pytest.mark.parametrize("n_tail,tiles,ctas", [(48, 72, 132), (72, 1857, 132), (1, 5, 7), (7, 2, 7), (3, 100, 4)])
def test_tail_pieces_cover_each_tail_item_once(n_tail, tiles, ctas):
    """Every key tile of every tail item lies in exactly one piece; each range c gives at most two pieces
    (slots c and ctas + c), in order, about W / ctas tiles in all."""
    pieces = dense_ws.tail_pieces(n_tail, tiles, ctas)
    covered = {}
    for j, item, t0, t1 in pieces:
        assert 0 <= item < n_tail and 0 <= t0 < t1 <= tiles and 0 <= j < 2 * ctas
        for t in range(t0, t1):
            assert (item, t) not in covered
            covered[(item, t)] = j
    assert len(covered) == n_tail * tiles
    per_range = {}
    for j, item, t0, t1 in pieces:
        per_range[j % ctas] = per_range.get(j % ctas, 0) + t1 - t0
    w = n_tail * tiles
    assert max(per_range.values()) <= -(-w // ctas) and min(per_range.values()) >= w // ctas

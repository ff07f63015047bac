"""Token reordering (token_grid / token_tile): the permutation, where it applies, and that it is exact where the
method is exact (dense steps, everything selected) while changing which tokens share a selection."""
import pytest
import torch

import chipmunk_compile
import tiny_models
from chipmunk_compile.passes.token_order import image_segment, tile_permutation
from helpers import compile_chipmunk, denoise_loop, newest_runtimes, rel_err, runtime_ids


def test_tile_permutation_orders_tiles_and_keeps_text_in_place():
    perm, unperm = tile_permutation(5 + 4 * 6, 5, (1, 4, 6), (1, 2, 4))
    assert torch.equal(perm[:5], torch.arange(5))                      # text tokens stay
    assert torch.equal(unperm[perm], torch.arange(29)) and torch.equal(perm[unperm], torch.arange(29))
    image = (perm[5:] - 5).tolist()                                   # raster index h * 6 + w
    rows, cols = [i // 6 for i in image], [i % 6 for i in image]
    # First tile: rows 0-1, cols 0-3 in raster order; then the ragged right tile (cols 4-5); then rows 2-3.
    assert list(zip(rows[:8], cols[:8])) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert list(zip(rows[8:12], cols[8:12])) == [(0, 4), (0, 5), (1, 4), (1, 5)]
    assert set(rows[12:]) == {2, 3}
    video, _ = tile_permutation(2 * 2 * 2, 0, (2, 2, 2), (2, 1, 2))   # tiles span frames
    assert video.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


@pytest.mark.parametrize("layout", ["token_major", "contiguous", "other"])
def test_select_tokens_gathers_like_index_select_and_keeps_the_layout(layout):
    """The attention op gathers its queries through the token-major view when q is one (faster on CUDA): the same
    values as index_select in every layout, and a token-major q stays token-major (what the kernels were given)."""
    from chipmunk_compile.kernels.attention_op import select_tokens
    base = torch.randn(2, 7, 3, 5)                                   # [B, N, H, D] memory
    q = {"token_major": base.transpose(1, 2), "contiguous": base.transpose(1, 2).contiguous(),
         "other": torch.randn(3, 2, 7, 5).transpose(0, 1)}[layout]   # head-major memory
    index = torch.randperm(7)
    got = select_tokens(q, 2, index)
    assert torch.equal(got, q.index_select(2, index))
    if layout == "token_major":
        assert got.transpose(1, 2).is_contiguous()


def test_image_segment():
    assert image_segment(64, (1, 8, 8), None) == 0
    assert image_segment(69, (1, 8, 8), (0, 5)) == 5                  # text in front
    assert image_segment(69, (1, 8, 8), (64, 69)) == 0                # text behind
    assert image_segment(69, (1, 8, 8), None) is None                 # unknown layout: not reordered
    assert image_segment(5, (1, 8, 8), None) is None                  # a text-only site


def test_explain_reports_which_sites_are_reordered():
    model, make_inputs = tiny_models.flux()
    report = chipmunk_compile.explain(model, options={"first_dense_layers": 0, "token_grid": (1, 8, 8)},
                                      **make_inputs(size=8))
    order = {s.module: s.details.get("token_order") for s in report.sites if s.rewritten}
    assert order["transformer_blocks.0.attn"] == "tiles"              # [5 text | 64 image] joint attention
    assert order["single_transformer_blocks.0.attn"] == "tiles"
    assert order["transformer_blocks.0.ff.net.2"] == "tiles"          # image tokens only
    assert order["transformer_blocks.0.ff_context.net.2"] == "raster"  # text tokens only
    assert order["single_transformer_blocks.0.proj_out"] == "tiles"   # [text | image] through the fused MLP
    plain = chipmunk_compile.explain(model, options={"first_dense_layers": 0}, **make_inputs(size=8))
    assert {s.details.get("token_order") for s in plain.sites if s.rewritten} == {"raster"}


@pytest.mark.parametrize("options", [{"mode": "dense"},
                                     {"attn_sparsity": 0.0, "mlp_sparsity": 0.0, "attn_random_fraction": 0.0,
                                      "mlp_random_fraction": 0.0}])
def test_reordering_is_exact_where_the_method_is(options):
    model, make_inputs = tiny_models.flux(num_layers=1, num_single_layers=1)
    eager = denoise_loop(model, make_inputs, steps=8, size=16, batch=2)
    before = runtime_ids()
    outs = denoise_loop(compile_chipmunk(model, token_grid=(1, 16, 16), token_tile=(1, 4, 8), **options),
                        make_inputs, steps=8, size=16, batch=2)
    for step, (a, b) in enumerate(zip(outs, eager)):
        assert rel_err(a, b) < 2e-5, (step, rel_err(a, b))
    if options.get("mode") != "dense":
        counters = newest_runtimes(before)[0].site_counters
        assert counters.get("attention:sparse", 0) > 0 and counters.get("mlp:sparse_refresh", 0) > 0


def test_reordering_changes_sparse_steps_and_stays_close():
    model, make_inputs = tiny_models.flux(num_layers=2, num_single_layers=2)
    eager = denoise_loop(model, make_inputs, steps=12, size=16)
    raster = denoise_loop(compile_chipmunk(model, attn_sparsity=0.7, mlp_sparsity=0.7), make_inputs, steps=12,
                          size=16, driver=model)
    torch._dynamo.reset()
    tiles = denoise_loop(compile_chipmunk(model, attn_sparsity=0.7, mlp_sparsity=0.7, token_grid=(1, 16, 16),
                                          token_tile=(1, 4, 8)), make_inputs, steps=12, size=16, driver=model)
    assert rel_err(tiles[0], eager[0]) < 1e-5                         # dense step
    assert any(rel_err(a, b) > 1e-6 for a, b in zip(tiles[2:], raster[2:]))   # other groups, other selections
    assert max(rel_err(a, b) for a, b in zip(tiles, eager)) < 0.2


def test_bad_token_grid_is_rejected():
    with pytest.raises(ValueError, match="token_grid"):
        chipmunk_compile.ChipmunkOptions.from_dict({"token_grid": (64, 64)})
    with pytest.raises(ValueError, match="token_tile"):
        chipmunk_compile.ChipmunkOptions.from_dict({"token_tile": (1, 0, 8)})


@pytest.mark.parametrize("grid,warns", [((1, 16, 16), False), ((1, 32, 32), True)])
def test_a_token_grid_matching_no_site_is_reported(grid, warns):
    import warnings
    model, make_inputs = tiny_models.flux(num_layers=1, num_single_layers=1)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        compile_chipmunk(model, token_grid=grid, token_tile=(1, 4, 8))(**make_inputs(size=16))
    ours = [str(w.message) for w in caught if issubclass(w.category, chipmunk_compile.ChipmunkFallbackWarning)]
    assert any("matches no site's token count" in m for m in ours) == warns, ours

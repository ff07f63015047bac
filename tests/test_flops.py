"""FLOP accounting (chipmunk_compile.flops): a hand count on a tiny config, and the replayed schedule equals the
plans the ops actually run."""
import pytest
import torch

from chipmunk_compile.flops import attention_plans, collect_site_records, flops_saved, mlp_plans
from helpers import compile_chipmunk, denoise_loop, newest_runtimes, runtime_ids

# num_steps 6; attention dense at 0, 1 (warm-up) and 3 (every 3rd); MLP dense at 0 and 3; MLP selection refreshed
# before step 2 and on even steps afterwards.
OPTS = {"num_steps": 6, "attn_warmup_steps": 2, "attn_dense_every": 3, "mlp_warmup_steps": 1,
        "mlp_dense_every": 3, "mlp_refresh_until": 2, "mlp_refresh_every": 2}

ATTN = {"kind": "attention", "module": "b.attn", "rewritten": True,
        "details": {"batch": 2, "heads": 3, "queries": 10, "keys": 12, "head_dim": 4, "value_dim": 4,
                    "kept_keys": 5}}
MLP = {"kind": "mlp", "module": "b.mlp", "rewritten": True,
       "details": {"batch": 2, "tokens": 10, "d_in": 8, "d_out": 6, "hidden_units": 16, "kept_units": 4,
                   "token_blocks": 3, "gated": True}}


def test_schedules_follow_the_ops_rules():
    assert attention_plans(OPTS, 6) == ["dense_lse", "dense_select", "sparse", "dense_select", "sparse", "sparse"]
    assert mlp_plans(OPTS, 6) == ["dense_fill", "sparse_refresh", "sparse_refresh", "dense_fill",
                                  "sparse_refresh", "sparse"]
    # a second generation starts over (state resets after num_steps calls)
    assert attention_plans(OPTS, 12)[6:] == attention_plans(OPTS, 6)
    # mode="dense": every call plain dense, no selection work
    assert set(attention_plans({**OPTS, "mode": "dense"}, 6)) == {"dense"}
    # explicit dense steps without step 1: step 1 is scheduled sparse but has no cache yet -> dense_select
    assert attention_plans({**OPTS, "attn_dense_steps": [0, 4]}, 6)[:3] == ["dense_lse", "dense_select", "sparse"]
    # keeping the first selection: later dense steps refill the cache without re-selecting
    assert attention_plans({**OPTS, "attn_recompute_mask": False}, 6)[3] == "dense_cache"


def test_hand_count_tiny_config():
    # attention, B*H*Nq = 2*3*10 = 60 query rows, Nk=12, D=Dv=4, K=5
    dense_a = 4 * 60 * 12 * 4                   # 11520 per call
    colmass = 2 * 60 * 12 * 4                   # 5760, a second Q·Kᵀ on selecting dense steps
    sparse_a = 4 * 60 * 5 * 4                   # 4800 (also the o_cache = O − P^S work on selecting steps)
    # steps: 0 dense_lse, 1 dense_select, 2 sparse, 3 dense_select, 4 sparse, 5 sparse
    chip_a = dense_a + 2 * (dense_a + colmass + sparse_a) + 3 * sparse_a
    # mlp, B*N = 20 tokens, d_in 8, F 16, gated (P=2), d_out 6, K 4, nb 3 token blocks
    dense_m = 2 * 20 * (8 * 16 * 2 + 16 * 6)    # 14080
    sparse_m = 2 * 20 * (8 * 4 * 2 + 4 * 6)     # 3520 = K/F of dense
    scoring = 2 * 2 * 3 * 8 * 16 * 2            # 3072, block-mean pre-activations times W_gate, W_up
    # steps: 0 fill, 1 refresh, 2 refresh, 3 fill, 4 refresh, 5 sparse
    chip_m = 2 * (dense_m + scoring) + 3 * (sparse_m + scoring) + sparse_m
    # a site left dense counts dense FLOPs on both sides
    left_dense = {**MLP, "module": "b0.mlp", "rewritten": False}

    r = flops_saved([ATTN, MLP, left_dense], OPTS, 6)
    assert r["attention_flops_dense"] == 6 * dense_a
    assert r["attention_flops_chipmunk"] == chip_a
    assert r["mlp_flops_dense"] == 2 * 6 * dense_m
    assert r["mlp_flops_chipmunk"] == chip_m + 6 * dense_m
    assert r["attention_saved_fraction"] == pytest.approx(1 - chip_a / (6 * dense_a))
    assert r["mlp_saved_fraction"] == pytest.approx(1 - (chip_m + 6 * dense_m) / (12 * dense_m))
    total_dense, total_chip = 6 * dense_a + 12 * dense_m, chip_a + chip_m + 6 * dense_m
    assert r["total_saved_fraction"] == pytest.approx(1 - total_chip / total_dense)
    assert r["uncounted_sites"] == []

    # invocations_per_step multiplies both sides; the fractions stay
    r2 = flops_saved([ATTN, MLP], {**OPTS, "invocations_per_step": 2}, 6)
    assert r2["attention_flops_dense"] == 2 * 6 * dense_a and r2["attention_flops_chipmunk"] == 2 * chip_a
    # mode dense: nothing saved; a site without shapes is listed, not counted
    r3 = flops_saved([ATTN, MLP, {"kind": "attention", "module": "x", "rewritten": False, "details": {}}],
                     {**OPTS, "mode": "dense"}, 6)
    assert r3["total_saved_fraction"] == 0.0 and r3["uncounted_sites"] == ["x"]


def test_replayed_plans_match_the_ops_and_records_have_shapes():
    from tiny_models import flux

    model, make_inputs = flux(num_layers=1, num_single_layers=2)
    steps = 7
    options = {"num_steps": steps, "first_dense_layers": 1, "attn_dense_every": 3, "mlp_dense_every": 4}
    records = collect_site_records(model, {"inner_backend": "aot_eager", "attn_query_group": 32,
                                           "mlp_token_block": 32, "attn_kv_tile": 16, "mlp_unit_tile": 16,
                                           **options}, **make_inputs(batch=2))
    assert any(not r.rewritten for r in records) and all("batch" in r.details for r in records)
    torch._dynamo.reset()

    before = runtime_ids()
    compiled = compile_chipmunk(model, **options)
    denoise_loop(compiled, make_inputs, steps, batch=2)
    counters = newest_runtimes(before)[0].site_counters
    n_attn = sum(r.kind == "attention" and r.rewritten for r in records)
    n_mlp = sum(r.kind == "mlp" and r.rewritten for r in records)
    expected = {}
    for kind, plans, n in (("attention", attention_plans(options, steps), n_attn),
                           ("mlp", mlp_plans(options, steps), n_mlp)):
        for p in plans:
            expected[f"{kind}:{p}"] = expected.get(f"{kind}:{p}", 0) + n
    assert counters == expected

    r = flops_saved(records, options, steps)
    assert 0.0 < r["total_saved_fraction"] < 1.0
    assert r["sites_rewritten"] == {"attention": n_attn, "mlp": n_mlp}


def test_records_for_options_equal_explain():
    from chipmunk_compile.flops import records_for_options, shape_records
    from tiny_models import flux

    model, make_inputs = flux(num_layers=1, num_single_layers=2)
    inputs = make_inputs(batch=2)
    shaped = shape_records(model, **inputs)
    for options in ({"num_steps": 10}, {"num_steps": 10, "first_dense_layers": 0, "attn_sparsity": 0.5,
                                        "mlp_sparsity": 0.9, "attn_kv_tile": 16, "mlp_token_block": 32},
                    {"num_steps": 10, "sparsify_mlp": False, "attn_static_columns": "none", "attn_kv_tile": 8}):
        torch._dynamo.reset()
        direct = collect_site_records(model, options, **inputs)
        derived = records_for_options(shaped, options)
        assert [(r.module, r.rewritten) for r in derived] == [(r.module, r.rewritten) for r in direct]
        assert flops_saved(derived, options, 10) == flops_saved(direct, options, 10)

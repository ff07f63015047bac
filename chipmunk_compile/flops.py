"""FLOP accounting of attention and MLP sites over a whole generation: dense vs chipmunk.

    records = collect_site_records(transformer, options, **one_call_kwargs)   # shapes for every site
    report = flops_saved(records, options, num_steps=50)
    report["total_saved_fraction"]

Every site counts, rewritten or not (a site left dense costs its dense FLOPs in both columns). The schedule is
replayed per site exactly as ``torch.ops.chipmunk.{attention,mlp}`` choose their plan (same flags: a scheduled
sparse step whose caches are not filled yet runs dense). Multiply-add = 2 FLOPs. Per call of one site:

attention (B batch, H heads, Nq queries, Nk keys, D head dim, Dv value dim, K kept keys incl. static/random)
    dense / dense_lse              2·B·H·Nq·Nk·(D + Dv)                (= 4·B·H·Nq·Nk·D when Dv = D)
    dense_select                   dense + 2·B·H·Nq·Nk·D  (column mass, a second Q·Kᵀ pass)
                                         + 2·B·H·Nq·K·(D + Dv)  (o_cache = O − P^S over the kept columns)
    dense_cache (recompute off)    dense + 2·B·H·Nq·K·(D + Dv)
    sparse                         2·B·H·Nq·K·(D + Dv)
mlp (B batch, N tokens, d_in, d_out, F hidden units, K kept units, nb token blocks, P = 2 if gated else 1)
    dense                          2·B·N·(d_in·F·P + F·d_out)
    dense_fill                     dense + 2·B·nb·d_in·F·P  (block means of the pre-activations, for scoring)
    sparse                         2·B·N·(d_in·K·P + K·d_out)          (= K/F of dense)
    sparse_refresh                 sparse + 2·B·nb·d_in·F·P (scoring GEMM)

Elementwise work (softmax, activation, top-k, cache reads) is not counted. ``invocations_per_step`` multiplies
every call (each invocation is a separate call of the same shapes).

``explain`` reports the shapes (``details``) only for rewritten sites; ``collect_site_records`` runs it twice
(once with the given options for the rewritten flags, once with every detectable site rewritten for the
shapes) and merges. Sites whose shapes are still unknown are listed under ``uncounted_sites``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from chipmunk_compile.options import ChipmunkOptions

__all__ = ["flops_saved", "collect_site_records", "shape_records", "records_for_options", "attention_call_flops", "mlp_call_flops",
           "attention_plans", "mlp_plans"]

_ATTN_KEYS = ("batch", "heads", "queries", "keys", "head_dim", "kept_keys")
_MLP_KEYS = ("batch", "tokens", "d_in", "d_out", "hidden_units", "kept_units", "token_blocks")


def _options(options) -> ChipmunkOptions:
    if isinstance(options, ChipmunkOptions):
        return options
    return ChipmunkOptions.from_dict(options)


def _get(record, name, default=None):
    if isinstance(record, dict):
        return record.get(name, default)
    return getattr(record, name, default)


# --- plans, replayed as the ops choose them ------------------------------------------------------------------

def attention_plans(options, num_steps: int) -> list[str]:
    """Plan of a rewritten attention site at each call of a generation (invocation 0), as attention_op does."""
    opts = _options(options)
    plans = []
    has_lse = has_indices = has_cache = False
    for call in range(num_steps):
        step = call % opts.num_steps
        if step == 0 and call > 0:  # the runtime resets all state after num_steps calls
            has_lse = has_indices = has_cache = False
        if opts.mode == "dense":
            plan = "dense"
        elif opts.attention_dense_at(step) or not has_cache:
            if not has_lse:
                plan = "dense_lse"
            elif opts.attn_recompute_mask or not has_indices:
                plan = "dense_select"
            else:
                plan = "dense_cache"
        else:
            plan = "sparse"
        if plan == "dense_select":
            has_indices = True
        if plan in ("dense_lse", "dense_select", "dense_cache"):
            has_lse = True
        if plan in ("dense_select", "dense_cache"):
            has_cache = True
        plans.append(plan)
    return plans


def mlp_plans(options, num_steps: int) -> list[str]:
    """Plan of a rewritten MLP site at each call of a generation, as mlp_op does."""
    opts = _options(options)
    plans = []
    has_cache = has_indices = False
    for call in range(num_steps):
        step = call % opts.num_steps
        if step == 0 and call > 0:
            has_cache = has_indices = False
        if opts.mode == "dense":
            plan = "dense"
        elif opts.mlp_dense_at(step) or not has_cache:
            plan = "dense_fill"
        elif opts.mlp_refresh_at(step) or not has_indices:
            plan = "sparse_refresh"
        else:
            plan = "sparse"
        if plan == "dense_fill":
            has_cache = True
        if plan == "sparse_refresh":
            has_indices = True
        plans.append(plan)
    return plans


# --- per-call FLOPs --------------------------------------------------------------------------------------------

def attention_call_flops(d: dict, plan: str) -> int:
    B, H, Nq, Nk, D = (int(d[k]) for k in ("batch", "heads", "queries", "keys", "head_dim"))
    Dv = int(d.get("value_dim") or D)
    K = int(d["kept_keys"])
    dense = 2 * B * H * Nq * Nk * (D + Dv)
    delta = 2 * B * H * Nq * K * (D + Dv)
    if plan in ("dense", "dense_lse"):
        return dense
    if plan == "dense_select":
        return dense + 2 * B * H * Nq * Nk * D + delta
    if plan == "dense_cache":
        return dense + delta
    if plan == "sparse":
        return delta
    raise ValueError(f"unknown attention plan {plan!r}")


def mlp_call_flops(d: dict, plan: str) -> int:
    B, N, din, dout, F_, K, nb = (int(d[k]) for k in _MLP_KEYS)
    P = 2 if d.get("gated") else 1
    dense = 2 * B * N * (din * F_ * P + F_ * dout)
    scoring = 2 * B * nb * din * F_ * P
    sparse = 2 * B * N * (din * K * P + K * dout)
    if plan == "dense":
        return dense
    if plan == "dense_fill":
        return dense + scoring
    if plan == "sparse_refresh":
        return sparse + scoring
    if plan == "sparse":
        return sparse
    raise ValueError(f"unknown mlp plan {plan!r}")


def _has_shapes(record) -> bool:
    d = _get(record, "details") or {}
    keys = _ATTN_KEYS if _get(record, "kind") == "attention" else _MLP_KEYS
    return all(d.get(k) is not None for k in keys)


def flops_saved(site_records: Iterable[Any], options, num_steps: int) -> dict:
    """Attention and MLP FLOPs of every site over ``num_steps`` calls (× invocations_per_step), dense vs chipmunk.

    ``site_records``: ``explain(...).sites`` (SiteRecord or dicts with kind, module, rewritten, details).
    Returns dense and chipmunk totals per kind, the saved fractions (1 − chipmunk / dense), the plan counts per
    kind and the sites that could not be counted (no shapes in their details).
    """
    opts = _options(options)
    inv = opts.invocations_per_step
    attn_plans, mlp_plan_list = attention_plans(opts, num_steps), mlp_plans(opts, num_steps)
    totals = {"attention": [0, 0], "mlp": [0, 0]}
    uncounted = []
    counted = {"attention": 0, "mlp": 0}
    rewritten = {"attention": 0, "mlp": 0}
    for rec in site_records:
        kind = _get(rec, "kind")
        if kind not in totals:
            continue
        if not _has_shapes(rec):
            uncounted.append(_get(rec, "module"))
            continue
        d = _get(rec, "details")
        call = attention_call_flops if kind == "attention" else mlp_call_flops
        plans = (attn_plans if kind == "attention" else mlp_plan_list) if _get(rec, "rewritten") else None
        dense = call(d, "dense") * num_steps * inv
        chip = (sum(call(d, p) for p in plans) * inv) if plans is not None else dense
        totals[kind][0] += dense
        totals[kind][1] += chip
        counted[kind] += 1
        rewritten[kind] += bool(_get(rec, "rewritten"))

    def frac(dense, chip):
        return 1.0 - chip / dense if dense else 0.0

    (ad, ac), (md, mc) = totals["attention"], totals["mlp"]
    return {
        "attention_flops_dense": ad,
        "attention_flops_chipmunk": ac,
        "mlp_flops_dense": md,
        "mlp_flops_chipmunk": mc,
        "total_flops_dense": ad + md,
        "total_flops_chipmunk": ac + mc,
        "attention_saved_fraction": frac(ad, ac),
        "mlp_saved_fraction": frac(md, mc),
        "total_saved_fraction": frac(ad + md, ac + mc),
        "num_steps": num_steps,
        "sites_counted": counted,
        "sites_rewritten": rewritten,
        "uncounted_sites": uncounted,
        "attention_plan_counts": {p: attn_plans.count(p) for p in sorted(set(attn_plans))},
        "mlp_plan_counts": {p: mlp_plan_list.count(p) for p in sorted(set(mlp_plan_list))},
    }


def collect_site_records(model, options=None, **call_kwargs) -> list:
    """``explain`` records of every site with its shapes filled in (also for sites the options leave dense).

    Runs ``explain`` with ``options`` (rewritten flags, reasons) and once more with every detectable site
    rewritten (first_dense_layers=0, both kinds on, mode 'chipmunk', same sparsities) to read the shapes of the
    sites the first run left dense. Call it with the keyword arguments of one transformer call.
    """
    from chipmunk_compile.explain import explain

    opts = _options(options)
    base = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    base["dump_dir"] = None
    records = list(explain(model, options=base, **call_kwargs).sites)
    if all(_has_shapes(r) for r in records):
        return records
    forced = dict(base, first_dense_layers=0, sparsify_attention=True, sparsify_mlp=True, mode="chipmunk")
    shaped = list(explain(model, options=forced, **call_kwargs).sites)
    pool: dict = {}
    for r in shaped:
        pool.setdefault((r.kind, r.module), []).append(r)
    out = []
    for r in records:
        if not _has_shapes(r):
            cands = pool.get((r.kind, r.module)) or []
            donor = next((c for c in cands if _has_shapes(c)), None)
            if donor is not None:
                cands.remove(donor)
                shapes = {k: v for k, v in donor.details.items() if k in _ATTN_KEYS + _MLP_KEYS + ("value_dim", "gated")}
                r = dataclasses.replace(r, details={**r.details, **shapes})
        out.append(r)
    return out


def shape_records(model, **call_kwargs) -> list:
    """``explain`` records with every detectable site rewritten (first_dense_layers=0, both kinds, static text
    columns 'auto'): the shapes of all sites, for ``records_for_options`` to re-derive any options' records
    without tracing the model again (a parameter sweep traces once)."""
    from chipmunk_compile.explain import explain

    forced = {"first_dense_layers": 0, "sparsify_attention": True, "sparsify_mlp": True,
              "attn_static_columns": "auto"}
    return list(explain(model, options=forced, **call_kwargs).sites)


def records_for_options(shaped, options) -> list:
    """The records ``explain(model, options=options)`` would give (rewritten flags, reasons, kept counts), derived
    from ``shape_records``: the backend's rules (sparsify_* flags, first_dense_layers) and its selection counts."""
    from chipmunk_compile.kernels.attention_op import attention_selection_counts
    from chipmunk_compile.kernels.mlp_op import mlp_selection_counts

    opts = _options(options)
    out = []
    for r in shaped:
        d = dict(r.details)
        rewritten, reason = r.rewritten, r.reason
        if rewritten:
            if r.kind == "attention" and not opts.sparsify_attention:
                rewritten, reason = False, "attention sparsity disabled (sparsify_attention=False)"
            elif r.kind == "mlp" and not opts.sparsify_mlp:
                rewritten, reason = False, "MLP sparsity disabled (sparsify_mlp=False)"
            elif r.layer is not None and r.layer < opts.first_dense_layers:
                rewritten, reason = False, f"layer {r.layer} < first_dense_layers={opts.first_dense_layers}"
        if _has_shapes(r):
            if r.kind == "attention":
                static = d.get("static_columns") if opts.attn_static_columns == "auto" else None
                num_static = static[1] - static[0] if static else 0
                d["top"], d["random"], d["kept_keys"] = attention_selection_counts(d["keys"], num_static, opts)
                d["static_columns"] = static
                d["query_groups"] = -(-int(d["queries"]) // opts.attn_query_group)
            else:
                _, _, d["kept_units"] = mlp_selection_counts(d["hidden_units"], opts)
                d["token_blocks"] = -(-int(d["tokens"]) // opts.mlp_token_block)
        out.append(dataclasses.replace(r, rewritten=rewritten, reason=reason, details=d))
    return out

"""The ``chipmunk`` torch.compile backend: analyse the Dynamo graph, rewrite sites, hand the rest to Inductor.

    torch.compile(model, backend="chipmunk", options={...})
      Dynamo FX graph ──copy──► detect sites (passes/detect_*) ─► layers, first_dense_layers
                                 ─► rewrite each accepted site into torch.ops.chipmunk.* + cache buffers
                                 ─► inner compiler (Inductor by default)
      returned callable: checks it runs for the module it was compiled for, calls the compiled graph,
      advances the step counter of this graph's GraphRuntime.

If analysis, rewrite or the inner compile of the rewritten graph raises, the original graph is compiled
plainly and one warning says why. Bad options raise immediately (they are the user's to fix).
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.fx as fx

from chipmunk_compile import dump, runtime
from chipmunk_compile.options import ChipmunkOptions
from chipmunk_compile.passes.dataflow import dataflow_graph
from chipmunk_compile.passes.detect_attention import find_attention_sites
from chipmunk_compile.passes.detect_mlp import find_mlp_sites
from chipmunk_compile.passes.rewrite_attention import rewrite_attention
from chipmunk_compile.passes.rewrite_mlp import rewrite_mlp
from chipmunk_compile.passes.sites import Site, assign_layers
from chipmunk_compile.passes.state_buffers import state_bytes

log = logging.getLogger("chipmunk_compile")

# Kernels register their ops on import.
import chipmunk_compile.kernels.attention_op  # noqa: E402,F401
import chipmunk_compile.kernels.mlp_op  # noqa: E402,F401


class ChipmunkFallbackWarning(UserWarning):
    """A graph (or some of its sites) runs without the delta-cache rewrite."""


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy sharing attributes and node metadata, so the original stays intact for fallback."""
    graph = fx.Graph()
    value_map: dict = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output(output)
    for old, new in value_map.items():
        if hasattr(old, "_dynamo_source"):  # AOTAutograd reads it from placeholders
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    copy._param_name_to_source = dict(getattr(gm, "_param_name_to_source", None) or {})
    return copy


def detect_sites(gm: fx.GraphModule, options: ChipmunkOptions) -> list[Site]:
    sites = find_attention_sites(gm.graph) + find_mlp_sites(gm.graph)
    sites.sort(key=lambda s: _node_order(gm.graph)[s.nodes["out"]])
    assign_layers(gm.graph, sites)
    for site in sites:
        if site.reason:
            continue
        if site.kind == "attention" and not options.sparsify_attention:
            site.reason = "attention sparsity disabled (sparsify_attention=False)"
        elif site.kind == "mlp" and not options.sparsify_mlp:
            site.reason = "MLP sparsity disabled (sparsify_mlp=False)"
        elif site.layer is not None and site.layer < options.first_dense_layers:
            site.reason = f"layer {site.layer} < first_dense_layers={options.first_dense_layers}"
    return sites


def _node_order(graph: fx.Graph) -> dict:
    return {node: i for i, node in enumerate(graph.nodes)}


def rewrite_sites(gm: fx.GraphModule, sites: list[Site], runtime_id: int, options: ChipmunkOptions,
                  cache_device=None) -> int:
    """Rewrites accepted sites in place; returns how many were rewritten. ``cache_device="meta"`` allocates
    no real cache memory (analysis only)."""
    rewritten = 0
    dag = dataflow_graph(gm.graph)  # taken before any rewrite: analyses see the original dataflow
    for index, site in enumerate(sites):
        if site.reason:
            continue
        if site.kind == "attention":
            rewrite_attention(gm, site, index, runtime_id, options, dag, cache_device)
        else:
            rewrite_mlp(gm, site, index, runtime_id, options, cache_device)
        site.rewritten = True
        rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return rewritten


def inner_compile(gm: fx.GraphModule, example_inputs, options: ChipmunkOptions, torch_mode: str | None):
    if options.inner_backend == "eager":
        return gm.forward
    if options.inner_backend == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    patches = {}
    if torch_mode in ("reduce-overhead", "max-autotune"):
        patches["triton.cudagraphs"] = True
    if torch_mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        patches["max_autotune"] = True
    return compile_fx(gm, example_inputs, config_patches=patches)


def _regional_error(site_count: int) -> RuntimeError:
    return RuntimeError(
        "chipmunk: one compiled graph is being run for a different module instance than it was compiled for "
        "(diffusers' compile_repeated_blocks / regional compilation reuses one graph for every block). The "
        f"graph's {site_count} delta caches belong to one layer, so sharing them would silently mix layers. "
        "Compile the whole transformer instead: torch.compile(transformer, backend='chipmunk').")


def _keep_shapes_static() -> None:
    """Caches have the shapes of one resolution and batch, so a new shape must be a new graph. Dynamo's
    automatic dynamic shapes would instead recompile the second shape as a symbolic graph, whose sites stay
    dense; turn that off for the process (as torch.compile(dynamic=False) does for one model)."""
    if torch._dynamo.config.automatic_dynamic_shapes:
        torch._dynamo.config.automatic_dynamic_shapes = False
        log.info("chipmunk: set torch._dynamo.config.automatic_dynamic_shapes=False (caches are per shape)")


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, ChipmunkFallbackWarning, stacklevel=3)


def chipmunk_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """Entry point registered as torch_dynamo_backends: chipmunk."""
    unknown = set(kwargs) - {"options", "mode"}
    if unknown:
        raise TypeError(f"chipmunk backend: unexpected arguments {sorted(unknown)}")
    options = ChipmunkOptions.from_dict(kwargs.get("options"))
    torch_mode = kwargs.get("mode")
    _keep_shapes_static()
    try:
        rewritten = copy_graph_module(gm)
        sites = detect_sites(rewritten, options)
        rt = runtime.GraphRuntime(options, num_sites=len(sites), weight_ptrs=frozenset())
        code_before = rewritten.code
        count = rewrite_sites(rewritten, sites, rt.id, options)
    except Exception as exc:  # analysis must never break the user's model
        _warn(f"chipmunk: graph analysis/rewrite failed ({type(exc).__name__}: {exc}); this graph runs plain "
              f"{options.inner_backend}.")
        log.debug("chipmunk rewrite failure", exc_info=True)
        return inner_compile(gm, example_inputs, options, torch_mode)

    rt.site_records = [s.record() for s in sites]
    rt.state_bytes = state_bytes(rewritten)
    rejected = [s for s in sites if s.reason.startswith(("unsupported", "symbolic"))]
    if rejected:
        _warn(f"chipmunk: {len(rejected)} site(s) left dense: {rejected[0].reason} (e.g. {rejected[0].module}).")
    log.info("chipmunk: %d of %d sites rewritten (%d attention, %d mlp), %.1f MiB of cache state", count,
             len(sites), sum(s.rewritten and s.kind == "attention" for s in sites),
             sum(s.rewritten and s.kind == "mlp" for s in sites), rt.state_bytes / 2**20)
    if options.dump_dir:
        dump.write_graph_dump(options.dump_dir, rt.id, code_before, rewritten, sites)
    if count == 0:
        return inner_compile(gm, example_inputs, options, torch_mode)

    try:
        compiled = inner_compile(rewritten, example_inputs, options, torch_mode)
    except Exception as exc:
        _warn(f"chipmunk: compiling the rewritten graph failed ({type(exc).__name__}: {exc}); this graph runs "
              f"plain {options.inner_backend}.")
        log.debug("chipmunk compile failure", exc_info=True)
        return inner_compile(gm, example_inputs, options, torch_mode)

    # Dynamo passes parameters as graph inputs; their addresses identify the module instance.
    expected = {i: t.data_ptr() for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)}
    rt.weight_ptrs = frozenset(expected.values())
    check_position, check_ptr = next(iter(expected.items()), (None, None))

    def run_with_state(*args):
        if check_position is not None and args[check_position].data_ptr() != check_ptr:
            raise _regional_error(count)
        runtime.activate(rt)
        out = compiled(*args)
        rt.advance()
        return out

    run_with_state.chipmunk_runtime = rt  # keeps the runtime alive as long as the compiled graph
    return run_with_state

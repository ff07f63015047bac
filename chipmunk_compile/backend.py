"""The ``chipmunk`` torch.compile backend: analyse the Dynamo graph, rewrite sites, hand the rest to Inductor.

    torch.compile(model, backend="chipmunk", options={...})
      Dynamo FX graph ──copy──► detect sites (passes/detect_*) ─► layers, first_dense_layers
                                 ─► rewrite each accepted site into torch.ops.chipmunk.* + cache buffers
                                 ─► inner compiler (Inductor by default)
      returned callable: picks the caches and runtime of the module instance it is called for (Dynamo shares
      one graph between instances of a class), calls the compiled rewrite with those caches, advances the step
      counter of that instance's GraphRuntime.

A graph that is one whole block (regional compilation, or per-block frames after a graph break in the block
loop; ``passes/sites.is_one_block_graph``) is rewritten too: every block instance then has its own caches and
runtime, and its layer (for first_dense_layers) is its rank in first-call order (``_BlockOrder``). Instances
whose rewrite has the same sites share one compiled graph, their caches passed to it as inputs
(``passes/lift_state.py``; not under CUDA graphs, where each instance compiles its own).

If analysis, rewrite or the inner compile of the rewritten graph raises, the original graph is compiled
plainly and one warning says why. Bad options raise immediately (they are the user's to fix).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
import weakref

import torch
import torch.fx as fx

from chipmunk_compile import cache_key, dump, runtime
from chipmunk_compile.options import ChipmunkOptions
from chipmunk_compile.passes.autocast_regions import autocast_region_nodes
from chipmunk_compile.passes.dataflow import dataflow_graph
from chipmunk_compile.passes.lift_state import lift_site_state
from chipmunk_compile.passes.detect_attention import find_attention_sites
from chipmunk_compile.passes.detect_mlp import find_mlp_sites, site_nodes as mlp_site_nodes
from chipmunk_compile.passes.rewrite_attention import rewrite_attention
from chipmunk_compile.passes.rewrite_mlp import rewrite_mlp
from chipmunk_compile.passes.sites import (GRAPH_BLOCK, Site, assign_layers, is_one_block_graph,
                                           mark_one_block_graph, repeated_containers, sibling_blocks_outside_lists)
from chipmunk_compile.passes.state_buffers import state_bytes, tensors_nbytes

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


def _find_sites(graph: fx.Graph) -> list[Site]:
    sites = find_attention_sites(graph) + find_mlp_sites(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    sites.sort(key=lambda s: order[s.nodes["out"]])
    return sites


def detect_sites(gm: fx.GraphModule, options: ChipmunkOptions, block_layer=None) -> list[Site]:
    """The graph's sites with their blocks, layers and reasons. A graph that is one whole block (marked on
    ``gm.graph``, then detected again with every node in that block) takes its layer from ``block_layer()``
    (called once; layer 0 without it)."""
    sites = _find_sites(gm.graph)
    if is_one_block_graph(gm.graph, sites):
        mark_one_block_graph(gm.graph)
        block_sites = _find_sites(gm.graph)
        if sibling_blocks_outside_lists(block_sites):  # a whole model with its blocks as plain attributes
            mark_one_block_graph(gm.graph, False)
        else:
            sites = block_sites
    assign_layers(gm.graph, sites)
    if any(site.block == GRAPH_BLOCK for site in sites):
        layer = block_layer() if block_layer is not None else 0
        for site in sites:
            if site.block == GRAPH_BLOCK:
                site.layer = layer
    under_autocast = autocast_region_nodes(gm.graph)
    for site in sites:
        if site.reason:
            continue
        if under_autocast and any(n in under_autocast for n in _computed_nodes(site)):
            site.reason = ("unsupported: inside a torch.autocast region entered in the model's own code (the "
                           "chipmunk ops compute in the weights' dtype and do not follow autocast); move the "
                           "autocast out of the compiled forward to run it sparse")
            continue
        if site.kind == "attention" and not options.sparsify_attention:
            site.reason = "attention sparsity disabled (sparsify_attention=False)"
        elif site.kind == "mlp" and not options.sparsify_mlp:
            site.reason = "MLP sparsity disabled (sparsify_mlp=False)"
        elif site.layer is not None and site.layer < options.first_dense_layers:
            site.reason = f"layer {site.layer} < first_dense_layers={options.first_dense_layers}"
    return sites


def _computed_nodes(site: Site) -> set[fx.Node]:
    """The nodes a site computes (what its op would replace), not its inputs: an MLP input or q/k/v produced
    inside an autocast region and consumed outside it does not put the site in the region."""
    if site.kind == "mlp":
        return mlp_site_nodes(site)
    stops = {site.nodes.get(key) for key in ("q", "k", "v", "key_mask")}
    seen, todo = set(), [site.nodes["out"]]
    while todo:
        node = todo.pop()
        if node in seen or node in stops or node.op in ("placeholder", "get_attr"):
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return seen


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
            rewrite_mlp(gm, site, index, runtime_id, options, cache_device, dag)
        site.rewritten = True
        rewritten += 1
    # The replaced computations go even where they update in place (an activation with inplace=True); any other
    # unused node goes only if it has no side effects.
    replaced = set()
    for site in sites:
        if site.rewritten:
            replaced |= mlp_site_nodes(site) if site.kind == "mlp" else {site.nodes["out"]}
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: node not in replaced and has_side_effects(node))
    gm.graph.lint()
    gm.recompile()
    return rewritten


def has_side_effects(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its value. FX's own rule keeps
    side-effectful functions but treats every ``call_method`` as pure, so an unused ``h.mul_(2)`` or
    ``buf[:, n:].copy_(pos)`` (as diffusers' CogVideoX patch embedding writes its positional table) would be
    deleted together with the nodes the rewrite replaced. In-place methods and functions (trailing underscore),
    ``out=`` and ``inplace=True`` calls and ops with a mutable schema count as side effects here."""
    if node.is_impure() or "out" in node.kwargs or _inplace_flag(node):
        return True
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _inplace_flag(node: fx.Node) -> bool:
    """A call such as F.relu(x, inplace=True) or F.silu(x, True)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function" or not any(a is True for a in node.args):
        return False
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return "inplace" in params and params.index("inplace") < len(node.args) and \
        node.args[params.index("inplace")] is True


def wants_cudagraphs(options: ChipmunkOptions, torch_mode: str | None) -> bool:
    """CUDA graphs asked for by the options, the torch.compile mode, or Inductor's global config."""
    from torch._inductor import config as inductor_config
    return bool(options.cudagraphs or torch_mode in ("reduce-overhead", "max-autotune")
                or inductor_config.triton.cudagraphs)


def inner_compile(gm: fx.GraphModule, example_inputs, options: ChipmunkOptions, torch_mode: str | None):
    if options.inner_backend == "eager":
        return gm.forward
    if options.inner_backend == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    patches = cache_key.inductor_config_patch()
    if wants_cudagraphs(options, torch_mode):
        patches["triton.cudagraphs"] = True
    if torch_mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        patches["max_autotune"] = True
    return compile_fx(gm, example_inputs, config_patches=patches)


def _keep_shapes_static() -> None:
    """Caches have the shapes of one resolution and batch, so a new shape must be a new graph. Dynamo's
    automatic dynamic shapes would instead recompile the second shape as a symbolic graph, whose sites stay
    dense; turn that off for the process (as torch.compile(dynamic=False) does for one model)."""
    if torch._dynamo.config.automatic_dynamic_shapes:
        torch._dynamo.config.automatic_dynamic_shapes = False
        log.info("chipmunk: set torch._dynamo.config.automatic_dynamic_shapes=False (caches are per shape)")


# frame id -> tensor-shape signature -> Dynamo recompile numbers of that frame that had it.
_COMPILES_BY_SHAPE: dict = {}


def _warn_on_recompiles_with_same_shapes(example_inputs) -> None:
    """With automatic dynamic shapes off, a Python number argument that changes at every call (e.g. a float
    timestep) makes Dynamo recompile the frame at every call: fresh caches each time (every step dense), until
    its recompile limit sends the model to eager. Three compiles of one frame with the same tensor shapes say
    so once."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None or compile_id.frame_id is None:
        return
    if compile_id.frame_compile_id == 0:  # a new frame (ids restart after torch._dynamo.reset())
        _COMPILES_BY_SHAPE[compile_id.frame_id] = {}
    shapes = tuple((tuple(t.shape), t.dtype) for t in example_inputs if isinstance(t, torch.Tensor))
    seen = _COMPILES_BY_SHAPE.setdefault(compile_id.frame_id, {}).setdefault(shapes, set())
    seen.add(compile_id.frame_compile_id)
    if len(seen) == 3:
        _warn("chipmunk: this model was compiled 3 times with the same tensor shapes. A Python number argument "
              "(e.g. a float timestep) probably changes at every call: the backend keeps Dynamo's shapes and "
              "numbers static (automatic dynamic shapes off), so every call recompiles with fresh caches (dense) "
              "until Dynamo's recompile limit. Pass such arguments as tensors.")


def _warn(message: str) -> None:
    """One fallback message: a ChipmunkFallbackWarning (Python shows each text once), and a log record only
    where the application has configured logging (otherwise logging's last-resort handler would print the same
    text a second time, and again whenever Dynamo restarts a compile)."""
    if log.hasHandlers():
        log.warning(message)
    warnings.warn(message, ChipmunkFallbackWarning, stacklevel=3)


class _BlockOrder:
    """Layer numbers of graphs that are one block. A block's own frame does not know its index in the model
    (its module paths start inside it), so block instances are numbered in the order they are first called: a
    model's first forward builds its blocks in execution order (double and single blocks counted together, as
    a whole-model graph counts them), and the first call of an already-built block instance (the model's next
    forward, or another model's) makes the next new one layer 0 again, as for a new resolution whose blocks all
    get new graphs. Assumes no two models run their first forwards interleaved."""

    def __init__(self):
        self.next_layer = 0
        self.fresh = None  # the entry built last and not yet called
        self.layers: dict[tuple, int] = {}  # instance_key(its weights) -> its layer, while they live

    def take(self, weights=()) -> int:
        """The layer of the block instance recognised by ``weights`` (its parameters, or buffers): the one it got
        at its first build when it has been numbered before (a new resolution or batch size rebuilds every
        instance, possibly right after a single first forward), else the next one in first-call order."""
        key = instance_key(weights)
        if key is not None and key in self.layers:
            return self.layers[key]
        layer, self.next_layer = self.next_layer, self.next_layer + 1
        if key is not None:
            self.layers[key] = layer
            for tensor in weights:
                weakref.finalize(tensor, self.layers.pop, key, None)
        return layer

    def called(self, entry) -> None:
        if entry is not self.fresh:
            self.next_layer = 0
        self.fresh = None


_BLOCK_ORDER = _BlockOrder()


SHARE_COMPILES = True  # module instances share compiled rewrites (False: one compile per instance; experiments)


class _SharedCompiles(dict):
    """The rewritten graphs one Dynamo graph compiled for its module instances, shared between them:
    (rewritten site indices, device) -> (compiled callable taking the caches as trailing inputs, the caches'
    (shape, dtype, device)), or None where that compile failed (its instances run the plain compile)."""


def _build(gm: fx.GraphModule, example_inputs, options: ChipmunkOptions, torch_mode: str | None, plain=None,
           shared: _SharedCompiles | None = None):
    """Rewrites and compiles one graph for one module instance: (compiled callable, runtime or None, whether
    the graph is one block, the instance's cache tensors to pass after the graph's inputs). ``plain(inputs)``
    gives the graph compiled without rewrite (shared by instances). With ``shared``, an instance whose rewrite
    has the same sites as an earlier one's reuses that compile (caches as inputs, ops bound to the caller's
    runtime) and only gets new caches; without it (CUDA graphs), each instance compiles its own graph with its
    caches as buffers."""
    if plain is None:
        def plain(inputs):
            return inner_compile(gm, inputs, options, torch_mode)
    one_block = False
    try:
        rewritten = copy_graph_module(gm)
        weights = [example_inputs[i] for i in module_state_inputs(gm, example_inputs)]
        sites = detect_sites(rewritten, options, block_layer=lambda: _BLOCK_ORDER.take(weights))
        one_block = any(site.block == GRAPH_BLOCK for site in sites)
        rt = runtime.GraphRuntime(options, num_sites=len(sites), weights=weights)
        code_before = rewritten.code
        key = None
        if shared is not None:
            key = (tuple(i for i, s in enumerate(sites) if not s.reason), weights[0].device if weights else None)
        reuse = key in shared if shared is not None else False
        # A reused compile needs only this instance's site records: the rewrite then allocates nothing. A shared
        # graph takes one invocation's caches (the dispatcher passes the current invocation's set).
        rewrite_options = options if shared is None else dataclasses.replace(options, invocations_per_step=1)
        rt.caches_per_invocation = shared is not None
        count = rewrite_sites(rewritten, sites, runtime.CALLER if shared is not None else rt.id, rewrite_options,
                              cache_device="meta" if reuse else None)
        state = lift_site_state(rewritten)[1] if shared is not None and count else []
        if reuse and count and shared[key] is not None:  # this instance's own caches, for the compiled graph
            state = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in shared[key][1]]
    except Exception as exc:  # analysis must never break the user's model
        _warn(f"chipmunk: graph analysis/rewrite failed ({type(exc).__name__}: {exc}); this graph runs plain "
              f"{options.inner_backend}.")
        log.debug("chipmunk rewrite failure", exc_info=True)
        return plain(example_inputs), None, one_block, ()

    rt.site_records = [s.record() for s in sites]
    rt.state_bytes = state_bytes(rewritten) + tensors_nbytes(state)
    if one_block:
        rt.block_layer = next(s.layer for s in sites if s.block == GRAPH_BLOCK)
    _report_sites(rt, sites, rewritten, count, one_block, options)
    if options.dump_dir:
        dump.write_graph_dump(options.dump_dir, rt.id, code_before, rewritten, sites)
    if count == 0:
        return plain(example_inputs), None, one_block, ()
    if reuse:
        if shared[key] is None:
            return plain(example_inputs), None, one_block, ()
        log.info("chipmunk: graph %d reuses the compiled graph of an earlier module instance", rt.id)
        return shared[key][0], rt, one_block, tuple(state)
    try:
        compiled = inner_compile(rewritten, [*example_inputs, *state], options, torch_mode)
    except Exception as exc:
        if key is not None:
            shared[key] = None
        _warn(f"chipmunk: compiling the rewritten graph failed ({type(exc).__name__}: {exc}); this graph runs "
              f"plain {options.inner_backend}.")
        log.debug("chipmunk compile failure", exc_info=True)
        return plain(example_inputs), None, one_block, ()
    if key is not None:
        shared[key] = (compiled, [(t.shape, t.dtype, t.device) for t in state])
    return compiled, rt, one_block, tuple(state)


def _report_sites(rt, sites: list[Site], rewritten: fx.GraphModule, count: int, one_block: bool,
                  options: ChipmunkOptions) -> None:
    """The warnings and log lines about one graph's sites (what is left dense and why)."""
    rejected = [s for s in sites if s.reason.startswith(("unsupported", "symbolic"))]
    if rejected:
        _warn(f"chipmunk: {len(rejected)} site(s) left dense: {rejected[0].reason} (e.g. {rejected[0].module}).")
    if sites and all(s.block is None for s in sites):
        _warn("chipmunk: this graph has attention computations but neither repeated transformer blocks around "
              "them (a ModuleList of blocks; blocks held as separate attributes, self.b0, self.b1, are not "
              "recognised) nor is it one whole block (a self-attention the backend can rewrite, as a block "
              "compiled alone has), so nothing is rewritten (chipmunk_compile.explain shows each site). If it is "
              "part of the transformer split off by a graph break (TORCH_LOGS=graph_breaks shows it; e.g. "
              ".item()/nonzero in the forward, or a break inside a block's forward), remove the break to run it "
              "sparse.")
    if options.token_grid is not None and count and all(s.details.get("token_order") != "tiles"
                                                         for s in sites if s.rewritten):
        _warn(f"chipmunk: token_grid={options.token_grid} matches no site's token count in this graph (a "
              "different resolution?), so every site keeps raster token order.")
    in_blocks = [s for s in sites if s.block is not None]
    if one_block:  # dense by first_dense_layers is then this instance's layer, nothing to warn about
        log.info("chipmunk: graph %d is one transformer block (regional compilation or per-block frames): "
                 "block instance %d in first-call order", rt.id, rt.block_layer)
    if count == 0 and in_blocks and not one_block and all(s.reason.startswith("layer ") for s in in_blocks):
        _warn(f"chipmunk: none of this graph's {len(in_blocks)} sites is rewritten: all sit in its first "
              f"{options.first_dense_layers} blocks (first_dense_layers={options.first_dense_layers}). Layers are "
              "counted per compiled graph, so a graph break inside the transformer restarts the count: remove the "
              "break (TORCH_LOGS=graph_breaks shows it) or lower first_dense_layers.")
    explained = rejected or (sites and all(s.block is None for s in sites)) or (
        in_blocks and all(s.reason.startswith("layer ") for s in in_blocks))
    blocks = repeated_containers(rewritten.graph)
    if count == 0 and blocks and not explained:
        # e.g. linear attention and convolutional feed-forwards (Sana), or cross-attention only: the model
        # compiles and runs, just without any speedup; say so once instead of leaving it to explain().
        found = "; ".join(sorted({f"{s.kind}: {s.reason}" for s in sites})) or "no softmax attention or MLP found"
        _warn(f"chipmunk: this graph has repeated blocks ({', '.join(sorted(blocks))}) but none of their "
              f"computations can be rewritten ({found}), so it runs plain {options.inner_backend} with no "
              "speedup; chipmunk_compile.explain shows each site.")
    log.info("chipmunk: %d of %d sites rewritten (%d attention, %d mlp), %.1f MiB of cache state", count,
             len(sites), sum(s.rewritten and s.kind == "attention" for s in sites),
             sum(s.rewritten and s.kind == "mlp" for s in sites), rt.state_bytes / 2**20)


def _ambient_autocast() -> str | None:
    """Why autocast would change the whole graph's arithmetic (the model is called inside torch.autocast) and
    what the user can do about it, or None. Regions the model enters itself are handled per site
    (``passes/autocast_regions.py``)."""
    for device_type in ("cuda", "cpu", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device_type):
                return (f"the model is called under torch.autocast('{device_type}'). Cast the model instead (e.g. "
                        "model.to(torch.bfloat16)) to run it sparse.")
        except (RuntimeError, TypeError, ValueError):  # a device type this torch build does not know
            continue
    return None


def module_state_inputs(gm: fx.GraphModule, inputs) -> list[int]:
    """Indices of the graph inputs whose addresses identify the module instance: its parameters (Dynamo passes
    them as inputs), or, for a model without any (weights kept as buffers, as converted or frozen weights are),
    its buffers; otherwise every such model would look like every other."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params, buffers = [], []
    for i, (node, t) in enumerate(zip(placeholders, inputs)):
        if not isinstance(t, torch.Tensor):
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "") or ""
        source = source() if callable(source) else source
        if isinstance(t, torch.nn.Parameter) or "._parameters[" in source or "_parameters_" in node.name:
            params.append(i)
        elif "._buffers[" in source or "_buffers_" in node.name:
            buffers.append(i)
    return params or buffers



def instance_key(weights) -> tuple | None:
    """What tells module instances apart: the identities of all their weight tensors (parameters, or buffers for a
    model without parameters), not of the first one only, since blocks may share some weights (e.g. one
    modulation layer tied across blocks) and must still get their own caches. Objects, not addresses: weights
    moved to new memory (offloading) are the same instance."""
    return tuple(map(id, weights)) or None


class _Instances(dict):
    """A compiled graph's module instances: instance_key -> (compiled callable, runtime or None, the instance's
    cache sets: per invocation, the cache tensors passed after the graph's inputs; [()] when the graph holds its
    caches itself). A dict that can be referenced weakly."""


def _caches_for(rt, cache_sets: list) -> tuple:
    """The current invocation's cache set of a graph that takes its caches as inputs, made (zeros, like the first
    set) on the invocation's first call."""
    if not rt.caches_per_invocation:
        return ()
    if not rt.stepped and len(cache_sets) > rt.options.invocations_per_step:  # back to counting: extra sets go
        for extra in cache_sets[rt.options.invocations_per_step:]:
            rt.state_bytes -= tensors_nbytes(extra)
        del cache_sets[rt.options.invocations_per_step:]
    while len(cache_sets) <= rt.invocation:
        cache_sets.append(tuple(torch.zeros_like(t) for t in cache_sets[0]))
        rt.state_bytes += tensors_nbytes(cache_sets[0])
    return cache_sets[rt.invocation]


def _drop_instance(instances_ref, key) -> None:
    instances = instances_ref()
    if instances is not None:
        instances.pop(key, None)


def chipmunk_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """Entry point registered as torch_dynamo_backends: chipmunk."""
    unknown = set(kwargs) - {"options", "mode"}
    if unknown:
        raise TypeError(f"chipmunk backend: unexpected arguments {sorted(unknown)}")
    options = ChipmunkOptions.from_dict(kwargs.get("options"))
    torch_mode = kwargs.get("mode")
    _keep_shapes_static()
    _warn_on_recompiles_with_same_shapes(example_inputs)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        _warn("chipmunk: the model was called with gradients enabled; the delta caches are inference-only, so "
              f"this graph runs plain {options.inner_backend}. Call the model under torch.no_grad() or "
              "torch.inference_mode().")
        return inner_compile(gm, example_inputs, options, torch_mode)
    autocast = _ambient_autocast()
    if autocast:
        _warn(f"chipmunk: the chipmunk ops compute in the weights' dtype and do not follow autocast, so this "
              f"graph runs plain {options.inner_backend}: {autocast}")
        return inner_compile(gm, example_inputs, options, torch_mode)
    plain_compiled = []

    def plain(inputs):  # instances left dense (first_dense_layers) share one plain compile
        if not plain_compiled:
            plain_compiled.append(inner_compile(gm, inputs, options, torch_mode))
        return plain_compiled[0]

    # Module instances share compiled rewrites (their caches passed as inputs), except under CUDA graphs: inputs
    # that differ per instance would be copied into the graph's static buffers at every replay.
    shared = None if wants_cudagraphs(options, torch_mode) or not SHARE_COMPILES else _SharedCompiles()
    compiled, rt, one_block, state = _build(gm, example_inputs, options, torch_mode, plain, shared)
    if rt is None and not one_block:
        return compiled

    # Dynamo reuses one graph for every module instance with the same code and shapes (parameters are graph
    # inputs), e.g. two transformers compiled side by side, or the blocks of a regional compile. Caches belong to
    # one instance: each instance (recognised by its weight objects, instance_key) gets its own caches and runtime,
    # and shares the compiled rewrite of earlier instances with the same sites. Weights moved to new memory
    # (offloading to the CPU and back) are the same objects, so the model keeps its caches. An instance's caches are
    # released with its weights (the model deleted, or a parameter replaced), not kept until torch._dynamo.reset().
    # A graph that is one block always comes here (even when its first instance is a dense layer): the next
    # instance may be sparse.
    state_inputs = module_state_inputs(gm, example_inputs)
    instances = _Instances()

    def add_instance(weights, entry):
        key = instance_key(weights)
        instances[key] = entry
        # weakly: the graph may go first (torch._dynamo.reset()) and take its entries; any weight released (the
        # model deleted, or that parameter replaced) drops the entry
        for tensor in weights:
            weakref.finalize(tensor, _drop_instance, weakref.ref(instances), key)
        return entry

    first = add_instance([example_inputs[i] for i in state_inputs], (compiled, rt, [state]))
    if one_block:
        _BLOCK_ORDER.fresh = first

    def run_with_state(*args):
        entry = instances.get(tuple(map(id, map(args.__getitem__, state_inputs))) or None)
        if entry is None:
            log.info("chipmunk: graph reused for another module instance; building its caches")
            fn, state, _, caches = _build(gm, list(args), options, torch_mode, plain, shared)
            entry = add_instance([args[i] for i in state_inputs], (fn, state, [caches]))
            if one_block:
                _BLOCK_ORDER.fresh = entry
        if one_block:
            _BLOCK_ORDER.called(entry)
        fn, state, cache_sets = entry
        if state is None:
            return fn(*args)
        runtime.activate(state)
        caches = _caches_for(state, cache_sets)
        previous = runtime.calling(state)
        try:
            out = fn(*args, *caches)
        finally:
            runtime.done_calling(previous)
        state.advance()
        return out

    run_with_state.chipmunk_instances = instances  # keeps the runtimes alive as long as the compiled graph
    run_with_state.chipmunk_shared = shared
    return run_with_state

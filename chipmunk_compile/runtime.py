"""Per-instance runtime state: which step and invocation the next call is, and what each site has cached.

The caches themselves are tensors the compiled graph mutates: graph inputs of a rewrite that module instances
share (each instance passes its own, one set per invocation), or buffers of a per-instance GraphModule under CUDA
graphs (a leading invocation axis of invocations_per_step). What lives here is host-side bookkeeping that
decides, per call, what each ``torch.ops.chipmunk.*`` op does:

    counted:  call k of a graph  ->  step = k // invocations_per_step, invocation = k % invocations_per_step
    stepped:  step = scheduler.step() calls since the generation began, invocation = model calls since the last
              one (follow_scheduler, once the scheduler has been seen stepping: separate cond / uncond calls
              need no invocations_per_step then)
    each site, each invocation: has_lse / has_indices / has_cache flags (validity of its caches)

Counted, after ``num_steps * invocations_per_step`` calls, or on ``reset`` (stepped: at the scheduler's next
set_timesteps), every flag is cleared, so the next call starts a new generation from dense steps. Flags are never
shared between graphs: a new resolution, batch size or recompilation, and every module instance, gets its own
``GraphRuntime``. Ops find their runtime by an integer id baked into the graph; a graph compiled once for every
instance of a module (its caches passed as inputs) bakes in ``CALLER`` instead, and its ops use the runtime of the
instance being called (``calling``).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import weakref

import torch

from chipmunk_compile.options import ChipmunkOptions

log = logging.getLogger("chipmunk_compile")


@dataclasses.dataclass
class SiteFlags:
    has_lse: bool = False
    has_indices: bool = False
    has_cache: bool = False


class GraphRuntime:
    """Step counter and cache-validity flags of one compiled graph."""

    def __init__(self, options: ChipmunkOptions, num_sites: int, weights: list[torch.Tensor] = ()):
        self.id = next(_ids)
        self.options = options
        # The model's weight tensors (graph inputs) identify it: weak references for stats/reset, and their
        # object ids as the key of the model's active graph. Objects, not addresses: weights moved to new memory
        # are the same model, and a new model in a deleted one's memory is not.
        self.weight_refs = tuple(weakref.ref(w) for w in weights)
        self.model_key = frozenset(id(w) for w in weights)
        steps = next((_steps_override[id(w)] for w in weights if id(w) in _steps_override), None)
        if steps is not None and steps != options.num_steps:  # the model follows its scheduler's step count
            self.options = options = dataclasses.replace(options, num_steps=steps)
        self.calls = 0
        # follow_scheduler: generations begin at scheduler.set_timesteps; running past num_steps * invocations_per_step
        # calls before the next one means the model is called more often per step than the options say.
        self.followed = steps is not None
        self.overran = False
        self.restarts = 0       # mid-generation restarts because another graph of the same model ran
        # Stepped mode (the scheduler's step() is followed and has been seen): steps and invocations by events.
        self.stepped = any(id(w) in _stepped for w in weights)
        self.steps_done = 0
        self.calls_in_step = 0
        self.generation_calls = 0  # counted calls since the generation began (internal restarts do not clear it)
        # Caches passed per invocation (a graph shared by instances: one cache set per invocation, slot 0 in the
        # graph), else a leading invocation axis of invocations_per_step slots in the graph's buffers.
        self.caches_per_invocation = False
        self.num_sites = num_sites
        self.flags = [[SiteFlags() for _ in range(num_sites)] for _ in range(options.invocations_per_step)]
        self.site_counters: dict[str, int] = {}
        self.site_records: list = []      # filled by the backend after the rewrite
        self.state_bytes = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        # A graph that is one block (regional compilation): that instance's layer, so the block instances of one
        # graph (same site numbers) draw different random columns / units.
        self.block_layer: int | None = None
        self._derived: dict = {}
        _RUNTIMES[self.id] = self

    @property
    def step(self) -> int:
        return self.steps_done if self.stepped else self.calls // self.options.invocations_per_step

    @property
    def invocation(self) -> int:
        return self.calls_in_step if self.stepped else self.calls % self.options.invocations_per_step

    @property
    def cache_slot(self) -> int | None:
        """Where the current invocation's caches are in the graph's cache tensors: 0 when caches are passed per
        invocation, else the invocation's index on the leading axis; None when that axis has no slot for it (a
        stepped model called more often per step than invocations_per_step, under CUDA graphs)."""
        if self.caches_per_invocation:
            return 0
        return self.invocation if self.invocation < self.options.invocations_per_step else None

    def site_flags(self, site_index: int) -> SiteFlags:
        while len(self.flags) <= self.invocation:
            self.flags.append([SiteFlags() for _ in range(self.num_sites)])
        return self.flags[self.invocation][site_index]

    def advance(self) -> None:
        if self.stepped:
            self.calls_in_step += 1
            return
        self.calls += 1
        self.generation_calls += 1
        if self.calls >= self.options.num_steps * self.options.invocations_per_step:
            self.overran, self.restarts = self.followed, 0
            self.reset()

    def end_step(self) -> None:
        """The followed scheduler stepped. The first time (the generation ran counted so far), unless the counting
        made exactly one step of this generation's calls, the caches are dropped: calls of one step were counted as
        steps and shared caches. The current step is then step 1, its next call invocation 0. After num_steps
        steps the next generation begins."""
        if not self.stepped:
            self.stepped = True
            # Keep the caches only when the counting made exactly the one step the scheduler ended of this
            # generation's calls (no restart or wrap in between).
            if not self.calls == self.generation_calls == self.options.invocations_per_step:
                self.reset()
            self.calls = 0
        self.steps_done += 1
        self.calls_in_step = 0
        if self.steps_done >= self.options.num_steps:  # the generation is over (as after num_steps counted steps)
            self.reset()

    def reset(self, new_generation: bool = False) -> None:
        """Clears every cache flag and the step count. ``new_generation``: a generation begins (reset(model),
        the scheduler's set_timesteps), as opposed to a restart inside one."""
        if new_generation:
            self.generation_calls = 0
        self.calls = self.steps_done = self.calls_in_step = 0
        for per_invocation in self.flags:
            for flags in per_invocation:
                flags.has_lse = flags.has_indices = flags.has_cache = False

    def count(self, what: str) -> None:
        """Counts executed plans (e.g. 'attention:sparse'); tests and explain() read them."""
        self.site_counters[what] = self.site_counters.get(what, 0) + 1

    def derived(self, key, tensor: torch.Tensor, make):
        """``make(tensor)``, cached until the tensor changes. The cache key includes the storage address, shape,
        strides and the version counter, which every in-place update (load_state_dict, fused LoRA) bumps,
        so a derived copy of a weight can never be stale."""
        stamp = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor._version, tensor.dtype)
        cached = self._derived.get(key)
        if cached is None or cached[0] != stamp:
            cached = self._derived[key] = (stamp, make(tensor))
        return cached[1]

    def generator(self, site_index: int, device: torch.device) -> torch.Generator:
        """A generator seeded by (seed, site, step) (and the layer of a one-block graph): reproducible runs, fresh
        draws per step, the same draw for every invocation and sample (so batched CFG equals separate calls)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        key = (self.options.seed, site_index, self.step) if self.block_layer is None else \
            (self.options.seed, "block", self.block_layer, site_index, self.step)
        gen.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)
        return gen


_ids = itertools.count(1)
# Calls within one scheduler step beyond which a stepped runtime goes back to counting by calls (each invocation of
# a step has its own cache set; CFG makes 2, rarely 3).
MAX_STEPPED_INVOCATIONS = 3
# The runtime id baked into a graph that module instances share: the ops then take the caller's runtime.
CALLER = 0
_caller = threading.local()


def calling(rt: GraphRuntime):
    """Makes ``rt`` the runtime of CALLER ops until the returned token is passed to ``done_calling``."""
    previous = getattr(_caller, "rt", None)
    _caller.rt = rt
    return previous


def done_calling(previous) -> None:
    _caller.rt = previous


# id(weight tensor) -> steps per generation, set by scheduler_sync.begin_generation for the graphs a model
# compiles later; an entry goes with its tensor.
_steps_override: dict[int, int] = {}
# id(weight tensor) of models whose followed scheduler has been seen stepping (their graphs count by events).
_stepped: set[int] = set()


def mark_stepped(tensor: torch.Tensor) -> None:
    key = id(tensor)
    if key not in _stepped:
        weakref.finalize(tensor, _stepped.discard, key)
        _stepped.add(key)


def set_steps_override(tensor: torch.Tensor, num_steps: int) -> None:
    key = id(tensor)
    if key not in _steps_override:
        weakref.finalize(tensor, _steps_override.pop, key, None)
    _steps_override[key] = num_steps


_RUNTIMES: "weakref.WeakValueDictionary[int, GraphRuntime]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


# Per model (its weight set), the runtime that ran last. A call to another graph of the same model (another
# resolution or batch size) means a new generation there: it restarts from dense steps instead of continuing
# whatever it held from before.
_active: dict[frozenset, int] = {}
_warned_models: set = set()  # (model key, warning kind) said once


def _warn_once(rt: GraphRuntime, what: str, message: str) -> None:
    """One warning per model and kind (the graphs of one model share the text)."""
    key = (rt.model_key, what)
    if key in _warned_models:
        return
    _warned_models.add(key)
    from chipmunk_compile.backend import _warn  # the package's one way to say a fallback (warning + log)
    _warn(message)


def no_cache_slot(rt: GraphRuntime) -> None:
    """Says once that a stepped model's extra calls per step run dense (their caches have no slot)."""
    _warn_once(rt, "no_slot", f"chipmunk: graph {rt.id} is called {rt.invocation + 1} times in one scheduler step, "
               f"more than invocations_per_step={rt.options.invocations_per_step}; with CUDA graphs each instance's "
               "caches have that many slots, so the extra calls run dense (exact, no speedup). Set "
               f"invocations_per_step={rt.invocation + 1}.")


def activate(rt: GraphRuntime) -> None:
    if rt.stepped and rt.calls_in_step >= max(MAX_STEPPED_INVOCATIONS, rt.options.invocations_per_step):
        # That many calls without a step of the followed scheduler: the model runs outside the followed sampler
        # (another loop, a scheduler swapped in). Count by calls again instead of making a cache set per call.
        _warn_once(rt, "unstepped", f"chipmunk: graph {rt.id} was called {rt.calls_in_step} times without a step "
                   "of the followed scheduler; it counts steps by calls again (num_steps calls per generation, "
                   "times the invocations option) until that scheduler steps.")
        rt.stepped = False
        rt.reset()
    if rt.stepped:  # steps come from the scheduler: graphs of one model may alternate (cond / uncond shapes)
        _active[rt.model_key] = rt.id
        return
    if rt.overran and rt.calls == 0:
        rt.overran = False
        _warn_once(rt, "overran", f"chipmunk: graph {rt.id} was called more than num_steps * invocations_per_step = "
                   f"{rt.options.num_steps} * {rt.options.invocations_per_step} times since the scheduler's last "
                   "set_timesteps: the pipeline calls the model more often per step than invocations_per_step "
                   "says (separate cond/uncond CFG calls: Wan, Flux true_cfg_scale, HunyuanVideo true_cfg_scale, "
                   "QwenImage need invocations_per_step=2), so cond and uncond share caches and the schedule "
                   "restarts mid-generation.")
    if _active.get(rt.model_key) != rt.id:
        if rt.calls:
            rt.restarts += 1
            if rt.restarts == 3:
                _warn_once(rt, "alternating", f"chipmunk: graph {rt.id} restarted from dense steps 3 times in the "
                           "middle of a generation: another graph of the same model runs between its calls (e.g. "
                           "cond/uncond CFG calls with different text lengths or masks, as QwenImage true CFG "
                           "makes), so every step stays dense (no speedup). Batch the two calls or give them the "
                           "same shapes (pad the negative prompt embeddings and masks to the prompt's length).")
            log.info("chipmunk: graph %d restarts from dense steps: another graph of the same model ran since "
                     "its last call (new resolution/batch, or cond/uncond calls of different shapes)", rt.id)
            rt.reset()
        _active[rt.model_key] = rt.id
        if len(_active) > 4 * len(_RUNTIMES) + 64:  # drop the keys of released graphs now and then
            live = {r.id for r in live_runtimes()}
            for key in [k for k, v in _active.items() if v not in live]:
                del _active[key]


def lookup(runtime_id: int) -> GraphRuntime:
    if runtime_id == CALLER:
        rt = getattr(_caller, "rt", None)
        if rt is None:
            raise RuntimeError("chipmunk: a compiled graph shared by module instances ran outside its instance "
                               "dispatcher (no caller runtime). This is a bug.")
        return rt
    try:
        return _RUNTIMES[runtime_id]
    except KeyError:
        raise RuntimeError(f"chipmunk: no runtime state with id {runtime_id}; the compiled graph that owned it "
                           "was released. This is a bug if the model is still in use.") from None


def live_runtimes() -> list[GraphRuntime]:
    return list(_RUNTIMES.values())


def _module_tensors(model) -> list[torch.Tensor]:
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"chipmunk_compile: expected the model, an nn.Module (or torch.compile'd module), got "
                        f"{type(model)}")
    return [*module.parameters(), *module.buffers()]


def _belongs_to(rt: GraphRuntime, tensor_ids: set[int]) -> bool:
    """The graph was compiled from these weight tensors (the same objects, wherever their memory is now)."""
    return any((t := ref()) is not None and id(t) in tensor_ids for ref in rt.weight_refs)


def _runtimes_of(model) -> list[GraphRuntime]:
    runtimes = live_runtimes()
    if model is not None:
        tensor_ids = {id(t) for t in _module_tensors(model)}
        runtimes = [rt for rt in runtimes if _belongs_to(rt, tensor_ids)]
    return runtimes


def stats(model=None) -> list[dict]:
    """What each compiled graph of ``model`` (all models when None) has done: the next step and invocation,
    how often each plan ran (e.g. 'attention:sparse', 'mlp:sparse_refresh'), sites rewritten, cache memory."""
    return [{"graph": rt.id, "step": rt.step, "invocation": rt.invocation, "plans": dict(rt.site_counters),
             "sites_rewritten": sum(r.rewritten for r in rt.site_records),
             "cache_mib": rt.state_bytes / 2**20} for rt in _runtimes_of(model)]


def reset(model=None) -> int:
    """Start a new generation: clear the cache state of every graph compiled from ``model`` (all models when
    None). Returns how many compiled graphs were reset."""
    with _lock:
        runtimes = _runtimes_of(model)
        for rt in runtimes:
            rt.reset(new_generation=True)
        return len(runtimes)

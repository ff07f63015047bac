"""Which nodes of a Dynamo graph compute under an autocast region the model enters in its own code.

    with torch.autocast("cuda", torch.float32):      enter = _enter_autocast("cuda", torch.float32, True, None)
        freqs = pos @ inv_freq                  ──►  freqs = matmul(pos, inv_freq)        # in the region
    ...                                              _exit_autocast(enter)
    attention / MLP of the blocks                    sdpa(...), linear(...)               # outside: sparse

The chipmunk ops compute in the weights' dtype and do not follow autocast, so a site whose nodes lie inside
such a region stays dense (the rest of the graph is still rewritten). Regions that turn autocast off
(``enabled=False``, as float32 RoPE / timestep code does) change no arithmetic when the model is not called
under autocast (the backend checks that first), so they are not regions here; an enabled region nested in
a disabled one still is.
"""
from __future__ import annotations

import torch.fx as fx


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def enters_enabled_autocast(node: fx.Node) -> bool:
    """An ``_enter_autocast(device_type, dtype, enabled, cache_enabled)`` node whose region turns autocast on."""
    if _target_name(node) != "_enter_autocast":
        return False
    enabled = node.args[2] if len(node.args) > 2 else node.kwargs.get("enabled", True)
    return enabled is not False


def autocast_region_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes between an enabled ``_enter_autocast`` and its ``_exit_autocast`` (graph order; Dynamo passes
    the enter node to its exit). A region left open to the end of the graph covers the rest of it."""
    inside: set[fx.Node] = set()
    open_regions: list[fx.Node] = []
    for node in graph.nodes:
        if enters_enabled_autocast(node):
            open_regions.append(node)
            continue
        if _target_name(node) == "_exit_autocast":
            entered = node.args[0] if node.args else None
            if entered in open_regions:
                open_regions.remove(entered)
            continue
        if open_regions:
            inside.add(node)
    return inside

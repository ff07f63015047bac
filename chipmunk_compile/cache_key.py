"""Puts this package's code version into Inductor's on-disk FX graph cache key.

    before: key(graph, inputs, Inductor config)           -> a graph compiled by an older chipmunk_compile
            (the chipmunk ops are opaque calls to it)         is reused after an upgrade; if an op's fake
                                                              function changed (e.g. its output strides), the
                                                              cached code's stride asserts fail at run time
    after:  key(graph, inputs, Inductor config
                + uuid of a no-op post-grad pass = hash of     -> any change to the package compiles afresh
                  the package's sources)

Inductor asks custom graph passes for a ``uuid()`` to key the cache on exactly this.
"""
from __future__ import annotations

import functools
import hashlib
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 over the Python sources of chipmunk_compile and its kernels and passes subpackages."""
    import chipmunk_compile
    import chipmunk_compile.kernels
    import chipmunk_compile.passes
    hasher = hashlib.sha256()
    for package in (chipmunk_compile, chipmunk_compile.kernels, chipmunk_compile.passes):
        root = os.path.dirname(os.path.abspath(package.__file__))
        for name in sorted(os.listdir(root)):
            if name.endswith(".py"):
                hasher.update(name.encode())
                with open(os.path.join(root, name), "rb") as f:
                    hasher.update(f.read())
    return hasher.hexdigest()


class PackageVersionKey(CustomGraphPass):
    """A post-grad pass that changes nothing; its uuid keys Inductor's cache on the package's sources."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return source_hash()


_KEY_PASS = PackageVersionKey()


def inductor_config_patch() -> dict:
    """The config patch that adds the key pass after any post-grad pass the application set itself."""
    current = torch._inductor.config.post_grad_custom_post_pass
    if current is None:
        return {"post_grad_custom_post_pass": _KEY_PASS}
    try:  # torch builds that run a sequence of passes
        from torch._inductor.custom_graph_pass import get_custom_graph_passes
    except ImportError:
        return {}  # keep the application's pass; the key then is Inductor's own
    return {"post_grad_custom_post_pass": (*get_custom_graph_passes(current), _KEY_PASS)}

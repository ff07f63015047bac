"""Packaging: passes/ and kernels/ install as chipmunk_compile.passes / .kernels from a normal wheel too."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheel_dir), ROOT], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel = next(wheel_dir.glob("chipmunk_compile-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "chipmunk_compile/passes/detect_attention.py" in names
    assert "chipmunk_compile/kernels/attention_op.py" in names
    assert not any(n.startswith(("passes/", "kernels/")) for n in names)  # no generic top-level packages
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import chipmunk_compile, chipmunk_compile.passes.detect_mlp, chipmunk_compile.kernels.mlp_op;"
            "print(chipmunk_compile.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def test_inductor_cache_is_keyed_on_the_package_sources(tmp_path, monkeypatch):
    """Inductor's on-disk graph cache does not see what the chipmunk ops' fake functions return: a graph
    compiled by another version of the package must not be reused (its stride asserts could fail). Same sources:
    a cache hit; changed sources (a different hash): a miss."""
    import itertools

    import torch
    from torch._dynamo.utils import counters

    import chipmunk_compile
    import tiny_models
    from chipmunk_compile import cache_key, runtime
    from helpers import compile_chipmunk

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # config.patch, not monkeypatch: monkeypatch's undo deletes a config entry that was only a default, which
    # breaks every later Inductor compile in the process.
    model, make_inputs = tiny_models.plain_dit()

    def compile_once():
        torch._dynamo.reset()
        chipmunk_compile.reset()
        # Ids restart in every process (and a graph shared by instances bakes in none), so a new process meets
        # its old graphs.
        monkeypatch.setattr(runtime, "_ids", itertools.count(1))
        counters.clear()
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
            compile_chipmunk(model, inner_backend="inductor")(**make_inputs())
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    assert compile_once()[1] >= 1                       # cold cache
    assert compile_once() == (1, 0)                     # same sources: reused
    monkeypatch.setattr(cache_key, "source_hash", lambda: "another version")
    assert compile_once()[1] >= 1                       # other sources: compiled afresh

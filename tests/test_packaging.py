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

"""The Triton (and Gluon) kernels compile for the H100 (sm_90) on this CPU machine, in every variant the GPU uses.

The interpreter tests check what the kernels compute but never run Triton's GPU compiler; this runs
``benchmarks/compile_check.py`` (lowering to a cubin with Triton's bundled ptxas, no GPU needed) in a subprocess
without TRITON_INTERPRET, so a kernel change that breaks GPU compilation fails on CI.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--strict"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "FAIL" not in run.stdout, run.stdout + run.stderr
    compiled = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    kinds = {line.split()[1] for line in compiled}
    assert kinds == {"sparse_attention", "sparse_attention_ws", "dense_attention", "dense_attention_ws", "mlp_mm1",
                     "mlp_mm2", "mlp_mm2_ws", "selection"}, run.stdout
    assert len(compiled) >= 20, run.stdout

#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the pinned CPU stack and this
# package (editable). Idempotent. On a CUDA machine set CHIPMUNK_TORCH="torch" to keep the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
WHEELS=()
[ -d ../shared/wheels ] && WHEELS=(--find-links ../shared/wheels)
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "${WHEELS[@]}" "${CHIPMUNK_TORCH:-torch==2.13.0}" triton==3.6.0 "numpy<2.4" \
    diffusers==0.42.1 safetensors pytest networkx sympy matplotlib
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import chipmunk_compile, chipmunk_compile.passes, chipmunk_compile.kernels" 

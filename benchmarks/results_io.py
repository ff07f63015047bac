"""Where the GPU benchmarks write their JSON: $OUT when set (the device tool), else benchmarks/results/."""
from __future__ import annotations

import json
import os

import torch
import triton


def write_results(stem: str, payload: dict) -> str:
    """Writes ``payload`` plus device / torch / triton versions to ``<stem>_<gpu tag>.json``; returns the path."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()
    path = os.path.join(out_dir, f"{stem}_{tag}.json")
    with open(path, "w") as f:
        json.dump(dict(dict(device=gpu, torch=torch.__version__, triton=triton.__version__), **payload), f, indent=1,
                  default=str)
    print(f"wrote {path}")
    return path

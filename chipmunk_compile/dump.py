"""Debug dump of one compiled graph: FX code before/after, the site report, a picture of the rewritten region.

Files (per graph id N, in ``dump_dir``): graph_N_before.py, graph_N_after.py, graph_N_sites.json and
graph_N_rewritten.svg (rendered by graphviz ``dot`` when it is installed) or graph_N_rewritten.dot.
The picture shows each chipmunk op with its direct inputs and users.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import torch.fx as fx


def _dot_label(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name}\\n{node.op}:{target}".replace('"', "'")


def rewritten_region_dot(gm: fx.GraphModule) -> str:
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and "chipmunk" in str(n.target)]
    shown: set[fx.Node] = set()
    edges = []
    for op in ops:
        shown.add(op)
        for parent in op.all_input_nodes:
            shown.add(parent)
            edges.append((parent, op))
        for user in op.users:
            shown.add(user)
            edges.append((op, user))
    lines = ["digraph chipmunk_rewrite {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    for node in shown:
        style = ', style=filled, fillcolor="#ffd27f"' if node in ops else (
            ', style=filled, fillcolor="#d7e8ff"' if node.op == "get_attr" else "")
        lines.append(f'  "{node.name}" [label="{_dot_label(node)}"{style}];')
    lines += [f'  "{a.name}" -> "{b.name}";' for a, b in edges]
    lines.append("}")
    return "\n".join(lines)


def write_graph_dump(folder: str, graph_id: int, code_before: str, gm: fx.GraphModule, sites) -> None:
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"graph_{graph_id}")
    with open(base + "_before.py", "w") as f:
        f.write(code_before)
    with open(base + "_after.py", "w") as f:
        f.write(gm.code)
    with open(base + "_sites.json", "w") as f:
        json.dump([s.record().__dict__ for s in sites], f, indent=2, default=str)
    dot = rewritten_region_dot(gm)
    if shutil.which("dot"):
        result = subprocess.run(["dot", "-Tsvg", "-o", base + "_rewritten.svg"], input=dot.encode(),
                                capture_output=True, timeout=60)
        if result.returncode == 0:
            return
    with open(base + "_rewritten.dot", "w") as f:
        f.write(dot)

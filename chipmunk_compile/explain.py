"""``chipmunk_compile.explain``: which attention / MLP sites the backend finds in a model, and what it does.

    report = chipmunk_compile.explain(model, *args, options={...}, **kwargs)
    print(report)                 # a table: kind, module, layer, rewritten, reason / details
    report.sites                  # [SiteRecord(kind, module, rewritten, reason, layer, variant, details)]

It traces the model once with Dynamo (the model runs eagerly, nothing is compiled by Inductor and no cache
memory is allocated) and runs the same detection and rewrite the backend runs.
"""
from __future__ import annotations

import dataclasses
import json

import torch
import torch.fx as fx

from chipmunk_compile.options import ChipmunkOptions
from chipmunk_compile.passes.sites import SiteRecord


@dataclasses.dataclass
class ExplainReport:
    sites: list[SiteRecord]
    graphs: int
    options: ChipmunkOptions

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.rewritten]

    def count(self, kind: str, rewritten: bool | None = None) -> int:
        return sum(s.kind == kind and (rewritten is None or s.rewritten == rewritten) for s in self.sites)

    def to_json(self) -> str:
        return json.dumps({"graphs": self.graphs, "sites": [dataclasses.asdict(s) for s in self.sites]},
                          indent=2, default=str)

    def __str__(self) -> str:
        header = ("kind", "module", "layer", "rewritten", "reason / details")
        rows = []
        for s in self.sites:
            info = s.reason or ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in s.details.items() if v is not None)
            rows.append((s.kind, s.module, "-" if s.layer is None else str(s.layer), "yes" if s.rewritten
                         else "no", info))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths + [0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths + [0])) for r in rows]
        lines.append(f"{len(self.rewritten)} of {len(self.sites)} sites rewritten "
                     f"({self.count('attention', True)} attention, {self.count('mlp', True)} mlp) "
                     f"in {self.graphs} graph(s)")
        return "\n".join(lines)


def explain(model, *args, options: dict | None = None, **kwargs) -> ExplainReport:
    from chipmunk_compile.backend import copy_graph_module, detect_sites, rewrite_sites

    opts = ChipmunkOptions.from_dict(options)
    # Analysis only: the rewrite allocates its cache buffers on the meta device and is thrown away.
    opts_meta = dataclasses.replace(opts, dump_dir=None)
    records: list[SiteRecord] = []
    graphs = 0

    def analysis_backend(gm: fx.GraphModule, example_inputs):
        nonlocal graphs
        graphs += 1
        copy = copy_graph_module(gm)
        sites = detect_sites(copy, opts_meta)
        rewrite_sites(copy, sites, runtime_id=0, options=opts_meta, cache_device="meta")
        records.extend(s.record() for s in sites)
        return gm.forward

    module = getattr(model, "_orig_mod", model)
    with torch.no_grad():
        torch.compile(module, backend=analysis_backend)(*args, **kwargs)
    return ExplainReport(sites=records, graphs=graphs, options=opts)

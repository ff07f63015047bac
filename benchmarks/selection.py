"""GPU benchmark of the Triton selection kernel (``kernels/selection_triton.py``) and of what its passes cost.

1. Pass cost: a loop of 9 passes over rows in chunks doing only ``tl.histogram`` of a byte (bytes all in one bin,
   or spread), a plain ``tl.sum``, or a ``tl.cumsum`` — what one radix pass of the kernel spends per chunk.
2. The selection itself at the shapes the backend meets — MLP refresh rows (36 / 132 token blocks x 12288 units,
   70 % sparse incl. 5 % random) and attention rows (576 query groups x 4608 keys, 93 % sparse) — for each warp
   count, against the torch path (``selection_reference``), after checking both pick the same index sets.
   (Pass 1 times the building blocks of the earlier chunked radix kernel; ``mlp_experiments.py`` compares the
   shipped kernel with it.)

Prints a table and writes selection_<gpu>.json ($OUT or benchmarks/results). Usage: python benchmarks/selection.py
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402

from chipmunk_compile.kernels import selection_reference as select_ref  # noqa: E402
from chipmunk_compile.kernels import selection_triton as select_tr  # noqa: E402

DEV = "cuda"


@triton.jit
def _pass_loop(X, OUT, n, PASSES: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    hist = tl.zeros([256], tl.int32)
    total = 0
    for _ in tl.static_range(PASSES):
        for start in range(0, n, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            v = tl.load(X + row * n + offs, mask=offs < n, other=0)
            if MODE == 0:
                hist += tl.histogram(v & 255, 256, mask=offs < n)
            elif MODE == 1:
                total += tl.sum(v & 255, 0)
            else:
                total += tl.sum(tl.cumsum(v & 1, 0), 0)
    tl.store(OUT + row * 256 + tl.arange(0, 256), hist + total)


def us(fn):
    fn()
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1000


def main():
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows_out = []
    for rows, n in ((36, 12288), (576, 4608)):
        same = torch.full((rows, n), 7, dtype=torch.int32, device=DEV)
        spread = torch.randint(0, 256, (rows, n), dtype=torch.int32, device=DEV)
        out = torch.empty(rows, 256, dtype=torch.int32, device=DEV)
        for chunk, warps in ((1024, 4), (2048, 8), (4096, 8)):
            t = {name: us(lambda: _pass_loop[(rows,)](x, out, n, PASSES=9, CHUNK=chunk, MODE=mode, num_warps=warps))
                 for name, x, mode in (("histogram_one_bin", same, 0), ("histogram_spread", spread, 0),
                                       ("sum", spread, 1), ("cumsum", spread, 2))}
            rows_out.append(dict(bench="pass_cost", rows=rows, n=n, chunk=chunk, warps=warps, passes=9, **t))
            print(f"pass cost rows {rows:4d} n {n:6d} chunk {chunk:5d} w{warps}: "
                  + " ".join(f"{k} {v:7.1f} us" for k, v in t.items()), flush=True)
    cases = (("mlp N4608", (1, 36, 12288), 0.7), ("mlp N16896", (1, 132, 12288), 0.7),
             ("attention N4608", (1, 24, 24, 4608), 0.93))
    for name, shape, sparsity in cases:
        n = shape[-1]
        k = int(round((1 - sparsity) * n))
        n_rand = -(-n // 20) if name.startswith("mlp") else k // 20
        scores = torch.rand(shape, device=DEV)
        gen = torch.Generator(DEV)
        # Time the kernel itself even where the dispatch keeps torch (rows over MAX_TRITON_ROW, e.g. the MLP's
        # 12288 units, which the op selects through mlp_refresh_selection instead, without that limit).
        dispatched = "triton" if n <= select_tr.MAX_TRITON_ROW else "torch"
        saved_max = select_tr.MAX_TRITON_ROW
        select_tr.MAX_TRITON_ROW = max(saved_max, n)
        got = select_tr.select_topk_with_random(scores, k - n_rand, n_rand, None, gen.manual_seed(1))
        want = select_ref.select_topk_with_random(scores, k - n_rand, n_rand, None, gen.manual_seed(1))
        rows_equal = (got.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
        torch_us = us(lambda: select_ref.select_topk_with_random(scores, k - n_rand, n_rand, None, gen))
        row = dict(bench="selection", case=name, shape=list(shape), kept=k, random=n_rand, rows_equal=rows_equal,
                   torch_us=torch_us, triton_us={})
        for warps in (None, 4, 8, 16):
            select_tr.NUM_WARPS = warps
            row["triton_us"][f"w{warps or 'auto'}"] = us(
                lambda: select_tr.select_topk_with_random(scores, k - n_rand, n_rand, None, gen))
        select_tr.NUM_WARPS = None
        select_tr.MAX_TRITON_ROW = saved_max
        row["generic_dispatch"] = dispatched
        rows_out.append(row)
        print(f"selection {name:16s} rows equal {rows_equal:.3f} torch {torch_us:7.1f} us | triton "
              + " ".join(f"{c}:{t:.1f}" for c, t in row["triton_us"].items()), flush=True)
    write_results("selection", dict(rows=rows_out))


if __name__ == "__main__":
    main()

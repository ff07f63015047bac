"""Compiles the Triton kernels for a Hopper GPU on any machine (no GPU needed) and reports their resources.

The CPU interpreter checks what the kernels compute but never runs Triton's GPU compiler, so a kernel can pass
every CPU test and still fail to compile, or spill registers, on the H100. This script lowers each kernel variant
the GPU uses (production tile configs; bf16; the stride-1 and 16-byte-alignment specialisations a real launch
gets) to a cubin for ``--arch`` (default sm_90) with Triton's bundled ptxas, and prints registers, spilled bytes
and shared memory per variant. ``--strict`` exits non-zero when a variant fails to compile.
Usage: python benchmarks/compile_check.py [--arch 90] [--strict] [--only NAME_SUBSTRING]
Must run without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.runtime.jit import mangle_type
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from chipmunk_compile.kernels import attention_dense_triton as dense_tr
from chipmunk_compile.kernels import attention_dense_gluon as dense_ws
from chipmunk_compile.kernels import attention_sparse_gluon as sparse_ws
from chipmunk_compile.kernels import mlp_mm2_gluon as mm2_ws
from chipmunk_compile.kernels import attention_sparse_triton as sparse_tr
from chipmunk_compile.kernels import mlp_sparse_triton as mlp_tr
from chipmunk_compile.kernels import selection_triton as select_tr

_FLOAT_ARGS = {"qk_scale", "sign"}
_H100_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on sm_90
_HEAD = dict(D=128, DV=128, D_PAD=128, DV_PAD=128, PRECISION="tf32")


def _variants():
    """(name, jit function, pointer types, constexprs, stride args specialised to 1, num_warps, num_stages)."""
    attn_ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", KB="*fp32")
    for kb, perm in ((False, False), (True, False), (False, True)):
        sparse = sparse_tr._CONFIGS[0]
        yield (f"sparse_attention kb={kb} perm={perm}", sparse_tr._sparse_attn_kernel,
               dict(attn_ptrs, IDX="*i32", BASE="*bf16", OUT="*bf16", PERM="*i64"),
               dict(_HEAD, HAS_KB=kb, HAS_PERM=perm, **sparse.kwargs),
               ["stride_qd", "stride_kd", "stride_vd", "stride_bd", "stride_od"], sparse.num_warps, sparse.num_stages)
    ws = {n: v for n, v in sparse_ws._CONFIG.items() if n in sparse_ws._sparse_attn_ws_kernel.arg_names}
    for d, kb, groups, perm in ((128, False, 192, False), (128, True, 192, False), (64, False, 192, False),
                                (128, False, 128, False), (64, True, 64, False), (128, False, 192, True)):
        yield (f"sparse_attention_ws d={d} kb={kb} group={groups} perm={perm}", sparse_ws._sparse_attn_ws_kernel,
               dict(attn_ptrs, IDX="*i32", BASE="*bf16", OUT="*bf16", PERM="*i64"),
               dict(D=d, HAS_KB=kb, HAS_PERM=perm, N_CONSUMERS=groups // 64, **ws), [], 4,
               dict(maxnreg=sparse_ws._MAXNREG))
    dense_ptrs = dict(attn_ptrs, O="*bf16", LSE="*fp32", LSE_PREV="*fp32", CS="*fp32", REDO="*i32", PART_O="*fp32",
                      PART_L="*fp32")
    for d, kb, groups, tma in ((128, False, 192, 1), (128, True, 192, 1), (64, False, 192, 1), (128, False, 128, 1),
                               (128, False, 192, 0)):
        if tma:  # the descriptors' types, as the launcher derives them from the host TensorDescriptor
            desc = mangle_type(dense_ws.kv_tile_descriptor(torch.empty(2, 4, 300, d, dtype=torch.bfloat16),
                                                           dense_ws._CONFIG["BLOCK_N"]))
            q_desc = mangle_type(dense_ws.kv_tile_descriptor(torch.empty(2, 4, 300, d, dtype=torch.bfloat16), 64))
            descs = dict(Q_DESC=q_desc, K_DESC=desc, V_DESC=desc)
        else:
            descs = dict(Q_DESC="*bf16", K_DESC="*bf16", V_DESC="*bf16")
        yield (f"dense_attention_ws d={d} kb={kb} group={groups} tma={tma}", dense_ws._dense_colmass_ws_kernel,
               dict(dense_ptrs, **descs), dict(D=d, HAS_KB=kb, N_CONSUMERS=groups // 64,
                                                   **{n: v for n, v in dict(dense_ws._CONFIG, TMA=tma).items()
                                                      if n in dense_ws._dense_colmass_ws_kernel.arg_names}), [], 4,
               dict(maxnreg=dense_ws._MAXNREG))
    for config in dense_tr._CONFIGS:
        bm, cs_mode, anchor = config.kwargs["BLOCK_M"], config.kwargs["CS_MODE"], config.kwargs["ANCHOR"]
        for has_cs, kb in ((True, False), (True, True), (False, False)):
            constexprs = dict(_HEAD, HAS_CS=has_cs, HAS_KB=kb, HAS_REDO=False, SINGLE_GROUP=192 % bm == 0,
                              MAX_G=(bm - 1) // 192 + 2, ANCHORED=bool(anchor) and has_cs, **config.kwargs)
            yield (f"dense_attention BM{bm} cs_mode={cs_mode} anchor={anchor} colmass={has_cs} kb={kb}",
                   dense_tr._dense_attn_kernel, dense_ptrs, constexprs, ["stride_qd", "stride_kd", "stride_vd"],
                   config.num_warps, config.num_stages)
    for config in mlp_tr._MM1_CONFIGS[:2]:
        for gated, perm in ((False, False), (True, False), (False, True)):
            yield (f"mlp_mm1 {config.kwargs} gated={gated} perm={perm}", mlp_tr._mlp_mm1_kernel,
                   dict(X="*bf16", WG="*bf16", BG="*bf16", WU="*bf16", BU="*bf16", IDX="*i64", ACACHE="*bf16",
                        DELTA="*bf16", PERM="*i64"),
                   dict(HAS_BG=True, GATED=gated, HAS_BU=gated, ACT=1, PRECISION="tf32", EVEN_C=True, FULL_T=True,
                        BLOCK_T=128, HAS_PERM=perm, **config.kwargs),
                   ["stride_xc", "stride_wgc", "stride_wuc", "stride_an"], config.num_warps, config.num_stages)
    yield ("mlp_mm2_ws (opt-in)", mm2_ws._mm2_ws_kernel, dict(DELTA="*bf16", IDX="*i64", W2="*bf16", Y="*fp32"),
           dict(BLOCK_T=128, **mm2_ws._CONFIG), [], 4, dict(maxnreg=mm2_ws._MAXNREG))
    for config, y_type, perm in ((mlp_tr._MM2_CONFIGS[0], "*fp32", False), (mlp_tr._MM2_CONFIGS[-1], "*fp32", False),
                                 (mlp_tr._MM2_CONFIGS[0], "*bf16", True), (mlp_tr._MM2_CONFIGS[-1], "*bf16", False)):
        yield (f"mlp_mm2 {config.kwargs} y={y_type[1:]} perm={perm}", mlp_tr._mlp_mm2_kernel,
               dict(DELTA="*bf16", IDX="*i64", W2="*bf16", Y=y_type, OUT="*bf16", PERM="*i64"),
               dict(PRECISION="tf32", FULL_T=True, EVEN_K=True, EVEN_D=True, HAS_OUT=True, BLOCK_T=128,
                    HAS_PERM=perm, **config.kwargs),
               ["stride_w2o", "stride_yo", "stride_oo"], config.num_warps, config.num_stages)
    # Selection: one program per row, keys in registers (scores given, or from the MLP's block means; the MLP
    # path writes the op's int32 index buffer directly), in the launch shapes ``_launch_shape`` picks for few rows
    # (MLP refresh: 12288 or 32768 units) and many rows (attention query groups), plus the earlier 16-warp shape.
    for from_hbar, block, warps, lanes in ((True, 16384, 8, 2048), (True, 32768, 16, 4096), (True, 16384, 16, 512),
                                           (False, 8192, 4, 128)):
        yield (f"selection block {block} from_hbar={from_hbar} warps={warps} store chunk {lanes}",
               select_tr._select_kernel,
               dict(SCORES="*fp32", HBAR_NEW="*bf16", HBAR_CACHE="*fp32", NOISE="*fp32",
                    OUT="*i32" if from_hbar else "*i64"),
               dict(FROM_HBAR=from_hbar, PATHS=1, BLOCK=block, LOG2_BLOCK=block.bit_length() - 1, LANES=lanes),
               [], warps, 1)


def compile_variant(fn, pointers, constexprs, unit_strides, num_warps, num_stages, arch):
    """num_stages: an int (Triton kernels) or a dict of extra options (Gluon kernels, which pipeline by hand)."""
    gluon_options = num_stages if isinstance(num_stages, dict) else None
    constexprs = dict(constexprs, **{name: 1 for name in unit_strides})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
        if signature[name] not in ("constexpr", "fp32") and not signature[name].startswith("tensordesc"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    if gluon_options is not None:
        from triton.experimental.gluon._runtime import GluonASTSource
        source, options = GluonASTSource(fn, signature, constexprs, attrs), dict(num_warps=num_warps, **gluon_options)
    else:
        source, options = ASTSource(fn, signature, constexprs, attrs), dict(num_warps=num_warps, num_stages=num_stages)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=int(stack.group(1)) if stack else None,
                shared_bytes=kernel.metadata.shared, warps=kernel.metadata.num_warps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET: the interpreter has no compiler"
    failures = 0
    for name, fn, pointers, constexprs, unit, warps, stages in _variants():
        if args.only not in name:
            continue
        try:
            r = compile_variant(fn, pointers, constexprs, unit, warps, stages, args.arch)
            over = "  > H100 shared memory: cannot launch there (the autotuner skips it)" \
                if r["shared_bytes"] > _H100_SHARED_BYTES else ""
            stages = stages if isinstance(stages, int) else "-"
            print(f"ok    {name:90s} w{r['warps']} s{stages}  regs {r['registers']}  spill {r['spill_bytes']} B  "
                  f"smem {r['shared_bytes'] // 1024} KiB{over}", flush=True)
        except Exception as exc:  # noqa: BLE001 (report every failing variant)
            failures += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    if args.strict and failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Triton sparse MLP update: y_cache += (a_new[S] - a_cache[S]) W2[:, S]^T and a_cache[S] = a_new[S], per token block.

Two kernels, each a GEMM whose reduction or output columns are gathered through the block's unit list
``indices[b, blk, :]`` (S, K units):

- mm1, one program per (row tile of a token block, tile of BLOCK_F selected units, batch): accumulates
  x[rows] @ W_gate[S_tile]^T (and the up projection when gated) over C in BLOCK_C chunks, gathering whole
  weight rows (contiguous in C). Epilogue: + bias[S_tile], activation, * up path, round to a_cache's dtype,
  subtract the cached activation a_cache[rows, S_tile], write the difference into a packed delta
  [B, nb, T, K], and overwrite a_cache[rows, S_tile] with the new value. The read-then-write of a_cache is
  safe to fuse: each (row, unit) entry belongs to exactly one program (units are unique within a block).
  Taking the delta against the rounded new value keeps y_cache - W2 a_cache from drifting over steps.
- mm2, one program per (row tile, tile of BLOCK_D output features, batch): accumulates
  delta[rows, :] @ W2[:, S]^T over the K selected units in BLOCK_K chunks, gathering rows of W2^T, and adds
  the tile into y_cache with one read-modify-write, summed in fp32 and rounded once into y_cache's dtype (fp32,
  or the activations' dtype with the option mlp_output_cache_dtype='model'; fp32 also allows one relaxed atomic
  add per element, Y_ATOMIC): each output element belongs to one program.

Layout: every operand is taken through its strides. Gathers are coalesced when W2 is stored as W2^T (pass
``w2t.t()`` for a contiguous w2t [F, Dout]) and a_cache is unit-major (pass ``a.transpose(1, 2)`` of a
contiguous [B, F, N] buffer), as the reference kernels store them; the logical shapes stay as in
``mlp_reference.sparse_mlp_update``, whose semantics this matches.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from chipmunk_compile.kernels.dispatch import gluon_module
from chipmunk_compile.kernels.mlp_reference import check_mlp_token_perm
from chipmunk_compile.kernels.launch import CachedLaunch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}


@triton.jit
def _activation(h, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates correctly at both ends.
        return 0.5 * h * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACT == 2:
        return h * tl.sigmoid(h)
    else:
        return tl.maximum(h, 0.0)


@triton.jit
def _tile_coords(pid, n_t, n_o, GROUP_T: tl.constexpr):
    """Program order: row tiles fastest inside groups of GROUP_T row tiles (0 = all row tiles), so concurrent
    programs share one output/unit tile column (W slab in L2) while a group's row data stays in L2 too."""
    if GROUP_T == 0:
        pid_t = pid % n_t
        pid_o = pid // n_t
    else:
        per_group = GROUP_T * n_o
        first_t = (pid // per_group) * GROUP_T
        size = tl.minimum(n_t - first_t, GROUP_T)
        pid_t = first_t + (pid % per_group) % size
        pid_o = (pid % per_group) // size
    return pid_t, pid_o


@triton.jit
def _token_rows(PERM, rows, row_ok, HAS_PERM: tl.constexpr):
    """The tokens of x / the output at the caches' rows: rows themselves, or PERM[rows] (token_grid reordering;
    rows outside the sequence read token 0 and are masked)."""
    tokens = rows
    if HAS_PERM:
        tokens = tl.load(PERM + rows, mask=row_ok, other=0).to(rows.dtype)
    return tokens


@triton.jit
def _mlp_mm1_kernel(X, WG, BG, WU, BU, IDX, ACACHE, DELTA, PERM,
                    stride_xb, stride_xn, stride_xc, stride_wgf, stride_wgc, stride_wuf, stride_wuc,
                    stride_ab, stride_an, stride_af,
                    N, C, nb, n_sel, token_block,
                    HAS_BG: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
                    PRECISION: tl.constexpr, EVEN_C: tl.constexpr, FULL_T: tl.constexpr, GROUP_T: tl.constexpr,
                    HAS_PERM: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, EPI_SPLIT: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    tiles_per_block = tl.cdiv(token_block, BLOCK_T)
    pid_t, pid_f = _tile_coords(tl.program_id(0), nb * tiles_per_block, tl.cdiv(n_sel, BLOCK_F), GROUP_T)
    blk = pid_t // tiles_per_block
    local = (pid_t % tiles_per_block) * BLOCK_T + tl.arange(0, BLOCK_T)     # row within the token block
    rows = blk * token_block + local
    row_ok = (local < token_block) & (rows < N)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < n_sel
    sel_base = (b * nb + blk) * n_sel
    units = tl.load(IDX + sel_base + offs_f, mask=f_ok, other=0).to(tl.int64)

    offs_c = tl.arange(0, BLOCK_C)
    x_rows = _token_rows(PERM, rows, row_ok, HAS_PERM)
    x_ptrs = X + b * stride_xb + x_rows[:, None] * stride_xn + offs_c[None, :] * stride_xc
    wg_ptrs = WG + units[None, :] * stride_wgf + offs_c[:, None] * stride_wgc
    wu_ptrs = WU + units[None, :] * stride_wuf + offs_c[:, None] * stride_wuc
    acc_g = tl.zeros([BLOCK_T, BLOCK_F], tl.float32)
    acc_u = tl.zeros([BLOCK_T, BLOCK_F], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        if EVEN_C and FULL_T:
            x = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
        elif EVEN_C:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            wg = tl.load(wg_ptrs)
        else:
            c_ok = (c0 + offs_c) < C
            x = tl.load(x_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=c_ok[:, None], other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
        if GATED:
            if EVEN_C:
                wu = tl.load(wu_ptrs)
            else:
                wu = tl.load(wu_ptrs, mask=c_ok[:, None], other=0.0)
            acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_C * stride_xc
        wg_ptrs += BLOCK_C * stride_wgc
        wu_ptrs += BLOCK_C * stride_wuc

    # EPI_SPLIT=2 runs the epilogue on the tile's column halves: its temporaries (bias, activation, cached values,
    # pointers) then live for a slice at a time next to the accumulator instead of for the whole tile.
    args = (rows, local, row_ok, b, sel_base, IDX, BG, BU, ACACHE, DELTA, stride_ab, stride_an, stride_af, n_sel,
            token_block, HAS_BG, GATED, HAS_BU, ACT)
    first = pid_f * BLOCK_F
    if EPI_SPLIT == 1:
        _mm1_epilogue(acc_g, acc_u, first, BLOCK_F, *args)
    else:
        tl.static_assert(EPI_SPLIT == 2, "EPI_SPLIT is 1 or 2")
        g0, g1 = _column_halves(acc_g, BLOCK_T, BLOCK_F)
        u0, u1 = _column_halves(acc_u, BLOCK_T, BLOCK_F)
        _mm1_epilogue(g0, u0, first, BLOCK_F // 2, *args)
        _mm1_epilogue(g1, u1, first + BLOCK_F // 2, BLOCK_F // 2, *args)


@triton.jit
def _column_halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """t[:, :COLS // 2], t[:, COLS // 2:] (register subsets of an MMA accumulator: no data movement)."""
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _mm1_epilogue(h, up, first, WIDTH: tl.constexpr, rows, local, row_ok, b, sel_base, IDX, BG, BU, ACACHE, DELTA,
                  stride_ab, stride_an, stride_af, n_sel, token_block,
                  HAS_BG: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr):
    """Columns [first, first + WIDTH) of an mm1 tile: bias, activation (x up path), delta against a_cache,
    a_cache overwritten."""
    offs_f = first + tl.arange(0, WIDTH)
    f_ok = offs_f < n_sel
    units = tl.load(IDX + sel_base + offs_f, mask=f_ok, other=0).to(tl.int64)
    if HAS_BG:
        h += tl.load(BG + units).to(tl.float32)[None, :]
    a = _activation(h, ACT)
    if GATED:
        if HAS_BU:
            up += tl.load(BU + units).to(tl.float32)[None, :]
        a = a * up
    mask = row_ok[:, None] & f_ok[None, :]
    a_ptrs = ACACHE + b * stride_ab + rows[:, None] * stride_an + units[None, :] * stride_af
    a_new = a.to(ACACHE.dtype.element_ty)
    a_old = tl.load(a_ptrs, mask=mask, other=0.0)
    delta = a_new.to(tl.float32) - a_old.to(tl.float32)
    d_ptrs = DELTA + (sel_base * token_block) + local[:, None] * n_sel + offs_f[None, :]
    tl.store(d_ptrs, delta.to(DELTA.dtype.element_ty), mask=mask)
    tl.store(a_ptrs, a_new, mask=mask)


@triton.jit
def _mlp_mm2_kernel(DELTA, IDX, W2, Y, OUT, PERM,
                    stride_w2o, stride_w2f, stride_yb, stride_yn, stride_yo, stride_ob, stride_on, stride_oo,
                    N, Dout, nb, n_sel, token_block,
                    PRECISION: tl.constexpr, GROUP_T: tl.constexpr, FULL_T: tl.constexpr,
                    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, Y_ATOMIC: tl.constexpr, HAS_OUT: tl.constexpr,
                    HAS_PERM: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, EPI_SPLIT: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    tiles_per_block = tl.cdiv(token_block, BLOCK_T)
    pid_t, pid_d = _tile_coords(tl.program_id(0), nb * tiles_per_block, tl.cdiv(Dout, BLOCK_D), GROUP_T)
    blk = pid_t // tiles_per_block
    local = (pid_t % tiles_per_block) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = blk * token_block + local
    row_ok = (local < token_block) & (rows < N)
    offs_o = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_ok = offs_o < Dout
    sel_base = (b * nb + blk) * n_sel
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    d_base = DELTA + sel_base * token_block + local[:, None] * n_sel
    for k0 in range(0, n_sel, BLOCK_K):
        if EVEN_K and FULL_T and EVEN_D:
            # Unmasked loads in the common case (full token blocks, K and Dout multiples of the tiles).
            units = tl.load(IDX + sel_base + k0 + offs_k).to(tl.int64)
            d = tl.load(d_base + (k0 + offs_k)[None, :])
            w = tl.load(W2 + units[:, None] * stride_w2f + offs_o[None, :] * stride_w2o)
        else:
            k_ok = (k0 + offs_k) < n_sel
            # Masked tail units read W2 column 0 (valid memory) and meet zero deltas.
            units = tl.load(IDX + sel_base + k0 + offs_k, mask=k_ok, other=0).to(tl.int64)
            d = tl.load(d_base + (k0 + offs_k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W2 + units[:, None] * stride_w2f + offs_o[None, :] * stride_w2o, mask=o_ok[None, :],
                        other=0.0)
        acc = tl.dot(d, w, acc, input_precision=PRECISION)

    out_rows = _token_rows(PERM, rows, row_ok, HAS_PERM)
    args = (rows, out_rows, row_ok, b, Y, OUT, stride_yb, stride_yn, stride_yo, stride_ob, stride_on, stride_oo,
            Dout, Y_ATOMIC, HAS_OUT)
    first = pid_d * BLOCK_D
    if EPI_SPLIT == 1:
        _mm2_epilogue(acc, first, BLOCK_D, *args)
    else:  # the y_cache read-modify-write in column halves: half the y tile in registers at a time
        tl.static_assert(EPI_SPLIT == 2, "EPI_SPLIT is 1 or 2")
        acc0, acc1 = _column_halves(acc, BLOCK_T, BLOCK_D)
        _mm2_epilogue(acc0, first, BLOCK_D // 2, *args)
        _mm2_epilogue(acc1, first + BLOCK_D // 2, BLOCK_D // 2, *args)


@triton.jit
def _mm2_epilogue(acc, first, WIDTH: tl.constexpr, rows, out_rows, row_ok, b, Y, OUT, stride_yb, stride_yn,
                  stride_yo, stride_ob, stride_on, stride_oo, Dout, Y_ATOMIC: tl.constexpr, HAS_OUT: tl.constexpr):
    """Output columns [first, first + WIDTH) of an mm2 tile: y_cache += acc, and the op's output (its rows at
    out_rows)."""
    offs_o = first + tl.arange(0, WIDTH)
    o_ok = offs_o < Dout
    y_ptrs = Y + b * stride_yb + rows[:, None] * stride_yn + offs_o[None, :] * stride_yo
    mask = row_ok[:, None] & o_ok[None, :]
    if Y_ATOMIC and Y.dtype.element_ty == tl.float32:  # (a 16-bit y_cache always takes the read-modify-write)
        # The old value comes back (each element has one writer): the new one is what the atomic stored.
        y_new = tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed") + acc
    else:  # summed in fp32, rounded once into y_cache's dtype
        y_new = (tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc).to(Y.dtype.element_ty)
        tl.store(y_ptrs, y_new, mask=mask)
    if HAS_OUT:  # the op's output, y_cache in the activations' dtype, without a second pass over y_cache
        o_ptrs = OUT + b * stride_ob + out_rows[:, None] * stride_on + offs_o[None, :] * stride_oo
        tl.store(o_ptrs, y_new.to(OUT.dtype.element_ty), mask=mask)


_MM1_DEFAULT = {"BLOCK_F": 32, "BLOCK_C": 32, "GROUP_T": 0, "EPI_SPLIT": 1, "num_warps": 4, "num_stages": 2}
_MM2_DEFAULT = {"BLOCK_D": 32, "BLOCK_K": 32, "GROUP_T": 0, "EPI_SPLIT": 1, "num_warps": 4, "num_stages": 2}


def _full_t(a) -> bool:
    """Every row tile lies inside the sequence and inside its token block: no row masks in the main loops."""
    return a["token_block"] % a["BLOCK_T"] == 0 and a["N"] % a["token_block"] == 0


def _c1(bf, bc, warps, stages, group_t=0, epi_split=1):
    return triton.Config({"BLOCK_F": bf, "BLOCK_C": bc, "GROUP_T": group_t, "EPI_SPLIT": epi_split},
                         num_warps=warps, num_stages=stages)


def _c2(bd, bk, warps, stages, group_t=0, y_atomic=0, epi_split=1):
    return triton.Config({"BLOCK_D": bd, "BLOCK_K": bk, "GROUP_T": group_t, "Y_ATOMIC": y_atomic,
                          "EPI_SPLIT": epi_split}, num_warps=warps, num_stages=stages)


# Measured on H100 (benchmarks/KERNEL_NOTES.md): 128 x 256 mm1 tiles win at every shape; grouping row tiles
# (GROUP_T) keeps a group's activations in L2 while the unit tiles sweep past (sorted unit lists make concurrent
# programs of one unit-tile index read nearby W1 rows). Splitting mm1's epilogue (EPI_SPLIT=2) removes its spills
# but measured 0-8 % slower, so mm1 keeps the whole-tile epilogue.
_MM1_CONFIGS = [
    _c1(256, 64, 8, 3),
    _c1(256, 64, 8, 3, 8),
    _c1(256, 64, 8, 3, 16),
    _c1(256, 64, 8, 3, 32),
    _c1(256, 64, 8, 3, 64),
    _c1(128, 64, 8, 4, 8),
]
# mm2: num_stages >= 5 because its W2^T rows are addressed through the unit list loaded in the same loop, and
# Triton 3.6 software-pipelines such indirect loads only from 5 stages on (3 buffers, loads two steps ahead; at
# 3-4 stages it waits for every load each step): 11-25 % faster than the best 3-4 stage configs. The epilogue
# adds the tile into y_cache in two column halves (EPI_SPLIT=2: no spills; 2-7 % faster than the whole tile).
# GROUP_T sets how many token blocks' packed deltas stay in L2 while the output tiles sweep past (the deltas
# of all blocks exceed L2 at N16896: every output tile column would re-read them from HBM).
# Y_ATOMIC=1 adds the tile into y_cache with relaxed fp32 atomics instead of load + add + store: each element is
# still written by exactly one program (same result), but the y tile never occupies registers next to the
# accumulator.
_MM2_CONFIGS = [
    _c2(256, 64, 8, 5, 0, 0, 2),
    _c2(256, 64, 8, 5, 8, 0, 2),
    _c2(256, 64, 8, 5, 32, 0, 2),
    _c2(256, 64, 8, 5, 64, 0, 2),
    _c2(128, 64, 4, 5, 0, 0, 2),
    _c2(128, 64, 4, 5, 32, 0, 2),
    _c2(128, 128, 8, 5, 32, 1, 2),
]
_mm1 = triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BLOCK_C"] == 0, "FULL_T": _full_t})(_mlp_mm1_kernel)
_mm2 = triton.heuristics({"FULL_T": _full_t, "EVEN_K": lambda a: a["n_sel"] % a["BLOCK_K"] == 0,
                          "EVEN_D": lambda a: a["Dout"] % a["BLOCK_D"] == 0})(_mlp_mm2_kernel)
# mm1 mutates a_cache and mm2 accumulates into y_cache: every autotuning trial must see the original values.
_mm1_tuned = triton.autotune(_MM1_CONFIGS, key=["N", "C", "n_sel", "GATED", "BLOCK_T"], restore_value=["ACACHE"])(_mm1)
_mm2_tuned = triton.autotune(_MM2_CONFIGS, key=["N", "Dout", "n_sel", "BLOCK_T", "HAS_OUT"],
                             restore_value=["Y"])(_mm2)


_mm1_launch = CachedLaunch(_mm1_tuned)
_mm2_launch = CachedLaunch(_mm2_tuned)


def _grid1(grid_t, n_sel, B):
    return lambda m: (grid_t * triton.cdiv(n_sel, m["BLOCK_F"]), B)


def _grid2(grid_t, dout, B):
    return lambda m: (grid_t * triton.cdiv(dout, m["BLOCK_D"]), B)


def sparse_mlp_update(x, w_gate, b_gate, w_up, b_up, w2, activation: str, indices, a_cache, y_cache,
                      token_block: int, config: dict | None = None, kernel: str = "auto", out=None, token_perm=None):
    """In place: y_cache[block] += (a_new[S] - a_cache[block, S]) W2[:, S]^T; a_cache[block, S] = a_new[S];
    ``out`` (optional, [B, N, Dout] in any float dtype) receives the updated y_cache from mm2's epilogue.
    ``token_perm`` (needs ``out``): cache row r is token token_perm[r] of x and of out (token_grid reordering
    inside the kernels; ``mlp_reference.sparse_mlp_update`` has the exact semantics).

    ``config`` = {"mm1": {...}, "mm2": {...}} forces launch configurations (tests); by default the GPU
    autotunes and the interpreter uses small fixed configurations. ``kernel`` "auto" / "triton" run both GEMMs
    here; "gluon" runs mm2 on the warp-specialised Gluon kernel (``mlp_mm2_gluon``; Hopper only), an experiment
    kept opt-in because it measured within +-6 % of this one (``benchmarks/mlp_ws.py``).
    """
    assert kernel in ("auto", "triton", "gluon"), kernel
    if token_perm is not None:
        check_mlp_token_perm(token_perm, x.shape[1], out)
    _launch(x, w_gate, b_gate, w_up, b_up, w2, activation, indices, a_cache, y_cache, token_block, config,
            kernel=kernel, out=out, token_perm=token_perm)


def _warp_specialized_mm2():
    """The Gluon (Hopper, warp-specialised) mm2 kernel module, or None."""
    return gluon_module("mlp_mm2_gluon")


def _launch(x, w_gate, b_gate, w_up, b_up, w2, activation, indices, a_cache, y_cache, token_block, config,
            run_mm1=True, run_mm2=True, delta=None, kernel="auto", out=None, token_perm=None):
    """Both GEMMs (or one of them, for benchmarks: ``delta`` then carries mm1's output between calls)."""
    B, N, C = x.shape
    nb, n_sel = indices.shape[1], indices.shape[2]
    Dout = w2.shape[0]
    assert indices.shape[0] == B and nb == -(-N // token_block), (indices.shape, N, token_block)
    assert a_cache.shape == (B, N, w_gate.shape[0]) and y_cache.shape == (B, N, Dout)
    if y_cache.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"sparse MLP: y_cache must be float32 or the activations' dtype ({x.dtype}), "
                         f"got {y_cache.dtype}")
    indices = indices.contiguous()
    if delta is None:
        delta = torch.empty((B, nb, token_block, n_sel), dtype=x.dtype, device=x.device)
    gated = w_up is not None
    block_t = min(128, max(16, triton.next_power_of_2(token_block)))
    grid_t = nb * triton.cdiv(token_block, block_t)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    w_up_arg = w_up if gated else w_gate
    perm = indices if token_perm is None else token_perm  # any pointer when absent (never read)
    mm1_args = (x, w_gate, w_gate if b_gate is None else b_gate, w_up_arg, w_up_arg if b_up is None else b_up,
                indices, a_cache, delta, perm, *x.stride(), *w_gate.stride(), *w_up_arg.stride(), *a_cache.stride(),
                N, C, nb, n_sel, token_block)
    mm1_meta = dict(HAS_BG=b_gate is not None, GATED=gated, HAS_BU=b_up is not None,
                    ACT=_ACTIVATIONS[activation], PRECISION=precision, BLOCK_T=block_t,
                    HAS_PERM=token_perm is not None)
    if out is not None:
        assert out.shape == y_cache.shape, (tuple(out.shape), tuple(y_cache.shape))
    mm2_out = y_cache if out is None else out
    mm2_args = (delta, indices, w2, y_cache, mm2_out, perm, *w2.stride(), *y_cache.stride(), *mm2_out.stride(), N, Dout,
                nb, n_sel, token_block)
    mm2_meta = dict(PRECISION=precision, BLOCK_T=block_t, HAS_OUT=out is not None, HAS_PERM=token_perm is not None)
    ws = None
    if kernel == "gluon" and run_mm2:
        ws = _warp_specialized_mm2()
        why = "this Triton has no Gluon" if ws is None else ws.supports(delta, w2, y_cache, token_block)
        if why is not None:
            raise ValueError(f"the warp-specialised mm2 kernel does not apply here: {why}")
    if config is None and _INTERPRET:
        config = {"mm1": _MM1_DEFAULT, "mm2": _MM2_DEFAULT}
    if config is None:
        if run_mm1:
            _mm1_launch(_grid1(grid_t, n_sel, B), mm1_args, mm1_meta)
        if run_mm2 and ws is None:
            _mm2_launch(_grid2(grid_t, Dout, B), mm2_args, mm2_meta)
    else:
        c1 = {"GROUP_T": 0, "EPI_SPLIT": 1, **config["mm1"]}
        c2 = {"GROUP_T": 0, "Y_ATOMIC": 0, "EPI_SPLIT": 1, **config["mm2"]}
        if run_mm1:
            _mm1[_grid1(grid_t, n_sel, B)(c1)](*mm1_args, **mm1_meta, **c1)
        if run_mm2 and ws is None:
            _mm2[_grid2(grid_t, Dout, B)(c2)](*mm2_args, **mm2_meta, **c2)
    if run_mm2 and ws is not None:  # after mm1: it reads mm1's deltas
        ws.mm2_ws(delta, indices, w2, y_cache)
        if token_perm is not None:
            out.index_copy_(1, token_perm.long(), y_cache.to(out.dtype))
        elif out is not None:
            out.copy_(y_cache)
    return delta

"""Triton top-k selection with a random extra fraction: one program per score row, the row's keys in registers.

Same semantics as ``selection_reference.select_topk_with_random`` (the oracle) and, for the MLP, as
``mlp_reference.mlp_refresh_selection`` (scores from block-mean pre-activations, references refreshed).

    before (torch, ~6 launches per refresh)               after (one launch)
    s = |hbar_new - hbar_cache| summed over paths         per row r (a token block or a query group):
    top = topk(s, k_top)        radix select, sorts         key  = order-preserving int32 of s (forced: max)
    noise[top] = -1; topk(noise, k_rand)                    T1   = k_top-th largest key: bisection, 32 block-
    cat; hbar_cache.scatter_(hbar_new.gather(...))                 wide counts on the register-resident keys
                                                            P1   = position cut for ties at T1 (bisection on
                                                                   positions; only when not all ties fit)
                                                            T2, P2: the same on the noise of the untaken entries
                                                            store pass (chunks of 1-8 entries per thread): take
                                                            key > T1 | key == T1 & pos < P1, then the noise
                                                            rule; store the indices (running offsets);
                                                            hbar_cache[taken] = hbar_new

Why this shape (H100, ``benchmarks/mlp_experiments.py``, ``benchmarks/selection_path.py``): each search step is
a short loop body plus one block-wide sum, and the store pass scans short chunks (a few entries per thread), so
the compiled kernel stays small. The earlier versions (byte histograms over streamed chunks; bisection with scans
over the whole register-resident row) compiled to 11-24 K instructions and took 0.10-0.13 ms of GPU time for an
MLP refresh (36 or 132 rows of 12288, one program per SM) against 0.069-0.072 ms here (8 warps, store chunks of 8
entries per thread; 0.079-0.084 with 16 warps and one entry per thread). Ties at a threshold take the lowest
positions (torch.topk may take any of them; the set differs only among exactly equal values). Indices come out
top entries first in increasing position order, then the random ones. The interpreter runs this kernel too (CPU tests).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from chipmunk_compile.kernels import mlp_reference
from chipmunk_compile.kernels import selection_reference as reference
from chipmunk_compile.kernels.launch import CachedLaunch, sm_count


@triton.jit
def _order_key(s):
    """float32 -> int32 with the same order (NaN above +inf like torch.topk): sign-magnitude to two's complement."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _score_keys(SCORES, HBAR_NEW, HBAR_CACHE, row, n, pos, forced_lo, forced_hi,
                FROM_HBAR: tl.constexpr, PATHS: tl.constexpr):
    """Order keys of the scores at ``pos``: forced entries get INT32_MAX, positions past the row INT32_MIN (both
    NaN patterns, which no finite score maps to)."""
    valid = pos < n
    if FROM_HBAR:
        # MLP scores: |hbar_new - hbar_cache| summed over the gate (and up) paths of each unit.
        s = tl.zeros_like(pos).to(tl.float32)
        for p in tl.static_range(PATHS):
            new = tl.load(HBAR_NEW + (row * PATHS + p) * n + pos, mask=valid, other=0.0).to(tl.float32)
            old = tl.load(HBAR_CACHE + (row * PATHS + p) * n + pos, mask=valid, other=0.0)
            s += tl.abs(new - old)
    else:
        s = tl.load(SCORES + row * n + pos, mask=valid, other=0.0).to(tl.float32)
    key = tl.where((pos >= forced_lo) & (pos < forced_hi), 0x7FFFFFFF, _order_key(s))
    return tl.where(valid, key, -0x7FFFFFFF - 1)


@triton.jit
def _noise_keys(NOISE, noise_row, n, pos, taken):
    """Uniform noise in [0, 1) as int32 keys (same order) for the entries still open; -1 for the others."""
    noise = tl.load(NOISE + noise_row * n + pos, mask=pos < n, other=0.0)
    return tl.where((pos < n) & ~taken, noise.to(tl.int32, bitcast=True), -1)


@triton.jit
def _kth_largest(key, k, lo, hi, STEPS: tl.constexpr):
    """Largest T in [lo, hi] with count(key >= T) >= k, given count(key >= lo) >= k and hi - lo < 2**STEPS
    (int64 scalar bounds: the midpoints never overflow the int32 keys). One block-wide count per halving step.
    (Cutting in four with the three counts packed into one int64 sum halves the steps but measured 15 % slower on
    H100: the per-step work over a 16384-slot row, not the reduction latency, dominates.)"""
    for _ in range(STEPS):
        mid = lo + ((hi - lo + 1) >> 1)
        enough = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def _tie_cut(key, t, pos, k, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr):
    """Position P such that key > t, plus the keys equal to t at positions below P, are exactly k entries (the
    lowest-position ties): BLOCK when every tie fits, else a bisection on positions."""
    above = tl.sum((key > t).to(tl.int32), 0)
    tie = key == t
    cut = tl.full([], BLOCK, tl.int32)
    if above + tl.sum(tie.to(tl.int32), 0) > k:
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], BLOCK, tl.int32)
        for _ in range(LOG2_BLOCK + 1):
            mid = (lo + hi) >> 1
            enough = above + tl.sum((tie & (pos < mid)).to(tl.int32), 0) >= k
            hi = tl.where(enough, mid, hi)
            lo = tl.where(enough, lo, mid + 1)
        cut = hi
    return cut


@triton.jit
def _taken(key, t, cut, pos):
    return (key > t) | ((key == t) & (pos < cut))


@triton.jit
def _store_positions(OUT, first, mask, offs):
    """OUT[first + (running count of mask)] = offs where mask (order kept); returns how many were stored."""
    count = tl.cumsum(mask.to(tl.int32), 0)
    tl.store(OUT + first + count - 1, offs, mask=mask)
    return tl.sum(mask.to(tl.int32), 0)


@triton.jit
def _select_kernel(SCORES, HBAR_NEW, HBAR_CACHE, NOISE, OUT, n, rows_per_sample, num_top, num_random,
                   forced_lo, forced_hi, FROM_HBAR: tl.constexpr, PATHS: tl.constexpr, BLOCK: tl.constexpr,
                   LOG2_BLOCK: tl.constexpr, LANES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    noise_row = row % rows_per_sample
    pos = tl.arange(0, BLOCK)
    # Thresholds on the register-resident row: T1 / P1 for the top part, T2 / P2 for the random part.
    key = _score_keys(SCORES, HBAR_NEW, HBAR_CACHE, row, n, pos, forced_lo, forced_hi, FROM_HBAR, PATHS)
    t1 = _kth_largest(key, num_top, tl.full([], -0x7FFFFFFF - 1, tl.int64), tl.full([], 0x7FFFFFFF, tl.int64), 32)
    p1 = _tie_cut(key, t1, pos, num_top, BLOCK, LOG2_BLOCK)
    t2 = tl.full([], 0, tl.int32)
    p2 = tl.full([], 0, tl.int32)
    if num_random > 0:
        nkey = _noise_keys(NOISE, noise_row, n, pos, _taken(key, t1, p1, pos))
        # noise < 1.0: keys in [0, 0x3F800000), so 30 halvings suffice.
        t2 = _kth_largest(nkey, num_random, tl.full([], 0, tl.int64), tl.full([], 0x3F800000, tl.int64), 30)
        p2 = _tie_cut(nkey, t2, pos, num_random, BLOCK, LOG2_BLOCK)
    # Store pass over chunks of LANES entries (keys recomputed from the row, now in L1/L2).
    out_row = OUT + row * (num_top + num_random)
    n_top = 0
    n_extra = 0
    for start in range(0, n, LANES):
        offs = start + tl.arange(0, LANES)
        k1 = _score_keys(SCORES, HBAR_NEW, HBAR_CACHE, row, n, offs, forced_lo, forced_hi, FROM_HBAR, PATHS)
        top = _taken(k1, t1, p1, offs) & (offs < n)
        n_top += _store_positions(out_row, n_top, top, offs)
        taken = top
        if num_random > 0:
            extra = _taken(_noise_keys(NOISE, noise_row, n, offs, top), t2, p2, offs) & (offs < n)
            n_extra += _store_positions(out_row, num_top + n_extra, extra, offs)
            taken = top | extra
        if FROM_HBAR:
            # Each selected unit's reference becomes its value now; unselected units keep their older one.
            for p in tl.static_range(PATHS):
                new = tl.load(HBAR_NEW + (row * PATHS + p) * n + offs, mask=taken, other=0.0)
                tl.store(HBAR_CACHE + (row * PATHS + p) * n + offs, new.to(HBAR_CACHE.dtype.element_ty), mask=taken)


# Rows up to this many entries are selected by the kernel (the row's keys in registers: at most 64 per thread at
# 16 warps). The generic call keeps torch above MAX_TRITON_ROW: measured on H100, 2112 attention rows of 16896
# take 1.85 ms here vs 1.50 ms with torch.topk (576 rows of 4608: 0.17 vs 0.48 ms).
MAX_ROW = 32768
MAX_TRITON_ROW = 8192
# Warps per program and entries per thread in each chunk of the store pass (tests force small ones): few rows (an
# MLP refresh, 36-132 rows) are latency bound, one program per SM; many rows (attention query groups) share SMs.
NUM_WARPS = None
STORE_ENTRIES_PER_THREAD = None




_select_launch = CachedLaunch(_select_kernel)


def _launch_shape(rows: int, block: int, device: torch.device) -> tuple[int, int]:
    """(warps, store-pass chunk width). Measured on H100 (``benchmarks/selection_path.py``): an MLP refresh (36 or
    132 rows of 12288) takes 0.069 / 0.072 ms at 8 warps with 8 entries per thread in each store chunk, against
    0.079 / 0.083 ms at 16 warps with one entry per thread (each chunk costs two block-wide scans and two sums:
    24 chunks became 6); 16 warps with 4 entries: 0.071 / 0.075; whole-row chunks: 0.093 / 0.097. At most 64 keys
    per thread (register budget). Many rows (576 attention rows of 4608): 4 warps, one entry per thread."""
    few_rows = device.type == "cuda" and rows <= 2 * sm_count(device.index or 0)
    warps = NUM_WARPS if NUM_WARPS is not None else max(4, min(16, block // 2048))
    per_thread = STORE_ENTRIES_PER_THREAD if STORE_ENTRIES_PER_THREAD is not None else (8 if few_rows else 1)
    return warps, min(block, 32 * warps * per_thread)


def _launch(rows, n, scores, hbar_new, hbar_cache, noise, out, rows_per_sample, num_top, num_random, forced,
            paths):
    lo, hi = forced if forced is not None else (0, 0)
    block = max(32, triton.next_power_of_2(n))
    warps, lanes = _launch_shape(rows, block, scores.device)
    from_hbar = hbar_new is not None
    if not from_hbar:  # any pointer (never read): a cached launch passes tensors only
        hbar_new = hbar_cache = scores
    _select_launch((rows,), (scores, hbar_new, hbar_cache, noise, out, n, rows_per_sample, num_top, num_random, lo,
                             hi), dict(FROM_HBAR=from_hbar, PATHS=paths, BLOCK=block,
                                       LOG2_BLOCK=block.bit_length() - 1, LANES=lanes, num_warps=warps))


def _noise(shape, device, generator, num_random):
    """The reference's draw (same generator calls, same values), or a placeholder when no random entries."""
    if num_random == 0:
        return torch.empty((1,), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device).uniform_(generator=generator)


def _writable_indices(out, shape) -> bool:
    """The kernel can store into ``out`` directly (else the result is copied in)."""
    return out.dtype in (torch.int32, torch.int64) and out.is_contiguous() and tuple(out.shape) == tuple(shape)


def select_topk_with_random(scores: torch.Tensor, num_top: int, num_random: int,
                            forced: tuple[int, int] | None, generator: torch.Generator | None, out=None):
    n = scores.shape[-1]
    num_forced = 0 if forced is None else forced[1] - forced[0]
    k_total = reference.selection_size(n, num_top, num_random, num_forced)
    num_top_total = min(n, num_forced + num_top)
    shape = (*scores.shape[:-1], k_total)
    # Everything, nothing ranked (the kernel's thresholds assume at least one top entry) or long rows: torch.
    if k_total == n or num_top_total == 0 or n > MAX_TRITON_ROW or (out is not None
                                                                     and not _writable_indices(out, shape)):
        return reference.select_topk_with_random(scores, num_top, num_random, forced, generator, out)
    scores = scores.contiguous()
    noise = _noise(scores.shape[1:], scores.device, generator, k_total - num_top_total)
    if out is None:
        out = torch.empty(shape, dtype=torch.int64, device=scores.device)
    rows = scores.numel() // n
    _launch(rows, n, scores, None, None, noise, out, max(1, noise.numel() // n), num_top_total,
            k_total - num_top_total, forced, 1)
    return out


def mlp_refresh_selection(hbar_new: torch.Tensor, hbar_cache: torch.Tensor, num_units: int, num_top: int,
                          num_random: int, generator: torch.Generator | None, out: torch.Tensor | None = None):
    n = num_units
    k_total = reference.selection_size(n, num_top, num_random, 0)
    shape = (*hbar_new.shape[:-1], k_total)
    if (k_total == n or num_top == 0 or n > MAX_ROW or not hbar_cache.is_contiguous()
            or (out is not None and not _writable_indices(out, shape))):
        return mlp_reference.mlp_refresh_selection(hbar_new, hbar_cache, num_units, num_top, num_random, generator,
                                                   out)
    hbar_new = hbar_new.contiguous()  # any float dtype: the kernel reads it as float32
    noise = _noise((*hbar_new.shape[1:-1], n), hbar_new.device, generator, k_total - min(n, num_top))
    if out is None:
        out = torch.empty(shape, dtype=torch.int64, device=hbar_new.device)
    rows = hbar_new.numel() // hbar_new.shape[-1]
    _launch(rows, n, hbar_new, hbar_new, hbar_cache, noise, out, max(1, noise.numel() // n), min(n, num_top),
            k_total - min(n, num_top), None, hbar_new.shape[-1] // n)
    return out

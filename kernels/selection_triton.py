"""Triton top-k selection with a random extra fraction: one program per score row, the row held in registers.

Same semantics as ``selection_reference.select_topk_with_random`` (the oracle) and, for the MLP, as
``mlp_reference.mlp_refresh_selection`` (scores from block-mean pre-activations, references refreshed).

    before (torch, ~6 launches per refresh)               after (one launch)
    s = |hbar_new - hbar_cache| summed over paths         per row r (a token block or a query group):
    top = topk(s, k_top)        radix select, sorts         key  = order-preserving int of s (forced: max)
    noise[top] = -1; topk(noise, k_rand)                    T    = k_top-th largest key: 32 counting steps
    cat; hbar_cache.scatter_(hbar_new.gather(...))          take key > T, then the first ties == T (cumsum)
                                                            same on the noise of the untaken entries
                                                            store indices; hbar_cache[taken] = hbar_new[taken]

The k-th largest key is found by bisection on the 32-bit key space (count(key >= mid) >= k), one block-wide
count per bit, so no sort and no second pass over memory. Ties at the threshold take the lowest indices
(torch.topk may take any of them; the set differs only among exactly equal scores). Indices come out top
entries first in increasing index order, then the random ones. Rows longer than ``MAX_ROW`` keep the torch
path (``supports``); the interpreter runs this kernel too (CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from chipmunk_compile.kernels import mlp_reference
from chipmunk_compile.kernels import selection_reference as reference

MAX_ROW = 32768  # the whole row in registers: up to 64 values per thread at 16 warps


@triton.jit
def _order_key(s):
    """float32 -> int32 with the same order (NaN above +inf like torch.topk): sign-magnitude to two's complement.
    The two ends, INT32_MAX and INT32_MIN, are NaN patterns; they are reserved for forced and absent entries."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _kth_largest(key, k, lo, hi):
    """Largest T in [lo, hi] with count(key >= T) >= k, given count(key >= lo) >= k (int64 scalars bounding the
    int32 keys: the midpoints never overflow)."""
    for _ in range(32):
        mid = lo + ((hi - lo + 1) >> 1)
        enough = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    return lo


@triton.jit
def _take_top(key, k, lo, hi):
    """Mask of the k largest keys (ties at the threshold: lowest positions first)."""
    t = _kth_largest(key, k, lo, hi)
    above = key > t
    tie = key == t
    room = k - tl.sum(above.to(tl.int32), 0)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))


@triton.jit
def _select_kernel(SCORES, HBAR_NEW, HBAR_CACHE, NOISE, OUT, n, rows_per_sample, num_top, num_random,
                   forced_lo, forced_hi, FROM_HBAR: tl.constexpr, PATHS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    if FROM_HBAR:
        # MLP scores: |hbar_new - hbar_cache| summed over the gate (and up) paths of each unit.
        base = row * n * PATHS
        s = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(PATHS):
            new = tl.load(HBAR_NEW + base + p * n + offs, mask=valid, other=0.0)
            old = tl.load(HBAR_CACHE + base + p * n + offs, mask=valid, other=0.0)
            s += tl.abs(new - old)
    else:
        s = tl.load(SCORES + row * n + offs, mask=valid, other=0.0).to(tl.float32)
    key = _order_key(s)
    key = tl.where((offs >= forced_lo) & (offs < forced_hi), 0x7FFFFFFF, key)  # forced: the top key
    key = tl.where(valid, key, -0x7FFFFFFF - 1)  # past the row: the bottom key, below the search range
    lo = tl.full([], -0x7FFFFFFF, tl.int64)
    taken = _take_top(key, num_top, lo, tl.full([], 0x7FFFFFFF, tl.int64)) & valid
    out_row = OUT + row * (num_top + num_random)
    tl.store(out_row + tl.cumsum(taken.to(tl.int32), 0) - 1, offs, mask=taken)
    if num_random > 0:
        # Uniform noise in [0, 1) ranks the untaken entries; one draw per row of a sample, shared by the batch.
        noise = tl.load(NOISE + (row % rows_per_sample) * n + offs, mask=valid, other=0.0)
        key2 = tl.where(taken | (offs >= n), -1, noise.to(tl.int32, bitcast=True))
        extra = _take_top(key2, num_random, tl.full([], 0, tl.int64), tl.full([], 0x7FFFFFFF, tl.int64))
        extra = extra & valid & (key2 >= 0)
        tl.store(out_row + num_top + tl.cumsum(extra.to(tl.int32), 0) - 1, offs, mask=extra)
        taken = taken | extra
    if FROM_HBAR:
        # Each selected unit's reference becomes its value now; unselected units keep their older reference.
        for p in tl.static_range(PATHS):
            new = tl.load(HBAR_NEW + base + p * n + offs, mask=taken, other=0.0)
            tl.store(HBAR_CACHE + base + p * n + offs, new, mask=taken)


def supports(n: int) -> str | None:
    return None if n <= MAX_ROW else f"rows longer than {MAX_ROW} entries"


def num_warps_for(block: int) -> int:
    return max(4, min(16, block // 1024))


def _launch(rows, n, scores, hbar_new, hbar_cache, noise, out, rows_per_sample, num_top, num_random, forced,
            paths):
    block = max(16, triton.next_power_of_2(n))
    lo, hi = forced if forced is not None else (0, 0)
    _select_kernel[(rows,)](scores, hbar_new, hbar_cache, noise, out, n, rows_per_sample, num_top, num_random,
                            lo, hi, FROM_HBAR=hbar_new is not None, PATHS=paths, BLOCK=block,
                            num_warps=num_warps_for(block))


def _noise(shape, device, generator, num_random):
    """The reference's draw (same generator calls, same values), or a placeholder when no random entries."""
    if num_random == 0:
        return torch.empty((1,), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device).uniform_(generator=generator)


def select_topk_with_random(scores: torch.Tensor, num_top: int, num_random: int,
                            forced: tuple[int, int] | None, generator: torch.Generator | None):
    n = scores.shape[-1]
    num_forced = 0 if forced is None else forced[1] - forced[0]
    k_total = reference.selection_size(n, num_top, num_random, num_forced)
    if k_total == n or supports(n) is not None:
        return reference.select_topk_with_random(scores, num_top, num_random, forced, generator)
    num_top_total = min(n, num_forced + num_top)
    scores = scores.contiguous()
    noise = _noise(scores.shape[1:], scores.device, generator, k_total - num_top_total)
    out = torch.empty((*scores.shape[:-1], k_total), dtype=torch.int64, device=scores.device)
    rows = scores.numel() // n
    _launch(rows, n, scores, None, None, noise, out, max(1, noise.numel() // n), num_top_total,
            k_total - num_top_total, forced, 1)
    return out


def mlp_refresh_selection(hbar_new: torch.Tensor, hbar_cache: torch.Tensor, num_units: int, num_top: int,
                          num_random: int, generator: torch.Generator | None):
    n = num_units
    k_total = reference.selection_size(n, num_top, num_random, 0)
    if k_total == n or supports(n) is not None or not hbar_cache.is_contiguous():
        return mlp_reference.mlp_refresh_selection(hbar_new, hbar_cache, num_units, num_top, num_random, generator)
    hbar_new = hbar_new.float().contiguous()
    noise = _noise((*hbar_new.shape[1:-1], n), hbar_new.device, generator, k_total - min(n, num_top))
    out = torch.empty((*hbar_new.shape[:-1], k_total), dtype=torch.int64, device=hbar_new.device)
    rows = hbar_new.numel() // hbar_new.shape[-1]
    _launch(rows, n, hbar_new, hbar_new, hbar_cache, noise, out, max(1, noise.numel() // n), min(n, num_top),
            k_total - min(n, num_top), None, hbar_new.shape[-1] // n)
    return out

"""Triton top-k selection with a random extra fraction: one program per score row, streamed in chunks.

Same semantics as ``selection_reference.select_topk_with_random`` (the oracle) and, for the MLP, as
``mlp_reference.mlp_refresh_selection`` (scores from block-mean pre-activations, references refreshed).

    before (torch, ~6 launches per refresh)               after (one launch)
    s = |hbar_new - hbar_cache| summed over paths         per row r (a token block or a query group):
    top = topk(s, k_top)        radix select, sorts         key  = order-preserving int32 of s (forced: max)
    noise[top] = -1; topk(noise, k_rand)                    T1   = k_top-th largest key: radix select, one
    cat; hbar_cache.scatter_(hbar_new.gather(...))                 256-bin histogram per key byte (4 passes)
                                                            T2   = the same on the noise of the untaken entries
                                                            last pass: take key > T1 and the first ties, then
                                                            noise > T2 and its first ties; store the indices
                                                            (running offsets); hbar_cache[taken] = hbar_new

Each pass streams the row in chunks of CHUNK entries (the row stays in L1/L2 between passes), so any row length
works with a few registers per entry; no sort. Ties at a threshold take the lowest indices (torch.topk may take
any of them; the set differs only among exactly equal values). Indices come out top entries first in increasing
index order, then the random ones. The interpreter runs this kernel too (CPU tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from chipmunk_compile.kernels import mlp_reference
from chipmunk_compile.kernels import selection_reference as reference


@triton.jit
def _order_key(s):
    """float32 -> int32 with the same order (NaN above +inf like torch.topk): sign-magnitude to two's complement.
    INT32_MAX is a NaN pattern; it marks forced entries."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _chunk(SCORES, HBAR_NEW, HBAR_CACHE, NOISE, row, noise_row, n, start, forced_lo, forced_hi, num_random,
           FROM_HBAR: tl.constexpr, PATHS: tl.constexpr, CHUNK: tl.constexpr, WITH_NOISE: tl.constexpr):
    """(positions, in-row mask, score keys, noise keys or zeros) of one chunk of a row, recomputed by every
    pass (WITH_NOISE: also read the noise, which the passes over the scores do not need)."""
    offs = start + tl.arange(0, CHUNK)
    valid = offs < n
    if FROM_HBAR:
        # MLP scores: |hbar_new - hbar_cache| summed over the gate (and up) paths of each unit.
        s = tl.zeros([CHUNK], tl.float32)
        for p in tl.static_range(PATHS):
            new = tl.load(HBAR_NEW + (row * PATHS + p) * n + offs, mask=valid, other=0.0).to(tl.float32)
            old = tl.load(HBAR_CACHE + (row * PATHS + p) * n + offs, mask=valid, other=0.0)
            s += tl.abs(new - old)
    else:
        s = tl.load(SCORES + row * n + offs, mask=valid, other=0.0).to(tl.float32)
    key = tl.where((offs >= forced_lo) & (offs < forced_hi), 0x7FFFFFFF, _order_key(s))  # forced: the top key
    # Uniform noise in [0, 1) ranks the untaken entries; one draw per row of a sample, shared by the batch.
    noise = tl.load(NOISE + noise_row * n + offs, mask=valid & (num_random > 0) & WITH_NOISE, other=0.0)
    return offs, valid, key, noise.to(tl.int32, bitcast=True)


@triton.jit
def _radix_step(hist, need, prefix):
    """From a 256-bin histogram of the next byte of the candidates: the highest byte value with at least
    ``need`` candidates at or above it; returns (prefix extended by it, candidates still needed at that byte,
    candidates at that byte)."""
    bins = tl.arange(0, 256)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    byte = tl.max(tl.where(at_or_above >= need, bins, 0), 0)
    return ((prefix << 8) | byte, need - tl.sum(tl.where(bins > byte, hist, 0), 0),
            tl.sum(tl.where(bins == byte, hist, 0), 0))


@triton.jit
def _byte_of(key, p: tl.constexpr):
    return ((key ^ (-0x7FFFFFFF - 1)) >> (24 - 8 * p)) & 255  # sign bit flipped: unsigned order


@triton.jit
def _prefix_matches(key, prefix, p: tl.constexpr):
    """The bytes above byte p of the (sign-flipped) key equal prefix."""
    return ((key ^ (-0x7FFFFFFF - 1)) >> (32 - 8 * p) & ((1 << (8 * p)) - 1)) == prefix


@triton.jit
def _take(cand, key, t, room, ties_before, all_ties):
    """Entries of ``cand`` taken at threshold t: key > t, and keys equal to t in position order while fewer than
    ``room`` were taken before (``ties_before`` counts earlier chunks'; ``all_ties``: every one is taken, no
    scan needed). Returns (taken, this chunk's count of keys equal to t)."""
    if all_ties:
        taken = cand & (key >= t)
        ties = tl.full([], 0, tl.int32)
    else:
        tie = (cand & (key == t)).to(tl.int32)
        taken = cand & (key > t) | ((tie != 0) & (ties_before + tl.cumsum(tie, 0) <= room))
        ties = tl.sum(tie, 0)
    return taken, ties


@triton.jit
def _store_positions(OUT, first, mask, offs):
    """OUT[first + (running count of mask)] = offs where mask (order kept); returns how many were stored."""
    count = tl.cumsum(mask.to(tl.int32), 0)
    tl.store(OUT + first + count - 1, offs, mask=mask)
    return tl.sum(mask.to(tl.int32), 0)


@triton.jit
def _select_kernel(SCORES, HBAR_NEW, HBAR_CACHE, NOISE, OUT, n, rows_per_sample, num_top, num_random,
                   forced_lo, forced_hi, FROM_HBAR: tl.constexpr, PATHS: tl.constexpr, CHUNK: tl.constexpr):
    # Streams the row in chunks (reloaded from L1/L2 by each pass): 4 radix passes find the num_top-th largest
    # score key T1 (and how many keys equal to T1 to take), 4 more the num_random-th largest noise key T2 among
    # the rest, and a last pass stores the indices (running offsets across chunks) and refreshes hbar_cache.
    row = tl.program_id(0).to(tl.int64)
    noise_row = row % rows_per_sample
    t1 = tl.full([], 0, tl.int32)
    room1 = num_top
    ties_at_t1 = num_top
    for p in tl.static_range(4):
        hist = tl.zeros([256], tl.int32)
        for start in range(0, n, CHUNK):
            offs, valid, key, noise = _chunk(SCORES, HBAR_NEW, HBAR_CACHE, NOISE, row, noise_row, n, start,
                                             forced_lo, forced_hi, num_random, FROM_HBAR, PATHS, CHUNK, False)
            match = valid if p == 0 else valid & _prefix_matches(key, t1, p)
            hist += tl.histogram(_byte_of(key, p), 256, mask=match)
        t1, room1, ties_at_t1 = _radix_step(hist, room1, t1)
    t1 = t1 ^ (-0x7FFFFFFF - 1)
    # Usually every key equal to a threshold is taken (continuous scores: one key per value); then "taken" is a
    # plain comparison and the tie ranks (a block-wide scan per chunk) are skipped.
    all_t1 = ties_at_t1 == room1
    t2 = tl.full([], 0, tl.int32)
    room2 = num_random
    ties_at_t2 = num_random
    if num_random > 0:
        for p in tl.static_range(4):
            hist = tl.zeros([256], tl.int32)
            ties_before = 0
            for start in range(0, n, CHUNK):
                offs, valid, key, noise = _chunk(SCORES, HBAR_NEW, HBAR_CACHE, NOISE, row, noise_row, n, start,
                                                 forced_lo, forced_hi, num_random, FROM_HBAR, PATHS, CHUNK,
                                                 True)
                top, ties = _take(valid, key, t1, room1, ties_before, all_t1)
                ties_before += ties
                open_ = valid & ~top  # not taken by the top part
                match = open_ if p == 0 else open_ & _prefix_matches(noise, t2, p)
                hist += tl.histogram(_byte_of(noise, p), 256, mask=match)
            t2, room2, ties_at_t2 = _radix_step(hist, room2, t2)
        t2 = t2 ^ (-0x7FFFFFFF - 1)
    all_t2 = ties_at_t2 == room2
    out_row = OUT + row * (num_top + num_random)
    ties1 = 0
    ties2 = 0
    n_top = 0
    n_extra = 0
    for start in range(0, n, CHUNK):
        offs, valid, key, noise = _chunk(SCORES, HBAR_NEW, HBAR_CACHE, NOISE, row, noise_row, n, start,
                                         forced_lo, forced_hi, num_random, FROM_HBAR, PATHS, CHUNK, True)
        top, ties = _take(valid, key, t1, room1, ties1, all_t1)
        ties1 += ties
        n_top += _store_positions(out_row, n_top, top, offs)
        taken = top
        if num_random > 0:
            extra, ties = _take(valid & ~top, noise, t2, room2, ties2, all_t2)
            ties2 += ties
            n_extra += _store_positions(out_row, num_top + n_extra, extra, offs)
            taken = top | extra
        if FROM_HBAR:
            # Each selected unit's reference becomes its value now; unselected units keep their older one.
            for p in tl.static_range(PATHS):
                new = tl.load(HBAR_NEW + (row * PATHS + p) * n + offs, mask=taken, other=0.0)
                tl.store(HBAR_CACHE + (row * PATHS + p) * n + offs, new.to(HBAR_CACHE.dtype.element_ty), mask=taken)


# Chunk per pass iteration (tests force small ones). Measured on H100 (benchmarks/selection.py): tl.histogram
# is most of a pass (~1.2 us per 2048 entries per program, however the bytes spread), so few long rows (an MLP
# refresh: 36-132 rows of 12288) run fastest in 4096-entry chunks at 8 warps, while many rows (attention N4608:
# 576 rows of 4608) prefer 1024 at 4 warps, where several programs share an SM.
CHUNK = None
# kernels.py runs: up to 4608 entries per row this kernel beats the torch path (0.24 vs 0.28-0.41 ms); at 16896
# and 118800 its 9 passes over the row from HBM lose to torch.topk (2.07 vs 1.48 ms, 112 vs 55 ms), so longer
# rows of the generic selection keep the torch path.
MAX_TRITON_ROW = 8192


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _chunk_size(rows: int, n: int, device: torch.device) -> int:
    if CHUNK is not None:
        chunk = CHUNK
    elif device.type == "cuda" and rows <= 2 * _sm_count(device.index or 0):
        chunk = 4096
    else:
        chunk = 1024
    return min(chunk, max(128, triton.next_power_of_2(n)))


def _launch(rows, n, scores, hbar_new, hbar_cache, noise, out, rows_per_sample, num_top, num_random, forced,
            paths):
    lo, hi = forced if forced is not None else (0, 0)
    chunk = _chunk_size(rows, n, scores.device)
    _select_kernel[(rows,)](scores, hbar_new, hbar_cache, noise, out, n, rows_per_sample, num_top, num_random,
                            lo, hi, FROM_HBAR=hbar_new is not None, PATHS=paths, CHUNK=chunk,
                            num_warps=max(4, min(8, chunk // 512)))


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
    if (k_total == n or num_top == 0 or not hbar_cache.is_contiguous()
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

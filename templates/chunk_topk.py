"""Top-k chunk ids in one kernel: the ids of the k largest scores of each row, in no particular
order. Specification: ``torch.topk(scores, k, dim=-1, sorted=False).indices`` up to the order
and the choice among equal scores (both pick k of the tied ids; here the lowest ids win).

Why a kernel: torch.topk over [B, H, N] fp32 launches several radix-select kernels per call.
At 128K context (N = 16384 chunks, k = 256) it took 78.7 us of a 169 us step at batch 1 and
60.6 us of 460 us at batch 8 (H100, results/h100/kernels_full/). Here one program owns one row
and runs a radix select on the scores' 32-bit keys, 8 bits a pass: 4 histogram passes find
the k-th largest key, then one pass writes the ids above it and the first ties.

Sub notation: R = B * H rows, N scores a row, k ids kept, BLOCK scores a tile. A row of at most
BLOCK scores is loaded once and kept in registers (SINGLE); a longer one is re-read each pass
(from L2: 64 KB a row at N = 16384).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch, next_pow2

# One tile holds a 128K-context row (16384 chunks of 8 tokens) at 16 warps, 32 keys a thread.
MAX_BLOCK = 4096


@triton.jit
def _keys(scores_ptr, row, start, N, BLOCK: tl.constexpr):
    """(uint32 keys whose unsigned order is the scores' order, ids, in-row mask) of one tile.
    NaN maps above +inf, as torch.topk ranks it."""
    n = start + tl.arange(0, BLOCK)
    valid = n < N
    x = tl.load(scores_ptr + row * N + n, mask=valid, other=0.0)
    bits = x.to(tl.uint32, bitcast=True)
    # negative floats: all bits flipped (larger magnitude -> smaller key); others: sign bit set
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    return key, n, valid


@triton.jit
def _digit_counts(key, valid, prefix, hi_mask, shift):
    """Counts [256] of the keys matching prefix on hi_mask, by descending digit: bin j holds
    digit 255 - j at bit shift. Keys not counted go to bin 255 and are taken off again."""
    match = valid & ((key & hi_mask) == prefix)
    digit = ((key >> shift) & 255).to(tl.int32)
    bins = tl.where(match, 255 - digit, 255)
    counts = tl.histogram(bins, 256)
    skipped = tl.sum((~match).to(tl.int32), 0)
    return counts - tl.where(tl.arange(0, 256) == 255, skipped, 0)


@triton.jit
def _top_chunks_kernel(scores_ptr, out_ptr, N, k, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0)
    if SINGLE:
        key0, n0, valid0 = _keys(scores_ptr, row, 0, N, BLOCK)
    # Radix select, most significant digit first. prefix holds the k-th largest key's digits
    # found so far, hi_mask their bits; want = how many of the keys matching prefix to keep.
    prefix = tl.full((), 0, tl.uint32)
    hi_mask = tl.full((), 0, tl.uint32)
    want = k
    for shift in tl.static_range(24, -8, -8):
        if SINGLE:
            counts = _digit_counts(key0, valid0, prefix, hi_mask, shift)
        else:
            counts = tl.zeros((256,), tl.int32)
            for start in range(0, N, BLOCK):
                key, n, valid = _keys(scores_ptr, row, start, N, BLOCK)
                counts += _digit_counts(key, valid, prefix, hi_mask, shift)
        # at_least[j]: matching keys whose digit is >= 255 - j; the digit sought is the
        # largest one with at least `want` keys at or above it
        at_least = tl.cumsum(counts, 0)
        short = at_least < want
        j = tl.sum(short.to(tl.int32), 0)
        want -= tl.max(tl.where(short, at_least, 0), 0)
        prefix = prefix | ((255 - j).to(tl.uint32) << shift)
        hi_mask = hi_mask | (tl.full((), 255, tl.uint32) << shift)
    # prefix is now the k-th largest key: keep every key above it and the first `want` equal
    written = 0
    ties = 0
    for start in range(0, N, BLOCK):
        if SINGLE:
            key, n, valid = key0, n0, valid0
        else:
            key, n, valid = _keys(scores_ptr, row, start, N, BLOCK)
        tie = (valid & (key == prefix)).to(tl.int32)
        keep = (valid & (key > prefix)) | ((tie != 0) & (ties + tl.cumsum(tie, 0) <= want))
        keep32 = keep.to(tl.int32)
        pos = written + tl.cumsum(keep32, 0) - keep32
        tl.store(out_ptr + row * k + pos, n.to(tl.int64), mask=keep)
        written += tl.sum(keep32, 0)
        ties += tl.sum(tie, 0)


def top_chunks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [..., k] int64 of the k largest of ``scores`` [..., N] (float32) along the last axis,
    in no particular order; k <= N."""
    if scores.dtype != torch.float32:
        raise TypeError(f"top_chunks: scores must be float32 (got {scores.dtype}); the landmark "
                        "scores are fp32")
    N = scores.shape[-1]
    if not 0 <= k <= N:
        raise ValueError(f"top_chunks: k = {k} must be in [0, N = {N}]; pass min(k, N)")
    out = torch.empty(*scores.shape[:-1], k, dtype=torch.int64, device=scores.device)
    rows = out.numel() // max(k, 1)
    if k == 0 or rows == 0:
        return out
    BLOCK = min(next_pow2(N, 256), MAX_BLOCK)
    launch(_top_chunks_kernel)[(rows,)](
        scores.contiguous(), out, N, k, BLOCK=BLOCK, SINGLE=N <= BLOCK,
        num_warps=max(4, min(16, BLOCK // 512)))
    return out


__all__ = ["top_chunks"]

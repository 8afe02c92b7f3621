"""Top-k chunk ids of each row of chunk scores: ``torch.topk(scores, k, sorted=False).indices``
up to the order of the ids and the choice among equal scores (deterministic here).

Sub notation:
    R rows (B * Hkv), N scores a row, K ids to pick (K <= N). Constexprs: NG groups a row (a
    power of two >= K_PAD), GS_PAD (power of two >= GS = cdiv(N, NG) members a group), K_PAD
    (power of two >= K), HAS_TOPK (``tl.topk`` exists in this Triton).

Method: group g of a row holds scores g, g + NG, g + 2 NG, ... (strided, so the group maxima
are GS coalesced loads). The K groups with the largest maxima hold a top-k of the row: a score
outside them is at most its group's maximum, which is at most the K-th largest group maximum,
and the K chosen groups' maxima are K distinct scores at least that large. So the kernel sorts
the NG group maxima, gathers the K_PAD * GS_PAD members of the first K groups, and sorts those.
Scores and ids sort together as one int64 (the score's bits made order-preserving, then the
id), so the work is two bitonic sorts in registers and does not depend on the scores'
distribution (a radix select's histogram bins do: softmax scores crowd a few of them).

Parallelization: one program per row, all of it in registers; ``group_count`` picks NG to
balance the two sorts. Rows whose sorts would not fit (``MAX_SORT``) go to ``torch.topk``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch, next_pow2

MAX_SORT = 8192  # int64 elements of one sort, held in one program's registers
HAS_TOPK = hasattr(tl, "topk")  # triton >= 3.5 has a bitonic top-k that stops sorting early


@triton.jit
def _order_key(x):
    """fp32 -> int32 in the same order (negative floats' magnitude bits flipped)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _largest(x, K_PAD: tl.constexpr, HAS_TOPK: tl.constexpr):
    """The K_PAD largest of a 1-D power-of-two block, largest first."""
    if HAS_TOPK:
        return tl.topk(x, K_PAD)
    else:
        n: tl.constexpr = x.shape[0]
        rows = tl.reshape(tl.sort(x, descending=True), [n // K_PAD, K_PAD])
        return tl.sum(tl.where(tl.arange(0, n // K_PAD)[:, None] == 0, rows, 0), axis=0)


@triton.jit
def _chunk_topk_kernel(score_ptr, idx_ptr, N, K, GS, NG: tl.constexpr, GS_PAD: tl.constexpr,
                       K_PAD: tl.constexpr, HAS_TOPK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scores = score_ptr + row * N
    lowest = -2147483648  # below every score's key: padding never wins
    g = tl.arange(0, NG)
    gmax = tl.full([NG], lowest, tl.int32)
    for j in range(GS):
        n = j * NG + g
        s = tl.load(scores + n, mask=n < N, other=0.0)
        gmax = tl.maximum(gmax, tl.where(n < N, _order_key(s), lowest))
    top = _largest((gmax.to(tl.int64) << 32) | (NG - 1 - g), K_PAD, HAS_TOPK)
    grp = (NG - 1 - (top & 0xFFFFFFFF)).to(tl.int32)
    i = tl.arange(0, K_PAD)[:, None]
    j = tl.arange(0, GS_PAD)[None, :]
    n = grp[:, None] + j * NG  # [K_PAD, GS_PAD] members of the first K groups
    ok = (i < K) & (j < GS) & (n < N)
    key = tl.where(ok, _order_key(tl.load(scores + n, mask=ok, other=0.0)), lowest)
    cand = tl.reshape((key.to(tl.int64) << 32) | (0x7FFFFFFF - n), [K_PAD * GS_PAD])
    best = _largest(cand, K_PAD, HAS_TOPK)
    k = tl.arange(0, K_PAD)
    tl.store(idx_ptr + row * K + k, (0x7FFFFFFF - (best & 0xFFFFFFFF)), mask=k < K)


def padded_k(k: int) -> int:
    """K_PAD: at least 2, since Triton 3.6 fails to compile ``tl.topk`` of one element (H100,
    2026-12-07; 3.9's interpreter runs it)."""
    return max(2, next_pow2(k))


def group_count(n: int, k: int) -> int:
    """NG: a power of two >= the padded k that makes the group sort plus the member sort least
    (0 when no choice fits ``MAX_SORT``)."""
    k_pad = padded_k(k)
    best, cost = 0, None
    ng = k_pad
    while ng <= max(next_pow2(n), k_pad):
        members = k_pad * next_pow2(triton.cdiv(n, ng))
        if ng <= MAX_SORT and members <= MAX_SORT and (cost is None or ng + members < cost):
            best, cost = ng, ng + members
        ng *= 2
    return best


def chunk_topk(scores: torch.Tensor, k: int, num_warps: int = 0) -> torch.Tensor:
    """Ids of the k largest scores of each row, as ``torch.topk(scores, k, dim=-1,
    sorted=False).indices`` (int64). Neither the order of the ids nor which of equal scores is
    taken is part of the contract (both are deterministic).

    Parameters
    ----------
    scores : [..., N] float32 (landmark scores: -1 marks an unselectable chunk).
    k : ids per row, 0 <= k <= N.
    num_warps : 0 picks the default (8).
    """
    *lead, N = scores.shape
    if scores.dtype != torch.float32:
        raise TypeError(f"chunk_topk: scores must be float32, got {scores.dtype}")
    if not 0 <= k <= N:
        raise ValueError(f"chunk_topk: k={k} must be in [0, {N}] (the scores per row)")
    ng = group_count(N, k)
    if ng == 0 or k == 0 or scores.numel() == 0:
        return scores.topk(k, dim=-1, sorted=False).indices
    s = scores.contiguous()
    idx = torch.empty(*lead, k, dtype=torch.int64, device=scores.device)
    launch(_chunk_topk_kernel)[(s.numel() // N,)](
        s, idx, N, k, triton.cdiv(N, ng), NG=ng, GS_PAD=next_pow2(triton.cdiv(N, ng)),
        K_PAD=padded_k(k), HAS_TOPK=HAS_TOPK, num_warps=num_warps or 8)
    return idx


__all__ = ["MAX_SORT", "chunk_topk", "group_count"]

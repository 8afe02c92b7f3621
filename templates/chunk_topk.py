"""Top-k chunk ids of each (sequence, KV head) row of scores, in one launch (``torch.topk``'s
unsorted indices, as ``reference.select_chunks`` needs them).

torch.topk's radix select runs 4+ kernels per call, each a fixed launch and sync cost, so a
selection costs about the same at any row count (H100, 128K batch 8: ~60 us of a ~460 us step;
per batch slice it costs that again, which made per-slice selection slower). Here one program
holds one row in registers and finds its k-th largest value bit by bit:

1. each score becomes an unsigned key whose order is the floats' order (flip every bit of a
   negative float, the sign bit of the others);
2. the threshold t = the k-th largest key, built from the top bit down: a bit stays set when
   at least k keys are >= t with it set (32 block-wide counts);
3. keep the keys > t and, of those equal to t, the first k - count(> t) by chunk id; each kept
   chunk's output slot is its rank among the kept (a prefix sum).

The ids come out in ascending chunk order; which of several tied chunks are kept may differ from
torch.topk's choice (both are a top-k). Rows longer than ``MAX_CHUNKS`` (prompts over 128K
tokens at chunk size 8) use torch.topk.

Sub notation: R rows (B * H), N chunks per row, K ids kept per row; N_PAD = next power of
two >= N (constexpr).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import is_fake, launch, next_pow2

# 16384 chunks (128K tokens at chunk size 8) in 16 warps: 32 keys a thread (sm_90 build,
# scripts/compile_kernels.py: 128 registers, 40 bytes spilled)
MAX_CHUNKS = 16384


def torch_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``chunk_topk``'s contract through torch.topk (unsorted indices)."""
    return scores.topk(k, dim=-1, sorted=False).indices


@triton.jit
def _chunk_topk_kernel(score_ptr, idx_ptr, N, K, N_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, N_PAD)
    ok = n < N
    x = tl.load(score_ptr + row * N + n, mask=ok, other=0.0)
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    key = tl.where(ok, key, 0)  # padding: the smallest key, never above the threshold
    t = tl.zeros([], dtype=tl.uint32)
    for b in tl.static_range(31, -1, -1):
        cand = t | (tl.full([], 1, tl.uint32) << b)
        enough = tl.sum((key >= cand).to(tl.int32), axis=0) >= K
        t = tl.where(enough, cand, t)
    above = key > t
    tied = (key == t) & ok
    room = K - tl.sum(above.to(tl.int32), axis=0)
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + row * K + slot, n.to(tl.int64), mask=keep)


def chunk_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores of each row: [..., N] float32 -> [..., k] int64, in
    ascending order (``scores.topk(k, sorted=False).indices`` up to ties and order)."""
    N = scores.shape[-1]
    if not 0 <= k <= N:
        raise ValueError(f"chunk_topk: k = {k} must lie in [0, N = {N}]")
    if (not isinstance(N, int) or N > MAX_CHUNKS or is_fake(scores)
            or scores.dtype != torch.float32):
        # traced or long rows: N_PAD would specialize on the prompt length or spill
        return torch_topk(scores, k)
    rows = scores.reshape(-1, N).contiguous()
    idx = torch.empty(rows.shape[0], k, dtype=torch.int64, device=scores.device)
    if idx.numel():
        launch(_chunk_topk_kernel)[(rows.shape[0],)](
            rows, idx, N, k, N_PAD=next_pow2(N, 16), num_warps=16 if N > 4096 else 8)
    return idx.view(*scores.shape[:-1], k)


__all__ = ["MAX_CHUNKS", "chunk_topk", "torch_topk"]

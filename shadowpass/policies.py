"""Chunk-selection policies: ShadowKV's landmark scorer and baselines on the same machinery.

A policy decides which prompt chunks a decode step attends to; everything else (outlier chunks,
local window, generated tokens, key rebuild from the low-rank factors, value fetch, exact
attention over the chosen set) is shared. Baselines are run with ``rank = H_kv * d`` (exact
keys) and ``outlier_chunks = 0`` by the accuracy harness, so they differ from ShadowKV only
where the original methods differ.

Each policy is one small function returning chunk scores ``[B, Hkv, N]`` (higher = keep,
non-negative, so ``reference.select_chunks`` can push unselectable chunks below all of them).
A policy that needs more than ShadowKV's state reads one auxiliary tensor built at prefill
(``prefill_aux``); for ``shadowkv`` it is empty, so ShadowKV's memory is unchanged.

Sub notation: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, T query positions,
d head dim, C chunk size, N sparse chunks.

Imports nothing beyond torch (reference.py imports this module).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

POLICIES = ("shadowkv", "quest", "streaming", "oracle")
SINK_TOKENS = 4  # StreamingLLM keeps the first 4 tokens


def aux_shape(policy: str, B, H, N, C, d) -> Tuple:
    """Shape of the policy's auxiliary prefill tensor (works on SymInts)."""
    if policy == "quest":
        return (B, H, N, 2, d)      # per-chunk min and max of post-RoPE keys
    if policy == "oracle":
        return (B, H, N * C, d)     # exact post-RoPE keys of the sparse region
    return (B, H, 0, d)             # shadowkv, streaming: nothing


def prefill_aux(policy: str, k_post: torch.Tensor, valid: torch.Tensor, C: int) -> torch.Tensor:
    """The auxiliary tensor a policy keeps from prefill.

    k_post: [B, Hkv, N*C, d] post-RoPE keys of the sparse region; valid: [B, N*C] bool
    (False for padding). Returns a fresh tensor of ``aux_shape(policy, ...)``, k_post's dtype.
    """
    B, H, S, d = k_post.shape
    N = S // C
    if policy == "quest":
        k = k_post.reshape(B, H, N, C, d)
        pad = ~valid.view(B, 1, N, C, 1)
        lo = k.masked_fill(pad, math.inf).amin(3)
        hi = k.masked_fill(pad, -math.inf).amax(3)
        bounds = torch.stack([lo, hi], dim=3)  # [B, H, N, 2, d]
        return bounds.masked_fill(~torch.isfinite(bounds), 0.0)  # all-padding chunks
    if policy == "oracle":
        return k_post.clone()
    return k_post.new_empty(aux_shape(policy, B, H, N, C, d))


def _group_softmax(logits: torch.Tensor, selectable: torch.Tensor, H: int) -> torch.Tensor:
    """logits [B, Hq, T, N] -> softmax over selectable chunks, max over the GQA group, sum
    over query positions: [B, Hkv, N]. The same reduction as ShadowKV's landmark scorer."""
    B, Hq, T, N = logits.shape
    s = logits.view(B, H, Hq // H, T, N).masked_fill(~selectable[:, :, None, None, :], -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num(0.0).amax(2).sum(2)


def quest_scores(q: torch.Tensor, bounds: torch.Tensor, selectable: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Quest (Tang et al., 2024, arXiv 2406.10774): an upper bound of q . k over each chunk,
    sum_d max(q_d * min_d, q_d * max_d), from per-chunk min/max keys.

    q: [B, Hq, T, d]; bounds: [B, Hkv, N, 2, d]; selectable: [B, Hkv, N]. The bounds go through
    the same softmax / GQA-max / sum-over-T reduction as ShadowKV's landmark scores, so only
    the estimate of q . k differs. Returns [B, Hkv, N] fp32.
    """
    B, Hq, T, d = q.shape
    H = bounds.shape[1]
    qg = q.float().view(B, H, Hq // H, T, 1, d)
    lo = bounds[:, :, None, None, :, 0].float()  # [B, H, 1, 1, N, d]
    hi = bounds[:, :, None, None, :, 1].float()
    ub = torch.maximum(qg * lo, qg * hi).sum(-1)  # [B, H, G, T, N]
    return _group_softmax(ub.reshape(B, Hq, T, -1) * scale, selectable, H)


def streaming_scores(selectable: torch.Tensor, sparse_valid: torch.Tensor, C: int,
                     sink_tokens: int = SINK_TOKENS) -> torch.Tensor:
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks + a recent window.

    Chunks holding one of the first ``sink_tokens`` real tokens score highest, then chunks by
    recency, so top-k keeps the sinks and the most recent chunks before the local window.
    selectable: [B, Hkv, N]; sparse_valid: [B, N*C]. Returns [B, Hkv, N] fp32 in [0, 2].
    """
    B, H, N = selectable.shape
    before = sparse_valid.view(B, N, C).sum(-1).cumsum(-1) - sparse_valid.view(B, N, C).sum(-1)
    sink = (before < sink_tokens) & sparse_valid.view(B, N, C).any(-1)  # [B, N]
    recency = (torch.arange(N, device=selectable.device, dtype=torch.float32) + 1) / (N + 1)
    scores = torch.where(sink, 2.0, recency.expand(B, N))
    return scores[:, None, :].expand(B, H, N) * selectable


def oracle_scores(q: torch.Tensor, keys: torch.Tensor, selectable: torch.Tensor,
                  sparse_valid: torch.Tensor, scale: float, C: int) -> torch.Tensor:
    """Oracle top-k: the exact attention mass of each chunk, an upper bound for any selector
    that picks whole chunks (cf. the oracle in Quest, arXiv 2406.10774, and ShadowKV's
    analysis, arXiv 2410.21465).

    q: [B, Hq, T, d]; keys: [B, Hkv, N*C, d] exact post-RoPE keys; selectable: [B, Hkv, N];
    sparse_valid: [B, N*C]. Softmax of q . k * scale over the selectable real tokens of the
    sparse region, summed per chunk, max over the GQA group, summed over T. Returns
    [B, Hkv, N] fp32.
    """
    B, Hq, T, d = q.shape
    H, S = keys.shape[1], keys.shape[2]
    N = S // C
    qg = q.float().view(B, H, Hq // H, T, d)
    s = torch.einsum("bhgtd,bhsd->bhgts", qg, keys.float()) * scale
    ok = selectable.repeat_interleave(C, dim=-1) & sparse_valid[:, None, :]  # [B, H, S]
    p = torch.softmax(s.masked_fill(~ok[:, :, None, None], -math.inf), dim=-1).nan_to_num(0.0)
    return p.view(B, H, Hq // H, T, N, C).sum(-1).amax(2).sum(2)


def chunk_scores(policy: str, q: torch.Tensor, state, scale: float, C: int) -> torch.Tensor:
    """Scores [B, Hkv, N] of a non-ShadowKV policy; ``state`` is a reference.PrefillState."""
    if policy == "quest":
        return quest_scores(q, state.aux, state.selectable, scale)
    if policy == "streaming":
        return streaming_scores(state.selectable, state.sparse_valid, C)
    if policy == "oracle":
        return oracle_scores(q, state.aux, state.selectable, state.sparse_valid, scale, C)
    raise ValueError(f"unknown selection policy {policy!r}; choose one of {POLICIES}")

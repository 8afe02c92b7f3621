"""Chunk-selection policies: ShadowKV's landmark scorer and baselines on the same machinery.

A policy decides which prompt chunks a decode step attends to; everything else (outlier chunks,
local window, generated tokens, key rebuild from the low-rank factors, value fetch, exact
attention over the chosen set) is shared. Baselines are run with ``rank = H_kv * d`` (exact
keys) and ``outlier_chunks = 0`` by the accuracy harness, so they differ from ShadowKV only
where the original methods differ.

Each policy is one small function returning chunk scores ``[B, Hkv, N]`` (higher = keep,
non-negative, so ``reference.select_chunks`` can push unselectable chunks below all of them).
A policy that needs more than ShadowKV's state reads one auxiliary tensor built at prefill
(``prefill_selection``); for ``shadowkv`` it is empty, so ShadowKV's memory is unchanged.
Quest and the hybrid keep the same landmark tensor (holding mid-range keys where they score by
the bound) plus a radius, so one scorer and one kernel serve shadowkv, quest and the hybrid.

``shadowkv_hybrid`` is ShadowKV with a per-head fallback decided at prefill: the prompt's last
queries (the local window) measure, per KV head, how much more exact attention mass the landmark
top-k misses than the oracle top-k; heads that lose more than ``HYBRID_GAP`` score chunks by
Quest's min/max bound instead of landmarks (landmarks dilute a single key that a head attends to
in the chunk mean; the bound does not). See results/cpu/perhead_fallback.txt.

Sub notation: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, T query positions,
d head dim, C chunk size, N sparse chunks, W calibration queries.

Imports nothing beyond torch (reference.py imports this module).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

POLICIES = ("shadowkv", "shadowkv_hybrid", "quest", "streaming", "oracle")
SINK_TOKENS = 4  # StreamingLLM keeps the first 4 tokens
# shadowkv_hybrid: a KV head whose landmark top-k misses more than this share of the prompt's
# last queries' attention mass beyond what the oracle top-k misses scores by Quest bounds.
# On SmolLM2-135M at 8K the gaps split into < 0.09 (layers 0-2, 11-29) and > 0.13 (3-10).
HYBRID_GAP = 0.1
CALIBRATION = ("shadowkv_hybrid",)  # policies whose prefill needs queries, scale and budget
BOUNDED = ("quest", "shadowkv_hybrid")  # policies that score (some heads) by Quest's bound
# policies the CUDA kernels run; the others (accuracy baselines) run the reference on CUDA
KERNEL_POLICIES = ("shadowkv", *BOUNDED)


def aux_shape(policy: str, B, H, N, C, d) -> Tuple:
    """Shape of the policy's auxiliary prefill tensor (works on SymInts)."""
    if policy in BOUNDED:
        return (B, H, N, d)         # chunk radius: half the per-dim key range (0: landmark head)
    if policy == "oracle":
        return (B, H, N * C, d)     # exact post-RoPE keys of the sparse region
    return (B, H, 0, d)             # shadowkv, streaming: nothing


def prefill_selection(policy: str, k_post: torch.Tensor, valid: torch.Tensor,
                      landmarks: torch.Tensor, C: int, calibration=None):
    """What a policy keeps from prefill to score chunks: (centers, aux).

    k_post: [B, Hkv, N*C, d] post-RoPE keys of the sparse region; valid: [B, N*C] bool
    (False for padding); landmarks: [B, Hkv, N, d] chunk means. calibration: for
    ``CALIBRATION`` policies, the tuple (q, k_all, key_valid, landmarks, selectable, scale,
    budget_chunks) of ``landmark_gap``.
    centers replace the landmarks in the state: the chunk means, or for a head scored by Quest's
    bound the middle of each chunk's per-dim key range; aux is a fresh tensor of
    ``aux_shape(policy, ...)``, k_post's dtype.
    """
    B, H, S, d = k_post.shape
    if policy in BOUNDED:
        mid, radius = chunk_ranges(k_post, valid, C)
        if policy == "quest":
            return mid, radius
        if calibration is None:
            raise ValueError("shadowkv_hybrid: prefill needs the prompt's queries to pick the "
                             "fallback heads (pass q, scale and budget_chunks to prefill_state)")
        fallback = (landmark_gap(*calibration, C=C) > HYBRID_GAP)[:, :, None, None]  # [B, H]
        return torch.where(fallback, mid, landmarks), radius * fallback
    if policy == "oracle":
        return landmarks, k_post.clone()
    return landmarks, k_post.new_empty(aux_shape(policy, B, H, S // C, C, d))


def chunk_ranges(k_post: torch.Tensor, valid: torch.Tensor, C: int):
    """Per chunk and dim, the middle and half-width of the real keys' range: (mid, radius),
    [B, H, N, d] each (zeros for an all-padding chunk). Quest's bound of q . k over a chunk,
    sum_d max(q_d * min_d, q_d * max_d), is q . mid + |q| . radius."""
    B, H, S, d = k_post.shape
    k = k_post.reshape(B, H, S // C, C, d)
    pad = ~valid.view(B, 1, S // C, C, 1)
    lo = k.masked_fill(pad, math.inf).amin(3)
    hi = k.masked_fill(pad, -math.inf).amax(3)
    real = torch.isfinite(lo)
    mid = torch.where(real, (lo + hi) / 2, 0.0)
    return mid, torch.where(real, (hi - lo) / 2, 0.0)


def landmark_gap(q: torch.Tensor, k_all: torch.Tensor, key_valid: torch.Tensor,
                 landmarks: torch.Tensor, selectable: torch.Tensor, scale: float,
                 budget_chunks: int, C: int) -> torch.Tensor:
    """Per KV head, how much more attention mass the landmark top-k misses than the oracle
    top-k, for the prompt's queries after the sparse region (the local window).

    q: [B, Hq, T, d] post-RoPE prompt queries; k_all: [B, Hkv, T, d] post-RoPE prompt keys;
    key_valid: [B, T] bool (False for padding); landmarks: [B, Hkv, N, d]; selectable:
    [B, Hkv, N]. Each of the W = T - N*C queries selects its own top-k (k = min(budget_chunks,
    N)) as a decode step would; its missed mass is its causal softmax mass (over all its real
    keys) on selectable chunks it did not select. Returns [B, Hkv] fp32: mean over the W
    queries of the worst query head's (landmark - oracle) missed mass; zero if W or k is 0.
    """
    B, Hq, T, d = q.shape
    H, N = landmarks.shape[1], landmarks.shape[2]
    S, G = N * C, Hq // H
    W, K = T - S, min(budget_chunks, N)
    if W == 0 or K == 0:
        return q.new_zeros(B, H, dtype=torch.float32)
    qg = q[:, :, S:].float().view(B, H, G, W, d)
    logits = torch.einsum("bhgwd,bhsd->bhgws", qg, k_all.float()) * scale  # [B, H, G, W, T]
    pos = torch.arange(T, device=q.device)
    ok = (pos[None, :] <= pos[S:, None])[None] & key_valid[:, None, :]  # [B, W, T]
    p = torch.softmax(logits.masked_fill(~ok[:, None, None], -math.inf), -1).nan_to_num(0.0)
    mass = p[..., :S].reshape(B, H, G, W, N, C).sum(-1)  # [B, H, G, W, N] exact chunk mass
    mass = mass * selectable[:, :, None, None].float()
    lm = torch.einsum("bhgwd,bhnd->bhgwn", qg, landmarks.float()) * scale
    lm = torch.softmax(lm.masked_fill(~selectable[:, :, None, None], -math.inf), -1)
    lm = lm.nan_to_num(0.0).amax(2).masked_fill(~selectable[:, :, None], -1.0)
    missed = []
    for ranking in (lm, mass.amax(2)):  # landmark, oracle (mass is 0 off selectable)
        idx = ranking.topk(K, -1).indices[:, :, None].expand(B, H, G, W, K)
        missed.append(mass.sum(-1) - mass.gather(-1, idx).sum(-1))  # [B, H, G, W]
    return (missed[0] - missed[1]).amax(2).mean(-1)


def landmark_scores(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor,
                    scale: float, radius: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ShadowKV's chunk scores [B, Hkv, N]: softmax over chunks of q . landmark * scale, max
    over the GQA group, summed over query positions. q: [B, Hq, T, d]; landmarks:
    [B, Hkv, N, d]; selectable: [B, Hkv, N].

    radius [B, Hkv, N, d] (``chunk_ranges``; quest, shadowkv_hybrid): the logit is
    q . landmark + |q| . radius, which with the chunks' mid-range keys as landmarks is Quest's
    upper bound of q . k over the chunk (Tang et al., 2024, arXiv 2406.10774); heads with zero
    radius keep ShadowKV's estimate. Only this estimate differs between the policies."""
    B, Hq, T, d = q.shape
    H = landmarks.shape[1]
    qg = q.float().view(B, H, Hq // H, T, d)
    s = torch.einsum("bhgtd,bhnd->bhgtn", qg, landmarks.float())
    if radius is not None:
        s = s + torch.einsum("bhgtd,bhnd->bhgtn", qg.abs(), radius.float())
    return _group_softmax(s.reshape(B, Hq, T, -1) * scale, selectable, H)


def _group_softmax(logits: torch.Tensor, selectable: torch.Tensor, H: int) -> torch.Tensor:
    """logits [B, Hq, T, N] -> softmax over selectable chunks, max over the GQA group, sum
    over query positions: [B, Hkv, N]. The same reduction as ShadowKV's landmark scorer."""
    B, Hq, T, N = logits.shape
    s = logits.view(B, H, Hq // H, T, N).masked_fill(~selectable[:, :, None, None, :], -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num(0.0).amax(2).sum(2)


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
    if policy in BOUNDED:
        return landmark_scores(q, state.landmarks, state.selectable, scale, state.aux)
    if policy == "streaming":
        return streaming_scores(state.selectable, state.sparse_valid, C)
    if policy == "oracle":
        return oracle_scores(q, state.aux, state.selectable, state.sparse_valid, scale, C)
    raise ValueError(f"unknown selection policy {policy!r}; choose one of {POLICIES}")

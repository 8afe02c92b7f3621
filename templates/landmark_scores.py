"""Chunk scoring for one decode step: softmax over chunks of q . landmarks^T * scale, max over
the GQA group, summed over query positions (``reference.score_chunks``).

Sub notation:
    B batch, H = Hkv KV heads, Hq query heads, G = Hq // H (GQA group), T query positions,
    d head dim, N chunks, M = G * T query rows of one KV head (row m -> g = m // T, t = m % T).
    Constexprs: D (= d), D_PAD (power of two >= d), M_PAD (power of two >= max(16, M), the
    tl.dot minimum), BLOCK_N chunks per program, NB_TILE block statistics merged per step,
    G_PAD / T_PAD (powers of two >= G / T), UPCAST (see templates.common).

Parallelization: two kernels, each on a grid (cdiv(N, BLOCK_N), B * H) so that even batch 1
fills the GPU. Pass 1 reads each landmark once, writes masked logits [B, H, M, N] (fp32, M*4
bytes per chunk against d*2 bytes of landmark) and per-block softmax statistics (max, sum of
exp). Pass 2 merges the block statistics of its (b, h), normalizes its block of logits and
reduces max over g, sum over t.

The same two passes are Inductor templates (``landmark_logits.py.jinja``,
``landmark_softmax.py.jinja``; ``logits_source`` / ``softmax_source``), which
``shadowpass.lowering`` registers for ``shadowkv::landmark_scores``: both the kernels here and
the templates call the ``@triton.jit`` tiles below, so the two routes compute alike.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .chunk_topk import chunk_topk
from .common import INTERPRET, as_bytes, dot, launch, next_pow2, template_source

LOG2E = 1.4426950408889634


@triton.jit
def _logits_tile(q_ptr, lm_ptr, rad_ptr, sel_ptr, bh, pid_n, qk_scale, M, N,
                 D: tl.constexpr, D_PAD: tl.constexpr, M_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_RADIUS: tl.constexpr, UPCAST: tl.constexpr):
    """Masked logits (log2 units) [M_PAD, BLOCK_N] of block pid_n of (b, h) = bh, contiguous
    inputs; unselectable chunks are -inf. Returns (s, rows, n)."""
    rows = tl.arange(0, M_PAD)
    cols = tl.arange(0, D_PAD)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    n_ok = n < N
    d_ok = cols < D
    # q rows of this KV head: q[b, h*G + g, t] sits at ((bh*G + g)*T + t) * D = (bh*M + m) * D
    q = tl.load(q_ptr + (bh * M + rows)[:, None] * D + cols[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lm = tl.load(lm_ptr + (bh * N + n)[:, None] * D + cols[None, :],
                 mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if lm.dtype.is_fp8():  # fp8 storage (ShadowKVConfig.landmark_dtype): widen, keep q's bits
        lm = lm.to(q.dtype)
    s = dot(q.to(lm.dtype), tl.trans(lm), UPCAST)
    if HAS_RADIUS:  # Quest's bound: q . mid + |q| . radius (policies.landmark_scores)
        rad = tl.load(rad_ptr + (bh * N + n)[:, None] * D + cols[None, :],
                      mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s += dot(tl.abs(q).to(rad.dtype), tl.trans(rad), UPCAST)
    # .to: Inductor may pass the float scale as fp64, which would make s fp64
    s = (s * qk_scale).to(tl.float32)
    sel = tl.load(sel_ptr + bh * N + n, mask=n_ok, other=0) != 0
    return tl.where(sel[None, :], s, float("-inf")), rows, n


@triton.jit
def _store_block_stats(s, bmax_ptr, bsum_ptr, bh, pid_n, rows, M, NB):
    """This block's softmax statistics per query row: max and sum of exp2 (an all-masked row:
    -inf and 0)."""
    row_ok = rows < M
    m_blk = tl.max(s, axis=1)
    m_safe = tl.where(m_blk == float("-inf"), 0.0, m_blk)
    l_blk = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    tl.store(bmax_ptr + (bh * M + rows) * NB + pid_n, m_blk, mask=row_ok)
    tl.store(bsum_ptr + (bh * M + rows) * NB + pid_n, l_blk, mask=row_ok)


@triton.jit
def _scores_tile(logit_ptr, bmax_ptr, bsum_ptr, sel_ptr, bh, pid_n, fill, G, T, N, NB,
                 G_PAD: tl.constexpr, T_PAD: tl.constexpr, NB_TILE: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Scores [BLOCK_N] of block pid_n of (b, h) = bh from the logits and block statistics
    (contiguous); unselectable chunks score ``fill``. Returns (score, n)."""
    M = G * T
    g = tl.arange(0, G_PAD)[:, None, None]
    t = tl.arange(0, T_PAD)[None, :, None]
    m3 = g * T + t  # [G_PAD, T_PAD, 1] query row
    row_ok = (g < G) & (t < T)
    # merge the per-block statistics of this (b, h): global max and sum of exp per row, a tile
    # of blocks at a time (no constexpr depends on N, so a new prompt length needs no recompile)
    gmax = tl.full([G_PAD, T_PAD], float("-inf"), dtype=tl.float32)
    gsum = tl.zeros([G_PAD, T_PAD], dtype=tl.float32)
    for blk0 in range(0, NB, NB_TILE):
        blk = blk0 + tl.arange(0, NB_TILE)[None, None, :]
        st_ok = row_ok & (blk < NB)
        bmax = tl.load(bmax_ptr + (bh * M + m3) * NB + blk, mask=st_ok, other=float("-inf"))
        bsum = tl.load(bsum_ptr + (bh * M + m3) * NB + blk, mask=st_ok, other=0.0)
        new_max = tl.maximum(gmax, tl.max(bmax, axis=2))
        new_safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        gsum = gsum * tl.exp2(gmax - new_safe) + tl.sum(bsum * tl.exp2(bmax - new_safe[:, :, None]),
                                                         axis=2)
        gmax = new_max
    gmax_safe = tl.where(gmax == float("-inf"), 0.0, gmax)
    inv = tl.where(gsum > 0, 1.0 / tl.where(gsum > 0, gsum, 1.0), 0.0)
    # normalize this block of logits; masked chunks give exp2(-inf) = 0 (reference: nan_to_num)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = n[None, None, :]
    ok = row_ok & (n3 < N)
    s = tl.load(logit_ptr + (bh * M + m3) * N + n3, mask=ok, other=float("-inf"))
    p = tl.exp2(s - gmax_safe[:, :, None]) * inv[:, :, None]
    p = tl.where(ok, p, 0.0)
    score = tl.sum(tl.max(p, axis=0), axis=0)  # max over the group, sum over positions
    sel = tl.load(sel_ptr + bh * N + n, mask=n < N, other=0) != 0
    return tl.where(sel, score, fill), n


@triton.jit
def _landmark_logits_kernel(
    lm_ptr, rad_ptr, q_ptr, sel_ptr, logit_ptr, bmax_ptr, bsum_ptr,
    qk_scale, H, G, T, N, NB,
    D: tl.constexpr, D_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RADIUS: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * H + h; int64 offsets for large caches
    M = G * T
    s, rows, n = _logits_tile(q_ptr, lm_ptr, rad_ptr, sel_ptr, bh, pid_n, qk_scale, M, N,
                              D, D_PAD, M_PAD, BLOCK_N, HAS_RADIUS, UPCAST)
    tl.store(logit_ptr + (bh * M + rows)[:, None] * N + n[None, :], s,
             mask=(rows < M)[:, None] & (n < N)[None, :])
    _store_block_stats(s, bmax_ptr, bsum_ptr, bh, pid_n, rows, M, NB)


@triton.jit
def _landmark_softmax_kernel(
    logit_ptr, bmax_ptr, bsum_ptr, sel_ptr, score_ptr,
    fill, G, T, N, NB,
    G_PAD: tl.constexpr, T_PAD: tl.constexpr, NB_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    score, n = _scores_tile(logit_ptr, bmax_ptr, bsum_ptr, sel_ptr, bh, pid_n, fill, G, T, N,
                            NB, G_PAD, T_PAD, NB_TILE, BLOCK_N)
    tl.store(score_ptr + bh * N + n, score, mask=n < N)


NB_TILE = 64  # block statistics merged per step of the softmax pass


# (num_warps, num_stages) choices of the logits template, which Inductor autotunes; the first
# is the launch of _landmark_logits_kernel above (Triton's default of 3 stages). The block of
# chunks stays fixed: it sizes the block-statistics buffers that every choice writes.
LOGITS_CONFIGS = [(4, 3), (8, 3)]
LOGITS_CONFIGS_MORE = [(4, 1), (8, 1), (2, 3)]


def block_chunks(elem_bytes: int, interpret: bool = INTERPRET) -> int:
    """Chunks per program: 128 of 1- or 2-byte landmarks; fp32 halves it (register spills at
    d=128); 32 under the interpreter, so that the CPU tests' small prompts span several blocks."""
    return 32 if interpret else (128 if elem_bytes <= 2 else 64)


def landmark_scores(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor,
                    scale: float, fill: float = 0.0, block_n: int = 0,
                    radius: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk scores of ``policies.landmark_scores``.

    Parameters
    ----------
    q : [B, Hq, T, d] query (any float dtype; cast to the landmarks' dtype for the dot).
    landmarks : [B, H, N, d] chunk means (fp32, bf16 or fp16; float8_e4m3fn ones are widened
        to q's dtype instead).
    selectable : [B, H, N] bool; False chunks score ``fill`` and are excluded from the softmax.
    scale : the model's attention scale.
    fill : score written for unselectable chunks (0.0 as the reference; -1.0 ranks them last).
    block_n : chunks per program (0 = default).
    radius : [B, H, N, d] like landmarks, or None: adds |q| . radius to each logit (Quest's
        bound for the heads of quest / shadowkv_hybrid that keep mid-range keys as landmarks).

    Returns
    -------
    [B, H, N] float32 scores.
    """
    B, Hq, T, d = q.shape
    H, N = landmarks.shape[1], landmarks.shape[2]
    G = Hq // H
    M = G * T
    scores = torch.empty(B, H, N, dtype=torch.float32, device=landmarks.device)
    if N == 0 or B * H == 0:
        return scores
    BLOCK_N = block_n or block_chunks(landmarks.element_size())
    if isinstance(N, int) and N < BLOCK_N:  # small prompts (tests); SymInt N keeps the default
        BLOCK_N = next_pow2(N, 16)
    NB = triton.cdiv(N, BLOCK_N)
    logits = torch.empty(B, H, M, N, dtype=torch.float32, device=landmarks.device)
    bmax = torch.empty(B, H, M, NB, dtype=torch.float32, device=landmarks.device)
    bsum = torch.empty_like(bmax)
    lm = landmarks.contiguous()
    # unread without radius; beside fp8 landmarks it keeps q's dtype, as they are widened to
    rad = lm if radius is None else radius.to(q.dtype if lm.element_size() == 1 else lm.dtype)
    rad = rad.contiguous()
    sel = as_bytes(selectable.contiguous())
    grid = (NB, B * H)
    launch(_landmark_logits_kernel)[grid](
        lm, rad, q.contiguous(), sel, logits, bmax, bsum,
        float(scale) * LOG2E, H, G, T, N, NB,
        D=d, D_PAD=next_pow2(d, 16), M_PAD=next_pow2(M, 16), BLOCK_N=BLOCK_N,
        HAS_RADIUS=radius is not None, UPCAST=INTERPRET, num_warps=4)
    launch(_landmark_softmax_kernel)[grid](
        logits, bmax, bsum, sel, scores,
        float(fill), G, T, N, NB,
        G_PAD=next_pow2(G), T_PAD=next_pow2(T), NB_TILE=NB_TILE, BLOCK_N=BLOCK_N,
        num_warps=4)
    return scores


def select_top_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor,
                      scale: float, budget_chunks: int, radius: torch.Tensor | None = None):
    """Top-k chunk ids as ``reference.select_chunks`` of ``policies.landmark_scores``.

    Returns
    -------
    idx : [B, H, K] int64 chunk ids, K = min(budget_chunks, N), in no particular order (the
        attention does not depend on it), from ``chunk_topk``: the ids of unsorted
        ``torch.topk`` up to ties. In the fused step at 128K batch 8 (H100, CUDA graph) it took
        313.3 us against 337.7 with ``torch.topk`` (results/h100/chunk_topk_fp8).
    scores : [B, H, N] float32, unselectable chunks at -1 (below every softmax probability).
    """
    scores = landmark_scores(q, landmarks, selectable, scale, fill=-1.0, radius=radius)
    return chunk_topk(scores, min(budget_chunks, scores.shape[-1])), scores


# Names only our templates' generated code contains (tests look for them in Inductor's output).
LOGITS_MARKER = "shadowkv_landmark_logits"
SOFTMAX_MARKER = "shadowkv_landmark_softmax"


@functools.lru_cache(maxsize=None)
def logits_source() -> str:
    """Pass 1's template: the Jinja kernel, then the helpers it calls."""
    return template_source("landmark_logits.py.jinja", dot, _logits_tile, _store_block_stats)


@functools.lru_cache(maxsize=None)
def softmax_source() -> str:
    """Pass 2's template: the Jinja kernel, then the helper it calls."""
    return template_source("landmark_softmax.py.jinja", _scores_tile)


__all__ = ["LOGITS_CONFIGS", "LOGITS_CONFIGS_MORE", "LOGITS_MARKER", "NB_TILE", "SOFTMAX_MARKER", "block_chunks", "landmark_scores",
           "logits_source", "select_top_chunks", "softmax_source"]

"""Prefill: chunk landmarks (mean post-RoPE key over a chunk's real tokens) and each chunk's
minimum cosine between its tokens and its landmark, in one pass over the keys
(``reference.chunk_landmarks``).

Sub notation:
    B batch, H = Hkv KV heads, N chunks, C chunk size, d head dim; keys k [B, H, N*C, d] with
    any batch/head strides and unit stride along d; valid [B, N*C] token is real.
    Constexprs: D (= d), D_PAD (power of two >= d), C_PAD (power of two >= C), BLOCK_CH chunks
    per program.

Parallelization: grid (cdiv(N, BLOCK_CH), B*H); each program reads its chunks' keys once
([BLOCK_CH, C_PAD, D_PAD] in fp32), reduces the mean over c and then the cosines over d.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import as_bytes, launch, next_pow2


@triton.jit
def _chunk_landmarks_kernel(
    k_ptr, valid_ptr, lm_ptr, mincos_ptr,
    H, N, C, stride_b, stride_h, stride_s,
    D: tl.constexpr, D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    n = pid * BLOCK_CH + tl.arange(0, BLOCK_CH)[:, None, None]  # [BLOCK_CH, 1, 1]
    c = tl.arange(0, C_PAD)[None, :, None]                      # [1, C_PAD, 1]
    d = tl.arange(0, D_PAD)[None, None, :]                      # [1, 1, D_PAD]
    tok = n * C + c
    tok_in = (n < N) & (c < C)
    ok = tok_in & (tl.load(valid_ptr + b * N * C + tok, mask=tok_in, other=0) != 0)
    k = tl.load(k_ptr + b * stride_b + h * stride_h + tok * stride_s + d,
                mask=ok & (d < D), other=0.0).to(tl.float32)
    w = ok.to(tl.float32)                                       # [BLOCK_CH, C_PAD, 1]
    count = tl.maximum(tl.sum(w, axis=1), 1.0)                  # [BLOCK_CH, 1]
    lm = tl.sum(k, axis=1) / count                              # [BLOCK_CH, D_PAD]
    dots = tl.sum(k * lm[:, None, :], axis=2)                   # [BLOCK_CH, C_PAD]
    # torch.cosine_similarity: x.y / (max(|x|, eps) * max(|y|, eps)), eps = 1e-8
    k_norm = tl.maximum(tl.sqrt(tl.sum(k * k, axis=2)), 1e-8)
    lm_norm = tl.maximum(tl.sqrt(tl.sum(lm * lm, axis=1)), 1e-8)
    cos = dots / (k_norm * lm_norm[:, None])
    cos = tl.where(tl.sum(w, axis=2) > 0, cos, float("inf"))    # padding tokens never win
    n2 = pid * BLOCK_CH + tl.arange(0, BLOCK_CH)
    n_ok = n2 < N
    tl.store(mincos_ptr + bh * N + n2, tl.min(cos, axis=1), mask=n_ok)
    d2 = tl.arange(0, D_PAD)
    tl.store(lm_ptr + (bh * N + n2)[:, None] * D + d2[None, :], lm,
             mask=n_ok[:, None] & (d2 < D)[None, :])


def chunk_landmarks(k_post: torch.Tensor, valid: torch.Tensor, C: int, block_ch: int = 0):
    """Landmarks and min-cosine outlier scores of ``reference.chunk_landmarks``.

    Parameters
    ----------
    k_post : [B, H, N*C, d] post-RoPE keys (a slice of the prompt's keys is fine: only the last
        dim must be contiguous).
    valid : [B, N*C] bool token is real.
    C : chunk size.

    Returns
    -------
    landmarks : [B, H, N, d] float32; min_cos : [B, H, N] float32 (+inf: no real token).
    """
    B, H, S, d = k_post.shape
    N = S // C
    if k_post.stride(-1) != 1:
        k_post = k_post.contiguous()
    lm = torch.empty(B, H, N, d, dtype=torch.float32, device=k_post.device)
    min_cos = torch.empty(B, H, N, dtype=torch.float32, device=k_post.device)
    if B * H * N == 0:
        return lm, min_cos
    C_PAD = next_pow2(C)
    D_PAD = next_pow2(d, 16)
    BLOCK_CH = block_ch or max(1, 4096 // (C_PAD * D_PAD))  # ~4K fp32 elements per program
    grid = (triton.cdiv(N, BLOCK_CH), B * H)
    launch(_chunk_landmarks_kernel)[grid](
        k_post, as_bytes(valid.contiguous()), lm, min_cos,
        H, N, C, k_post.stride(0), k_post.stride(1), k_post.stride(2),
        D=d, D_PAD=D_PAD, C_PAD=C_PAD, BLOCK_CH=BLOCK_CH, num_warps=4)
    return lm, min_cos


__all__ = ["chunk_landmarks"]

"""Plain-PyTorch reference implementations of the ShadowKV ops: the specification.

Sub notation:
    B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, T new tokens,
    d head dim, rd rotary dims (<= d), C chunk size, N sparse chunks of the prompt,
    O outlier chunks per KV head, L local tokens (tail of the prompt), r rank,
    K selected chunks per step (budget // C), Gcap generated-token capacity.

Prompt layout: tokens [0, N*C) are the sparse region (chunked, low-rank keys, host values);
tokens [N*C, T) are the local window, kept exactly. Outlier chunks are sparse-region chunks
kept exactly and excluded from selection.

Imports nothing beyond torch, so it runs on any CPU.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import policies  # selection-policy hook (eval baselines)
from .hostmem import check_host_memory, pinned_empty


class PrefillState(NamedTuple):
    """What a rewritten attention site keeps after prefill (per layer, per batch).

    The rotary tables (cos, sin) are not part of it: every site of a model shares one copy
    (see ``rope_tables``).
    """

    U: torch.Tensor             # [B, N*C, r] pre-RoPE keys in the rank-r basis (K_pre @ V_r)
    SV: torch.Tensor            # [B, Hkv, r, d] the basis per KV head (V_r^T): K_pre ~= U @ SV
    landmarks: torch.Tensor     # [B, Hkv, N, d] chunk means of post-RoPE keys (policies.py)
    selectable: torch.Tensor    # [B, Hkv, N] bool: valid chunk and not an outlier
    sparse_valid: torch.Tensor  # [B, N*C] bool: token is not padding
    outlier_k: torch.Tensor     # [B, Hkv, O*C, d] exact post-RoPE keys of outlier chunks
    outlier_v: torch.Tensor     # [B, Hkv, O*C, d]
    outlier_valid: torch.Tensor  # [B, Hkv, O*C] bool
    local_k: torch.Tensor       # [B, Hkv, L, d]
    local_v: torch.Tensor       # [B, Hkv, L, d]
    local_valid: torch.Tensor   # [B, L] bool
    values: torch.Tensor        # [B, Hkv, N, C, d] on the host (pinned when the model is on CUDA)
    aux: torch.Tensor           # a baseline policy's extra state (policies.aux_shape); empty for shadowkv


def layout(T: int, chunk_size: int, outlier_chunks: int, local_chunks: int, rank: int,
           kv_width: int):
    """Sizes (N, O, L, r) that a prompt of T tokens implies; works on SymInts too."""
    N = torch.sym_max(T // chunk_size - local_chunks, 0)
    O = torch.sym_min(outlier_chunks, N)
    L = T - N * chunk_size
    r = min(rank, kv_width)
    return N, O, L, r


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX / Llama rotation: [x1, x2] -> [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GPT-J / Meta rotation on pairs: (a, b) -> (-b, a)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((-b, a), dim=-1).flatten(-2)


ROTATIONS = {"rotate_half": rotate_half, "interleaved": rotate_interleaved}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x * cos + rot(x) * sin on the first rd = cos.shape[-1] dims; the rest passes through."""
    if style == "none":
        return x
    rd = cos.shape[-1]
    xr = x[..., :rd]
    out = xr * cos + ROTATIONS[style](xr) * sin
    return torch.cat((out, x[..., rd:]), dim=-1)


NOT_CAUSAL_PADDING = (
    "shadowkv: the prefill attention mask is not causal + padding (a sliding window, an "
    "ALiBi-style bias, or a custom mask?). ShadowKV needs causal attention over the whole prompt; "
    "raise the model's sliding window above the context or compile it without shadowkv.")


def keep_rows(mask: torch.Tensor, kind: str, T: int) -> torch.Tensor:
    """The attention mask over the prompt's own rows and columns, as bool [B or 1, T, T]
    (True = attend). mask: the model's mask, broadcastable to [B, 1, >=T, >=T]; kind: how to
    read it ("bool_keep", "bool_drop", or "additive": attend where the bias is above -inf/2)."""
    m = rows_of(mask, T)
    return attended(m[..., :T], kind)


def rows_of(mask: torch.Tensor, T: int) -> torch.Tensor:
    """The mask's last T query rows, [B or 1, T, keys] (mask broadcastable to [B, 1, q, keys])."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m[:, 0, m.shape[2] - T:] if m.shape[2] >= T else m[:, 0]


def attended(m: torch.Tensor, kind: str) -> torch.Tensor:
    """bool: where a mask of `kind` lets a query attend."""
    if kind == "bool_keep":
        return m.bool()
    if kind == "bool_drop":
        return ~m.bool()
    if kind == "additive":
        return m > torch.finfo(m.dtype).min / 2
    raise ValueError(f"unknown mask kind {kind!r}")


def no_bias(m: torch.Tensor) -> torch.Tensor:
    """0-d bool: an additive mask holds only 0 (attend) and -inf-like (masked) values; a finite
    non-zero bias (ALiBi) is not a mask ShadowKV can keep."""
    return ((m == 0) | (m <= torch.finfo(m.dtype).min / 2)).all()


def mask_validity(mask: Optional[torch.Tensor], kind: str, k: torch.Tensor):
    """([B, T] bool: which prompt tokens are real (not padding), 0-d bool: the mask is exactly
    causal + that padding). k: any [B, H, T, d] tensor of the prompt, for the sizes.

    Whole-tensor ops on purpose: compiled, Inductor fuses them with the mask's own construction,
    so the [T, T] mask is never materialized (HF builds one under torch.compile; at 122K tokens
    it would take 15 GiB as bool, 28 GiB as the bf16 bias SDPA wants).
    """
    B, T = k.shape[0], k.shape[2]
    if mask is None:
        return (torch.ones(B, T, dtype=torch.bool, device=k.device),
                torch.ones((), dtype=torch.bool, device=k.device))
    keep = keep_rows(mask, kind, T)
    valid = keep[:, -1].expand(B, T)
    cols = torch.arange(T, device=keep.device)
    causal = cols[None, :] <= cols[:, None]
    # rows of padding queries are free (their outputs are never used)
    ok = ~((keep ^ (causal & valid[:, None, :])) & valid[:, :, None]).any()
    if kind == "additive":
        ok = ok & no_bias(mask[..., :T])
    return valid.to(k.device).contiguous(), ok


NEW_TOKENS_NOT_CAUSAL = (
    "shadowkv: the attention mask of a multi-token step on a sequence with ShadowKV state (a "
    "follow-up turn with the old cache) is not causal among the new tokens: padding inside the "
    "new tokens (a batch of follow-ups of different lengths?) or a custom mask. Pass follow-ups "
    "of equal length (or one sequence per call), or pass the whole conversation as a new prompt "
    "without the old cache.")


def new_tokens_causal(mask: torch.Tensor, kind: str, q: torch.Tensor) -> torch.Tensor:
    """0-d bool: among the T new tokens (q: [B, H, T, d]), the mask lets each attend to exactly
    itself and the new tokens before it (the last T rows and columns are causal, no padding,
    no finite bias). The columns of the past are the state's business, not checked here."""
    T = q.shape[2]
    block = rows_of(mask, T)[..., -T:]
    rows = torch.arange(T, device=block.device)
    ok = ~(attended(block, kind) ^ (rows[None, :] <= rows[:, None])).any()  # xor: Inductor's
    # CPU code generation fails on == of two bools (torch 2.13)
    return ok & no_bias(block) if kind == "additive" else ok


def key_validity(mask: Optional[torch.Tensor], kind: str, B: int, T: int, device) -> torch.Tensor:
    """[B, T] bool: which prompt tokens are real; raises if the mask is not causal + padding.
    kind "valid": mask is already that [B, T] validity (mask_validity's, checked by the caller)."""
    if kind == "valid":
        return mask.to(device)
    valid, ok = mask_validity(mask, kind, torch.empty(B, 0, T, 0, device=device))
    if not bool(ok):
        raise ValueError(NOT_CAUSAL_PADDING)
    return valid


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal attention of a prompt over its real tokens: what SDPA computes with a causal +
    padding mask, without the [T, T] mask. q: [B, Hq, T, d]; k, v: [B, Hkv, T, d]; valid: [B, T].

    Rows whose padding is a prefix (left padding, or none) run grouped by padding length as
    is_causal SDPA over their real suffix (the flash kernel); other rows take the mask in
    blocks of query rows. Outputs of padding queries are zero, as SDPA gives fully masked rows.
    """
    B, Hq, T, _ = q.shape
    out = q.new_zeros(B, Hq, T, v.shape[-1])
    sdpa = functools.partial(F.scaled_dot_product_attention, scale=scale,
                             enable_gqa=k.shape[1] != Hq)
    real = valid.sum(1)
    trailing = valid.flip(1).int().cumprod(1).sum(1)
    groups: dict = {}
    for b, (n, tail) in enumerate(zip(real.tolist(), trailing.tolist())):
        groups.setdefault(T - n if n == tail else -1, []).append(b)
    for p, rows in groups.items():
        if p >= T:
            continue
        idx = torch.tensor(rows, device=q.device)
        if p >= 0:
            out[idx, :, p:] = sdpa(q[idx, :, p:], k[idx, :, p:], v[idx, :, p:], is_causal=True)
            continue
        cols = torch.arange(T, device=q.device)
        step = max(1, (1 << 24) // T)
        for start in range(0, T, step):
            r = slice(start, min(start + step, T))
            m = (cols[None, :] <= cols[r, None]) & valid[idx, None, :]           # [b, n, T]
            o = sdpa(q[idx, :, r], k[idx], v[idx], attn_mask=m[:, None])
            out[idx, :, r] = o.masked_fill(~valid[idx, None, r, None], 0.0)
    return out


def svd_keys(k_pre: torch.Tensor, valid: torch.Tensor, rank: int):
    """Rank-r factors of the pre-RoPE keys with KV heads concatenated (K = [S, Hkv*d]).

    k_pre: [B, Hkv, S, d]; valid: [B, S] bool. Returns U [B, S, r] = K @ V_r and
    SV [B, Hkv, r, d] = V_r^T split per head (fp32), so U @ SV is the best rank-r approximation
    of K (Eckart-Young). V_r comes from the eigendecomposition of the small Gram matrix K^T K
    ([Hkv*d, Hkv*d], in fp64): one pass over K instead of a full SVD of the [S, Hkv*d] matrix,
    and no division by singular values (U carries them). Padding rows are zeroed so they do not
    shape the basis.
    """
    B, H, S, d = k_pre.shape
    K = k_pre.transpose(1, 2).reshape(B, S, H * d).float() * valid[..., None]
    r = min(rank, H * d)
    if r == H * d:  # full rank: any orthonormal basis is exact; the identity keeps U = K
        basis = torch.eye(r, device=K.device).expand(B, r, r)
    else:
        gram = (K.transpose(1, 2) @ K).double()             # [B, Hd, Hd]
        _, vecs = torch.linalg.eigh(gram)                    # ascending eigenvalues
        basis = vecs[..., -r:].flip(-1).float()              # [B, Hd, r] top-r directions
    U = K @ basis
    SV = basis.transpose(1, 2).reshape(B, r, H, d).transpose(1, 2).contiguous()
    if r < rank:  # keep the promised width; the extra directions are zero
        U = torch.nn.functional.pad(U, (0, rank - r))
        SV = torch.nn.functional.pad(SV, (0, 0, 0, rank - r))
    return U, SV


def chunk_landmarks(k_post: torch.Tensor, valid: torch.Tensor, C: int):
    """Mean post-RoPE key of each chunk over its real tokens, and the min cosine inside it.

    k_post: [B, Hkv, N*C, d]; valid: [B, N*C]. Returns landmarks [B, Hkv, N, d] and
    min_cos [B, Hkv, N] (+inf for chunks with no real token).
    """
    B, H, S, d = k_post.shape
    N = S // C
    k = k_post.float().view(B, H, N, C, d)
    w = valid.view(B, 1, N, C, 1).float()
    landmarks = (k * w).sum(3) / w.sum(3).clamp(min=1)
    cos = torch.nn.functional.cosine_similarity(k, landmarks[:, :, :, None], dim=-1)  # [B,H,N,C]
    cos = cos.masked_fill(~valid.view(B, 1, N, C), math.inf)
    return landmarks, cos.amin(-1)


def landmark_storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The landmarks' storage dtype for ``ShadowKVConfig.landmark_dtype``."""
    if name == "model":
        return model_dtype
    if name == "float8_e4m3fn":
        return torch.float8_e4m3fn
    raise ValueError(f"landmark_dtype {name!r}: must be 'model' or 'float8_e4m3fn'")


def store_landmarks(landmarks: torch.Tensor, name: str, model_dtype: torch.dtype) -> torch.Tensor:
    """Landmarks in their storage dtype. fp8 is a plain cast, clamped to its finite range (a
    cast past +-448 would be NaN); the scorers widen them back before the dot with q."""
    dtype = landmark_storage_dtype(name, model_dtype)
    if dtype.is_floating_point and dtype.itemsize == 1:
        bound = torch.finfo(dtype).max
        return landmarks.float().clamp(-bound, bound).to(dtype)
    return landmarks.to(dtype)


def gather_chunks(x: torch.Tensor, idx: torch.Tensor, C: int) -> torch.Tensor:
    """x: [B, H, N*C, d], idx: [B, H, K] chunk ids -> [B, H, K*C, d]."""
    B, H, _, d = x.shape
    rows = (idx[..., None] * C + torch.arange(C, device=idx.device)).flatten(2)  # [B,H,K*C]
    return x.gather(2, rows[..., None].expand(B, H, rows.shape[-1], d))


def prefill_state(k_pre, k_post, v, mask, mask_kind: str, rank: int, chunk_size: int,
                  outlier_chunks: int, local_chunks: int, sites_left: int = 1,
                  policy: str = "shadowkv", mask_ok: Optional[torch.Tensor] = None,
                  q: Optional[torch.Tensor] = None, scale: float = 1.0,
                  budget_chunks: int = 0, landmark_dtype: str = "model") -> PrefillState:
    """Build a site's ShadowKV state from the prompt.

    k_pre, k_post, v: [B, Hkv, T, d] (pre-RoPE keys, post-RoPE keys, values);
    mask: the model's attention mask (or None for plain causal), interpreted by mask_kind
    (kind "valid": the [B, T] validity from mask_validity, whose check result is mask_ok);
    sites_left: this site and the ones after it in the graph, for the host-memory check;
    policy: chunk-selection policy (shadowpass/policies.py); decides the ``aux`` field and,
        for Quest-bound heads, what ``landmarks`` holds.
    q, scale, budget_chunks: the prompt's post-RoPE queries [B, Hq, T, d], the attention scale
    and the decode budget in chunks; read only by policies in ``policies.CALIBRATION``.
    landmark_dtype: "model" (k_post's dtype) or "float8_e4m3fn" (``store_landmarks``).
    """
    B, H, T, d = k_post.shape
    C = chunk_size
    N, O, L, r = layout(T, C, outlier_chunks, local_chunks, rank, H * d)
    S = N * C
    if mask_ok is not None and not bool(mask_ok):
        raise ValueError(NOT_CAUSAL_PADDING)
    valid = key_validity(mask, mask_kind, B, T, k_post.device)
    sparse_valid = valid[:, :S]

    U, SV = svd_keys(k_pre[:, :, :S], sparse_valid, r)
    landmarks, min_cos = chunk_landmarks(k_post[:, :, :S], sparse_valid, C)
    outliers = (-min_cos).topk(O, dim=-1).indices.sort(-1).values  # lowest min-cosine, [B,H,O]
    chunk_valid = sparse_valid.view(B, 1, N, C).any(-1).expand(B, H, N)
    selectable = chunk_valid.clone()
    selectable.scatter_(2, outliers, False)

    token_valid = sparse_valid[:, None, :, None].expand(B, H, S, 1)
    values = v[:, :, :S].reshape(B, H, N, C, v.shape[-1])
    check_host_memory(values.numel() * values.element_size(), sites_left, v.is_cuda, B, T)
    host = (pinned_empty if v.is_cuda else torch.empty)(values.shape, dtype=v.dtype)
    host.copy_(values)
    centers, aux = policies.prefill_selection(
        policy, k_post[:, :, :S], sparse_valid, landmarks, C,
        calibration=(q, k_post, valid, landmarks, selectable, scale, budget_chunks)
        if policy in policies.CALIBRATION and q is not None else None)
    return PrefillState(
        U=U.to(k_post.dtype), SV=SV.to(k_post.dtype),
        landmarks=store_landmarks(centers, landmark_dtype, k_post.dtype),
        selectable=selectable, sparse_valid=sparse_valid.clone(),
        outlier_k=gather_chunks(k_post[:, :, :S], outliers, C),
        outlier_v=gather_chunks(v[:, :, :S], outliers, C),
        outlier_valid=gather_chunks(token_valid, outliers, C)[..., 0],
        local_k=k_post[:, :, S:].clone(), local_v=v[:, :, S:].clone(),
        local_valid=valid[:, S:].clone(), values=host, aux=aux)


@dataclass
class DecodeWorkspace:
    """Selected-chunk buffers of one site, kept across decode steps for cache-hit reuse.

    sel_k, sel_v : [B, Hkv, S*C, d] rebuilt keys / fetched values, slot-major.
    slot_chunk : [B, Hkv, S] int32 chunk held by each slot (-1: empty).
    chunk_slot : [B, Hkv, N] int16 inverse map (-1: chunk not held); it grows with the
        context, so it is kept narrow (S <= 32767 slots).
    n_load : [B, Hkv] int32 chunks loaded by the last step (misses), for hit-rate reports.

    S = K, the selected chunks of a step, or c*K for a value cache (``chunk_cache`` = c):
    chunks no longer selected stay on the GPU until a miss needs their slot
    (``templates.chunk_gather.reuse_plan``), so a chunk selected again a few steps later is
    neither rebuilt nor fetched. The CUDA kernels reuse chunks through it; the split decode
    route passes it on every device. Allocate one per site after prefill (``allocate``); a new
    prompt needs a new one (or ``reset``), since slots refer to the old prompt's chunks.
    """

    sel_k: torch.Tensor
    sel_v: torch.Tensor
    slot_chunk: torch.Tensor
    chunk_slot: torch.Tensor
    n_load: torch.Tensor

    @classmethod
    def allocate(cls, state: PrefillState, budget_chunks: int, chunk_size: int,
                 dtype: Optional[torch.dtype] = None, chunk_cache: int = 1) -> "DecodeWorkspace":
        """Empty buffers for ``state``: S = min(chunk_cache * budget_chunks, N) slots; dtype
        defaults to the local keys' dtype (the model's)."""
        B, H, N, d = state.landmarks.shape
        S = min(chunk_cache * budget_chunks, N)
        if S > 32767:
            raise ValueError(f"shadowkv: {S} chunk slots per head (chunk_cache {chunk_cache} x "
                             f"{budget_chunks} chunks of budget) exceed the 32767 the slot map "
                             "holds; lower the budget or chunk_cache, or raise chunk_size")
        dev = state.landmarks.device
        dtype = dtype or state.local_k.dtype
        dv = state.local_v.shape[-1]
        ws = cls(sel_k=torch.empty(B, H, S * chunk_size, d, dtype=dtype, device=dev),
                 sel_v=torch.empty(B, H, S * chunk_size, dv, dtype=dtype, device=dev),
                 slot_chunk=torch.empty(B, H, S, dtype=torch.int32, device=dev),
                 chunk_slot=torch.empty(B, H, N, dtype=torch.int16, device=dev),
                 n_load=torch.empty(B, H, dtype=torch.int32, device=dev))
        return ws.reset()

    def reset(self) -> "DecodeWorkspace":
        """Forget every held chunk (the next step loads all of its selection)."""
        self.slot_chunk.fill_(-1)
        self.chunk_slot.fill_(-1)
        self.n_load.fill_(-1)
        return self

    def tensors(self) -> List[torch.Tensor]:
        return [self.sel_k, self.sel_v, self.slot_chunk, self.chunk_slot, self.n_load]

    def hit_rate(self, selected: Optional[int] = None) -> Optional[float]:
        """Fraction of last step's selected chunks that were reused (syncs; for reports only).
        selected: chunks a step selects per (b, h), where the workspace is a value cache."""
        return hit_rate(self.slot_chunk, self.n_load, selected)


def hit_rate(slot_chunk: torch.Tensor, n_load: torch.Tensor,
             selected: Optional[int] = None) -> Optional[float]:
    """Share of a step's selected chunks found on the GPU: 1 - loaded / selected, with
    `selected` chunks per (b, h) (default: one per slot); None before the first step
    (n_load = -1) or without a workspace. Syncs: for reports."""
    if slot_chunk.numel() == 0 or bool((n_load < 0).any()):
        return None
    per_row = min(selected or slot_chunk.shape[-1], slot_chunk.shape[-1])
    return 1.0 - n_load.sum().item() / (n_load.numel() * per_row)


NOT_PAIRED = (
    "shadowkv: the model's rotary tables do not repeat each angle over its pair of dims (cos and "
    "sin of a {style} rotation should be equal on {where}); ShadowKV stores one value per pair. "
    "Compile this model without shadowkv.")


def pair_tables(cos: torch.Tensor, sin: torch.Tensor, style: str):
    """Tables [..., rd] -> [..., rd/2], one value per rotated pair of dims.

    A rotation turns both dims of a pair by one angle, so a model's cos and sin hold each value
    twice (in both halves for rotate_half, in neighbours for interleaved); keeping one copy
    halves the tables, which grow with the context. Raises (ValueError) on tables that do not
    repeat: ``full_table`` would not give them back.
    """
    rd = cos.shape[-1]
    if style == "none" or rd == 0:
        return cos[..., :0], sin[..., :0]
    if rd % 2:
        raise ValueError(f"shadowkv: an odd number of rotary dims ({rd})")
    where = "halves" if style == "rotate_half" else "neighbouring dims"
    out = []
    for t in (cos, sin):
        a, b = (t[..., :rd // 2], t[..., rd // 2:]) if style == "rotate_half" else \
            (t[..., 0::2], t[..., 1::2])
        if not torch.equal(a, b):
            raise ValueError(NOT_PAIRED.format(style=style, where=where))
        out.append(a)
    return tuple(out)


def full_table(t: torch.Tensor, style: str) -> torch.Tensor:
    """The inverse of ``pair_tables``: [..., rd/2] -> [..., rd] in the rotation's layout."""
    if style == "rotate_half":
        return torch.cat((t, t), dim=-1)
    return t.repeat_interleave(2, dim=-1)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, chunk_size: int, local_chunks: int,
                rope_style: str):
    """The rotary factors [B, N*C, rd/2] of the sparse region, one value per rotated pair
    (``pair_tables``): what key rebuild needs.

    cos, sin: [B, T, rd] the factors the model applied to the prompt's keys. One copy serves
    every site that uses the same tables (all layers of a usual decoder).
    """
    T = cos.shape[1]
    N = layout(T, chunk_size, 0, local_chunks, 1, 1)[0]
    cos, sin = pair_tables(cos[:, :N * chunk_size], sin[:, :N * chunk_size], rope_style)
    return cos.clone(), sin.clone()


def score_chunks(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Chunk scores [B, Hkv, N]: softmax over chunks of q . landmark * scale, max over the GQA
    group, summed over query positions. q: [B, Hq, T, d]."""
    return policies.landmark_scores(q, landmarks, selectable, scale)


def select_chunks(scores: torch.Tensor, selectable: torch.Tensor, budget_chunks: int):
    """Top-k chunk ids [B, Hkv, K] and whether each is selectable (K = min(budget, N))."""
    k = min(budget_chunks, scores.shape[-1])
    idx = scores.masked_fill(~selectable, -1.0).topk(k, dim=-1).indices
    return idx, selectable.gather(2, idx)


def rebuild_keys(U, SV, cos, sin, idx, C: int, rope_style: str):
    """Post-RoPE keys of the chunks idx [B, Hkv, K]: U[rows] @ SV[head], RoPE at the rows'
    prompt positions with the model's own factors (cos, sin: [B, N*C, rd/2], ``rope_tables``).
    Returns [B, Hkv, K*C, d]."""
    B, H, K = idx.shape
    rows = (idx[..., None] * C + torch.arange(C, device=idx.device)).flatten(2)  # [B,H,K*C]
    u = U.gather(1, rows.flatten(1)[..., None].expand(B, H * K * C, U.shape[-1]))
    k_pre = u.view(B, H, K * C, U.shape[-1]).float() @ SV.float()
    if rope_style == "none":
        return k_pre
    half = cos.shape[-1]
    pos = rows.flatten(1)[..., None].expand(B, H * K * C, half)
    c, s = (full_table(t.gather(1, pos).view(B, H, K * C, half).float(), rope_style)
            for t in (cos, sin))
    return apply_rope(k_pre, c, s, rope_style)


def fetch_values(values: torch.Tensor, idx: torch.Tensor, device) -> torch.Tensor:
    """Values of chunks idx [B, Hkv, K] from the host store [B, Hkv, N, C, d] -> [B, Hkv, K*C, d]."""
    B, H, N, C, d = values.shape
    i = idx.to(values.device)
    picked = values.gather(2, i[..., None, None].expand(B, H, i.shape[-1], C, d))
    return picked.flatten(2, 3).to(device, non_blocking=True)


def append_generated(k, v, gen_k, gen_v, gen_len) -> torch.Tensor:
    """Write this step's T new keys/values at rows gen_len.. of the generated-token buffers and
    advance gen_len (all in place, no host sync). Returns the rows written, [T] int64."""
    T = k.shape[2]
    pos = gen_len + torch.arange(T, device=gen_len.device)
    gen_k.index_copy_(2, pos, k.to(gen_k.dtype))
    gen_v.index_copy_(2, pos, v.to(gen_v.dtype))
    gen_len.add_(T)
    return pos


def select(q, scale: float, state: PrefillState, chunk_size: int, budget_chunks: int,
           policy: str = "shadowkv") -> torch.Tensor:
    """A step's top-k chunks [B, Hkv, K] under a selection policy."""
    if policy == "shadowkv":
        scores = score_chunks(q, state.landmarks, state.selectable, scale)
    else:  # a baseline on the same machinery (accuracy comparisons)
        scores = policies.chunk_scores(policy, q, state, scale, chunk_size)
    return select_chunks(scores, state.selectable, budget_chunks)[0]


def select_and_load(q, scale: float, state: PrefillState, cos, sin, chunk_size: int,
                    budget_chunks: int, rope_style: str, policy: str = "shadowkv"):
    """A step's chunk selection and the selected chunks' keys and values.

    Returns idx [B, Hkv, K] chunk ids, sel_k [B, Hkv, K*C, d] rebuilt post-RoPE keys (fp32) and
    sel_v [B, Hkv, K*C, dv] fetched values (on q's device).
    """
    idx = select(q, scale, state, chunk_size, budget_chunks, policy)
    sel_k = rebuild_keys(state.U, state.SV, cos, sin, idx, chunk_size, rope_style)
    sel_v = fetch_values(state.values, idx, q.device)
    return idx, sel_k, sel_v


def sparse_attention(q, scale: float, outlier_k, outlier_v, outlier_valid, sel_k, sel_v,
                     slot_chunk, sparse_valid, selectable, local_k, local_v, local_valid,
                     gen_k, gen_v, gen_len, chunk_size: int) -> torch.Tensor:
    """Exact softmax attention of q over [outliers | selected | local | generated], in fp32.

    The attention part of a decode step, with the argument layout of the CUDA kernel
    (``templates.sparse_decode.sparse_decode``) and of ``shadowkv::sparse_attention``.

    q : [B, Hq, T, d] post-RoPE queries; scale : the model's attention scale.
    outlier_k, outlier_v : [B, Hkv, Lo, d|dv]; outlier_valid : [B, Hkv, Lo] bool.
    sel_k, sel_v : [B, Hkv, K*C, d|dv] the selected chunks' keys and values, slot-major;
    slot_chunk : [B, Hkv, K] int chunk held by each slot (-1: empty, attended by nobody).
    sparse_valid : [B, N*C] bool token is real; selectable : [B, Hkv, N] bool. A selected
        token (slot, c) counts when its slot holds a chunk, the token is real and the chunk
        is selectable (not an outlier, not all padding).
    local_k, local_v : [B, Hkv, Ll, d|dv]; local_valid : [B, Ll] bool.
    gen_k, gen_v : [B, Hkv, Gcap, d|dv]; gen_len : [1] int64 generated tokens *including*
        this step's T; query row t sees generated rows j <= gen_len - T + t (causal).
    chunk_size : C.

    Returns [B, Hq, T, dv] in q's dtype (a row with no valid key is nan, as softmax gives).
    """
    B, Hq, T, d = q.shape
    H = outlier_k.shape[1]
    C = chunk_size
    chunk = slot_chunk.long()
    held = chunk >= 0
    chunk = chunk.clamp(min=0)
    tok_ok = gather_chunks(sparse_valid[:, None, :, None].expand(B, H, -1, 1), chunk, C)[..., 0]
    sel_ok = tok_ok & (selectable.gather(2, chunk) & held).repeat_interleave(C, dim=-1)

    Gcap = gen_k.shape[2]
    pos = gen_len - T + torch.arange(T, device=gen_len.device)  # generated row of each query
    gen_ok = torch.arange(Gcap, device=q.device)[None, :] <= (pos.to(q.device)[:, None])  # [T,Gcap]
    keys = torch.cat([outlier_k.float(), sel_k.float(), local_k.float(), gen_k.float()], 2)
    vals = torch.cat([outlier_v.float(), sel_v.float(), local_v.float(), gen_v.float()], 2)
    prompt_ok = torch.cat([outlier_valid, sel_ok,
                           local_valid[:, None].expand(B, H, -1)], 2)  # [B,H,P]
    ok = torch.cat([prompt_ok[:, :, None, :].expand(B, H, T, -1),
                    gen_ok[None, None].expand(B, H, T, Gcap)], 3)  # [B,H,T,P+Gcap]

    qg = q.float().reshape(B, H, Hq // H, T, d)
    s = torch.einsum("bhgtd,bhsd->bhgts", qg, keys) * scale
    s = s.masked_fill(~ok[:, :, None], -math.inf)
    out = torch.einsum("bhgts,bhsd->bhgtd", torch.softmax(s, dim=-1), vals)
    return out.reshape(B, Hq, T, -1).to(q.dtype)


def decode_attention(q, k, v, scale: float, state: PrefillState, cos, sin, gen_k, gen_v,
                     gen_len, chunk_size: int, budget_chunks: int, rope_style: str,
                     policy: str = "shadowkv") -> torch.Tensor:
    """One decode step of a rewritten site.

    q: [B, Hq, T, d] post-RoPE queries; k, v: [B, Hkv, T, d] the new tokens' post-RoPE keys and
    values; cos, sin: [B, N*C, rd/2] rotary factors of the sparse region (``rope_tables``);
    gen_k, gen_v: [B, Hkv, Gcap, d] generated tokens so far (updated in place);
    gen_len: [1] int64 count of generated tokens (updated in place); policy: how chunks are
    scored (shadowkv landmarks, or a baseline from policies.py). Returns [B, Hq, T, d].
    Work per step is O(N + budget + outliers + local + generated), independent of T^2.
    """
    append_generated(k, v, gen_k, gen_v, gen_len)
    idx, sel_k, sel_v = select_and_load(q, scale, state, cos, sin, chunk_size, budget_chunks,
                                        rope_style, policy)
    return sparse_attention(q, scale, state.outlier_k, state.outlier_v, state.outlier_valid,
                            sel_k, sel_v, idx, state.sparse_valid, state.selectable,
                            state.local_k, state.local_v, state.local_valid, gen_k, gen_v,
                            gen_len, chunk_size)


def decode_gather(q, k, v, scale: float, state: PrefillState, cos, sin, gen_k, gen_v, gen_len,
                  sel_k, sel_v, slot_chunk, chunk_slot, n_load, chunk_size: int,
                  budget_chunks: int, rope_style: str, policy: str = "shadowkv") -> None:
    """The first part of a decode step, into a workspace: ``decode_attention`` is this, then
    ``sparse_attention`` over the workspace.

    Appends the new tokens (as decode_attention) and writes the selection into the workspace
    (``kernels.DecodeWorkspace`` layout): sel_k, sel_v [B, Hkv, K*C, d] (rounded to their
    dtype), slot_chunk [B, Hkv, K], chunk_slot [B, Hkv, N], n_load [B, Hkv] = K (the reference
    loads every selected chunk; the CUDA kernels reuse the chunks already held).
    """
    K = min(budget_chunks, state.selectable.shape[-1])
    if slot_chunk.shape[-1] != K:
        raise ValueError(f"shadowkv: the workspace holds {slot_chunk.shape[-1]} slots; this state "
                         f"selects {K} chunks a step (allocate it with ops.workspace(..., "
                         "gather=True))")
    # K == 0: a prompt no longer than the local window, nothing to select
    idx = select(q, scale, state, chunk_size, budget_chunks, policy) if K else slot_chunk.long()
    decode_load(idx, k, v, state, cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v, slot_chunk,
                chunk_slot, n_load, chunk_size, rope_style)


def selection_scores(q, landmarks, selectable, scale: float, radius=None) -> torch.Tensor:
    """The scores a decode step takes its top-k of (``shadowkv::landmark_scores``): the
    landmark scores of ``policies.landmark_scores`` (Quest's bound with ``radius``), with the
    unselectable chunks at -1, below every softmax probability. [B, Hkv, N] fp32."""
    return policies.landmark_scores(q, landmarks, selectable, scale, radius).masked_fill(
        ~selectable, -1.0)


def decode_load(idx, k, v, state: PrefillState, cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v,
                slot_chunk, chunk_slot, n_load, chunk_size: int, rope_style: str) -> None:
    """The part of ``decode_gather`` after the selection: append the new tokens and write the
    chunks idx [B, Hkv, K] into the workspace (``DecodeWorkspace`` layout): ``plan_loads``,
    then ``rebuild_into``."""
    load_chunk, load_slot = plan_loads(idx, k, v, state, gen_k, gen_v, gen_len, sel_v,
                                       slot_chunk, chunk_slot, n_load)
    rebuild_into(sel_k, state.U, state.SV, cos, sin, load_chunk, load_slot, n_load, chunk_size,
                 rope_style)


def plan_loads(idx, k, v, state: PrefillState, gen_k, gen_v, gen_len, sel_v, slot_chunk,
               chunk_slot, n_load):
    """Append the new tokens and plan the loads of the chunks idx [B, Hkv, K]: the reference
    loads every one (slot j takes idx[..., j]: slot_chunk = idx, chunk_slot its inverse
    [B, Hkv, N], n_load [B, Hkv] = K; the CUDA kernels keep the chunks already held) and
    fetches their values into sel_v [B, Hkv, K*C, dv] at once (CUDA: on a side stream, joined by
    ``shadowkv::fetch_wait``). Returns the load list (load_chunk, load_slot) [B, Hkv, K] int32:
    entry j < n_load puts chunk load_chunk[j] into slot load_slot[j]."""
    append_generated(k, v, gen_k, gen_v, gen_len)
    B, H, K = idx.shape
    load_slot = torch.arange(K, device=idx.device, dtype=torch.int32).expand(B, H, K).contiguous()
    if K:
        sel_v.copy_(fetch_values(state.values, idx, idx.device))
        slot_chunk.copy_(idx)
        chunk_slot.fill_(-1).scatter_(2, idx, load_slot.to(chunk_slot.dtype))
        n_load.fill_(K)
    return idx.to(torch.int32), load_slot


def rebuild_into(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size: int,
                 rope_style: str) -> None:
    """Rebuild the keys of load-list entries j < n_load[b, h] (``plan_loads``) into their
    slots of sel_k [B, Hkv, K*C, d] (``rebuild_keys``, rounded to sel_k's dtype); the other
    slots keep what they hold."""
    B, H, KC, d = sel_k.shape
    K, C = load_chunk.shape[-1], chunk_size
    if K == 0:
        return
    N = U.shape[1] // C
    keys = rebuild_keys(U, SV, cos, sin, load_chunk.long().clamp(0, N - 1), C, rope_style)
    b, h, j = (torch.arange(K, device=n_load.device) < n_load[..., None]).nonzero(as_tuple=True)
    sel_k.view(B, H, K, C, d)[b, h, load_slot[b, h, j].long()] = \
        keys.view(B, H, K, C, d)[b, h, j].to(sel_k.dtype)

"""Sparse decode attention (flash-decoding, split over the key axis) over the four ShadowKV key
segments [outliers | selected | local | generated] (``reference.decode_attention``'s last part).

Sub notation:
    B batch, H = Hkv KV heads, Hq query heads, G = Hq // H, T query positions, d head dim,
    M = G * T query rows per KV head (row m -> g = m // T, t = m % T), C chunk size,
    N chunks, K selected chunks (slots); segment lengths Lo = O*C outliers, Ls = K*C selected,
    Ll local, Lg = gen_len generated (read on the device, so no host sync and CUDA-graph safe);
    P = Lo + Ls + Ll + Lg keys in all, S splits.
    Validity: outliers by outlier_valid [B, H, Lo]; selected token (slot, c) by chunk =
    slot_chunk[b, h, slot] >= 0, sparse_valid[b, chunk*C + c] and selectable[b, h, chunk];
    with a value cache (S > K slots) the j-th selected chunk sits in slot sel_slot[b, h, j];
    local by local_valid [B, Ll]; generated j for row (g, t) when j <= Lg - T + t (causal).
    Constexprs: D (= d), D_PAD, M_PAD (power of two >= max(16, M)), BLOCK_N keys per step,
    M_ROWS (power of two >= M), S_BLOCK partials per load, UPCAST (see templates.common).

Parallelization: one kernel on a grid (B*H, S): program (bh, s) takes keys
[s*per, (s+1)*per) of the virtual concatenation (per = cdiv(P, S) rounded up to BLOCK_N), so
the work is balanced whatever the segment sizes; it processes all G*T query rows of its KV head
at once (one K/V read serves the whole GQA group) with an online softmax in fp32 and writes an
unnormalized partial output, its row max and its row sum. The last of a (b, h)'s S programs to
finish (an atomic count) merges the S partials, S_BLOCK per load, and writes [B, Hq, T, d] in
the output's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, as_bytes, dot, launch, next_pow2

LOG2E = 1.4426950408889634


def split_launch(splits: int, elem_bytes: int, cached: bool = False) -> dict:
    """Launch options of the split kernel (scripts/attention_configs.py sweeps them).

    One warp where the key axis is split 8 or more ways (few (b, h) pairs, short programs): the
    last split's merge then dominates, and with 4 warps it took ~15 us of the kernel's ~22 us at
    batch 1 (H100, scripts/attention_variants.py; results/h100/attention_merge/). Measured at
    128K context on an H100 (results/h100/warps_topk/configs.txt), us, 1 warp / 4 warps:
    batch 1 at 33 splits 14.6 / 20.2; batch 8 at 10 splits 41.2 / 46.0 but at its default 5
    splits 41.8 / 40.1; batch 32 at 2 splits 119.6 / 123.0 (one run each). Four
    warps also for 4-byte elements (1 warp spills at fp32 d=64, scripts/compile_kernels.py).
    Through a value cache's slot list, 1 warp at any split count, although it spills 112 B at
    bf16 d=128: H200, 128K, cache of 4 selections (results/h100/chunk_cache/attn_cache4_h200.txt),
    batch 2 at 17 splits 16.9 / 20.9 us, batch 8 at 5 splits 42.7 / 46.1."""
    warps = 1 if elem_bytes == 2 and (splits >= 8 or cached) else 4
    return {"num_warps": warps, "num_stages": 3}  # 3: Triton's default on CUDA


@triton.jit
def _attend(q, k_base, v_base, pos, pos_ok, allowed, m_i, l_i, acc, qk_scale, cols, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, UPCAST: tl.constexpr):
    """One online-softmax step over keys at rows pos of one (b, h) segment: key row n, dim j
    at k_base + n * stride_kn + j * stride_kd (values likewise). Shared with the Inductor
    template (``sparse_attention.py.jinja``)."""
    kv_mask = pos_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + pos[:, None] * stride_kn + cols[None, :] * stride_kd, mask=kv_mask,
                other=0.0)
    v = tl.load(v_base + pos[:, None] * stride_vn + cols[None, :] * stride_vd, mask=kv_mask,
                other=0.0)
    # .to: Inductor may pass the float scale as fp64, which would make s fp64
    s = (dot(q.to(k.dtype), tl.trans(k), UPCAST) * qk_scale).to(tl.float32)  # log2 units
    s = tl.where(allowed & pos_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep zeros
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _selected_valid(slot_base, tok_base, sel_base, pos, hi, C, stride_slot, stride_tok,
                    stride_sel):
    """Validity of the selected-segment keys pos (< hi) of one (b, h): the slot holds a chunk
    (>= 0), the chunk is selectable and the token real. Two dependent loads (slot -> chunk ->
    flags), so the loops below fetch each block's validity one step ahead. Shared with the
    Inductor template."""
    pos_ok = pos < hi
    chunk = tl.load(slot_base + (pos // C) * stride_slot, mask=pos_ok, other=-1).to(tl.int64)
    have = pos_ok & (chunk >= 0)
    tok_ok = tl.load(tok_base + (chunk * C + pos % C) * stride_tok, mask=have, other=0)
    chunk_ok = tl.load(sel_base + chunk * stride_sel, mask=have, other=0)
    return (tok_ok != 0) & (chunk_ok != 0)


@triton.jit
def _cached_valid(sel_slot_base, slot_base, tok_base, sel_base, pos, hi, C, SLOT_ROWS):
    """``_selected_valid`` through a value cache's slot list: the selected key pos (< hi) of one
    (b, h) is row c of slot sel_slot[pos // C], of SLOT_ROWS. Returns (valid, that row)."""
    pos_ok = pos < hi
    slot = tl.load(sel_slot_base + pos // C, mask=pos_ok, other=0)  # int32: few registers
    row = slot * C + pos % C
    valid = _selected_valid(slot_base, tok_base, sel_base, row, SLOT_ROWS, C, 1, 1, 1)
    return pos_ok & valid, row


@triton.jit
def _sparse_decode_split_kernel(
    q_ptr,
    ok_ptr, ov_ptr, ovalid_ptr,
    sk_ptr, sv_ptr, slot_chunk_ptr, sel_slot_ptr, tok_valid_ptr, selectable_ptr,
    lk_ptr, lv_ptr, lvalid_ptr,
    gk_ptr, gv_ptr, gen_len_ptr,
    po_ptr, pm_ptr, pl_ptr, out_ptr, count_ptr,
    qk_scale, H, G, T, Lo, Ls, Ll, Gcap, N, C, K, SLOTS, S,
    D: tl.constexpr, D_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    M_ROWS: tl.constexpr, S_BLOCK: tl.constexpr, CACHED: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    M = G * T
    rows = tl.arange(0, M_PAD)
    t_row = rows % T
    cols = tl.arange(0, D_PAD)
    d_ok = cols < D
    q = tl.load(q_ptr + (bh * M + rows)[:, None] * D + cols[None, :],
                mask=(rows < M)[:, None] & d_ok[None, :], other=0.0)

    Lg = tl.load(gen_len_ptr).to(tl.int32)
    gen_old = Lg - T
    P = Lo + Ls + Ll + Lg
    per = tl.cdiv(tl.cdiv(P, S), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, P)

    m_i = tl.full([M_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M_PAD], dtype=tl.float32)
    acc = tl.zeros([M_PAD, D_PAD], dtype=tl.float32)
    every_row = rows[:, None] >= 0  # [M_PAD, 1] all True, to broadcast token masks

    # outliers: keys [0, Lo)
    hi = tl.minimum(end, Lo)
    for n0 in range(tl.maximum(start, 0), hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < hi
        valid = tl.load(ovalid_ptr + bh * Lo + pos, mask=pos_ok, other=0) != 0
        m_i, l_i, acc = _attend(q, ok_ptr + bh * Lo * D, ov_ptr + bh * Lo * D, pos, pos_ok,
                                every_row & valid[None, :], m_i, l_i, acc, qk_scale,
                                cols, d_ok, D, 1, D, 1, UPCAST)
    # selected chunks: keys [Lo, Lo + Ls); each block's validity loaded one step ahead
    # (scripts/attention_variants.py, H100: the probe's loop went from 1.26x to 1.21x compact
    # SDPA at 4 warps, to 1.09x at 1 warp)
    lo = tl.maximum(start - Lo, 0)
    hi = tl.minimum(end - Lo, Ls)
    slot_base = slot_chunk_ptr + bh * SLOTS
    tok_base = tok_valid_ptr + b * N * C
    sel_base = selectable_ptr + bh * N
    sk_base = sk_ptr + bh * SLOTS * C * D
    sv_base = sv_ptr + bh * SLOTS * C * D
    if CACHED:  # rows through sel_slot, fetched one step ahead with the validity
        valid, row = _cached_valid(sel_slot_ptr + bh * K, slot_base, tok_base, sel_base,
                                   lo + tl.arange(0, BLOCK_N), hi, C, SLOTS * C)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid_next, row_next = _cached_valid(sel_slot_ptr + bh * K, slot_base, tok_base,
                                                 sel_base, pos + BLOCK_N, hi, C, SLOTS * C)
            m_i, l_i, acc = _attend(q, sk_base, sv_base, row, pos < hi,
                                    every_row & valid[None, :], m_i, l_i, acc, qk_scale,
                                    cols, d_ok, D, 1, D, 1, UPCAST)
            valid, row = valid_next, row_next
    else:
        valid = _selected_valid(slot_base, tok_base, sel_base, lo + tl.arange(0, BLOCK_N), hi,
                                C, 1, 1, 1)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid_next = _selected_valid(slot_base, tok_base, sel_base, pos + BLOCK_N, hi, C,
                                         1, 1, 1)
            m_i, l_i, acc = _attend(q, sk_base, sv_base, pos, pos < hi,
                                    every_row & valid[None, :], m_i, l_i, acc, qk_scale,
                                    cols, d_ok, D, 1, D, 1, UPCAST)
            valid = valid_next
    # local window: keys [Lo + Ls, Lo + Ls + Ll)
    off = Lo + Ls
    hi = tl.minimum(end - off, Ll)
    for n0 in range(tl.maximum(start - off, 0), hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < hi
        valid = tl.load(lvalid_ptr + b * Ll + pos, mask=pos_ok, other=0) != 0
        m_i, l_i, acc = _attend(q, lk_ptr + bh * Ll * D, lv_ptr + bh * Ll * D, pos, pos_ok,
                                every_row & valid[None, :], m_i, l_i, acc, qk_scale,
                                cols, d_ok, D, 1, D, 1, UPCAST)
    # generated tokens: keys [Lo + Ls + Ll, P), causal among this step's T new tokens
    off = Lo + Ls + Ll
    hi = tl.minimum(end - off, Lg)
    for n0 in range(tl.maximum(start - off, 0), hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < hi
        allowed = pos[None, :] <= (gen_old + t_row)[:, None]
        m_i, l_i, acc = _attend(q, gk_ptr + bh * Gcap * D, gv_ptr + bh * Gcap * D, pos, pos_ok,
                                allowed, m_i, l_i, acc, qk_scale, cols, d_ok, D, 1, D, 1, UPCAST)

    part = bh * S + split
    tl.store(po_ptr + (part * M_PAD + rows)[:, None] * D + cols[None, :], acc,
             mask=(rows >= 0)[:, None] & d_ok[None, :])
    tl.store(pm_ptr + part * M_PAD + rows, m_i)
    tl.store(pl_ptr + part * M_PAD + rows, l_i)
    # the (b, h)'s last split to finish merges the partials: no second launch (a combine
    # kernel of its own made the 122K decode step 48.20 instead of 45.89 ms, H100, 2 lanes,
    # results/h100/combine_in_split/). Its partial stores are ordered before the count
    # (barrier, then a release); the acquire makes every split's stores visible to the merge.
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu") == S - 1:
        _combine(bh, out_ptr, po_ptr, pm_ptr, pl_ptr, G, T, S, D, D_PAD, M_PAD, M_ROWS, S_BLOCK)


@triton.jit
def _combine(bh, out_ptr, po_ptr, pm_ptr, pl_ptr, G, T, S, D: tl.constexpr,
             D_PAD: tl.constexpr, M_PAD: tl.constexpr, M_ROWS: tl.constexpr,
             S_BLOCK: tl.constexpr):
    """Merge the S partials of (b, h) into its output rows. S_BLOCK partials per load, all in
    flight at once: one load per split in turn waited ~S memory latencies (35 us a call in
    the decode step beside the PCIe fetch, H100). Loads skip L1 (.cg): the partials were
    written by other programs."""
    M = G * T
    rows = tl.arange(0, M_ROWS)  # only the real rows, not the split kernel's M_PAD
    cols = tl.arange(0, D_PAD)
    sp = tl.arange(0, S_BLOCK)
    row_ok = rows < M
    gmax = tl.full([M_ROWS], float("-inf"), dtype=tl.float32)
    for s0 in range(0, S, S_BLOCK):  # the rows' max over all splits first
        st = (bh * S + s0 + sp)[:, None] * M_PAD + rows[None, :]
        pm = tl.load(pm_ptr + st, mask=(s0 + sp < S)[:, None] & row_ok[None, :],
                     other=float("-inf"), cache_modifier=".cg")
        gmax = tl.maximum(gmax, tl.max(pm, axis=0))
    gmax = tl.where(gmax == float("-inf"), 0.0, gmax)
    denom = tl.zeros([M_ROWS], dtype=tl.float32)
    acc = tl.zeros([M_ROWS, D_PAD], dtype=tl.float32)
    for s0 in range(0, S, S_BLOCK):
        ok = (s0 + sp < S)[:, None] & row_ok[None, :]  # [S_BLOCK, M_ROWS]
        st = (bh * S + s0 + sp)[:, None] * M_PAD + rows[None, :]
        w = tl.exp2(tl.load(pm_ptr + st, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    - gmax[None, :])
        denom += tl.sum(tl.load(pl_ptr + st, mask=ok, other=0.0, cache_modifier=".cg") * w,
                        axis=0)
        o = tl.load(po_ptr + st[:, :, None] * D + cols[None, None, :],
                    mask=ok[:, :, None] & (cols < D)[None, None, :], other=0.0,
                    cache_modifier=".cg")
        acc += tl.sum(o * w[:, :, None], axis=0)
    out = acc / denom[:, None]  # a row with no valid key gives nan, as the reference's softmax
    tl.store(out_ptr + (bh * M + rows)[:, None] * D + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < D)[None, :])


def merge_block(splits: int, m_rows: int, d_pad: int) -> int:
    """Partials ``_combine`` loads at once: about 32 fp32 registers a thread (4 warps)."""
    return min(next_pow2(splits), max(1, 4096 // (m_rows * d_pad)))


def default_splits(batch_heads: int, keys: int, block_n: int, device: torch.device) -> int:
    """Splits of the key axis so that about two programs run per SM (flash-decoding)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(2 * sms, max(batch_heads, 1))
    return max(1, min(want, triton.cdiv(max(keys, 1), block_n), 128))


def sparse_decode(q: torch.Tensor, scale: float,
                  outlier_k: torch.Tensor, outlier_v: torch.Tensor, outlier_valid: torch.Tensor,
                  sel_k: torch.Tensor, sel_v: torch.Tensor, slot_chunk: torch.Tensor,
                  sparse_valid: torch.Tensor, selectable: torch.Tensor,
                  local_k: torch.Tensor, local_v: torch.Tensor, local_valid: torch.Tensor,
                  gen_k: torch.Tensor, gen_v: torch.Tensor, gen_len: torch.Tensor,
                  chunk_size: int, num_splits: int = 0, block_n: int = 0,
                  out: torch.Tensor = None, sel_slot: torch.Tensor = None) -> torch.Tensor:
    """Exact softmax attention of q over [outliers | selected | local | generated].

    Parameters
    ----------
    q : [B, Hq, T, d] post-RoPE queries (T = 1 for plain decoding).
    scale : the model's attention scale.
    outlier_k, outlier_v : [B, H, Lo, d]; outlier_valid : [B, H, Lo] bool.
    sel_k, sel_v : [B, H, S*C, d] selected-chunk buffers; slot_chunk : [B, H, S] int32/int64
        chunk held by each slot (-1: empty slot, attended by nobody).
    sparse_valid : [B, N*C] bool token is real; selectable : [B, H, N] bool.
    local_k, local_v : [B, H, Ll, d]; local_valid : [B, Ll] bool.
    gen_k, gen_v : [B, H, Gcap, d]; gen_len : [1] int64 generated tokens *including* this
        step's T (as after ``reference.decode_attention``'s in-place update).
    chunk_size : C. num_splits, block_n : 0 picks defaults.
    out : optional [B, Hq, T, d] output buffer (default: new, q's dtype).
    sel_slot : [B, H, K] int32, the slots of the K chunks to attend, for a value cache (S > K
        slots, ``chunk_gather.reuse_plan``); None attends every slot (S = K).

    Returns
    -------
    [B, Hq, T, d] in out's dtype (q's dtype by default); accumulation in fp32.
    All K tensors share one dtype, as do all V tensors.
    """
    B, Hq, T, d = q.shape
    H = outlier_k.shape[1]
    G = Hq // H
    M = G * T
    C = chunk_size
    N = selectable.shape[-1]
    slots = slot_chunk.shape[-1]
    K = slots if sel_slot is None else sel_slot.shape[-1]
    Lo, Ll, Gcap = outlier_k.shape[2], local_k.shape[2], gen_k.shape[2]
    Ls = K * C  # the selected keys attended
    if sel_k.shape[2] != slots * C:
        raise ValueError(f"sel_k holds {sel_k.shape[2]} rows; expected slots*C = {slots}*{C}")
    if gen_v.shape[-1] != d or sel_v.shape[-1] != d:
        raise ValueError("sparse_decode: value head dim must equal the key head dim")
    if M > 128:
        raise ValueError(f"sparse_decode: {M} query rows per KV head (G*T = {G}*{T}); the kernel "
                         "holds them in registers and supports at most 128: decode fewer tokens "
                         "per step")
    if out is None:
        out = torch.empty(B, Hq, T, d, dtype=q.dtype, device=q.device)
    # 32 keys per step keeps the split kernel below 128 registers (98 on sm_90): 4 CTAs per SM
    BLOCK_N = block_n or (16 if INTERPRET else 32)
    # Ll (local tail) varies with the prompt length: leave it out so S does not
    S = num_splits or default_splits(B * H, Lo + Ls + Gcap, BLOCK_N, q.device)
    M_PAD = next_pow2(M, 16)
    D_PAD = next_pow2(d, 16)
    f32 = {"dtype": torch.float32, "device": q.device}
    po = torch.empty(B * H * S * M_PAD, d, **f32)
    pm = torch.empty(B * H * S * M_PAD, **f32)
    pl = torch.empty(B * H * S * M_PAD, **f32)
    count = torch.zeros(B * H, dtype=torch.int32, device=q.device)  # splits done per (b, h)
    M_ROWS = next_pow2(M)
    S_BLOCK = merge_block(S, M_ROWS, D_PAD)
    launch(_sparse_decode_split_kernel)[(B * H, S)](
        q.contiguous(),
        outlier_k.contiguous(), outlier_v.contiguous(), as_bytes(outlier_valid.contiguous()),
        sel_k, sel_v, slot_chunk.contiguous(),
        slot_chunk if sel_slot is None else sel_slot.contiguous(),
        as_bytes(sparse_valid.contiguous()),
        as_bytes(selectable.contiguous()),
        local_k.contiguous(), local_v.contiguous(), as_bytes(local_valid.contiguous()),
        gen_k, gen_v, gen_len,
        po, pm, pl, out, count,
        float(scale) * LOG2E, H, G, T, Lo, Ls, Ll, Gcap, N, C, K, slots, S,
        D=d, D_PAD=D_PAD, M_PAD=M_PAD, BLOCK_N=BLOCK_N, M_ROWS=M_ROWS, S_BLOCK=S_BLOCK,
        CACHED=sel_slot is not None, UPCAST=INTERPRET,
        **split_launch(S, sel_k.element_size(), sel_slot is not None))
    return out


__all__ = ["default_splits", "merge_block", "sparse_decode", "split_launch"]

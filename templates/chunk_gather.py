"""Selected-chunk data movement for one decode step: the reuse plan, the key rebuild (gathered
low-rank GEMM with RoPE in the epilogue) and the value fetch from host memory.

Sub notation:
    B batch, H = Hkv KV heads, d head dim, rd rotary dims (<= d), C chunk size, N chunks of the
    sparse region (N*C prompt tokens), r rank, K selected chunks per (b, h), S >= K slots of the
    selected-chunk buffers (S > K: a value cache, see ``reuse_plan``).
    A *load list* per (b, h) is n_load[b, h] <= K pairs (load_chunk[j], load_slot[j]), stored
    S apart: chunk load_chunk[j] goes into rows [slot*C, slot*C + C) of the [B, H, S*C, d]
    output buffer.
    Flattened load row i -> j = i // C, c = i % C (any C, not only powers of two).
    Constexprs: D (= d), D_PAD (power of two >= d), BLOCK_ROWS load rows per program, BLOCK_R
    rank columns per GEMM step, ROPE (0 none, 1 rotate_half, 2 interleaved), K_PAD (power of
    two >= K), UPCAST (see templates.common).

Parallelization: the rebuild runs on a grid (cdiv(K*C, BLOCK_ROWS), B*H); programs past
n_load[b, h]*C return at once. The fetch is persistent: a fixed number
of programs loop over the tiles that hold misses, so that it leaves SMs free for the rebuild it
overlaps (a full grid fills every SM with programs that wait on PCIe, and the rebuild queues
behind them). The plan runs one program per (b, h).

The rebuild is also an Inductor template (``key_rebuild.py.jinja``, ``rebuild_source``) that
``shadowpass.lowering`` registers for ``shadowkv::rebuild_keys``; both call ``_rebuild_rows``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..hostmem import is_pinned
from .common import INTERPRET, dot, is_fake, launch, next_pow2, template_source

ROPE_CODES = {"none": 0, "rotate_half": 1, "interleaved": 2}
# Persistent value-fetch programs. H100, 128K B8 (scripts/fetch_programs.py): 33 to 1M programs
# all fetch at the same speed, and up to 66 the rebuild on a side stream hides behind the fetch
# entirely (overlapped = fetch alone); from 132 it does not (+60-90 us).
FETCH_PROGRAMS = 64


@triton.jit
def _reuse_plan_kernel(
    idx_ptr, scores_ptr, slot_chunk_ptr, chunk_slot_ptr, kept_ptr, load_chunk_ptr, load_slot_ptr,
    nload_ptr, sel_slot_ptr, N, K, S, K_PAD: tl.constexpr, S_PAD: tl.constexpr,
    BY_SCORE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_PAD)
    k_ok = k < K
    idx = tl.load(idx_ptr + bh * K + k, mask=k_ok, other=0).to(tl.int32)
    prev = tl.load(chunk_slot_ptr + bh * N + idx, mask=k_ok, other=-1).to(tl.int32)  # or -1
    hit = (prev >= 0) & k_ok
    miss = (prev < 0) & k_ok
    s = tl.arange(0, S_PAD)
    s_ok = s < S
    # kept[s] = 1 when a chunk selected again still sits in slot s
    tl.store(kept_ptr + bh * S + s, tl.zeros([S_PAD], dtype=tl.int32), mask=s_ok)
    tl.debug_barrier()
    tl.store(kept_ptr + bh * S + prev, tl.full([K_PAD], 1, dtype=tl.int32), mask=hit)
    tl.debug_barrier()
    kept = tl.load(kept_ptr + bh * S + s, mask=s_ok, other=1, volatile=True)
    free = (kept == 0) & s_ok
    miss_i = miss.to(tl.int32)
    miss_rank = tl.cumsum(miss_i, axis=0) - miss_i  # exclusive prefix count
    n_miss = tl.sum(miss_i, axis=0)
    # load_slot[:free slots] lists the free slots in eviction order; the i-th miss takes the
    # i-th. With S == K there are exactly as many free slots as misses, so any order does.
    if BY_SCORE:  # empty slots first, then the held chunks that score lowest at this step
        held = tl.load(slot_chunk_ptr + bh * S + s, mask=free, other=-1)
        score = tl.load(scores_ptr + bh * N + held, mask=free & (held >= 0), other=0.0)
        bits = score.to(tl.int32, bitcast=True)
        order = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # ints in the floats' order
        order = tl.where(held >= 0, order, -2147483648)
        order = tl.where(free, order, 2147483647)
        if S_PAD <= 2048:  # 21 bits of order (12 of mantissa) and 11 of slot: an int32 sort
            ranked = tl.sort((order >> 11) * 2048 + s)
            victims = ranked & 2047
        else:
            ranked = tl.sort(order.to(tl.int64) * 4294967296 + s.to(tl.int64))  # ties by slot
            victims = (ranked & 0xFFFFFFFF).to(tl.int32)
        tl.store(load_slot_ptr + bh * S + s, victims, mask=s_ok)
    else:
        free_i = free.to(tl.int32)
        free_rank = tl.cumsum(free_i, axis=0) - free_i
        tl.store(load_slot_ptr + bh * S + free_rank, s, mask=free)
    tl.store(load_chunk_ptr + bh * S + miss_rank, idx, mask=miss)
    tl.debug_barrier()
    evict = s < n_miss
    victim = tl.load(load_slot_ptr + bh * S + s, mask=evict, other=0, volatile=True)
    old = tl.load(slot_chunk_ptr + bh * S + victim, mask=evict, other=-1)
    tl.store(chunk_slot_ptr + bh * N + old, tl.full([S_PAD], -1, dtype=tl.int16),
             mask=evict & (old >= 0))
    tl.debug_barrier()
    slot = tl.load(load_slot_ptr + bh * S + miss_rank, mask=miss, other=0, volatile=True)
    tl.store(chunk_slot_ptr + bh * N + idx, slot.to(tl.int16), mask=miss)
    tl.store(slot_chunk_ptr + bh * S + slot, idx, mask=miss)
    tl.store(sel_slot_ptr + bh * K + k, tl.where(hit, prev, slot), mask=k_ok)
    tl.store(nload_ptr + bh, n_miss)


@triton.jit
def _load_rows(bh, block, load_chunk_ptr, load_slot_ptr, n_load, K, C,
               BLOCK_ROWS: tl.constexpr):
    """Row block `block` of the (b, h) load list of n_load chunks: (valid, chunk, slot, row in
    chunk)."""
    i = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    j = i // C
    ok = j < n_load
    chunk = tl.load(load_chunk_ptr + bh * K + j, mask=ok, other=0).to(tl.int64)
    slot = tl.load(load_slot_ptr + bh * K + j, mask=ok, other=0).to(tl.int64)
    return ok, chunk, slot, i % C


@triton.jit
def _rebuild_keys_kernel(
    out_ptr, u_ptr, sv_ptr, cos_ptr, sin_ptr, load_chunk_ptr, load_slot_ptr, nload_ptr,
    H, N, K, C, R, RD, tab_bstride,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    ROPE: tl.constexpr, ROTATE_ALL: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    n_load = tl.load(nload_ptr + bh)
    if tl.program_id(0) * BLOCK_ROWS >= n_load * C:
        return  # past this head's misses (most programs when most chunks hit)
    _rebuild_rows(out_ptr, u_ptr, sv_ptr, cos_ptr, sin_ptr, load_chunk_ptr, load_slot_ptr,
                  n_load, tl.program_id(0), bh, H, N, K, C, R, RD, tab_bstride, RD // 2, 1,
                  D, D_PAD, BLOCK_ROWS, BLOCK_R, ROPE, ROTATE_ALL, UPCAST)


@triton.jit
def _rebuild_rows(out_ptr, u_ptr, sv_ptr, cos_ptr, sin_ptr, load_chunk_ptr, load_slot_ptr,
                  n_load, block, bh, H, N, K, C, R, RD, tab_bstride, tab_rstride, tab_estride,
                  D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_R: tl.constexpr, ROPE: tl.constexpr, ROTATE_ALL: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Rebuild row block `block` of the (b, h) = bh load list (n_load chunks) into its slots of
    out: the rank GEMM, RoPE at the rows' prompt positions, the store (contiguous buffers; the
    tables [., N*C, RD/2] at strides tab_bstride, tab_rstride, tab_estride)."""
    ok, chunk, slot, c = _load_rows(bh, block, load_chunk_ptr, load_slot_ptr, n_load, K, C,
                                    BLOCK_ROWS)
    b = bh // H
    pos = chunk * C + c  # the token's prompt position
    tok = b * N * C + pos  # its row of U
    cols = tl.arange(0, D_PAD)
    d_ok = cols < D
    HALF = RD // 2  # the tables hold one value per rotated pair: RD // 2 a row
    # Partial rotary: RoPE is linear along d, so rot(U @ SV) = U @ rot(SV), and a second GEMM
    # against SV with permuted columns gives the rotated keys without register shuffles.
    # ROTATE_ALL (every dim rotated, d a power of two): one GEMM, then the pairs are rotated in
    # registers, half the GEMM work and SV reads.
    if ROPE == 1:  # rotate_half: [x1, x2] -> [-x2, x1] on the first rd dims
        src = tl.where(cols < HALF, cols + HALF, cols - HALF)
        sign = tl.where(cols < HALF, -1.0, 1.0)
        pair = tl.where(cols < HALF, cols, cols - HALF)
    else:  # interleaved pairs: (a, b) -> (-b, a)
        src = tl.where(cols % 2 == 0, cols + 1, cols - 1)
        sign = tl.where(cols % 2 == 0, -1.0, 1.0)
        pair = cols // 2
    rot_ok = cols < RD
    acc = tl.zeros([BLOCK_ROWS, D_PAD], dtype=tl.float32)
    acc_rot = tl.zeros([BLOCK_ROWS, D_PAD], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        u = tl.load(u_ptr + tok[:, None] * R + rr[None, :], mask=ok[:, None] & r_ok[None, :],
                    other=0.0)
        sv_rows = sv_ptr + (bh * R + rr)[:, None] * D
        sv = tl.load(sv_rows + cols[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc += dot(u, sv, UPCAST)
        if ROPE != 0 and not ROTATE_ALL:
            svr = tl.load(sv_rows + src[None, :], mask=r_ok[:, None] & rot_ok[None, :], other=0.0)
            acc_rot += dot(u, svr, UPCAST)
    if ROTATE_ALL:
        if ROPE == 1:  # pair i is (dim i, dim i + D/2)
            x = tl.permute(tl.reshape(acc, [BLOCK_ROWS, 2, D // 2]), [0, 2, 1])
        else:  # pair i is (dim 2i, dim 2i + 1)
            x = tl.reshape(acc, [BLOCK_ROWS, D // 2, 2])
        x1, x2 = tl.split(x)
        tab = (b * tab_bstride + pos[:, None] * tab_rstride
               + tl.arange(0, D // 2)[None, :] * tab_estride)
        cs = tl.load(cos_ptr + tab, mask=ok[:, None], other=1.0).to(tl.float32)
        sn = tl.load(sin_ptr + tab, mask=ok[:, None], other=0.0).to(tl.float32)
        y = tl.join(x1 * cs - x2 * sn, x2 * cs + x1 * sn)  # [rows, D/2, 2]
        if ROPE == 1:
            y = tl.permute(y, [0, 2, 1])
        acc = tl.reshape(y, [BLOCK_ROWS, D])
    elif ROPE != 0:
        tab = b * tab_bstride + pos[:, None] * tab_rstride + pair[None, :] * tab_estride
        t_ok = ok[:, None] & rot_ok[None, :]
        cs = tl.load(cos_ptr + tab, mask=t_ok, other=1.0).to(tl.float32)  # dims >= rd pass through
        sn = tl.load(sin_ptr + tab, mask=t_ok, other=0.0).to(tl.float32)
        acc = acc * cs + acc_rot * (sn * sign[None, :])
    dst = out_ptr + ((bh * K + slot) * C + c)[:, None] * D + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _fetch_values_kernel(
    out_ptr, values_ptr, load_chunk_ptr, load_slot_ptr, nload_ptr,
    N, K, C, BH,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BH_PAD: tl.constexpr,
):
    cols = tl.arange(0, D_PAD)
    # only the tiles that hold misses: tile t is row block t - first[bh] of the (b, h) whose
    # tiles span t. A loop over every (b, h)'s K*C rows, most of them empty at a high hit
    # rate, took 130.0 against 82.5 us at 128K batch 8 with 7% misses, the same at 100%
    # (H100, scripts/fetch_tiles.py, results/h100/chunk_cache/fetch_tiles.txt).
    heads = tl.arange(0, BH_PAD)
    tiles_of = (tl.load(nload_ptr + heads, mask=heads < BH, other=0) * C + BLOCK_ROWS - 1) \
        // BLOCK_ROWS
    ends = tl.cumsum(tiles_of, axis=0)
    for t in range(tl.program_id(0), tl.sum(tiles_of, axis=0), tl.num_programs(0)):
        bh = tl.sum((ends <= t).to(tl.int32), axis=0)
        block = t - tl.sum(tl.where(heads < bh, tiles_of, 0), axis=0)
        bh = bh.to(tl.int64)
        ok, chunk, slot, c = _load_rows(bh, block, load_chunk_ptr, load_slot_ptr,
                                        tl.load(nload_ptr + bh), K, C, BLOCK_ROWS)
        m = ok[:, None] & (cols < D)[None, :]
        # one chunk of one head is C*d contiguous elements of the host store: coalesced reads
        x = tl.load(values_ptr + ((bh * N + chunk) * C + c)[:, None] * D + cols[None, :], mask=m)
        tl.store(out_ptr + ((bh * K + slot) * C + c)[:, None] * D + cols[None, :],
                 x.to(out_ptr.dtype.element_ty), mask=m)


def reuse_plan(idx: torch.Tensor, slot_chunk: torch.Tensor, chunk_slot: torch.Tensor,
               scores: torch.Tensor | None = None):
    """Plan which selected chunks must be loaded, keeping the chunks already held in their slots.

    Parameters
    ----------
    idx : [B, H, K] int64 chunk ids selected this step (distinct per (b, h), e.g. from topk).
    slot_chunk : [B, H, S] int32 chunk held by each slot of the selected-K/V buffers (-1: empty),
        S >= K; updated in place. With S == K it ends up holding exactly idx's chunks; with
        S > K the buffers are a value cache: chunks not selected stay until a miss needs
        their slot.
    chunk_slot : [B, H, N] int16 inverse map, chunk -> slot or -1; updated in place.
    scores : [B, H, N] this step's chunk scores, needed when S > K: the held chunks that are
        not selected and score lowest are evicted first (on SmolLM2's selections this keeps
        slightly more hits than least-recently-selected eviction, with no state of its own:
        scripts/value_cache_hits.py).

    Returns
    -------
    load_chunk, load_slot : [B, H, S] int32; entries [:n_load] are the misses and the slots
        they go to (the rest is scratch).
    n_load : [B, H] int32 misses per (b, h).
    sel_slot : [B, H, K] int32 slot holding idx[..., j] after the plan.
    """
    B, H, K = idx.shape
    S, N = slot_chunk.shape[-1], chunk_slot.shape[-1]
    if S < K:
        raise ValueError(f"reuse_plan: {S} slots cannot hold the {K} selected chunks")
    if S > K and scores is None:
        raise ValueError("reuse_plan: a workspace with more slots than selected chunks (a value "
                         "cache) needs the step's scores to pick what to evict")
    dev = idx.device
    load_chunk = torch.empty(B, H, S, dtype=torch.int32, device=dev)
    load_slot = torch.empty(B, H, S, dtype=torch.int32, device=dev)
    kept = torch.empty(B, H, S, dtype=torch.int32, device=dev)
    n_load = torch.empty(B, H, dtype=torch.int32, device=dev)
    sel_slot = torch.empty(B, H, K, dtype=torch.int32, device=dev)
    if B * H * K == 0:
        return load_chunk, load_slot, n_load.zero_(), sel_slot
    by_score = S > K
    launch(_reuse_plan_kernel)[(B * H,)](
        idx.contiguous(), scores.contiguous() if by_score else idx, slot_chunk, chunk_slot, kept,
        load_chunk, load_slot, n_load, sel_slot, N, K, S, K_PAD=next_pow2(K),
        S_PAD=next_pow2(S), BY_SCORE=by_score, num_warps=4)
    return load_chunk, load_slot, n_load, sel_slot


def full_load(idx: torch.Tensor):
    """The load list that loads every chunk of idx [B, H, K] into slot k (no reuse)."""
    B, H, K = idx.shape
    slots = torch.arange(K, dtype=torch.int32, device=idx.device).expand(B, H, K)
    n_load = torch.full((B, H), K, dtype=torch.int32, device=idx.device)
    return idx.to(torch.int32), slots.contiguous(), n_load


def rebuild_config(rotate_all: bool) -> tuple[int, int]:
    """(rows a program, warps) of the key rebuild. 32 rows x 8 warps: two fp32 [rows, d]
    accumulators fit in registers at d=128 (sm_90, scripts/compile_kernels.py: 64 rows x 4
    warps spilled 2 KB); one accumulator (every dim rotated): 64 rows."""
    return (64 if rotate_all else 32), 8


def rotates_all(rope: int, rotary_dims: int, head_dim: int) -> bool:
    """Every dim rotated and d a power of two: one GEMM, the pairs rotated in registers."""
    return rope != 0 and rotary_dims == head_dim == next_pow2(head_dim, 16)


@functools.lru_cache(maxsize=None)
def rebuild_source() -> str:
    """The rebuild's Inductor template: the Jinja kernel, then the helpers it calls."""
    return template_source("key_rebuild.py.jinja", dot, _load_rows, _rebuild_rows)


# A name only the template's generated code contains (tests look for it in Inductor's output).
REBUILD_MARKER = "shadowkv_key_rebuild"


def rebuild_keys_into(out: torch.Tensor, U: torch.Tensor, SV: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, load_chunk: torch.Tensor, load_slot: torch.Tensor,
                      n_load: torch.Tensor, chunk_size: int, rope_style: str,
                      block_rows: int = 0, max_loads: int = 0) -> torch.Tensor:
    """Rebuild post-RoPE keys of the listed chunks into their slots (``reference.rebuild_keys``).

    Parameters
    ----------
    out : [B, H, S*C, d] selected-K buffer (any float dtype; fp32 accumulation), written in place.
    U : [B, N*C, r] left factor; SV : [B, H, r, d] right factor (same dtype as U).
    cos, sin : [B, N*C, rd/2] rotary factors at prompt positions, one per rotated pair of dims
        (``reference.rope_tables``; ignored when rope_style="none"); [1, N*C, rd/2] or a
        batch-expanded view of it shares one table across the batch.
    load_chunk, load_slot : [B, H, S] int32; n_load : [B, H] int32 (see ``reuse_plan``).
    chunk_size : C. rope_style : "rotate_half", "interleaved" or "none".
    block_rows : rows a program (0: default). max_loads : the longest load list, K (0: S),
        so that a value cache's spare slots launch no programs.

    Returns
    -------
    out
    """
    B, H, KC, d = out.shape
    C = chunk_size
    K = KC // C
    N = U.shape[1] // C
    R = U.shape[-1]
    rope = ROPE_CODES[rope_style]
    RD = 2 * cos.shape[-1] if rope else 0
    if B * H * KC == 0:
        return out
    if cos.shape[0] == 1 or cos.stride(0) == 0:  # one table for the whole batch
        cos, sin, tab_bstride = cos[:1].contiguous(), sin[:1].contiguous(), 0
    else:
        cos, sin, tab_bstride = cos.contiguous(), sin.contiguous(), N * C * RD // 2
    rotate_all = rotates_all(rope, RD, d)
    BLOCK_ROWS, warps = rebuild_config(rotate_all)
    BLOCK_ROWS = block_rows or BLOCK_ROWS
    grid = (triton.cdiv((max_loads or K) * C, BLOCK_ROWS), B * H)
    launch(_rebuild_keys_kernel)[grid](
        out, U.contiguous(), SV.contiguous(), cos, sin,
        load_chunk, load_slot, n_load, H, N, K, C, R, RD, tab_bstride,
        D=d, D_PAD=next_pow2(d, 16), BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_R=min(32, next_pow2(R, 16)), ROPE=rope, ROTATE_ALL=rotate_all, UPCAST=INTERPRET,
        num_warps=warps)
    return out


def fetch_values_into(out: torch.Tensor, values: torch.Tensor, load_chunk: torch.Tensor,
                      load_slot: torch.Tensor, n_load: torch.Tensor,
                      block_rows: int = 0, programs: int = 0,
                      max_loads: int = 0) -> torch.Tensor:
    """Copy the listed chunks' values into their slots (``reference.fetch_values``).

    Parameters
    ----------
    out : [B, H, S*C, d] selected-V buffer on the compute device, written in place.
    values : [B, H, N, C, d] contiguous host store. On CUDA it must be pinned: the kernel reads
        it directly through unified virtual addressing (zero-copy, no staging copy).
    load_chunk, load_slot : [B, H, S] int32; n_load : [B, H] int32 (see ``reuse_plan``).
    block_rows, programs : tile height and number of persistent programs (0: defaults).
    max_loads : the longest load list, K (0: S), so that a value cache's spare slots cost no
        tiles.

    Returns
    -------
    out
    """
    B, H, N, C, d = values.shape
    KC = out.shape[2]
    K = KC // C
    if out.is_cuda and not is_fake(values) and not (values.is_cuda or is_pinned(values)):
        raise ValueError("fetch_values_into: the host value store must be pinned memory "
                         "(torch.empty(..., pin_memory=True)) for the GPU to read it zero-copy")
    if not values.is_contiguous():
        raise ValueError("fetch_values_into: the value store must be contiguous [B, H, N, C, d]")
    if B * H * KC == 0:
        return out
    # tiles of 16 rows (4 KB at d=128) per load; 64 programs of 8 warps keep enough zero-copy
    # reads in flight to reach the pinned-copy bandwidth (scripts/fetch_programs.py)
    BLOCK_ROWS = block_rows or 16
    blocks = triton.cdiv((max_loads or K) * C, BLOCK_ROWS)
    tiles = blocks * B * H
    # out goes first: Inductor takes a user kernel's device from its first tensor argument
    launch(_fetch_values_kernel)[(min(tiles, programs or FETCH_PROGRAMS),)](
        out, values, load_chunk, load_slot, n_load, N, K, C, B * H,
        D=d, D_PAD=next_pow2(d, 16), BLOCK_ROWS=BLOCK_ROWS, BH_PAD=next_pow2(B * H),
        num_warps=8)
    return out


__all__ = ["REBUILD_MARKER", "ROPE_CODES", "fetch_values_into", "full_load", "rebuild_config",
           "rebuild_keys_into", "rebuild_source", "reuse_plan", "rotates_all"]

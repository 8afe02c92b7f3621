"""Where the sparse decode attention loses time against SDPA: variants of its inner loop.

    python scripts/attention_variants.py [--batches 8] [--warps 1 2 4] [--stages 2 3] [--merge 1 0]

At the Llama-3.1-8B layer shape, 128K context, budget 2048 (2528 keys), batch 8, the
attention kernel (templates/sparse_decode.py) was 1.3-1.6x SDPA over a compact buffer of the
same keys, and no launch setting closed the gap (scripts/attention_configs.py). This probe runs
one split kernel over a single contiguous [B, H, P, d] buffer, with the production step
(``sparse_decode._attend``) and two switches, to see which part of the loop costs the time:

- GATHER: each key's validity through the selected segment's chain
  (``sparse_decode._selected_valid``: slot -> chunk -> token and chunk flags, two dependent
  loads), as production does for 81% of the keys; off: no masks at all;
- PREFETCH: each block's validity loaded one step ahead, as production now does;
- MERGE: the last split of each head merges the partials (``sparse_decode._combine``), as
  production does; off: the partials are only written, so only the time is printed. At batch
  1 the merge is what costs: ~15 us at 4 warps, ~5 us at 1, against a 6-9 us loop
  (H100, ``--batches 1 --warps 1 4 --stages 3 --merge 1 0``,
  results/h100/attention_merge/variants_b1.txt).

With 16 padded query rows (G = 4), 4 warps split a score tile's columns between them, so
each step's row max and sum cross warps through shared memory; 1 or 2 warps keep more of it
in one warp, with more programs (splits) to keep the memory busy; or M_PAD = 16 x warps puts
the warps along the rows (as FlashAttention's decode kernel does), each warp's reductions its
own, for 4x the (idle) tensor-core work.

Each variant over BLOCK_N x warps x stages x split counts x M_PAD; times in us (median, CUDA
graph) and as a ratio to SDPA. Outputs are checked against SDPA before timing.
The run in results/h100/attention_probe/variants.txt is of this probe at 6dc398f: its "early"
column is PREFETCH with K and V loaded together, which ``_attend`` has done since (then it
loaded V after the softmax).
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from shadowpass.templates import sparse_decode as sd

H, G, D, C, N, K, O, L, GEN = 8, 4, 128, 8, 16380, 256, 48, 32, 64
P = O * C + K * C + L + GEN
SLOTS = triton.cdiv(P, C)


@triton.jit
def _validity(slot_base, tok_base, sel_base, pos, end, C, GATHER: tl.constexpr):
    if GATHER:
        return sd._selected_valid(slot_base, tok_base, sel_base, pos, end, C, 1, 1, 1)
    else:
        return pos < end


@triton.jit
def _probe_split(q_ptr, k_ptr, v_ptr, slot_chunk_ptr, tok_valid_ptr, selectable_ptr,
                 po_ptr, pm_ptr, pl_ptr, out_ptr, count_ptr, qk_scale, H, G, P, N, C, K, S,
                 D: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 M_ROWS: tl.constexpr, S_BLOCK: tl.constexpr, GATHER: tl.constexpr,
                 PREFETCH: tl.constexpr, MERGE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    rows = tl.arange(0, M_PAD)
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * G + rows)[:, None] * D + cols[None, :],
                mask=(rows < G)[:, None], other=0.0)
    per = tl.cdiv(tl.cdiv(P, S), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, P)
    m_i = tl.full([M_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M_PAD], dtype=tl.float32)
    acc = tl.zeros([M_PAD, D], dtype=tl.float32)
    every_row = rows[:, None] >= 0
    slot_base = slot_chunk_ptr + bh * K  # K = cdiv(P, C) slots: every key is a selected one
    tok_base = tok_valid_ptr + b * N * C
    sel_base = selectable_ptr + bh * N
    valid = _validity(slot_base, tok_base, sel_base, start + tl.arange(0, BLOCK_N), end, C,
                      GATHER)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        if PREFETCH:
            valid_next = _validity(slot_base, tok_base, sel_base, pos + BLOCK_N, end, C, GATHER)
        else:
            valid = _validity(slot_base, tok_base, sel_base, pos, end, C, GATHER)
        m_i, l_i, acc = sd._attend(q, k_ptr + bh * P * D, v_ptr + bh * P * D, pos, pos < end,
                                   every_row & valid[None, :], m_i, l_i, acc, qk_scale, cols,
                                   cols < D, D, 1, D, 1, False)
        if PREFETCH:
            valid = valid_next
    part = bh * S + split
    tl.store(po_ptr + (part * M_PAD + rows)[:, None] * D + cols[None, :], acc)
    tl.store(pm_ptr + part * M_PAD + rows, m_i)
    tl.store(pl_ptr + part * M_PAD + rows, l_i)
    if MERGE:
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu") == S - 1:
            sd._combine(bh, out_ptr, po_ptr, pm_ptr, pl_ptr, G, 1, S, D, D, M_PAD, M_ROWS, S_BLOCK)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[8])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--merge", type=int, nargs="+", default=[1], help="1, 0 or both")
    args = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    scale = D ** -0.5
    for B in args.batches:
        q = torch.randn(B, H * G, 1, D, device=dev, dtype=bf)
        k, v = (torch.randn(B, H, P, D, device=dev, dtype=bf) for _ in range(2))
        slots = torch.stack([torch.randperm(N, device=dev)[:SLOTS] for _ in range(B * H)])
        slots = slots.view(B, H, SLOTS).to(torch.int32)
        tok_valid = torch.ones(B, N * C, dtype=torch.uint8, device=dev)
        selectable = torch.ones(B, H, N, dtype=torch.uint8, device=dev)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ref = sdpa(q, k, v, scale=scale, enable_gqa=True)
        t_ref = do_bench_cudagraph(lambda: sdpa(q, k, v, scale=scale, enable_gqa=True), rep=100)
        print(f"\nB={B}: SDPA over {P} keys: {t_ref * 1e3:.1f} us "
              f"({2 * B * H * P * D * 2 / t_ref / 1e6:.0f} GB/s)")
        print(f"{'merge':>5} {'gather':>6} {'prefetch':>8} {'BLOCK_N':>7} {'warps':>5} "
              f"{'stages':>6} {'splits':>6} {'M_PAD':>5} {'us':>7} {'/ SDPA':>7}")
        best = {}
        for merge, gather, prefetch, block_n, warps, stages in itertools.product(
                args.merge, (1, 0), (0, 1), (32,), args.warps, args.stages):
            default = sd.default_splits(B * H, P, block_n, q.device)
            for S, m_pad in itertools.product(sorted({default, 2 * default, 4 * default}),
                                              sorted({16, 16 * warps})):
                po = torch.empty(B * H * S * m_pad * D, device=dev)
                pm, pl = (torch.empty(B * H * S * m_pad, device=dev) for _ in range(2))
                out = torch.empty_like(q)
                count = torch.zeros(B * H, dtype=torch.int32, device=dev)
                s_block = sd.merge_block(S, 4, D)

                def run():
                    count.zero_()
                    _probe_split[(B * H, S)](
                        q, k, v, slots, tok_valid, selectable, po, pm, pl, out, count,
                        scale * sd.LOG2E, H, G, P, N, C, SLOTS, S, D=D, M_PAD=m_pad,
                        BLOCK_N=block_n, M_ROWS=4, S_BLOCK=s_block, GATHER=gather,
                        PREFETCH=prefetch, MERGE=merge, num_warps=warps, num_stages=stages)
                setting = (f"{merge:>5} {gather:>6} {prefetch:>8} {block_n:>7} {warps:>5} "
                           f"{stages:>6} {S:>6} {m_pad:>5}")
                try:
                    run()
                    err = (out.float() - ref.float()).abs().max().item()
                    t = do_bench_cudagraph(run, rep=50)
                except Exception as e:  # e.g. out of shared memory
                    print(f"{setting}  failed: {type(e).__name__}")
                    continue
                flag = "" if err < 2e-2 or not merge else f"  WRONG (max err {err:.3g})"
                print(f"{setting} {t * 1e3:>7.1f} {t / t_ref:>7.2f}{flag}")
                key = (merge, gather, prefetch)
                best[key] = min(best.get(key, (float("inf"),)),
                                (t / t_ref, block_n, warps, stages, S, m_pad))
        for (merge, gather, prefetch), (r, block_n, warps, stages, S, m_pad) in sorted(
                best.items()):
            print(f"best B={B} merge={merge} gather={gather} prefetch={prefetch}: {r:.2f}x SDPA "
                  f"(BLOCK_N {block_n}, {warps} warps, {stages} stages, {S} splits, M_PAD {m_pad})")


if __name__ == "__main__":
    main()

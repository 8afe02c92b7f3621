"""Launch settings of the sparse decode attention (templates/sparse_decode.py) against SDPA.

    python scripts/attention_configs.py [--batches 1 8 32] [--block-n 32 64] [--warps 1 2 4 8]
        [--stages 2 3] [--chunk-cache 4]      # GPU machine

At the Llama-3.1-8B layer shape (Hq 32, Hkv 8, d 128), 128K context, budget 2048 (48 outlier
chunks, 32 local and 64 generated tokens: 2528 keys), batch 1/8/32: the split kernel's time
for each BLOCK_N x num_warps (1-8) x num_stages x split count (half, 1, 2 and 4 times the
default), as a
ratio to SDPA over a compact buffer of the same keys (issue 4's target: <= 1.3x). Times in us
(median, CUDA graph); the last lines give the best setting per batch. With --chunk-cache c
the selected chunks are read through a value cache's slot list (c*K slots, sel_slot).
"""
import argparse
import itertools

import torch
from triton.testing import do_bench_cudagraph

from shadowpass.templates import sparse_decode as sd

H, G, D, C, N, K, O, L, GEN, GCAP = 8, 4, 128, 8, 16380, 256, 48, 32, 64, 256
dev, bf = "cuda", torch.bfloat16
print(torch.cuda.get_device_name(), torch.__version__)
best = {}
ap = argparse.ArgumentParser()
ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64])
ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
ap.add_argument("--chunk-cache", type=int, default=1)
args = ap.parse_args()
S = args.chunk_cache * K
for B in args.batches:
    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=bf)
    q = rnd(B, H * G, 1, D)
    ok_, ov = rnd(B, H, O * C, D), rnd(B, H, O * C, D)
    ovalid = torch.ones(B, H, O * C, dtype=torch.bool, device=dev)
    sk, sv = rnd(B, H, S * C, D), rnd(B, H, S * C, D)
    slots = torch.stack([torch.randperm(N, device=dev)[:S] for _ in range(B * H)]).view(B, H, S)
    slots = slots.to(torch.int32)
    sel_slot = None if S == K else torch.stack(
        [torch.randperm(S, device=dev)[:K] for _ in range(B * H)]).view(B, H, K).to(torch.int32)
    svalid = torch.ones(B, N * C, dtype=torch.bool, device=dev)
    selectable = torch.ones(B, H, N, dtype=torch.bool, device=dev)
    lk, lv = rnd(B, H, L, D), rnd(B, H, L, D)
    lvalid = torch.ones(B, L, dtype=torch.bool, device=dev)
    gk, gv = rnd(B, H, GCAP, D), rnd(B, H, GCAP, D)
    glen = torch.tensor([GEN], device=dev)
    P = O * C + K * C + L + GEN
    ck, cv = rnd(B, H, P, D), rnd(B, H, P, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t_ref = do_bench_cudagraph(lambda: sdpa(q, ck, cv, scale=D ** -0.5, enable_gqa=True), rep=100)
    print(f"\nB={B}: SDPA over a compact buffer of {P} keys: {t_ref * 1e3:.1f} us")
    print(f"{'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'splits':>6} {'us':>7} {'/ SDPA':>7}")
    for block_n, warps, stages in itertools.product(args.block_n, args.warps, args.stages):
        sd.split_launch = lambda *_, w=warps, s=stages: {"num_warps": w, "num_stages": s}
        default = sd.default_splits(B * H, O * C + K * C + GCAP, block_n, q.device)
        for splits in sorted({max(1, default // 2), default, 2 * default, 4 * default}):
            def run():
                return sd.sparse_decode(q, D ** -0.5, ok_, ov, ovalid, sk, sv, slots, svalid,
                                        selectable, lk, lv, lvalid, gk, gv, glen, chunk_size=C,
                                        num_splits=splits, block_n=block_n,
                                        sel_slot=sel_slot)
            try:
                t = do_bench_cudagraph(run, rep=50)
            except Exception as e:  # e.g. out of shared memory for a setting
                print(f"{block_n:>7} {warps:>5} {stages:>6} {splits:>6}  failed: {type(e).__name__}")
                continue
            print(f"{block_n:>7} {warps:>5} {stages:>6} {splits:>6} {t * 1e3:>7.1f} "
                  f"{t / t_ref:>7.2f}")
            best[B] = min(best.get(B, (float("inf"),)), (t / t_ref, block_n, warps, stages, splits,
                                                          default))
print()
for B, (r, block_n, warps, stages, splits, default) in best.items():
    print(f"best at B={B}: {r:.2f}x SDPA with BLOCK_N {block_n}, {warps} warps, {stages} stages, "
          f"{splits} splits (default {default})")

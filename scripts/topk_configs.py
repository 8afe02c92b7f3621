"""Time the group-max top-k kernel (templates/chunk_topk.py) at several group counts and warp
counts against torch.topk, on landmark scores of one Llama-3.1-8B layer (8 KV heads, 32 query
heads, d = 128, 8-token chunks, k = 256), random landmarks and queries.

    python scripts/topk_configs.py --contexts 32768 131072 --batches 1 8 32

CUDA graphs (triton's do_bench_cudagraph), median us; "WRONG" marks a selection whose scores
differ from torch.topk's. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.testing import do_bench_cudagraph

from shadowpass.templates import chunk_topk as ct
from shadowpass.templates.common import next_pow2
from shadowpass.templates.landmark_scores import landmark_scores

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
ap.add_argument("--k", type=int, default=256)
ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
args = ap.parse_args()


def run(scores, k, ng, warps, has_topk):
    N = scores.shape[-1]
    out = torch.empty(*scores.shape[:-1], k, dtype=torch.int64, device=scores.device)
    gs = triton.cdiv(N, ng)
    ct._chunk_topk_kernel[(scores.numel() // N,)](scores, out, N, k, gs, NG=ng,
                                                  GS_PAD=next_pow2(gs), K_PAD=ct.padded_k(k),
                                                  HAS_TOPK=has_topk, num_warps=warps)
    return out


print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, tl.topk: {ct.HAS_TOPK}; "
      f"k = {args.k}; us, CUDA graph medians")
g = torch.Generator(device="cuda").manual_seed(0)
for ctx in args.contexts:
    N = ctx // 8
    for B in args.batches:
        lm = torch.randn(B, 8, N, 128, device="cuda", generator=g).bfloat16()
        q = torch.randn(B, 32, 1, 128, device="cuda", generator=g).bfloat16()
        sel = torch.ones(B, 8, N, dtype=torch.bool, device="cuda")
        scores = landmark_scores(q, lm, sel, 128 ** -0.5, fill=-1.0)
        want = scores.topk(args.k, dim=-1).values.sort(-1).values
        t_torch = do_bench_cudagraph(lambda: scores.topk(args.k, dim=-1, sorted=False), rep=50)
        t_def = do_bench_cudagraph(lambda: ct.chunk_topk(scores, args.k), rep=50)
        ok = torch.equal(scores.gather(-1, ct.chunk_topk(scores, args.k)).sort(-1).values, want)
        line = [f"ctx {ctx:>6} B {B:>2}: torch.topk {t_torch * 1e3:6.1f}, chunk_topk "
                f"{t_def * 1e3:6.1f}{'' if ok else ' WRONG'} (NG {ct.group_count(N, args.k)}, "
                f"{t_torch / t_def:.2f}x);"]
        ng = next_pow2(args.k)
        while ng <= min(ct.MAX_SORT, next_pow2(N)):
            if next_pow2(args.k) * next_pow2(triton.cdiv(N, ng)) <= ct.MAX_SORT:
                for warps in args.warps:
                    for has in sorted({False, ct.HAS_TOPK}):
                        got = run(scores, args.k, ng, warps, has)
                        ok = torch.equal(scores.gather(-1, got).sort(-1).values, want)
                        t = do_bench_cudagraph(
                            lambda n=ng, w=warps, h=has: run(scores, args.k, n, w, h), rep=50)
                        line.append(f"NG {ng}/{warps}w/{'topk' if has else 'sort'} "
                                    f"{t * 1e3:.1f}{'' if ok else ' WRONG'}")
            ng *= 2
        print(" ".join(line), flush=True)

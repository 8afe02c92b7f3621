"""Time the top-k kernel (templates/chunk_topk.py) at several tile sizes and warp counts against
torch.topk, on the scores shape of one Llama-3.1-8B layer (8 KV heads, 8-token chunks, k = 256).

    python scripts/topk_configs.py --contexts 32768 131072 --batches 1 8 32

CUDA graphs (triton's do_bench_cudagraph), median us. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench_cudagraph

from shadowpass.templates import chunk_topk

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
ap.add_argument("--k", type=int, default=256)
ap.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
args = ap.parse_args()


def run(scores, k, block, warps):
    rows, N = scores.shape[0] * scores.shape[1], scores.shape[2]
    out = torch.empty(*scores.shape[:2], k, dtype=torch.int64, device=scores.device)
    chunk_topk._top_chunks_kernel[(rows,)](scores, out, N, k, BLOCK=block, SINGLE=N <= block,
                                           num_warps=warps)
    return out


print(f"{torch.cuda.get_device_name()}; k = {args.k}; us, CUDA graph medians")
for ctx in args.contexts:
    N = ctx // 8
    for B in args.batches:
        scores = torch.rand(B, 8, N, device="cuda")
        want = scores.topk(args.k, dim=-1).values.sort(-1).values
        t_torch = do_bench_cudagraph(lambda: scores.topk(args.k, dim=-1, sorted=False), rep=50)
        t_prod = do_bench_cudagraph(lambda: chunk_topk.top_chunks(scores, args.k), rep=50)
        line = [f"ctx {ctx:>6} B {B:>2}: torch.topk {t_torch * 1e3:6.1f}, "
                f"top_chunks {t_prod * 1e3:6.1f} ({t_torch / t_prod:.2f}x);"]
        for block in args.blocks:
            for warps in args.warps:
                if block // (32 * warps) < 1:
                    continue
                got = run(scores, args.k, block, warps)
                ok = torch.equal(scores.gather(-1, got).sort(-1).values, want)
                t = do_bench_cudagraph(lambda b=block, w=warps: run(scores, args.k, b, w), rep=50)
                line.append(f"{block}/{warps}w {t * 1e3:.1f}{'' if ok else ' WRONG'}")
        print(" ".join(line), flush=True)

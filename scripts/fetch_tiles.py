"""The value fetch's two tile loops side by side at 128K (Llama-3.1-8B layer, bf16): the flat
loop over every (b, h)'s K*C rows (before 2026-12-07) and the loop over the tiles that hold
misses only (templates/chunk_gather.py), at 100% and 7% misses, in CUDA graphs.

    python scripts/fetch_tiles.py [--batches 1 8]      # GPU machine
"""
import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from shadowpass.templates.chunk_gather import FETCH_PROGRAMS, _load_rows, fetch_values_into


@triton.jit
def _flat_fetch_kernel(out_ptr, values_ptr, load_chunk_ptr, load_slot_ptr, nload_ptr,
                       N, K, C, BLOCKS, TILES, D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    cols = tl.arange(0, D)
    for t in range(tl.program_id(0), TILES, tl.num_programs(0)):
        bh = (t // BLOCKS).to(tl.int64)
        ok, chunk, slot, c = _load_rows(bh, t % BLOCKS, load_chunk_ptr, load_slot_ptr,
                                        tl.load(nload_ptr + bh), K, C, BLOCK_ROWS)
        m = ok[:, None]
        x = tl.load(values_ptr + ((bh * N + chunk) * C + c)[:, None] * D + cols[None, :], mask=m)
        tl.store(out_ptr + ((bh * K + slot) * C + c)[:, None] * D + cols[None, :], x, mask=m)


ap = argparse.ArgumentParser()
ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
args = ap.parse_args()
H, D, C, K, N = 8, 128, 8, 256, 16380
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
for B in args.batches:
    values = torch.empty(B, H, N, C, D, dtype=torch.bfloat16, pin_memory=True)
    values.view(-1)[:] = 1.0
    out = torch.empty(B, H, K * C, D, dtype=torch.bfloat16, device="cuda")
    chunks = torch.stack([torch.randperm(N, device="cuda")[:K] for _ in range(B * H)])
    load_chunk = chunks.view(B, H, K).to(torch.int32)
    load_slot = torch.arange(K, device="cuda", dtype=torch.int32).expand(B, H, K).contiguous()
    for frac in (1.0, 0.07):
        n = torch.full((B, H), round(frac * K), dtype=torch.int32, device="cuda")
        mb = B * H * int(n[0, 0]) * C * D * 2 / 1e6
        blocks = triton.cdiv(K * C, 16)

        def flat():
            _flat_fetch_kernel[(FETCH_PROGRAMS,)](out, values, load_chunk, load_slot, n, N, K,
                                                  C, blocks, blocks * B * H, D=D, BLOCK_ROWS=16,
                                                  num_warps=8)

        def compact():
            fetch_values_into(out, values, load_chunk, load_slot, n)
        for name, fn in (("flat", flat), ("misses only", compact)):
            t = do_bench_cudagraph(fn, rep=100) * 1e3
            print(f"B {B:>2} {frac:>4.0%} miss {name:<12} {t:7.1f} us  {mb / t * 1e3:5.1f} GB/s",
                  flush=True)

"""How many persistent programs the value fetch needs (templates/chunk_gather.FETCH_PROGRAMS).

    python scripts/fetch_programs.py      # GPU machine

At the Llama-3.1-8B layer shape, 128K context, batch 8, budget 2048: the fetch alone and the
key rebuild overlapped with it (side stream), for a range of program counts, 100% and 30% of
the chunks missed. Fewer programs leave SMs to the rebuild; too few cannot keep enough PCIe
reads in flight. Times in us (median, CUDA graph).
"""
import torch
from triton.testing import do_bench_cudagraph

from shadowpass.bench import measure_peaks
from shadowpass.kernels import load_chunks
from shadowpass.reference import PrefillState
from shadowpass.templates import chunk_gather
from shadowpass.templates.chunk_gather import fetch_values_into, full_load

B, H, D, R, C, K, N = 8, 8, 128, 160, 8, 256, 16380
dev, bf = "cuda", torch.bfloat16
values = torch.empty(B, H, N, C, D, dtype=bf, pin_memory=True)
values.view(-1)[:] = 1.0
U = torch.randn(B, N * C, R, device=dev, dtype=bf)
SV = torch.randn(B, H, R, D, device=dev, dtype=bf)
cos = torch.randn(1, N * C, D // 2, device=dev, dtype=bf).expand(B, -1, -1)
sin = torch.randn_like(cos)
st = PrefillState(U=U, SV=SV, landmarks=None, selectable=None, sparse_valid=None,
                  outlier_k=None, outlier_v=None, outlier_valid=None, local_k=None, local_v=None,
                  local_valid=None, values=values, aux=None)
idx = torch.stack([torch.randperm(N, device=dev)[:K] for _ in range(B * H)]).view(B, H, K)
lc, ls, _ = full_load(idx)
sel_k = torch.empty(B, H, K * C, D, device=dev, dtype=bf)
sel_v = torch.empty_like(sel_k)
h2d = measure_peaks(lambda fn: do_bench_cudagraph(fn, rep=100), dev)[1]
print(f"{torch.cuda.get_device_name()}: pinned H2D copy {h2d / 1e9:.1f} GB/s")
print(f"{'programs':>9} {'miss':>5} {'fetch us':>9} {'GB/s':>6} {'rebuild us':>11} "
      f"{'serial us':>10} {'overlap us':>11}")
for programs in (33, 66, 132, 264, 528, 1056, 1 << 20):
    chunk_gather.FETCH_PROGRAMS = programs
    for miss in (1.0, 0.3):
        n = torch.full((B, H), round(miss * K), dtype=torch.int32, device=dev)
        mb = B * H * int(n[0, 0]) * C * D * 2 / 1e6
        tf = do_bench_cudagraph(lambda: fetch_values_into(sel_v, values, lc, ls, n), rep=100)
        tr = do_bench_cudagraph(lambda: chunk_gather.rebuild_keys_into(
            sel_k, U, SV, cos, sin, lc, ls, n, C, "rotate_half"), rep=100)
        ts, to = (do_bench_cudagraph(lambda o=o: load_chunks(
            sel_k, sel_v, st, cos, sin, lc, ls, n, C, "rotate_half", overlap=o), rep=100)
            for o in (False, True))
        print(f"{programs:>9} {miss:>5.0%} {tf * 1e3:>9.1f} {mb / tf:>6.1f} {tr * 1e3:>11.1f} "
              f"{ts * 1e3:>10.1f} {to * 1e3:>11.1f}")

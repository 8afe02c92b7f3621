"""Zero-copy value fetch bandwidth by host buffer kind, footprint, launch size and neighbouring
HBM traffic.

    python scripts/fetch_hostmem.py      # GPU machine

The end-to-end 122K step fetched at 76-80% of the pinned copy peak while the kernel benchmark
reaches 91%. The two differ in how the host store was allocated (torch's cudaHostAlloc there,
mmap + cudaHostRegister in shadowpass.hostmem here), in its size (one layer there, every layer
here), in the launch size (the whole batch there, batch slices here) and in what runs beside
the fetch (nothing there, the other lane's GEMMs here). Each row changes one of these at the
shape of one 122K lane (5 sequences, 8 KV heads, budget 2048, every chunk missed).

H100, 2026-12-06 (results/h100/lanes_parts/fetch_hostmem.txt; H2D copy 55.5 GB/s): 419-421 us
whatever the allocation, 416-418 us over one store or 24 (28 GiB), 417-421 us from 64 to 264
programs; beside GEMMs 466 against 449 us; in slices of 1, 2 and 3 sequences 1256, 644 and
428 us. Only the launch size matters: hence ``kernels.LANE_PARTS`` = 1.
"""
import os

import torch
from triton.testing import do_bench

from shadowpass.bench import measure_peaks
from shadowpass.hostmem import pinned_empty
from shadowpass.templates.chunk_gather import fetch_values_into, full_load

B, H, D, C, K, N = 5, 8, 128, 8, 256, 15344
LAYERS = 24
dev, bf = "cuda", torch.bfloat16
SHAPE = (B, H, N, C, D)
NBYTES = B * H * N * C * D * 2


def main():
    groups = "/sys/kernel/iommu_groups"
    print(f"{torch.cuda.get_device_name()}; IOMMU groups: "
          f"{len(os.listdir(groups)) if os.path.isdir(groups) else 'none'}")
    os.system("nvidia-smi --query-gpu=pcie.link.gen.current,pcie.link.width.current --format=csv")
    hbm, h2d = measure_peaks(lambda fn: do_bench(fn, rep=200), dev)
    print(f"HBM copy {hbm / 1e9:.0f} GB/s, pinned H2D copy {h2d / 1e9:.1f} GB/s; "
          f"one layer's store {NBYTES / 2**30:.2f} GiB")

    idx = torch.stack([torch.randperm(N, device=dev)[:K] for _ in range(B * H)]).view(B, H, K)
    lc, ls, nl = full_load(idx)
    out = torch.empty(B, H, K * C, D, device=dev, dtype=bf)
    mb = B * H * K * C * D * 2 / 1e6

    def line(name, us):
        print(f"  {name:58s} {us:8.1f} us {mb / us * 1e3:6.1f} GB/s "
              f"({mb / us * 1e12 / h2d:.0%} of H2D)", flush=True)

    def row(name, fn, reps=1):
        line(name, do_bench(fn, rep=300) * 1e3 / reps)

    torch_store = torch.empty(SHAPE, dtype=bf, pin_memory=True)
    mmap_store = pinned_empty(SHAPE, bf)
    mmap_store.copy_(torch.randn(SHAPE, device=dev, dtype=bf))
    print("one layer's store, 64 programs x 16 rows (the defaults):")
    for name, s in (("torch pin_memory (cudaHostAlloc)", torch_store),
                    ("mmap + cudaHostRegister (hostmem)", mmap_store)):
        row(name, lambda s=s: fetch_values_into(out, s, lc, ls, nl))

    print("mmap + cudaHostRegister, one launch per batch slice (kernels.PIPELINE_PARTS):")
    for rows in (1, 2, 3):
        slices = [slice(i, min(i + rows, B)) for i in range(0, B, rows)]
        row(f"{len(slices)} launches of {rows} sequence(s)", lambda sl=slices: [
            fetch_values_into(out[r], mmap_store[r], lc[r], ls[r], nl[r]) for r in sl])

    print("mmap + cudaHostRegister, tile and program count:")
    for programs, rows in ((64, 32), (64, 64), (128, 16), (132, 32), (264, 16)):
        row(f"{programs} programs x {rows} rows", lambda p=programs, r=rows: fetch_values_into(
            out, mmap_store, lc, ls, nl, block_rows=r, programs=p))

    print(f"{LAYERS} layers' stores read in turn (as a decode step does), against one repeated:")
    stores = [pinned_empty(SHAPE, bf) for _ in range(LAYERS)]
    row(f"{LAYERS} stores, {LAYERS * NBYTES / 2**30:.0f} GiB",
        lambda: [fetch_values_into(out, s, lc, ls, nl) for s in stores], LAYERS)
    row(f"one store {LAYERS} times",
        lambda: [fetch_values_into(out, stores[0], lc, ls, nl) for _ in stores], LAYERS)
    del stores

    print("beside weight GEMMs on another stream (batch 5 x 4096 @ 4096 x 14336, bf16):")
    w = torch.randn(14336, 4096, device=dev, dtype=bf)
    x = torch.randn(B, 4096, device=dev, dtype=bf)
    side, fetch_stream = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)
    for busy in (False, True):
        torch.cuda.synchronize()
        if busy:
            with torch.cuda.stream(side):
                for _ in range(400):
                    x @ w.T
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(fetch_stream):
            start.record()
            for _ in range(20):
                fetch_values_into(out, mmap_store, lc, ls, nl)
            end.record()
        torch.cuda.synchronize()
        line("beside GEMMs" if busy else "alone", start.elapsed_time(end) * 1e3 / 20)
    torch.testing.assert_close(out.cpu(), torch.stack([mmap_store[b, h, idx[b, h].cpu()]
                               for b in range(B) for h in range(H)]).view(B, H, K * C, D))
    print("fetched values equal the store's chunks")


if __name__ == "__main__":
    main()

"""Where the eval harness spends its time on the GPU: one batch per method at one length."""
import sys
import time

import torch

from shadowpass.eval import tasks
from shadowpass.eval.harness import Harness, build_methods
from shadowpass.eval.smollm2 import load_smollm2

B = int(sys.argv[1]) if len(sys.argv) > 1 else 25
L = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
DEV = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
for dev, dt in ((DEV, torch.float64), (DEV, torch.float32), ("cpu", torch.float64)):
    g = torch.randn(B, 192, 192, device=dev, dtype=dt)
    g = g @ g.transpose(1, 2)
    torch.linalg.eigh(g)
    sync()
    t = time.perf_counter()
    torch.linalg.eigh(g)
    sync()
    print(f"eigh {B}x192x192 {dev} {dt}: {1e3 * (time.perf_counter() - t):.1f} ms", flush=True)

model, tok = load_smollm2(DEV, torch.bfloat16 if DEV == "cuda" else torch.float32)
h = Harness(model, tok, batch_size=B)
samples = tasks.make_samples(tok, "passkey", [L], samples=B, seed=0)
idx = list(range(B))
methods = build_methods(["dense", "shadowkv", "quest", "streaming", "oracle"], [512], [30], 192)
methods.append(build_methods(["shadowkv"], [1 << 14], [192], 192)[0])
for m in methods:
    for rep in range(2):
        sync()
        t = time.perf_counter()
        toks, ran, _ = h.generate(m, samples, idx, L)
        sync()
        print(f"{m.label:28s} rep {rep}: {time.perf_counter() - t:6.2f} s sparse_ran={ran} "
              f"first={tok.decode(toks[0])!r}", flush=True)
from torch.profiler import ProfilerActivity, profile
for m in methods[1:3]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        h.generate(m, samples, idx, L)
    print(m.label, flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18), flush=True)

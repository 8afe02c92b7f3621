"""Is a ShadowKV miss on SmolLM2 caused by the key rank or by the chunk selection?

Runs the niah_single prompts at 8K that ShadowKV (budget 1024, rank 64) got wrong on the H100
(results/h100/eval_8k_grid: samples 3, 14, 25, 27 of niah_single) through dense, the oracle
selection (exact attention mass) and ShadowKV at rank 64 and full rank 192 with chunks of 8
tokens, then ShadowKV at full rank with chunks of 4 and 2 (the local window kept at 32 tokens),
all at budget 1024, in fp32 on the CPU (13 min on 2 cores). Prints each method's answers.

    SHADOWPASS_SMOLLM2_GGUF=... python scripts/selection_probe.py
"""
import time

import torch

from shadowpass.eval import tasks
from shadowpass.eval.harness import Harness, Method, build_methods
from shadowpass.eval.smollm2 import load_smollm2

model, tok = load_smollm2("cpu", torch.float32)
every = tasks.make_samples(tok, "niah_single", [8000], 50, 0, depths=[i / 10 for i in range(11)])
samples = [every[i] for i in (3, 14, 25, 27)]
print("answers", [s.answers[0] for s in samples], flush=True)
runs = [(8, [Method("dense")] + build_methods(["oracle"], [1024], [None], 192)
         + build_methods(["shadowkv"], [1024], [64, 192], 192))]
runs += [(C, build_methods(["shadowkv"], [1024], [192], 192, chunk_size=C)) for C in (4, 2)]
for C, methods in runs:
    h = Harness(model, tok, batch_size=len(samples), chunk_size=C, local_chunks=32 // C)
    for m in methods:
        t = time.perf_counter()
        toks, _, _ = h.generate(m, samples, list(range(len(samples))), 8000)
        print(f"chunk {C} {m.label:22s} {time.perf_counter() - t:5.0f} s",
              [tok.decode(x)[:12] for x in toks], flush=True)
    torch._dynamo.reset()  # the next Harness compiles the model again

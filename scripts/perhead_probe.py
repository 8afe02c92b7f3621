"""Greedy answers of methods on chosen 8K niah_single prompts (SmolLM2, fp32, CPU, batch of all).

    SHADOWPASS_SMOLLM2_GGUF=... python scripts/perhead_probe.py METHOD[,METHOD] RANK SAMPLE...

RANK: 0 for the default (5/32 of H_kv*d = 30). Samples index
tasks.make_samples(tok, "niah_single", [8000], 50, 0, depths=[i/10 for i in range(11)]);
3, 14, 25, 27 are the ones plain ShadowKV at budget 1024 misses (issue 5).
"""
import sys
import time

import torch

from shadowpass.eval import tasks
from shadowpass.eval.harness import Harness, build_methods
from shadowpass.eval.smollm2 import load_smollm2

names, rank, picks = sys.argv[1].split(","), int(sys.argv[2]) or None, [int(a) for a in sys.argv[3:]]
model, tok = load_smollm2("cpu", torch.float32)
every = tasks.make_samples(tok, "niah_single", [8000], 50, 0, depths=[i / 10 for i in range(11)])
samples = [every[i] for i in picks]
print("samples", picks, "answers", [s.answers[0] for s in samples], flush=True)
h = Harness(model, tok, batch_size=len(samples), chunk_size=8, local_chunks=4)
with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
    for m in build_methods(names, [1024], [rank], 192):
        t = time.perf_counter()
        toks, ran, _ = h.generate(m, samples, list(range(len(samples))), 8000)
        got = [tok.decode(x, skip_special_tokens=True).strip()[:12] for x in toks]
        ok = sum(s.answers[0] in g for s, g in zip(samples, got))
        print(f"{m.label:26s} sparse_ran={ran} {time.perf_counter() - t:5.0f} s  {ok}/{len(samples)}",
              got, flush=True)

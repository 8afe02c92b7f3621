"""How many more of a step's selected chunks would a GPU value cache larger than the selection
find on the GPU, on a real model?

The decode step keeps the previous step's K selected chunks (their rebuilt keys and fetched
values) and fetches only the new ones: at 128K and batch 8 the 31% missed values are most of the
step's bytes (benchmarks/kernels.py: "bytes: landmarks, then misses"), and that benchmark's 69%
hit rate comes from synthetic queries. This probe measures the hit rate of real selections:
SmolLM2 in fp32 on the CPU reads the first PROMPT tokens of issue 5's 8K niah_single prompts
over the Paul Graham essay haystack (or the repeated-sentence one), then is teacher-forced
through the next STEPS tokens of the same text (real decoding queries, no sampling). For every
layer and KV head, each decode step selects the top-K chunks by landmark score
(``reference.select_chunks``, outliers and the local window excluded, as a step does), and the
selections are replayed against a value cache of capacity c * K chunks
with least-recently-selected eviction, and with the eviction ``ShadowKVConfig.chunk_cache``
does (the unselected chunks that score lowest at this step first): c = 1 is the paper's
workspace (hits = chunks selected at the previous step too).

Then, with the peaks, kernel times and step shape of the 128K batch-8 benchmark
(results/h100/warps_topk/kernels_128k_b1_b8.txt), for each c: the bound on the step's bytes
(landmarks at HBM speed, then the misses at PCIe speed), and the sum of today's serial kernels
(scores, top-k, the misses at the fetch's measured speed, attention, reuse plan), which at that
run's 69% hits gives 422 us against the 459.3 us measured.

    SHADOWPASS_SMOLLM2_GGUF=... python scripts/value_cache_hits.py [--budgets 256 512 1024]
"""
from __future__ import annotations

import argparse

from shadowpass import reference as ref
from shadowpass.eval import tasks

from cache_replay import cache_hits, score_cache_hits
from niah_probe import scale, teacher_forced_layers, tok  # loads SmolLM2 (scripts/niah_probe.py)

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
ap.add_argument("--capacities", type=float, nargs="+", default=[1, 1.25, 1.5, 2, 3, 4])
ap.add_argument("--prompt", type=int, default=6000, help="prompt tokens")
ap.add_argument("--steps", type=int, default=64, help="teacher-forced decode steps")
ap.add_argument("--samples", type=int, default=3, help="prompts, each from its own seeded start")
ap.add_argument("--haystack", choices=tasks.HAYSTACKS, default="essay")
args = ap.parse_args()
prompts = tasks.make_samples(tok, "niah_single", [8000], args.samples, 0, haystack=args.haystack)
C, LOCAL_CHUNKS = 8, 4


rates = {(b, c): [] for b in args.budgets for c in args.capacities}
by_score = {key: [] for key in rates}
for budget, qs, st, _ in teacher_forced_layers(prompts, args.prompt, args.steps, args.budgets,
                                               C, LOCAL_CHUNKS):
    H, K = st.landmarks.shape[1], min(budget // C, st.landmarks.shape[2])
    scored = [ref.score_chunks(qs[:, :, s:s + 1], st.landmarks, st.selectable, scale)
              for s in range(args.steps)]
    per_step = [ref.select_chunks(s, st.selectable, K)[0][0] for s in scored]
    for h in range(H):
        sels = [set(p[h].tolist()) for p in per_step]
        head_scores = [s[0, h].tolist() for s in scored]
        for c in args.capacities:
            rates[(budget, c)].append(cache_hits(sels, round(c * K)))
            by_score[(budget, c)].append(score_cache_hits(sels, head_scores, round(c * K)))

# the 128K batch-8 step of benchmarks/kernels.py: 8 KV heads, d 128, bf16, K = 256 chunks of 8,
# N = 16380 landmarks a head; peaks of results/h100/warps_topk/kernels_128k_b1_b8.txt
B, H, D, EB, K128, N128 = 8, 8, 128, 2, 256, 16380
HBM, H2D, DENSE_US = 3025e9, 55.5e9, 1340.7
SCORES_US, TOPK_US, FETCH_OF_H2D, ATTN_US, PLAN_US = 113.7, 59.5, 0.91, 40.1, 2.7
landmark_us = B * H * N128 * D * EB / HBM * 1e6
hit = {key: sum(r) / len(r) for key, r in rates.items()}
print(f"\nSmolLM2-135M, {args.haystack} haystack, prompt {args.prompt} tokens, {args.steps} "
      f"teacher-forced steps, {args.samples} prompts, chunks of {C}; hit rate = mean over layers "
      "and KV heads")


def table(cell):
    """One row per budget, one column per capacity: cell(budget, c)."""
    print("budget  " + "  ".join(f"c={c:<5}" for c in args.capacities))
    for budget in args.budgets:
        print(f"{budget:>6}  " + "  ".join(f"{cell(budget, c):<7}" for c in args.capacities))


def miss_bytes(budget, c):
    return B * H * K128 * (1 - hit[(budget, c)]) * C * D * EB


table(lambda b, c: f"{hit[(b, c)]:7.1%}")
print("the same with the lowest-scoring unselected chunks evicted first (no state beyond the cache):")
table(lambda b, c: f"{sum(by_score[(b, c)]) / len(by_score[(b, c)]):7.1%}")
print(f"\n128K batch 8 byte bound (landmarks {landmark_us:.0f} us at HBM, then misses at H2D; "
      f"dense {DENSE_US} us), using each budget's hit rates:")
table(lambda b, c: f"{DENSE_US / (landmark_us + miss_bytes(b, c) / H2D * 1e6):5.1f}x")
print("the same with today's serial kernels (scores, top-k, fetch at 91% of H2D, attention, plan):")


def kernels_us(budget, c):
    fetch_us = miss_bytes(budget, c) / (H2D * FETCH_OF_H2D) * 1e6
    return SCORES_US + TOPK_US + fetch_us + ATTN_US + PLAN_US


table(lambda b, c: f"{DENSE_US / kernels_us(b, c):5.1f}x")

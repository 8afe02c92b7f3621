"""How often do the kernel benchmark's synthetic decode queries find their chunks on the GPU?

benchmarks/kernels.py times the whole step over a closed walk of queries around one query
(``query_walk``: WALK steps, noise SIGMA, AR(1) coefficient RHO) at the Llama-3.1-8B layer shape.
This replays one sequence's selections of that walk on the CPU (random landmarks as the
benchmark's, landmark scores of ``shadowpass.reference``, top-K) through a chunk cache of c * K
chunks with the eviction of ``ShadowKVConfig.chunk_cache`` (scripts/cache_replay.py), over the
walk's second lap as the benchmark counts, for a grid of SIGMA and RHO. The benchmark's values
were picked so that c = 1 and c = 4 come close to SmolLM2's real selections at budget 256
(scripts/value_cache_hits.py).

    python scripts/query_walk_hits.py [--sigmas 0.4 0.45 0.5] [--rhos 0.75 0.8 0.85]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from shadowpass import reference as ref

from cache_replay import score_cache_hits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from kernels import BUDGET, C, D, G, H, LOCAL, WALK, WALK_RHO, WALK_SIGMA, query_walk  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--context", type=int, default=131072)
ap.add_argument("--sigmas", type=float, nargs="+", default=[WALK_SIGMA])
ap.add_argument("--rhos", type=float, nargs="+", default=[WALK_RHO])
ap.add_argument("--caches", type=int, nargs="+", default=[1, 2, 4])
args = ap.parse_args()

torch.manual_seed(0)
N, K = args.context // C - LOCAL // C, BUDGET // C
landmarks = torch.randn(1, H, N, D)
selectable = torch.ones(1, H, N, dtype=torch.bool)
q = torch.randn(1, H * G, 1, D)
print(f"context {args.context}: {N} chunks a head, K = {K}, {H} KV heads x {G} queries, "
      f"walk of {WALK} steps; hits over its second lap")
for sigma in args.sigmas:
    for rho in args.rhos:
        walk = query_walk(q, WALK, sigma, rho, torch.Generator().manual_seed(1))
        scores = [ref.score_chunks(w, landmarks, selectable, D ** -0.5)[0] for w in walk]
        picks = [s.topk(K, dim=-1).indices for s in scores]
        hits = {c: sum(score_cache_hits([set(p[h].tolist()) for p in picks] * 2,
                                        [s[h].tolist() for s in scores] * 2, c * K, WALK)
                       for h in range(H)) / H for c in args.caches}
        print(f"sigma {sigma:<5} rho {rho:<5} " + "  ".join(f"c={c} {v:6.1%}" for c, v in
                                                          hits.items()), flush=True)

"""Replays of chunk selections through a GPU chunk cache of a given capacity (the decode
workspace with ``ShadowKVConfig.chunk_cache``), for the probes scripts/value_cache_hits.py (real
selections) and scripts/query_walk_hits.py (the kernel benchmark's synthetic ones)."""
from __future__ import annotations

from collections import OrderedDict


def cache_hits(selections: list, capacity: int) -> float:
    """Share of selected chunks found in an LRU cache of `capacity` chunks, over steps 2..n (the
    first step fills the cache from nothing)."""
    cache: OrderedDict = OrderedDict()
    hits = total = 0
    for t, sel in enumerate(selections):
        if t:
            hits += sum(c in cache for c in sel)
            total += len(sel)
        for c in sel:
            cache.pop(c, None)
            cache[c] = True
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / max(total, 1)


def score_cache_hits(selections: list, scores: list, capacity: int, warmup: int = 1) -> float:
    """The same with the eviction a decode step can do without state of its own: the held
    chunks not selected now that score lowest at this step go first. Counts steps from
    `warmup` on."""
    cache: set = set()
    hits = total = 0
    for t, (sel, s) in enumerate(zip(selections, scores)):
        if t >= warmup:
            hits += len(sel & cache)
            total += len(sel)
        cache |= sel
        spare = sorted(cache - sel, key=lambda c: s[c])
        cache -= set(spare[:max(len(cache) - capacity, 0)])
    return hits / max(total, 1)

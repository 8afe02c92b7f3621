"""Batch lanes: a decode step run as several sub-batches interleaved site by site.

A ShadowKV site's value fetch cannot start before its own top-k, and the next layer cannot start
before the fetch ends, so on one batch the GPU's compute and the PCIe fetch take turns (122K,
batch 10 on an H200: 29.7 ms of fetch plus ~17 ms of other work in a 46 ms step). Lanes cut the
batch in parts and run the model once per part, each part in its own thread; at every site, after
launching its fetch and before waiting for it, a lane hands the GPU stream to the next lane
(``handoff``). The stream then holds lane 1's layer-L compute while lane 0's layer-L fetch crosses
PCIe, and all fetches queue on one side stream in turn, so they never compete.

Only one lane runs Python at a time (a baton), so the stream order, and a CUDA graph captured
from it, is fixed: lane 0 to its first site, lane 1 to its first site, lane 0 to its second,
and so on. The cost: the weight GEMMs run once per lane.
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence

import torch

_LOCAL = threading.local()
_POOL: List[ThreadPoolExecutor] = []  # persistent lane threads: their cuBLAS handles persist too


class Baton:
    """Which lane may run: one at a time, handed on in a cycle over the lanes not finished."""

    def __init__(self, lanes: int):
        self.cond = threading.Condition()
        self.turn = 0
        self.done = [False] * lanes

    def _next(self, lane: int) -> int:
        n = len(self.done)
        for j in range(1, n + 1):
            other = (lane + j) % n
            if not self.done[other]:
                return other
        return lane

    def wait(self, lane: int):
        with self.cond:
            self.cond.wait_for(lambda: self.turn == lane)

    def pass_on(self, lane: int):
        with self.cond:
            self.turn = self._next(lane)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == lane)

    def finish(self, lane: int):
        with self.cond:
            self.done[lane] = True
            self.turn = self._next(lane)
            self.cond.notify_all()


def handoff():
    """Called by a site's step once its fetch is launched, before it waits for it: the next lane
    runs up to its own fetch meanwhile. Outside lanes, nothing."""
    baton = getattr(_LOCAL, "baton", None)
    if baton is not None:
        baton.pass_on(_LOCAL.lane)


def in_lane() -> bool:
    return getattr(_LOCAL, "baton", None) is not None


def run(calls: Sequence[Callable[[], object]]) -> list:
    """Run calls[i]() as lane i (lane 0 in this thread) and return their results. Each thread
    takes this thread's grad mode, inference mode and CUDA stream (a CUDA graph being captured
    records every lane's work)."""
    n = len(calls)
    baton = Baton(n)
    results, errors = [None] * n, [None] * n
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    stream = torch.cuda.current_stream() if torch.cuda.is_available() else None

    def lane(i: int):
        _LOCAL.baton, _LOCAL.lane = baton, i
        try:
            baton.wait(i)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                    (torch.cuda.stream(stream) if stream is not None and i else nullcontext()):
                results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            errors[i] = e
        finally:
            _LOCAL.baton = None
            baton.finish(i)

    while len(_POOL) < n - 1:
        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix=f"shadowpass-lane{len(_POOL) + 1}"))
    futures = [_POOL[i - 1].submit(lane, i) for i in range(1, n)]
    lane(0)
    for f in futures:
        f.result()
    for e in errors:
        if e is not None:
            raise e
    return results


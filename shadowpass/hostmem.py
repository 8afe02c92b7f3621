"""Host memory for the value store: how much is left, and exact-size page-locked buffers.

``torch.empty(..., pin_memory=True)`` goes through the caching host allocator, which rounds each
block up to a power of two: a 2.1 GiB value store would lock 4 GiB, and the OOM killer, not a
clear error, ends the run. Here large buffers are anonymous mappings registered with CUDA at
their exact size. When the last view of one dies, it goes back to a pool and a later request of
about the same size (the next prompt of a batch of equal-length prompts) reuses it, since
locking pages costs about 0.5 s per GiB. ``release_cached()`` unlocks the pool.

Imports nothing beyond torch and the standard library.
"""
from __future__ import annotations

import math
import mmap
import weakref
from typing import Dict, List, Optional, Tuple

import torch

SMALL = 1 << 24     # below this the caching allocator's rounding costs little
REUSE_SLACK = 8     # a pooled buffer serves requests down to 1 - 1/8 of its size

_locked: Dict[int, int] = {}                      # base address -> bytes, every registered buffer
_pool: List[Tuple[int, mmap.mmap, int]] = []     # (bytes, mapping, address) free for reuse


def host_bytes_available() -> int:
    """Host memory that can still be allocated: Linux MemAvailable, capped by the cgroup's
    limit (in a container the OOM killer acts on the cgroup), plus this module's pool (free
    for reuse). Else psutil if present."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            import psutil
            available = psutil.virtual_memory().available
        except ImportError:
            return 1 << 62  # unknown: do not block
    cgroup = _cgroup_bytes_left()
    available = available if cgroup is None else min(available, cgroup)
    return available + sum(n for n, _, _ in _pool)


def _cgroup_bytes_left(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Limit minus usage of this process's cgroup (v2, else v1); None when unlimited/unknown."""
    for limit, usage in ((f"{root}/memory.max", f"{root}/memory.current"),
                         (f"{root}/memory/memory.limit_in_bytes",
                          f"{root}/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                lim = f.read().strip()
            with open(usage) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if lim == "max" or int(lim) >= 1 << 60:
            return None
        return max(int(lim) - used + _cgroup_reclaimable(limit), 0)
    return None


def _cgroup_reclaimable(limit_path: str) -> int:
    """The cgroup's inactive page cache, which its usage counts but the kernel can drop."""
    stat = limit_path.rsplit("/", 1)[0] + "/memory.stat"
    try:
        with open(stat) as f:
            for line in f:
                key, value = line.split()
                if key in ("inactive_file", "total_inactive_file"):
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def check_host_memory(per_site: int, sites_left: int, pinned: bool, B: int, T: int):
    """Raise before allocating the host value store if the remaining sites cannot fit."""
    need = per_site * sites_left
    available = host_bytes_available()
    if need > 0.9 * available:
        gib = 1 << 30
        kind = "pinned host" if pinned else "host"
        raise MemoryError(
            f"shadowkv: the values of this batch ({B} sequences x {T} prompt tokens) need "
            f"{need / gib:.2f} GiB of {kind} memory for {sites_left} more attention layers "
            f"({per_site / gib:.3f} GiB each), but only {available / gib:.2f} GiB is available. "
            f"Reduce the batch size or the prompt / max length, or free host memory.")


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized page-locked host tensor of exactly its size, readable by the GPU."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < SMALL:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    fits = [e for e in _pool if nbytes <= e[0] <= nbytes + nbytes // REUSE_SLACK]
    if fits:
        entry = min(fits, key=lambda e: e[0])
        _pool.remove(entry)
        size, region, address = entry
    else:  # a miss means the sizes changed: unlock what is pooled before locking more
        release_cached()
        size, region = nbytes, mmap.mmap(-1, nbytes)
        address = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(address, size, 0)
        if err != cudart.cudaError.success:
            raise MemoryError(f"shadowkv: cannot page-lock {size / (1 << 30):.2f} GiB of host "
                              f"memory for the value store ({err}); reduce the batch size or "
                              "the prompt length")
        _locked[address] = size
    view = memoryview(region)[:nbytes]
    weakref.finalize(view, _pool.append, (size, region, address))  # back to the pool
    storage = torch.frombuffer(view, dtype=torch.uint8).untyped_storage()
    # a base tensor, not a view: custom ops copy outputs that are views of other tensors
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def release_cached():
    """Unlock and unmap the pooled buffers (those no tensor uses)."""
    cudart = torch.cuda.cudart() if _pool else None
    while _pool:
        _, region, address = _pool.pop()
        cudart.cudaHostUnregister(address)
        _locked.pop(address, None)
        region.close()


def is_pinned(t: torch.Tensor) -> bool:
    """Page-locked host memory, including this module's buffers (which torch's is_pinned does
    not recognize, since its caching allocator did not make them)."""
    if isinstance(t, torch._subclasses.FakeTensor):  # while torch.compile traces: no memory
        return False
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # other tensors without storage (functional wrappers while tracing)
        return False
    if ptr in _locked or any(base <= ptr < base + size for base, size in _locked.items()):
        return True  # checked first: decode steps ask this every step, t.is_pinned() asks CUDA
    return t.is_pinned()

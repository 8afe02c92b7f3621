"""Sources of the Inductor templates for ``shadowkv::sparse_attention`` (no Inductor imports).

Flash-decoding in two kernels, as ``sparse_decode`` (same segments, same online softmax, same
``_attend`` step), written with Inductor's template hooks (``def_kernel``, ``size``, ``stride``,
``store_output``) so they read every input through its strides and Inductor places them in its
generated code:

- ``sparse_attention.py.jinja``: the split kernel, partial outputs per split of the key axis;
- ``sparse_attention_combine.py.jinja``: their merge, whose ``store_output`` takes the
  consumer's pointwise epilogue (a cast, a scale, ...) fused by Inductor.

Sub notation and constexprs: see the block at the top of each ``.jinja`` file. The split
source is followed by the ``@triton.jit`` helpers it calls (``templates.sparse_decode._attend``
and ``_selected_valid``, ``templates.common.dot``), copied from their definitions so both
kernels share one inner step.
"""
from __future__ import annotations

import functools

from . import common, sparse_decode

__all__ = ["COMBINE_MARKER", "SPLIT_MARKER", "Config", "combine_source", "configs",
           "split_source"]

# Names only our templates' generated code contains (tests look for them in Inductor's output).
SPLIT_MARKER = "shadowkv_sparse_attention_split"
COMBINE_MARKER = "shadowkv_sparse_attention_combine"


@functools.lru_cache(maxsize=None)
def split_source() -> str:
    """The split kernel's template: the Jinja kernel, then the helpers it calls."""
    return common.template_source("sparse_attention.py.jinja", common.dot, sparse_decode._attend,
                                  sparse_decode._selected_valid)


@functools.lru_cache(maxsize=None)
def combine_source() -> str:
    """The merge kernel's template."""
    return common.template_source("sparse_attention_combine.py.jinja")


class Config:
    """One autotuning choice of the split kernel: keys per step, warps and pipeline stages."""

    __slots__ = ("block_n", "num_warps", "num_stages")

    def __init__(self, block_n: int, num_warps: int, num_stages: int):
        self.block_n, self.num_warps, self.num_stages = block_n, num_warps, num_stages

    def __repr__(self):
        return f"Config(BLOCK_N={self.block_n}, num_warps={self.num_warps}, num_stages={self.num_stages})"


# (BLOCK_N, num_warps, num_stages) for sm_90 (H100/H200: 228 KB shared memory, 64K registers
# per SM). ptxas's resource report of the generated kernels (Llama-8B layer, G = 4, d = 128,
# 16-byte aligned arguments as on a GPU; scripts/compile_kernels.py --inductor-kernels): with
# 16-bit data 32 keys x 4 warps x 3 stages uses 72 registers, 64 x 4 112, 64 x 8 86, 128 x 8
# 158, and one warp 255 with 16 bytes spilled; 32-bit data (G = 1, d = 64) spills nowhere.
# The quick three are the best of scripts/attention_configs.py and attention_variants.py at
# 128K, batch 8 (H100, 2026-12-07, results/h100/attention_probe/): 32 x 4 x 3 (1.31x SDPA
# over a compact buffer), 64 x 4 x 2 (1.39x) and 32 x 1 x 3 (one warp: the probe's loop with
# each block's validity loaded a step ahead, as both kernels now do, at 1.09x).
_QUICK = {2: [(32, 4, 3), (32, 1, 3), (64, 4, 2)], 4: [(32, 8, 2), (32, 4, 2)]}
_MORE = {2: [(32, 4, 2), (32, 2, 3), (64, 8, 3), (128, 8, 3), (16, 4, 2)],
         4: [(64, 8, 2), (16, 4, 2)]}
SHARED_BYTES = 200 * 1024  # below sm_90's 227 KB per block, with room for the compiler's own


def configs(head_dim: int, m_pad: int, elem_bytes: int, max_autotune: bool) -> list[Config]:
    """Autotuning choices of the split kernel: three without max-autotune, all with it.

    The loop is load-bound (a decode step reads each key once): more keys per step and more
    warps hide latency until registers spill. Pruned: score tiles [M_PAD, BLOCK_N] above 4096
    elements (many query rows per KV head) and pipelines whose K/V tiles
    (num_stages - 1) * 2 * BLOCK_N * d * elem_bytes exceed SHARED_BYTES.
    """
    size = 2 if elem_bytes <= 2 else 4
    table = _QUICK[size] + (_MORE[size] if max_autotune else [])
    keep = [Config(n, w, st) for n, w, st in table
            if m_pad * n <= 4096 and (st - 1) * 2 * n * head_dim * elem_bytes <= SHARED_BYTES]
    return keep or [Config(16, 4, 1)]

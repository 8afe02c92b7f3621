"""Sources of the Inductor templates for ``shadowkv::sparse_attention`` (no Inductor imports).

Flash-decoding in two kernels, as ``sparse_decode`` (same segments, same online softmax, same
``_attend`` step), written with Inductor's template hooks (``def_kernel``, ``size``, ``stride``,
``store_output``) so they read every input through its strides and Inductor places them in its
generated code:

- ``sparse_attention.py.jinja``: the split kernel, partial outputs per split of the key axis;
- ``sparse_attention_combine.py.jinja``: their merge, whose ``store_output`` takes the
  consumer's pointwise epilogue (a cast, a scale, ...) fused by Inductor.

Sub notation and constexprs: see the block at the top of each ``.jinja`` file. The split
source is followed by the ``@triton.jit`` helpers it calls (``templates.sparse_decode._attend``,
``templates.common.dot``), copied from their definitions so both kernels share one inner step.
"""
from __future__ import annotations

import functools
import inspect
import textwrap
from pathlib import Path

from . import common, sparse_decode

__all__ = ["COMBINE_MARKER", "SPLIT_MARKER", "Config", "combine_source", "configs",
           "split_source"]

# Names only our templates' generated code contains (tests look for them in Inductor's output).
SPLIT_MARKER = "shadowkv_sparse_attention_split"
COMBINE_MARKER = "shadowkv_sparse_attention_combine"

_HERE = Path(__file__).parent


def _jit_source(fn) -> str:
    """Source of a @triton.jit function, decorator included, without its module's indentation."""
    inner = getattr(fn, "fn", fn)  # JITFunction / InterpretedFunction keep the Python function
    return "@triton.jit\n" + textwrap.dedent(inspect.getsource(inner)).split("\n", 1)[1]


@functools.lru_cache(maxsize=None)
def split_source() -> str:
    """The split kernel's template: the Jinja kernel, then the helpers it calls."""
    helpers = [_jit_source(common.dot), _jit_source(sparse_decode._attend)]
    return (_HERE / "sparse_attention.py.jinja").read_text() + "\n\n" + "\n\n".join(helpers)


@functools.lru_cache(maxsize=None)
def combine_source() -> str:
    """The merge kernel's template."""
    return (_HERE / "sparse_attention_combine.py.jinja").read_text()


class Config:
    """One autotuning choice of the template: keys per step, warps and pipeline stages."""

    __slots__ = ("block_n", "num_warps", "num_stages")

    def __init__(self, block_n: int, num_warps: int, num_stages: int):
        self.block_n, self.num_warps, self.num_stages = block_n, num_warps, num_stages

    def __repr__(self):
        return f"Config(BLOCK_N={self.block_n}, num_warps={self.num_warps}, num_stages={self.num_stages})"


def configs(head_dim: int, m_pad: int, max_autotune: bool) -> list[Config]:
    """Autotuning choices for H100/H200 (sm_90, 228 KB shared memory, 64K registers per SM).

    The split program holds q [M_PAD, D] and the accumulator [M_PAD, D] in registers and
    streams K/V tiles of [BLOCK_N, D]; the loop is load-bound (a decode step reads each key
    once), so more keys per step and more warps hide latency until registers spill. Pruned:
    tiles whose fp32 scores [M_PAD, BLOCK_N] plus accumulator exceed what 8 warps hold
    without spilling (an estimate of 256 fp32 values per thread). Without max-autotune: three
    choices (32 keys at 4 warps, the hand-tuned setting of ``sparse_decode``; 64 at 4; 128 at
    8), so a compile benchmarks three kernels per shape; with it, every unpruned one.
    """
    grid = [(32, 4, 2), (64, 4, 2), (64, 8, 3), (128, 8, 3), (128, 4, 2), (32, 8, 2)]
    keep = []
    for block_n, warps, stages in grid:
        per_thread = (m_pad * block_n + m_pad * head_dim + 2 * block_n * head_dim) / (32 * warps)
        if per_thread > 256:
            continue
        keep.append(Config(block_n, warps, stages))
    if not keep:  # very large heads: the smallest tile, whatever it spills
        keep = [Config(16, 8, 2)]
    if max_autotune:
        return keep
    quick = [c for c in keep if (c.block_n, c.num_warps) in ((32, 4), (64, 4), (128, 8))]
    return quick or keep[:2]

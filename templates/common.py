"""Small pieces shared by the ShadowKV Triton kernels (no Inductor imports here).

Sub notation:
    UPCAST: constexpr bool; True under the Triton interpreter, whose bf16 ``tl.dot`` returns
        garbage (seen with triton 3.9 on CPU), so operands are widened to fp32 first. On a GPU it
        is False and bf16/fp16 operands go to the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import inspect
import os
import textwrap
from pathlib import Path

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "as_bytes", "dot", "is_fake", "jit_source", "launch", "next_pow2",
           "template_source"]

# Read at import: the interpreter is chosen per process by this variable, as Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """a [M, K] @ b [K, N] with fp32 accumulation; fp32 operands use exact (IEEE) products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        # input_precision only affects fp32 operands: no TF32 rounding of fp32 models' keys.
        return tl.dot(a, b, input_precision="ieee")


def launch(kernel):
    """The kernel wrapped so that ``torch.library.triton_op`` bodies let Inductor see into it.

    ``wrap_triton`` calls the kernel directly in eager mode, so one launch path serves both.
    """
    return torch.library.wrap_triton(kernel)


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def is_fake(t: torch.Tensor) -> bool:
    """True for the FakeTensors that torch.compile traces with (no data, no pinned state)."""
    return isinstance(t, torch._subclasses.FakeTensor)


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (one byte per element), so kernels load it as integers.

    A real tensor is viewed, not copied: each copy is a kernel of its own, and a decode step
    made 5 per layer and batch slice (~650 small kernels a step at 32 layers and 4 slices). A
    traced one is copied: Inductor 2.11 cannot lower a bool -> uint8 view ("torch.bool is not
    supported by torch.iinfo").
    """
    if mask.dtype != torch.bool:
        return mask
    if type(mask) is torch.Tensor and not torch.compiler.is_compiling():
        return mask.view(torch.uint8)
    return mask.to(torch.uint8)


def jit_source(fn) -> str:
    """Source of a @triton.jit function, decorator included, without its module's indentation
    (an Inductor template's source carries the helpers its kernel calls)."""
    inner = getattr(fn, "fn", fn)  # JITFunction / InterpretedFunction keep the Python function
    return "@triton.jit\n" + textwrap.dedent(inspect.getsource(inner)).split("\n", 1)[1]


def template_source(name: str, *helpers) -> str:
    """An Inductor template's source: the Jinja kernel ``name`` (beside this module), then the
    ``@triton.jit`` helpers it calls."""
    kernel = (Path(__file__).parent / name).read_text()
    return "\n\n".join([kernel, *(jit_source(h) for h in helpers)])

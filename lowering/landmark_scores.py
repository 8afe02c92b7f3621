"""Inductor lowering of ``shadowkv::landmark_scores``: IR logic only (the kernel sources are
``templates/landmark_logits.py.jinja`` and ``templates/landmark_softmax.py.jinja``).

On a device Inductor emits Triton for (CUDA; or a CPU with ``cpu_backend="triton"``, which the
CPU tests use under the Triton interpreter), the op lowers to the two passes of
``templates.landmark_scores`` as templates:

1. logits: masked q . landmark logits [B, H, M, N] (its store_output) and per-block softmax
   statistics BMAX, BSUM [B, H, M, NB] (mutated buffers);
2. softmax: scores [B, H, N] fp32 through its store_output, which ``torch.topk`` reads.

Both read contiguous inputs (q is a few KB a step; the landmarks and masks are state buffers
that are contiguous already). Inductor autotunes the logits pass over warps and pipeline
stages (``templates.landmark_scores.LOGITS_CONFIGS``, more with max-autotune); the chunk block
is fixed (``block_chunks``, chosen on the GPU) since it sizes the statistics buffers. The
softmax pass reads 1/16 of the bytes and has one configuration, the direct launch's. Anywhere
else the op stays an opaque call: the reference on the CPU, the same kernels launched directly
on CUDA.
"""
from __future__ import annotations

from typing import Optional

import torch

from shadowpass.templates import landmark_scores as tmpl
from shadowpass.templates.common import next_pow2
from shadowpass.templates.landmark_scores import LOG2E

from . import compat

LOGITS_NAME = tmpl.LOGITS_MARKER
SOFTMAX_NAME = tmpl.SOFTMAX_MARKER
MAX_ROWS = 128  # G * T query rows per KV head that one program holds
_STATE = {"enabled": True, "warned": set()}


@compat.symbolic_grid
def grid(batch, kv_heads, chunks, meta, *, cdiv):
    """(NB, B * H, 1): one program per block of chunks of each (sequence, KV head)."""
    return (cdiv(chunks, meta["BLOCK_N"]), batch * kv_heads, 1)


LOGITS = compat.make_template(name=LOGITS_NAME, grid=grid, source=tmpl.logits_source())
SOFTMAX = compat.make_template(name=SOFTMAX_NAME, grid=grid, source=tmpl.softmax_source())


def enable(template: bool = True) -> None:
    """Use the templates where they apply (default), or always the opaque op."""
    _STATE["enabled"] = template


def why_not_template(q, landmarks) -> Optional[str]:
    """None if the templates can lower this call, else the reason they cannot."""
    why = (compat.why_not_lowered("landmark_scores", _STATE["enabled"], q.get_device())
           or compat.gqa_reason(q, landmarks.get_size()[1], MAX_ROWS))
    if why is not None:
        return why
    if landmarks.get_dtype() not in (torch.float32, torch.float16, torch.bfloat16,
                                     torch.float8_e4m3fn):
        return f"landmark dtype {landmarks.get_dtype()}"
    return None


def _template(q, landmarks, selectable, scale, radius):
    contiguous = [compat.contiguous(x) for x in (q, landmarks, selectable)]
    if radius is not None:
        radius = compat.contiguous(radius)
    q, landmarks, selectable = contiguous
    device = landmarks.get_device()
    B, Hq, T, d = q.get_size()
    _, H, N, _ = landmarks.get_size()
    Hq, H, T, d = (compat.guard_int(x) for x in (Hq, H, T, d))
    G = Hq // H
    M = G * T
    block_n = tmpl.block_chunks(landmarks.get_dtype().itemsize)
    NB = compat.ceildiv(N, block_n)
    bmax = compat.realize_frozen(compat.empty([B, H, M, NB], torch.float32, device))
    bsum = compat.realize_frozen(compat.empty([B, H, M, NB], torch.float32, device))

    inputs = [q, landmarks] + ([radius] if radius is not None else []) + [selectable, bmax, bsum]
    logits_layout = compat.fixed_layout(device, torch.float32, [B, H, M, N])
    choices: list = []
    errors = []
    configs = tmpl.LOGITS_CONFIGS + (tmpl.LOGITS_CONFIGS_MORE if compat.max_autotune() else [])
    for num_warps, num_stages in configs:
        err = compat.append_choice(
            LOGITS, choices, input_nodes=inputs, layout=logits_layout, num_stages=num_stages,
            num_warps=num_warps, mutated_inputs=[bmax, bsum], call_sizes=[B, H, N], G=G, T=T,
            D=d, D_PAD=next_pow2(d, 16), M_PAD=next_pow2(M, 16), BLOCK_N=block_n,
            QK_SCALE=float(scale) * LOG2E, HAS_RADIUS=radius is not None,
            UPCAST=compat.interpret())
        if err is not None:
            errors.append(f"{num_warps} warps, {num_stages} stages: {err}")
    if not choices:
        raise NotImplementedError("no logits-kernel choice could be generated: " + "; ".join(errors))
    logits = compat.realize_frozen(compat.select(LOGITS_NAME, choices, inputs, logits_layout, {}))

    inputs = [logits, bmax, bsum, selectable]
    layout = compat.fixed_layout(device, torch.float32, [B, H, N])
    choices = []
    err = compat.append_choice(
        SOFTMAX, choices, input_nodes=inputs, layout=layout, num_stages=3, num_warps=4,
        mutated_inputs=None, call_sizes=[B, H, N], G=G, T=T, G_PAD=next_pow2(G),
        T_PAD=next_pow2(T), NB_TILE=tmpl.NB_TILE, BLOCK_N=block_n, FILL=-1.0)
    if not choices:
        raise NotImplementedError(f"no softmax-kernel choice could be generated: {err}")
    return compat.select(SOFTMAX_NAME, choices, inputs, layout, {})


def lower_landmark_scores(q, landmarks, selectable, scale, radius=None):
    """The lowering registered for ``shadowkv::landmark_scores`` (arguments: its schema)."""
    args = (q, landmarks, selectable, scale, radius)
    return compat.template_or_fallback(
        torch.ops.shadowkv.landmark_scores.default, why_not_template(q, landmarks),
        lambda: _template(*args), args, _STATE["warned"])


def register() -> bool:
    """Register the lowering (idempotent); False where this torch has no template route."""
    return compat.register(torch.ops.shadowkv.landmark_scores.default, lower_landmark_scores)

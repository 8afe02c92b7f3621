"""Inductor lowering of ``shadowkv::sparse_attention``: IR logic only (the kernel sources are
``templates/sparse_attention.py.jinja`` and ``templates/sparse_attention_combine.py.jinja``).

On a device Inductor emits Triton for (CUDA; or a CPU with ``cpu_backend="triton"``, which the
CPU tests use under the Triton interpreter), the op lowers to flash-decoding in two templates:

1. the split kernel, autotuned over ``templates.sparse_attention.configs``: each program
   attends one KV head's G*T query rows to one split of the key axis and writes an
   unnormalized partial output PO [B, S, Hq, T, d] (its store_output) with its row max PM and
   row sum PL [B, S, Hq, T] (mutated buffers, as flex decoding does);
2. the merge kernel: [B, Hq, T, d] in q's dtype through its store_output, into which Inductor
   fuses the consumer's pointwise epilogue (a cast, a scale, a residual add, ...).

Anywhere else (a CPU with the default C++ backend, shapes the kernels do not take, no template
API in this torch, or a template that fails to build) the op stays an opaque call: the
reference on the CPU, the Triton kernels of ``templates.sparse_decode`` on CUDA
(``shadowpass.kernels``).
"""
from __future__ import annotations

from typing import Optional

import torch

from shadowpass.templates import sparse_attention as tmpl
from shadowpass.templates.sparse_decode import LOG2E, default_splits

from . import compat

NAME = tmpl.SPLIT_MARKER  # the TritonTemplates are named by the markers their code holds
COMBINE_NAME = tmpl.COMBINE_MARKER
MAX_ROWS = 128  # G * T query rows per KV head a program holds in registers (as sparse_decode)
_STATE = {"enabled": True, "warned": set()}


@compat.symbolic_grid
def split_grid(batch, kv_heads, meta):
    """(B * H, S, 1): one program per (sequence, KV head) and split of the key axis."""
    return (batch * kv_heads, meta["SPLITS"], 1)


@compat.symbolic_grid
def combine_grid(batch, kv_heads, meta):
    """(B * H, 1, 1): one program per (sequence, KV head), merging its S splits."""
    return (batch * kv_heads, 1, 1)


SPLIT = compat.make_template(name=NAME, grid=split_grid, source=tmpl.split_source())
COMBINE = compat.make_template(name=COMBINE_NAME, grid=combine_grid, source=tmpl.combine_source())

# positions in the template's input list (def_kernel order)
_Q, _OK, _OV, _OVALID, _SK, _SV, _SLOT, _TOKVALID, _SELECTABLE, _LK, _LV, _LVALID, _GK, _GV, \
    _GEN_LEN, _PM, _PL = range(17)


def enable(template: bool = True) -> None:
    """Use the template where it applies (default), or always the opaque op (for comparisons)."""
    _STATE["enabled"] = template


def why_not_template(q, outlier_k, outlier_v) -> Optional[str]:
    """None if the template can lower this call, else the reason it cannot."""
    why = (compat.why_not_lowered("sparse_attention", _STATE["enabled"], q.get_device())
           or compat.gqa_reason(q, outlier_k.get_size()[1], MAX_ROWS))
    if why is not None:
        return why
    d = compat.guard_int(q.get_size()[3])
    if compat.guard_int(outlier_v.get_size()[-1]) != d:
        return "value head dim differs from the key head dim"
    if q.get_dtype() not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.get_dtype()}"
    return None


def _input_gen_fns(num_chunks: int, gen_capacity: int) -> dict:
    """Benchmark inputs for autotuning (integer and bool inputs would otherwise be zeros, so
    every key masked): every mask True, slots holding distinct chunks, every generated row in
    use (the most work a step can have)."""
    def full(value):
        def make(node):
            size = [compat.hint(s) for s in node.get_size()]
            return torch.full(size, value, dtype=node.get_dtype(), device=node.get_device())
        return make

    def slots(node):
        size = [compat.hint(s) for s in node.get_size()]
        idx = torch.arange(size[-1], device=node.get_device()) % max(num_chunks, 1)
        return idx.to(node.get_dtype()).expand(size).contiguous()

    fns = {i: full(True) for i in (_OVALID, _TOKVALID, _SELECTABLE, _LVALID)}
    fns[_SLOT] = slots
    fns[_GEN_LEN] = full(gen_capacity)
    return fns


def _template(q, scale, outlier_k, outlier_v, outlier_valid, sel_k, sel_v, slot_chunk,
              sparse_valid, selectable, local_k, local_v, local_valid, gen_k, gen_v, gen_len,
              chunk_size):
    inputs = [compat.realize_frozen(x) for x in (
        q, outlier_k, outlier_v, outlier_valid, sel_k, sel_v, slot_chunk, sparse_valid,
        selectable, local_k, local_v, local_valid, gen_k, gen_v, gen_len)]
    q = inputs[_Q]
    device, dtype = q.get_device(), q.get_dtype()
    B, Hq, T, d = q.get_size()
    H = outlier_k.get_size()[1]
    Hq, H, T, d = (compat.guard_int(x) for x in (Hq, H, T, d))
    G = Hq // H
    M_PAD = max(16, 1 << (G * T - 1).bit_length())
    D_PAD = max(16, 1 << (d - 1).bit_length())
    # the split count fixes the partial buffers' shape: one for every choice, from size hints
    keys = sum(compat.hint(x.get_size()[2]) for x in (outlier_k, sel_k, gen_k))
    S = default_splits(compat.hint(B) * H, keys, 32, device)

    pm = compat.empty([B, S, Hq, T], torch.float32, device)
    pl = compat.empty([B, S, Hq, T], torch.float32, device)
    pm, pl = compat.realize_frozen(pm), compat.realize_frozen(pl)
    inputs += [pm, pl]
    layout = compat.fixed_layout(device, torch.float32, [B, S, Hq, T, d])  # PO

    choices: list = []
    errors = []
    elem = max(x.get_dtype().itemsize for x in (q, outlier_k, sel_k, local_k, gen_k))
    for cfg in tmpl.configs(d, M_PAD, elem, compat.max_autotune()):
        err = compat.append_choice(
            SPLIT, choices, input_nodes=inputs, layout=layout, num_stages=cfg.num_stages,
            num_warps=cfg.num_warps, mutated_inputs=[pm, pl], call_sizes=[B, H],
            G=G, T=T, D=d, D_PAD=D_PAD, M_PAD=M_PAD, C=compat.guard_int(chunk_size), BLOCK_N=cfg.block_n,
            SPLITS=S, QK_SCALE=float(scale) * LOG2E, UPCAST=compat.interpret())
        if err is not None:
            errors.append(f"{cfg}: {err}")
    if not choices:
        raise NotImplementedError("no split-kernel choice could be generated: " + "; ".join(errors))
    gen_fns = _input_gen_fns(compat.hint(selectable.get_size()[2]),
                             compat.hint(gen_k.get_size()[2]))
    po = compat.realize_frozen(compat.select(NAME, choices, inputs, layout, gen_fns))

    out_layout = compat.fixed_layout(device, dtype, [B, Hq, T, d])
    choices = []
    err = compat.append_choice(
        COMBINE, choices, input_nodes=[po, pm, pl], layout=out_layout, num_stages=1,
        num_warps=4, mutated_inputs=None, call_sizes=[B, H], G=G, T=T, D=d, D_PAD=D_PAD,
        M_PAD=M_PAD, SPLITS=S, S_PAD=max(1, 1 << (S - 1).bit_length()))
    if not choices:
        raise NotImplementedError(f"no merge-kernel choice could be generated: {err}")
    return compat.select(COMBINE_NAME, choices, [po, pm, pl], out_layout, {})


def lower_sparse_attention(q, scale, outlier_k, outlier_v, outlier_valid, sel_k, sel_v,
                           slot_chunk, sparse_valid, selectable, local_k, local_v, local_valid,
                           gen_k, gen_v, gen_len, chunk_size):
    """The lowering registered for ``shadowkv::sparse_attention`` (arguments: its schema)."""
    args = (q, scale, outlier_k, outlier_v, outlier_valid, sel_k, sel_v, slot_chunk,
            sparse_valid, selectable, local_k, local_v, local_valid, gen_k, gen_v, gen_len,
            chunk_size)
    return compat.template_or_fallback(
        torch.ops.shadowkv.sparse_attention.default, why_not_template(q, outlier_k, outlier_v),
        lambda: _template(*args), args, _STATE["warned"])


def register() -> bool:
    """Register the lowering (idempotent); False where this torch has no template route."""
    return compat.register(torch.ops.shadowkv.sparse_attention.default, lower_sparse_attention)

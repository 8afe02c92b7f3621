"""Inductor lowering of ``shadowkv::rebuild_keys``: IR logic only (the kernel source is
``templates/key_rebuild.py.jinja``).

On a device Inductor emits Triton for, the op lowers to one template that writes the rebuilt
keys of the load list's chunks into the selected-K workspace in place (a mutated input of the
template, as flex attention's extra outputs are), so the workspace is neither cloned nor
copied back. The template needs an output of its own: a one-element flag that nothing reads,
which Inductor removes. Inductor autotunes rows per program and warps with max-autotune (one
choice otherwise, the tuned launch of ``rebuild_keys_into``). Anywhere else, or for a workspace
that is not a contiguous buffer, the op stays an opaque call.
"""
from __future__ import annotations

from typing import Optional

import torch

from shadowpass.templates import chunk_gather as tmpl
from shadowpass.templates.common import next_pow2

from . import compat

NAME = tmpl.REBUILD_MARKER
_STATE = {"enabled": True, "warned": set()}
_SK, _U, _SV, _COS, _SIN, _LOAD_CHUNK, _LOAD_SLOT, _N_LOAD = range(8)  # def_kernel order


@compat.symbolic_grid
def grid(batch, kv_heads, slots, meta, *, cdiv):
    """(cdiv(K*C, BLOCK_ROWS), B * H, 1): one program per block of load rows of a KV head."""
    return (cdiv(slots * meta["C"], meta["BLOCK_ROWS"]), batch * kv_heads, 1)


REBUILD = compat.make_template(name=NAME, grid=grid, source=tmpl.rebuild_source())


def enable(template: bool = True) -> None:
    """Use the template where it applies (default), or always the opaque op."""
    _STATE["enabled"] = template


def why_not_template(sel_k, cos, sin) -> Optional[str]:
    """None if the template can lower this call, else the reason it cannot."""
    why = compat.why_not_lowered("key_rebuild", _STATE["enabled"], sel_k.get_device())
    if why is not None:
        return why
    if not compat.is_contiguous(sel_k):
        return "the selected-K workspace is not a contiguous buffer (it is written in place)"
    if sel_k.get_dtype() not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {sel_k.get_dtype()}"
    if list(cos.get_stride()) != list(sin.get_stride()):
        return "cos and sin differ in strides"
    return None


def _input_gen_fns(num_chunks: int, slots: int) -> dict:
    """Benchmark inputs for autotuning: every slot loads, distinct chunks into distinct slots
    (zeros, the default, would load nothing)."""
    def cycle(modulo):
        def make(node):
            size = [compat.hint(s) for s in node.get_size()]
            idx = torch.arange(size[-1], device=node.get_device()) % max(modulo, 1)
            return idx.to(node.get_dtype()).expand(size).contiguous()
        return make

    def all_slots(node):
        size = [compat.hint(s) for s in node.get_size()]
        return torch.full(size, slots, dtype=node.get_dtype(), device=node.get_device())

    return {_LOAD_CHUNK: cycle(num_chunks), _LOAD_SLOT: cycle(slots), _N_LOAD: all_slots}


def _template(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size, rope_style):
    sk = compat.realize_frozen(sel_k)
    others = [compat.contiguous(x) for x in (U, SV)]
    tables = [compat.realize_frozen(x) for x in (cos, sin)]
    lists = [compat.contiguous(x) for x in (load_chunk, load_slot, n_load)]
    inputs = [sk, *others, *tables, *lists]
    device = sk.get_device()
    B, H, _, d = sk.get_size()
    d = compat.guard_int(d)
    K = load_chunk.get_size()[2]
    R = compat.guard_int(U.get_size()[2])
    rope = tmpl.ROPE_CODES[rope_style]
    RD = 2 * compat.guard_int(cos.get_size()[-1]) if rope else 0
    rotate_all = tmpl.rotates_all(rope, RD, d)
    tuned = tmpl.rebuild_config(rotate_all)
    configs = [tuned] + ([c for c in ((32, 8), (64, 8), (32, 4)) if c != tuned]
                         if compat.max_autotune() else [])
    layout = compat.fixed_layout(device, torch.int32, [1])  # the flag nothing reads
    choices: list = []
    errors = []
    for rows, warps in configs:
        err = compat.append_choice(
            REBUILD, choices, input_nodes=inputs, layout=layout, num_stages=3, num_warps=warps,
            mutated_inputs=[sk], call_sizes=[B, H, K], C=compat.guard_int(chunk_size), RD=RD,
            D=d, D_PAD=next_pow2(d, 16), BLOCK_ROWS=rows, BLOCK_R=min(32, next_pow2(R, 16)),
            ROPE=rope, ROTATE_ALL=rotate_all, SHARED_TABLE=compat.known_one(cos.get_size()[0]),
            UPCAST=compat.interpret())
        if err is not None:
            errors.append(f"{rows} rows, {warps} warps: {err}")
    if not choices:
        raise NotImplementedError("no rebuild-kernel choice could be generated: " + "; ".join(errors))
    num_chunks = compat.hint(U.get_size()[1]) // max(compat.hint(chunk_size), 1)
    compat.select(NAME, choices, inputs, layout, _input_gen_fns(num_chunks, compat.hint(K)))


def lower_rebuild_keys(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size,
                       rope_style):
    """The lowering registered for ``shadowkv::rebuild_keys`` (arguments: its schema)."""
    args = (sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size, rope_style)
    return compat.template_or_fallback(
        torch.ops.shadowkv.rebuild_keys.default, why_not_template(sel_k, cos, sin),
        lambda: _template(*args), args, _STATE["warned"])


def register() -> bool:
    """Register the lowering (idempotent); False where this torch has no template route."""
    return compat.register(torch.ops.shadowkv.rebuild_keys.default, lower_rebuild_keys)

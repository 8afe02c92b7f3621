"""The one place that knows Inductor's internal APIs and how they differ between torch versions.

Read off torch 2.11.0 (the GPU machine, 2.11.0+cu130) and 2.13.0 (CPU machines), and kept to
what both have, called with keyword arguments only:

- ``select_algorithm.TritonTemplate(name=, grid=, source=)``: 2.13 adds ``always_freeze_layout``
  (2.11 has no such argument), so input layouts are frozen by ``realize_frozen`` instead.
- ``TritonTemplate.maybe_append_choice(choices=, input_nodes=, layout=, num_stages=,
  num_warps=, mutated_inputs=, call_sizes=, **constexprs)``: same in both.
- ``select_algorithm.autotune_select_algorithm(name, choices, input_nodes, layout,
  input_gen_fns=)``: 2.11 returns the chosen node, 2.13 a (node, choice) pair.
- ``select_algorithm.SymbolicGridFn``, ``lowering.register_lowering``, ``lowering.lowerings``,
  ``lowering.empty_strided``, ``lowering.fallback_handler``, ``ir.FixedLayout``,
  ``ir.FlexibleLayout``, ``ir.ExternKernel.realize_input`` / ``require_contiguous``,
  ``utils.ceildiv``, ``V.graph.sizevars.optimization_hint`` / ``guard_int``: same in both.
- Jinja: the constexprs given to ``maybe_append_choice`` are also template variables (both
  render with ``template.render(**hooks, **kwargs)``), so ``{% if FLAG %}`` picks the inputs.
- Jinja hooks ``def_kernel``, ``size``, ``stride``, ``store_output(indices, val, mask,
  val_shape=)``: same in both; ``store_output(mask=None)`` generates an undefined ``xmask``
  (seen on 2.11), so the template always passes a mask.

``TEMPLATE_ROUTE`` says whether the template route can be used at all, ``REASON`` why not.
Nothing here runs Inductor; importing it on a CPU without CUDA is safe.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("shadowpass")

TORCH = torch.torch_version.TorchVersion(torch.__version__)
TESTED = ("2.11", "2.13")  # the torch versions whose Inductor these calls were checked against

TEMPLATE_ROUTE = False
REASON = ""

try:
    import triton  # noqa: F401  (the template is Triton code)
except ImportError as e:
    REASON = f"Triton is not installed ({e})"

if not REASON and TORCH < (2, 11):
    REASON = f"torch {TORCH} is older than 2.11, the oldest Inductor these calls were checked on"

if not REASON:
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import ir
        from torch._inductor.lowering import (
            empty_strided,
            fallback_handler,
            lowerings,
            register_lowering,
        )
        from torch._inductor.select_algorithm import (
            SymbolicGridFn,
            TritonTemplate,
            autotune_select_algorithm,
        )
        from torch._inductor.utils import ceildiv
        from torch._inductor.virtualized import V
        TEMPLATE_ROUTE = True
    except ImportError as e:  # a torch whose Inductor moved these names
        REASON = f"torch {TORCH}: Inductor's template API is not where it was ({e})"

if not TEMPLATE_ROUTE:
    log.debug("shadowpass: no Inductor template route: %s", REASON)
elif not any(str(TORCH).startswith(v) for v in TESTED):
    log.debug("shadowpass: torch %s is untested with the Inductor template (tested: %s)",
              TORCH, ", ".join(TESTED))

__all__ = ["REASON", "TEMPLATE_ROUTE", "TORCH", "append_choice", "ceildiv", "contiguous",
           "empty", "fallback", "fixed_layout", "gqa_reason", "guard_int", "hint", "interpret",
           "is_contiguous", "known_one", "lowerings", "make_template", "max_autotune",
           "realize_frozen", "register", "register_lowering", "select", "symbolic_grid",
           "template_device", "template_or_fallback", "why_not_lowered"]


def make_template(name: str, grid: Callable, source: str):
    """A TritonTemplate; re-importing the module (tests) reuses the registered one, since
    TritonTemplate names are global and may be registered once."""
    existing = TritonTemplate.all_templates.get(name)
    if existing is not None:
        return existing
    return TritonTemplate(name=name, grid=grid, source=source)


def symbolic_grid(fn: Callable) -> Callable:
    """A grid function usable with int and sympy sizes (``SymbolicGridFn``)."""
    return SymbolicGridFn(fn)


def append_choice(template, choices: list, *, input_nodes, layout, num_stages: int,
                  num_warps: int, mutated_inputs, call_sizes, **constexprs) -> Optional[Exception]:
    """Add one configuration of ``template`` to ``choices``; returns the error, if it could not."""
    return template.maybe_append_choice(
        choices=choices, input_nodes=input_nodes, layout=layout, num_stages=num_stages,
        num_warps=num_warps, mutated_inputs=mutated_inputs, call_sizes=call_sizes, **constexprs)


def select(name: str, choices: list, input_nodes: list, layout,
           input_gen_fns: dict[int, Callable[[Any], torch.Tensor]]):
    """Benchmark the choices (or take the only one) and return the chosen node."""
    out = autotune_select_algorithm(name, choices, input_nodes, layout,
                                    input_gen_fns=input_gen_fns)
    return out[0] if isinstance(out, tuple) else out  # 2.13: (node, choice); 2.11: node


def realize_frozen(x):
    """x realized into a buffer whose layout is fixed now (the template reads its strides)."""
    x = ir.ExternKernel.realize_input(x)
    try:
        x.freeze_layout()
    except (NotImplementedError, AttributeError):  # an input or a view: already fixed
        pass
    return x


def contiguous(x):
    """x as a contiguous buffer with a fixed layout (copied only where it is not)."""
    return realize_frozen(ir.ExternKernel.require_contiguous(x))


def register(op, lower: Callable) -> bool:
    """Register ``lower`` as the lowering of ``op`` (idempotent; tests re-import modules);
    False where this torch has no template route."""
    if not TEMPLATE_ROUTE:
        return False
    current = lowerings.get(op)
    if current is None or getattr(current, "__wrapped__", None) is not lower:
        register_lowering(op, type_promotion_kind=None)(lower)
    return True


def fixed_layout(device: torch.device, dtype: torch.dtype, size: list):
    return ir.FixedLayout(device, dtype, size, ir.FlexibleLayout.contiguous_strides(size))


def empty(size: list, dtype: torch.dtype, device: torch.device):
    """A new contiguous buffer (IR) for a template to write."""
    return empty_strided(size, None, dtype=dtype, device=device)


def hint(expr) -> int:
    """A concrete size for a possibly symbolic one, without adding a guard."""
    return int(V.graph.sizevars.optimization_hint(expr))


def guard_int(expr) -> int:
    """A concrete size for a possibly symbolic one, guarding on it (recompiles if it changes)."""
    return int(V.graph.sizevars.guard_int(expr))


def known_one(expr) -> bool:
    """The size is 1 for every value of its symbols (no guard added)."""
    return bool(V.graph.sizevars.statically_known_equals(expr, 1))


def template_or_fallback(op, why: Optional[str], build: Callable, args: tuple, warned: set):
    """A lowering's result for a call of op: build() (its templates) where why is None and the
    build succeeds, else op as an opaque kernel; a failed build is a warning, once per reason
    (the model compiles anyway: the opaque op is correct), a reason is a debug line."""
    name = op._schema.name
    if why is None:
        try:
            return build()
        except Exception as e:
            why = f"the template failed ({type(e).__name__}: {e})"
            if why not in warned:
                warned.add(why)
                log.warning("shadowpass: %s stays an opaque op: %s", name, why,
                            exc_info=log.isEnabledFor(logging.DEBUG))
    log.debug("shadowpass: %s not lowered to its template: %s", name, why)
    return fallback(op)(*args)


def fallback(op):
    """A lowering that calls ``op`` as an opaque kernel (Inductor's default for custom ops)."""
    return fallback_handler(op, add_to_fallback_set=False)


def max_autotune() -> bool:
    return bool(inductor_config.max_autotune)


def template_device(device: Optional[torch.device]) -> bool:
    """Whether Inductor emits Triton for this device: CUDA, or a CPU whose Inductor backend was
    set to Triton (``torch._inductor.config.cpu_backend = "triton"``; the CPU tests run the
    template that way under the Triton interpreter). Other CPUs keep the reference op."""
    if device is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and inductor_config.cpu_backend == "triton"


def why_not_lowered(module: str, enabled: bool, device) -> Optional[str]:
    """The reasons, shared by our lowerings, that a call cannot use its template: no template
    route, disabled by ``shadowpass.lowering.<module>.enable(False)``, or a device Inductor
    emits no Triton for. None if none applies."""
    if not TEMPLATE_ROUTE:
        return REASON
    if not enabled:
        return f"disabled (shadowpass.lowering.{module}.enable(False))"
    if not template_device(device):
        return f"Inductor does not emit Triton for {device}"
    return None


def gqa_reason(q, kv_heads, max_rows: int) -> Optional[str]:
    """Why the query heads of q [B, Hq, T, d] do not fit kernels that hold a KV head's G * T
    query rows in registers (at most max_rows), or None. Head counts and T are guarded: the
    kernels specialize on them."""
    Hq, T = (guard_int(x) for x in q.get_size()[1:3])
    H = guard_int(kv_heads)
    if H == 0 or Hq % H:
        return f"query heads ({Hq}) are not a multiple of KV heads ({H})"
    if (Hq // H) * T > max_rows:
        return f"{Hq // H} x {T} query rows per KV head exceed {max_rows}"
    return None


def is_contiguous(x) -> bool:
    """x's layout is the contiguous one (a buffer a template may write in place)."""
    size = x.get_size()
    return list(x.get_stride()) == list(ir.FlexibleLayout.contiguous_strides(size)) and \
        x.get_layout().offset == 0


def interpret() -> bool:
    """Triton's interpreter is on (kernels run as Python on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

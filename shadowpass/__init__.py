"""shadowpass: ShadowKV (Sun et al., 2024, arXiv 2410.21465) as a torch.compile backend.

    model = torch.compile(model, backend="shadowkv", options={"budget": 1024})
    report = shadowpass.explain(model, input_ids)
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import ops  # noqa: F401  (registers torch.ops.shadowkv.*)
from . import lowering  # noqa: F401  (registers their Inductor lowerings)
from .backend import dump, make_backend
from .config import ShadowKVConfig
from .report import Report, SiteReport
from .rewrite import rewrite
from .runtime import runtime_of

log = logging.getLogger(__name__)

__all__ = ["ShadowKVConfig", "compile", "explain", "shadowkv", "runtime_of", "Report",
           "SiteReport"]


def compile(model, config: Optional[ShadowKVConfig] = None, *, mode: Optional[str] = None,
            dump_dir: Optional[str] = None, dynamic: Optional[bool] = None,
            fullgraph: bool = False, options: Optional[dict] = None, **fields):
    """torch.compile with the shadowkv backend; ShadowKVConfig fields as keywords or in
    ``options`` (as ``torch.compile(..., options=...)`` takes them).

    dynamic, fullgraph: torch.compile's own (dynamic=True traces every size symbolically, which
    lets a prefill that runs out of GPU memory be split into sub-batches; see
    shadowpass/subbatch.py).
    """
    cfg = ShadowKVConfig.from_options({**(options or {}), **fields}, base=config)
    if isinstance(model, torch.nn.Module) and hasattr(model, "generate"):
        log.warning("shadowpass.compile returns a torch.compile wrapper: calling it runs "
                    "ShadowKV, but its generate() calls the uncompiled model (dense attention); "
                    "for generate, compile in place with model.compile(backend=\"shadowkv\", "
                    "options={...})")
    return torch.compile(model, backend=make_backend(cfg, mode=mode, dump_dir=dump_dir),
                         dynamic=dynamic, fullgraph=fullgraph)


def explain(model, *args, config: Optional[ShadowKVConfig] = None,
            dump_dir: Optional[str] = None, **kwargs) -> Report:
    """Trace model(*args, **kwargs) once and report each attention site; runs no ShadowKV op.

    dump_dir: if given, also write each graph before/after the rewrite and its report there
    (the same files as ``shadowpass.compile(..., dump_dir=...)``).
    """
    cfg = config or ShadowKVConfig()
    report = Report()

    def backend(gm, example_inputs, **_):
        try:
            rw = rewrite(gm, cfg)
            index = report.add_graph(rw.all_sites)
        except Exception as e:
            report.errors.append(f"{type(e).__name__}: {e}")
            return gm.forward
        if dump_dir:  # shadowpass-cli: explain(dump_dir=)
            one = Report(sites=[s for s in report.sites if s.graph == index], graphs=1)
            dump(dump_dir, index, gm, rw.gm if rw.phase else None, one)
        return gm.forward

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile(model)
        model = model._orig_mod
    compiled = getattr(model, "_compiled_call_impl", None)  # model.compile(): trace the module
    if compiled is not None:
        model._compiled_call_impl = None

    def trace(*a, **k):
        return model(*a, **k)

    # Dynamo keeps its compiled entries on the traced frame's code object: a fresh one per call
    # takes explain's entries with it, so they never count towards the model's recompile limit
    trace.__code__ = trace.__code__.replace()
    try:
        with torch.no_grad():
            torch.compile(trace, backend=backend)(*args, **kwargs)
    finally:
        if compiled is not None:
            model._compiled_call_impl = compiled
    if report.graphs == 0 and not report.errors:
        report.errors.append(
            "explain traced no graph: Dynamo ran the model without calling the backend (a "
            "torch.compiler stance such as force_eager, torch.compiler.disable on the forward, "
            "or the forward wrapped in its own torch.compile); explain the plain model outside "
            "that stance")
    return report


def shadowkv(target=None, **options):
    """Decorator: ``@shadowkv(budget=1024)`` on an nn.Module subclass, a module or a function."""
    cfg = ShadowKVConfig.from_options(options)

    def wrap(obj):
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            obj.forward = torch.compile(obj.forward, backend=make_backend(cfg))
            return obj
        if isinstance(obj, torch.nn.Module):  # in place, so its generate() runs compiled too
            obj.compile(backend=make_backend(cfg))
            return obj
        return torch.compile(obj, backend=make_backend(cfg))

    return wrap(target) if target is not None else wrap

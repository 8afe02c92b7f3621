"""The ``shadowkv`` torch.compile backend: find attention, rewrite it, hand off to Inductor."""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .config import ShadowKVConfig
from .report import Report
from .rewrite import rewrite
from .runtime import ShadowGraph

log = logging.getLogger("shadowpass")
_graph_ids = itertools.count()


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """A hash of the package's sources: shadowpass, shadowpass.lowering, shadowpass.templates
    (installed from separate folders, so each is read where it was imported from)."""
    from . import lowering, templates
    h = hashlib.sha256()
    for pkg in (Path(__file__).parent, Path(lowering.__file__).parent,
                Path(templates.__file__).parent):
        for f in sorted(p for p in pkg.rglob("*") if p.suffix in (".py", ".jinja")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class SourceKey(CustomGraphPass):
    """Changes no graph. Inductor's FX graph cache keys a compiled graph by its code and
    Inductor's config, not by our ops' fake shapes, lowerings or templates; with this pass in the
    config its uuid (``source_hash``) joins the key, so a graph compiled by another version of
    shadowpass is never reused (it would assert the old shapes)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return source_hash()


def mode_patches(mode: Optional[str]) -> dict:
    """Inductor config for torch.compile's mode= (HF's CompileConfig defaults to reduce-overhead),
    plus ``SourceKey`` where the user set no post-grad pass of their own."""
    patches = {} if mode in (None, "default") else dict(torch._inductor.list_mode_options(mode))
    if torch._inductor.config.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = SourceKey()
    return patches


def dump(dump_dir: str, index: int, before, after, report: Report, extended=None):
    """graph_<index>_{before,after}.py and the report; after=None: the graph is unchanged;
    extended: the rewrite for new tokens on a sequence with state (graph_<index>_extend.py)."""
    d = Path(dump_dir)
    d.mkdir(parents=True, exist_ok=True)
    code = before.print_readable(print_output=False)
    (d / f"graph_{index}_before.py").write_text(code)
    (d / f"graph_{index}_after.py").write_text(
        after.print_readable(print_output=False) if after is not None else
        f"# unchanged: the pass rewrote nothing in this graph (graph_{index}_report.txt says "
        f"why); it compiles with plain Inductor\n{code}")
    if extended is not None:
        (d / f"graph_{index}_extend.py").write_text(extended.print_readable(print_output=False))
    (d / f"graph_{index}_report.txt").write_text(str(report) + "\n")
    (d / f"graph_{index}_report.json").write_text(report.to_json() + "\n")


def trace_artifacts(report: Report, after, extended=None):
    torch._logging.trace_structured(
        "artifact", metadata_fn=lambda: {"name": "shadowpass_report", "encoding": "string"},
        payload_fn=lambda: str(report))
    for name, gm in (("shadowpass_rewritten_graph", after), ("shadowpass_extend_graph", extended)):
        if gm is not None:
            torch._logging.trace_structured(
                "artifact", metadata_fn=lambda name=name: {"name": name, "encoding": "string"},
                payload_fn=lambda gm=gm: gm.print_readable(print_output=False))


def publish(report: Report, index: int, before, after, dump_dir: Optional[str], extended=None):
    """The report (and rewritten graphs) as TORCH_TRACE artifacts, and the dump files."""
    trace_artifacts(report, after, extended)
    if dump_dir:
        dump(dump_dir, index, before, after, report, extended)


def needs_gradients(example_inputs) -> bool:
    """Whether AOTAutograd will trace a backward for this graph (the ShadowKV ops have none):
    grad mode on and an input, such as a parameter, that requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def compile_graph(gm: torch.fx.GraphModule, example_inputs, cfg: ShadowKVConfig,
                  patches: dict, dump_dir: Optional[str] = None, report: Optional[Report] = None):
    """Rewrite gm's attention sites into ShadowKV ops; any failure falls back to plain Inductor."""
    inductor = functools.partial(compile_fx, config_patches=patches)
    report = report if report is not None else Report()
    index = next(_graph_ids)
    dump_dir = dump_dir or os.environ.get("SHADOWPASS_DUMP_DIR")
    if needs_gradients(example_inputs):
        log.warning("shadowpass: graph %d is traced with gradients enabled; ShadowKV is "
                    "inference-only, so it compiles with plain Inductor (call the model under "
                    "torch.no_grad() or torch.inference_mode(), as generate() does)", index)
        report.errors.append(f"graph {index}: traced with gradients enabled (plain Inductor)")
        return compile_fx(gm, example_inputs, config_patches=patches)
    try:
        rw = rewrite(gm, cfg)
        # a prefill graph that can run with a past (a follow-up turn with the old cache)
        # also gets the rewrite that decodes its new tokens over the state
        extended = (rewrite(gm, cfg, extend=True)
                    if rw.phase == "prefill" and rw.past_len is not None
                    and not (isinstance(rw.past_len, int) and rw.past_len == 0) else None)
    except Exception as e:  # the pass must never break a model Inductor can compile
        log.warning("shadowpass: the pass failed on graph %d (%s: %s); compiling it with plain "
                    "Inductor", index, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        report.errors.append(f"graph {index}: {type(e).__name__}: {e}")
        publish(report, index, gm, None, dump_dir)
        return compile_fx(gm, example_inputs, config_patches=patches)
    report.add_graph(rw.all_sites, index)
    after = rw.gm if rw.phase else None
    log.info("%s", report)
    publish(report, index, gm, after, dump_dir, extended.gm if extended else None)
    if rw.phase is None:
        return compile_fx(gm, example_inputs, config_patches=patches)
    return ShadowGraph(gm, rw, example_inputs, cfg, inductor, extended)


def make_backend(config: Optional[ShadowKVConfig] = None, *, mode: Optional[str] = None,
                 dump_dir: Optional[str] = None, report: Optional[Report] = None):
    """A backend callable bound to a config (what shadowpass.compile passes to torch.compile)."""
    cfg = config or ShadowKVConfig()
    patches = mode_patches(mode)

    def backend(gm, example_inputs, **_):
        return compile_graph(gm, example_inputs, cfg, patches, dump_dir, report)

    return backend


def shadowkv_backend(gm, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None):
    """Entry point for ``torch.compile(model, backend="shadowkv", options={...})``."""
    cfg = ShadowKVConfig.from_options(options)
    return compile_graph(gm, example_inputs, cfg, mode_patches(mode))

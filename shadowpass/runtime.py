"""Runtime layer (never traced): per-model ShadowKV state and the callable a graph compiles to.

Each compiled model owns one Runtime, found from its parameters at call time (Dynamo may share
a compiled graph between two instances of one class, so it cannot be fixed at compile time).
A prefill stores fresh state for every rewritten site; a decode step passes that state into the
graph as real tensors (the ops declare which ones they mutate).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import sympy
import torch
import torch.fx as fx

from .config import ShadowKVConfig
from .reference import PrefillState
from .rewrite import STATE_FIELDS, Rewritten

log = logging.getLogger(__name__)

GEN_CAPACITY = 256  # generated tokens held exactly before the buffer doubles


@dataclass
class SiteState:
    prefill: PrefillState
    gen_k: torch.Tensor   # [B, Hkv, Gcap, d]
    gen_v: torch.Tensor
    gen_len: torch.Tensor  # [1] int64
    used: int = 0          # host mirror of gen_len, to grow the buffers without a sync

    def tensors(self) -> List[torch.Tensor]:
        return [*self.prefill, self.gen_k, self.gen_v, self.gen_len]

    def reserve(self, extra: int):
        cap = self.gen_k.shape[2]
        if self.used + extra <= cap:
            return
        new_cap = max(2 * cap, self.used + extra)
        for name in ("gen_k", "gen_v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:2] + (new_cap,) + old.shape[3:])
            new[:, :, :cap] = old
            setattr(self, name, new)

    def nbytes(self, device_only: bool = True) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors()
                   if not device_only or t.device == self.gen_k.device)


class Runtime:
    """ShadowKV state of one compiled model: site name -> SiteState."""

    def __init__(self):
        self.sites: Dict[str, SiteState] = {}

    def clear(self):
        self.sites = {}

    def store(self, names: List[str], flat: List[torch.Tensor]):
        n = len(STATE_FIELDS)
        self.sites = {}
        for i, name in enumerate(names):
            st = PrefillState(*flat[i * n:(i + 1) * n])
            B, H, _, d = st.local_k.shape
            dv = st.local_v.shape[-1]
            self.sites[name] = SiteState(
                prefill=st,
                gen_k=st.local_k.new_zeros(B, H, GEN_CAPACITY, d),
                gen_v=st.local_v.new_zeros(B, H, GEN_CAPACITY, dv),
                gen_len=torch.zeros(1, dtype=torch.long, device=st.local_k.device))

    def decode_inputs(self, names: List[str], new_tokens: int) -> Optional[List[torch.Tensor]]:
        if not self.sites:
            return None
        missing = [n for n in names if n not in self.sites]
        if missing:
            raise RuntimeError(f"shadowkv: no prefill state for sites {missing}; the prefill and "
                               "decode graphs found different attention sites (see explain())")
        flat = []
        for n in names:
            site = self.sites[n]
            site.reserve(new_tokens)
            site.used += new_tokens
            flat += site.tensors()
        return flat


# id(parameter) -> (weak reference to it, Runtime); tensors cannot be dict keys by value.
_RUNTIMES: Dict[int, tuple] = {}
_GLOBAL = Runtime()


def _lookup(p: torch.Tensor) -> Optional[Runtime]:
    entry = _RUNTIMES.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def _register(p: torch.Tensor, rt: Runtime):
    key = id(p)
    _RUNTIMES[key] = (weakref.ref(p, lambda _: _RUNTIMES.pop(key, None)), rt)


def runtime_of(model: torch.nn.Module) -> Optional[Runtime]:
    """The ShadowKV runtime of a compiled model (None before its first compiled call)."""
    for p in model.parameters():
        rt = _lookup(p)
        if rt is not None:
            return rt
    return None


def symbolic_reader(gm: fx.GraphModule, value) -> Callable[[tuple], int]:
    """A function of the graph's runtime args that evaluates an int or SymInt seen at trace time."""
    if value is None or isinstance(value, int):
        return lambda args: value
    expr = value.node.expr
    sources = {}
    for i, ph in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        ev = ph.meta.get("example_value")
        if isinstance(ev, torch.SymInt) and isinstance(ev.node.expr, sympy.Symbol):
            sources.setdefault(ev.node.expr, lambda a, i=i: int(a[i]))
        elif isinstance(ev, torch.Tensor):
            for j, s in enumerate(ev.shape):
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    sources.setdefault(s.node.expr, lambda a, i=i, j=j: a[i].shape[j])
    missing = expr.free_symbols - set(sources)
    if missing:
        raise ValueError(f"cannot read {expr} from the graph inputs (missing {missing})")
    used = {s: sources[s] for s in expr.free_symbols}
    return lambda args: int(expr.subs({s: f(args) for s, f in used.items()}))


class ShadowGraph:
    """What the backend returns for a graph with rewritten sites.

    Holds the dense graph and the rewritten one, each compiled lazily by a nested torch.compile
    (so state shapes, which change per prompt, get Dynamo's usual guards and dynamic shapes),
    and picks one per call: prompts shorter than min_sparse_len stay dense.
    """

    def __init__(self, original: fx.GraphModule, rw: Rewritten, example_inputs, cfg: ShadowKVConfig,
                 inductor: Callable):
        self.rw, self.cfg, self.inductor = rw, cfg, inductor
        self.names = [s.name for s in rw.sites]
        self.original = original
        self._dense = self._sparse = None
        self.param_idx = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        self.seq_len = symbolic_reader(original, rw.seq_len)
        self.past_len = symbolic_reader(original, rw.past_len)

    def dense(self, *args):
        if self._dense is None:
            self._dense = torch.compile(self.original, backend=self.inductor)
        return self._dense(*args)

    def sparse(self, *args):
        if self._sparse is None:
            self._sparse = torch.compile(self.rw.gm, backend=self.inductor)
        return self._sparse(*args)

    def runtime(self, args) -> Runtime:
        params = [args[i] for i in self.param_idx]
        for p in params:
            rt = _lookup(p)
            if rt is not None:
                return rt
        if not params:
            return _GLOBAL
        rt = Runtime()
        for p in params:
            _register(p, rt)
        return rt

    def __call__(self, *args):
        rt = self.runtime(args)
        T = self.seq_len(args)
        if self.rw.phase == "prefill":
            if (self.past_len(args) or 0) > 0 and rt.sites:
                raise NotImplementedError(
                    "shadowkv: a multi-token step on a sequence that already has ShadowKV state "
                    "(chunked prefill or speculative decoding) is not supported; decode one token "
                    "per step, or start a new generate() call for a new prompt")
            rt.clear()
            if T < self.cfg.sparse_threshold:
                log.debug("shadowpass: prompt of %d tokens < min_sparse_len %d: dense", T,
                          self.cfg.sparse_threshold)
                return self.dense(*args)
            outs = self.sparse(*args)
            n = self.rw.num_outputs
            rt.store(self.names, list(outs[n:]))
            return outs[:n] if isinstance(outs, tuple) else type(outs)(outs[:n])
        state = rt.decode_inputs(self.names, T)
        if state is None:
            return self.dense(*args)
        return self.sparse(*args, *state)

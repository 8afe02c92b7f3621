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

from . import hf, ops, subbatch
from .config import ShadowKVConfig
from .detect import shape
from .policies import KERNEL_POLICIES
from .reference import PrefillState
from .rewrite import STATE_FIELDS, Rewritten
from .stepgraph import DecodeGraphs

log = logging.getLogger(__name__)

GEN_CAPACITY = 256  # generated tokens held exactly before the buffer doubles


@dataclass
class SiteState:
    prefill: PrefillState
    cos: torch.Tensor      # [B, N*C, rd/2] shared with the other sites that use the same tables
    sin: torch.Tensor
    gen_k: torch.Tensor    # [B, Hkv, Gcap, d] generated tokens, exact
    gen_v: torch.Tensor
    gen_len: torch.Tensor  # [1] int64
    workspace: List[torch.Tensor]  # the CUDA kernels' selected-chunk buffers (ops.workspace)
    selected: int = 0      # chunks a step selects per (b, h), for the hit rate
    used: int = 0          # host mirror of gen_len, to grow the buffers without a sync

    def tensors(self) -> List[torch.Tensor]:
        return [*self.prefill, self.cos, self.sin, self.gen_k, self.gen_v, self.gen_len,
                *self.workspace]

    def hit_rate(self) -> Optional[float]:
        """Share of the last step's selected chunks reused from the step before (syncs)."""
        return ops.hit_rate(self.workspace[2], self.workspace[4], self.selected)

    def truncate(self, length: int, prompt_len: int):
        """Drop the tokens from position ``length`` on: generated ones, and prompt tokens of
        the local window (masked out; the compressed part before it cannot be cut)."""
        sparse = self.prefill.sparse_valid.shape[1]
        if length < sparse:
            raise ValueError(f"shadowkv: cannot crop the cache to {length} tokens: the first "
                             f"{sparse} tokens of the prompt exist only in compressed form")
        if length < prompt_len:
            self.prefill.local_valid[:, length - sparse:] = False
        keep = max(length - prompt_len, 0)
        if self.used > keep:
            self.gen_len.fill_(keep)
            self.used = keep

    def reorder(self, idx: torch.Tensor):
        """Row r takes row idx[r] (beam search). Beams of one prompt share its prefill state,
        so only the generated tokens and the reuse workspace move."""
        for t in (self.gen_k, self.gen_v, *self.workspace):
            t.copy_(t.index_select(0, idx))

    def reserve(self, extra: int):
        """Grow the generated-token buffers (doubling): generation has no fixed cap."""
        cap = self.gen_k.shape[2]
        if self.used + extra <= cap:
            return
        new_cap = max(2 * cap, self.used + extra)
        for name in ("gen_k", "gen_v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:2] + (new_cap,) + old.shape[3:])
            new[:, :, :cap] = old
            setattr(self, name, new)


class Session:
    """The ShadowKV state of one batch of prompts: site name -> SiteState.

    When the graph hands the model's cache zero-stride stubs, the stubs own the session (an
    attribute on each stub tensor), so the state lives exactly as long as the model's cache:
    when generate() drops its cache, the GPU state and the pinned values are freed.
    """

    def __init__(self, sites: Dict[str, SiteState], prompt_len: int):
        self.sites = sites
        self.prompt_len = prompt_len  # tokens the prefill turned into ShadowKV state
        self._reordered_by = None  # every cache layer reorders with the same beam_idx tensor

    def truncate(self, length: int):
        """Keep the first ``length`` tokens of the sequence (HF's ``crop``: assisted or
        prompt-lookup decoding drops the candidate tokens it rejected; its first forward puts
        candidates into the prompt). Idempotent, as every cache layer crops in turn."""
        for site in self.sites.values():
            site.truncate(length, self.prompt_len)
        self.prompt_len = min(self.prompt_len, length)

    def reorder(self, beam_idx: torch.Tensor):
        """Beam search's reorder of the cache (``hf.edit_with_sessions``), once per step."""
        if beam_idx is self._reordered_by:
            return
        self._reordered_by = beam_idx
        first = next(iter(self.sites.values()))  # every site holds the same prompts
        idx = beam_idx.to(first.gen_k.device)
        local = first.prefill.local_k
        if not torch.allclose(local.index_select(0, idx).float(), local.float(), atol=1e-2,
                              rtol=1e-2):
            raise ValueError("shadowkv: the cache was reordered across rows of different prompts; "
                             "ShadowKV reorders only the beams of one prompt (beam search). "
                             "Run such sequences with separate caches.")
        for site in self.sites.values():
            site.reorder(idx)

    def hit_rate(self) -> Optional[float]:
        rates = [r for r in (s.hit_rate() for s in self.sites.values()) if r is not None]
        return sum(rates) / len(rates) if rates else None

    def nbytes(self, where: str = "device") -> int:
        """Bytes held on the model's device ("device": everything but the value store) or in
        the host value store ("host"); each storage counted once (rotary tables are shared)."""
        seen, total = set(), 0
        for site in self.sites.values():
            for t in site.tensors():
                if (t is site.prefill.values) != (where == "host"):
                    continue
                key = (t.device, t.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total


class Runtime:
    """ShadowKV state of one compiled model: the current Session, if any."""

    def __init__(self):
        self._session: Optional[Session] = None   # held here when no cache stub owns it
        self._weak: Optional[weakref.ref] = None  # when the model's cache owns it
        self.built = 0  # sites whose state the last prefill built (outlives the state itself)
        self.dense_prefill: Optional[str] = None  # why the last prefill ran dense, if it did

    @property
    def session(self) -> Optional[Session]:
        if self._session is not None:
            return self._session
        return self._weak() if self._weak is not None else None

    @property
    def sites(self) -> Dict[str, SiteState]:
        session = self.session
        return session.sites if session is not None else {}

    def clear(self):
        self._session = self._weak = None
        self.built = 0
        self.dense_prefill = None

    def store(self, rw: Rewritten, names: List[str], extra: List[torch.Tensor],
              cfg: ShadowKVConfig, prompt_len: int) -> Session:
        n = len(STATE_FIELDS)
        tables = extra[len(names) * n:]
        sites = {}
        for i, name in enumerate(names):
            st = PrefillState(*extra[i * n:(i + 1) * n])
            cos, sin = tables[2 * rw.site_tables[i]:2 * rw.site_tables[i] + 2]
            B, H, _, d = st.local_k.shape
            sites[name] = SiteState(
                prefill=st, cos=cos, sin=sin,
                gen_k=st.local_k.new_zeros(B, H, GEN_CAPACITY, d),
                gen_v=st.local_v.new_zeros(B, H, GEN_CAPACITY, st.local_v.shape[-1]),
                gen_len=torch.zeros(1, dtype=torch.long, device=st.local_k.device),
                workspace=ops.workspace(st, cfg.budget_chunks, cfg.chunk_size,
                                        gather=cfg.decode_route == "split",
                                        chunk_cache=cfg.chunk_cache),
                selected=cfg.budget_chunks)
        self.clear()
        session = Session(sites, prompt_len)
        self._session = session
        self.built = len(sites)
        return session

    def attach(self, session: Session, stubs: List[torch.Tensor]):
        """Let the model's cache own the session through the stubs it holds."""
        if not stubs:
            return
        hf.edit_with_sessions()
        for t in stubs:
            t._shadowkv_session = session
        self._session, self._weak = None, weakref.ref(session)

    @staticmethod
    def decode_inputs(names: List[str], new_tokens: int,
                      session: Optional[Session]) -> Optional[List[torch.Tensor]]:
        """The decode graph's state inputs from ``session`` (None without one)."""
        sites = session.sites if session is not None else {}
        if not sites:
            return None
        missing = [n for n in names if n not in sites]
        if missing:
            raise RuntimeError(f"shadowkv: no prefill state for sites {missing}; the prefill and "
                               "decode graphs found different attention sites (see explain())")
        flat = []
        for n in names:
            site = sites[n]
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


def is_stub(t) -> bool:
    """A cache stub: a zero-stride view standing in for keys or values ShadowKV holds."""
    return (isinstance(t, torch.Tensor) and t.numel() > 1
            and all(st == 0 for st, n in zip(t.stride(), t.shape) if n > 1))


def nested_compile(gm: fx.GraphModule, inductor: Callable) -> Callable:
    """torch.compile of a graph's own forward (see ShadowGraph). Under dynamic=True, Dynamo
    hands the backend float attributes as 0-d tensors that the graph reads with ``.item()``
    (``embed_tokens.norm_type``, torch 2.13): captured as a symbolic float, not a graph break
    that would split the graph and warn at every compile."""
    compiled = torch.compile(gm.forward, backend=inductor)

    def run(*args):
        if torch._dynamo.config.capture_scalar_outputs:  # batch lanes nest: one patch at a time
            return compiled(*args)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return compiled(*args)
    return run


class ShadowGraph:
    """What the backend returns for a graph with rewritten sites.

    Holds the dense graph and the rewritten one, each compiled lazily by a nested torch.compile
    (so state shapes, which change per prompt, get Dynamo's usual guards and dynamic shapes),
    and picks one per call: prompts shorter than min_sparse_len stay dense. The nested compile
    takes each graph's own forward: compiling the module would put every graph's guards on one
    shared wrapper frame, whose recompile limit (8) then silently leaves later graphs eager.
    """

    def __init__(self, original: fx.GraphModule, rw: Rewritten, example_inputs, cfg: ShadowKVConfig,
                 inductor: Callable, extended: Optional[Rewritten] = None):
        self.rw, self.cfg, self.inductor, self.extended = rw, cfg, inductor, extended
        self.names = [s.name for s in rw.sites]
        self.original = original
        self._dense = self._sparse = self._extend = None
        self.unsupported = None  # why this graph stays dense, once its prefill refused the mask
        self.param_idx = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        self.seq_len = symbolic_reader(original, rw.seq_len)
        self.past_len = symbolic_reader(original, rw.past_len)
        placeholders = [n.name for n in original.graph.nodes if n.op == "placeholder"]
        self.past_inputs = [placeholders.index(p) for p in rw.past_names]
        self.batch = None  # reads the batch size from the args (prefill graphs)
        if rw.phase == "prefill":
            try:
                self.batch = symbolic_reader(original, shape(rw.sites[0].q)[0])
            except (ValueError, TypeError) as e:  # then an out-of-memory prefill is not split
                log.debug("shadowpass: cannot read the batch size of this graph (%s)", e)
        # decode: the whole step as one CUDA graph per session (kernel policies only: the
        # reference path of the accuracy baselines reads the host value store from the host)
        self.step_graphs = None
        if rw.phase == "decode" and cfg.policy in KERNEL_POLICIES:
            self.step_graphs = DecodeGraphs(self.sparse, rw.gm, rw.past_names, rw.stub_outputs,
                                            self.param_idx, cfg.decode_lanes, self.split)
        self._split = None  # subbatch.Split, or why this graph cannot be split (once needed)
        self.fits: Dict[tuple, int] = {}  # (batch, prompt length) -> sub-batch size that fit

    def dense(self, *args):
        if self._dense is None:
            self._dense = nested_compile(self.original, self.inductor)
        return self._dense(*args)

    def sparse(self, *args):
        if self._sparse is None:
            self._sparse = nested_compile(self.rw.gm, self.inductor)
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
        n = self.rw.num_outputs
        if self.rw.phase == "prefill" and (self.past_len(args) or 0) == 0:
            rt.clear()
            if self.unsupported:
                rt.dense_prefill = self.unsupported
                return self.dense(*args)
            if T < self.cfg.sparse_threshold:
                rt.dense_prefill = f"the prompt's {T} tokens are fewer than min_sparse_len " \
                                   f"({self.cfg.sparse_threshold})"
                log.debug("shadowpass: %s: dense", rt.dense_prefill)
                return self.dense(*args)
            try:
                outs = self.prefill(args, T)
            except ValueError as e:  # the prefill op found a mask ShadowKV cannot keep
                if "shadowkv:" not in str(e):
                    raise
                self.unsupported = rt.dense_prefill = str(e)
                log.warning("shadowpass: %s -- this graph runs dense attention from now on", e)
                return self.dense(*args)
            session = rt.store(self.rw, self.names, list(outs[n:]), self.cfg, T)
            outs = outs[:n] if isinstance(outs, tuple) else type(outs)(outs[:n])
        else:  # a step on a past: one decoded token, or new tokens over it (extend)
            session = self.session_for(args, rt)
            state = rt.decode_inputs(self.names, T, session)
            if state is None:  # a past of real keys and values, or no prefill through us
                self.check_no_stub(args)
                if self._dense is None and self.rw.phase == "decode":
                    log.info("shadowpass: a decode step with no ShadowKV state runs dense: %s",
                             f"its prefill ran dense ({rt.dense_prefill})" if rt.dense_prefill
                             else "the prefill did not go through the shadowkv backend (e.g. "
                             "generate(cache_implementation='static') compiles only the decode "
                             "step; use model.compile(backend='shadowkv') instead)")
                return self.dense(*args)
            if self.rw.phase == "prefill":
                outs = self.extend(T, *args, *state)
            else:
                outs = (self.step_graphs(session, args, state) if self.step_graphs is not None
                        else self.sparse(*args, *state))
        rt.attach(session, [outs[i] for i in self.rw.stub_outputs])
        return outs

    def extend(self, T: int, *args):
        """New tokens on a sequence with ShadowKV state (a follow-up turn with the old cache,
        chunked prefill, speculative verification): the graph's second rewrite
        (``extend=True``) decodes them in turn over the state."""
        if self._extend is None:
            self._extend = nested_compile(self.extended.gm, self.inductor)
        if T >= self.cfg.sparse_threshold:
            log.warning("shadowpass: %d new tokens on a sequence with ShadowKV state run as %d "
                        "decode steps, held exactly on the GPU. For a long prompt split in "
                        "chunks (generate's prefill_chunk_size), prefill it in one call", T, T)
        return self._extend(*args)

    def session_for(self, args, rt: Runtime) -> Optional[Session]:
        """The state a step with a past reads. The cache's stubs name their session, so
        sequences decoded in turn (several caches, micro-batches) each read their own; a past
        of real keys and values (a prompt that stayed dense) reads none, whatever another
        sequence left in the runtime; without the past among the inputs, the latest session."""
        if not self.past_inputs:
            return rt.session
        session = self.session_of(args)
        if session is None and any(is_stub(args[i]) for i in self.past_inputs):
            session = rt.session  # stubs that do not carry their session (copied by the cache)
        return session

    def session_of(self, args) -> Optional[Session]:
        """The session that the cache stubs among this step's inputs belong to, if any."""
        for i in self.past_inputs:
            session = getattr(args[i], "_shadowkv_session", None)
            if session is not None:
                return session
        return None

    def split(self):
        """subbatch.Split of this graph (prefill sub-batches, decode lanes), or why it cannot
        be split (a str)."""
        if self._split is None:
            try:
                self._split = subbatch.plan(self.original, self.rw, self.param_idx)
            except Exception as e:  # reading the graph must not hide the out-of-memory error
                self._split = f"reading the graph failed ({type(e).__name__}: {e})"
        return self._split

    def prefill(self, args, T: int):
        """The rewritten prefill graph on the whole batch; in sub-batches (halves, quarters, ...)
        when that runs out of GPU memory. The outputs are always the whole batch's."""
        B = self.batch(args) if self.batch is not None else None
        size = self.fits.get((B, T), B)
        if B is None or size >= B:
            cause = None
            try:
                return self.sparse(*args)
            except torch.OutOfMemoryError as e:  # keep only the text: the traceback holds memory
                cause = subbatch.cause_of(e)
            subbatch.free_memory()
            split = self.split() if B is not None else "its batch size cannot be read"
            if B is None or B < 2 or isinstance(split, str):
                why = "a single sequence cannot be split" if B == 1 else \
                    f"it cannot be prefilled in sub-batches: {split}"
                if isinstance(split, str) and "static shapes" in split:
                    why += ("; compile with dynamic=True (model.compile(backend='shadowkv', "
                            "dynamic=True), or shadowpass.compile(model, dynamic=True)) to let "
                            "shadowkv prefill the batch in parts")
                raise subbatch.oom(B or "?", T, why, cause)
            size = (B + 1) // 2
        else:
            cause = None
            log.debug("shadowpass: prefill of %d x %d tokens in sub-batches of %d (as last time)",
                      B, T, size)
        outs, sizes = subbatch.run(self.sparse, args, self.split(), self.rw.num_outputs, B, T,
                                   size)
        self.fits[(B, T)] = min(sizes)
        if cause is not None:
            log.info("shadowpass: the prefill of %d sequences x %d tokens ran out of GPU memory "
                     "(%s); ran it as %s", B, T, cause, subbatch.describe(sizes))
        return outs

    def check_no_stub(self, args):
        """A decode step without state on a cache of stubs would attend to zeros: refuse."""
        for i in self.past_inputs:
            if is_stub(args[i]):
                raise RuntimeError(
                    "shadowkv: this decode step continues a sequence whose ShadowKV state was "
                    "released (its cache holds stubs, not keys and values). Keep the cache "
                    "returned by the prefill alive while decoding, or start from a new prefill.")

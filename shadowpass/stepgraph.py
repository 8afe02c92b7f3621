"""A whole decode step (the model's kernels and every site's ShadowKV step) as one CUDA graph.

Without it each site's step replays its own CUDA graph while the model's Inductor kernels and
the 32 replays launch from Python: on an H100 the GPU idled 6-10% of an 8B model's decode step
at batch 10-23 and 35-55% at batch 1. What a decode step computes, apart from the cache stubs
it hands back, reads none of the cache stubs nor their lengths (after the rewrite nothing reads
them; HF's growing attention mask of ones is often dropped the same way), so one capture serves
every later token of a session, until its state moves (a new prompt, a grown generated-token
buffer) or an input the step reads changes shape.
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.fx as fx

from . import lanes
from .hostmem import is_pinned
from .kernels import graph_pool
from .rewrite import impure
from .subbatch import Merged, Split, written

log = logging.getLogger(__name__)

EAGER_CALLS = 3     # calls with one key before capturing it: nothing may compile during a
                    # capture, and the nested compile may still recompile (for a dynamic cache
                    # length) on the second
MIN_LANE = 2       # sequences per batch lane: smaller lanes run the batch whole
LANE_DEVICES = ("cuda",)  # where lanes pay: a fetch to hide (tests add "cpu")
COPY_LIMIT = 1 << 20  # inputs up to this size are copied into the graph's own buffers; larger
                      # ones (model buffers) are read in place and their address is in the key


def unread_inputs(gm: fx.GraphModule, stub_outputs: List[int]) -> set:
    """Names of the placeholders that neither the outputs other than the cache stubs nor any
    in-place node depend on: a step's result is the same whatever they hold or their shapes."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    stack = [o for i, o in enumerate(outs) if i not in stub_outputs and isinstance(o, fx.Node)]
    stack += [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and impure(n)]
    read = set()
    while stack:
        n = stack.pop()
        if n not in read:
            read.add(n)
            stack += n.all_input_nodes
    return {n.name for n in gm.graph.nodes if n.op == "placeholder" and n not in read}


def written_inputs(gm: fx.GraphModule) -> set:
    """Names of the placeholders that an in-place node writes (directly or through views):
    a copy of such an input would take the write instead of the caller's tensor."""
    names = set()
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or not impure(n):
            continue
        if isinstance(n.target, torch._ops.OpOverload):  # the arguments its schema writes
            targets = [a for a, s in zip(n.args, n.target._schema.arguments)
                       if s.alias_info is not None and s.alias_info.is_write]
        else:
            targets = list(n.args[:1])
        for t in targets:
            for a in t if isinstance(t, (list, tuple)) else [t]:
                base = written(a)
                if base is not None:
                    names.add(base.name)
    return names


def stub_rule(out: torch.Tensor, args, past: List[int]):
    """(input index, dim, growth): the stub output has the shape of that cache stub input,
    grown along one dim (the new tokens); None if no input fits."""
    for p in past:
        a = args[p]
        if isinstance(a, torch.Tensor) and a.dim() == out.dim():
            diff = [o - s for o, s in zip(out.shape, a.shape)]
            grown = [d for d, x in enumerate(diff) if x]
            if len(grown) <= 1 and all(x >= 0 for x in diff):
                d = grown[0] if grown else 0
                return p, d, diff[d]
    return None


class _Captured:
    def __init__(self, key, graph, static: dict, outs, stubs: dict, zero):
        self.key, self.graph, self.static, self.outs = key, graph, static, outs
        self.stubs, self.zero = stubs, zero  # output index -> stub_rule; a 1-element zero


def host_scalar(t: torch.Tensor) -> bool:
    """A 0-d CPU tensor: how Dynamo passes a float it does not specialize on (under
    dynamic=True, e.g. an embedding's ``norm_type``), read on the host with ``.item()``."""
    return t.device.type == "cpu" and t.dim() == 0


class DecodeGraphs:
    """Replays ``fn(*args, *state)`` (a compiled decode graph) as one CUDA graph per session.

    args: the graph's inputs as Dynamo passes them; state: the session's ShadowKV tensors,
    which live at fixed addresses (their addresses are part of the key). Inputs the step does
    not read (``unread_inputs``: the cache stubs and their lengths) are left out of the key;
    other small tensors are copied into the graph's buffers before each replay; parameters and
    large tensors are read in place. Stub outputs are views of one zero at the current length
    (the stub input's, grown by the new tokens); the other outputs are cloned (the next replay
    overwrites them).
    """

    def __init__(self, fn: Callable, gm: fx.GraphModule, past_names: List[str],
                 stub_outputs: List[int], param_idx: List[int], lanes: int = 1,
                 split: Optional[Callable[[], Union[Split, str]]] = None):
        self.fn, self.stub_outputs = fn, stub_outputs
        self.lanes, self.split = lanes, split  # split(): where the batch is, or why not known
        self.lane_split: Union[Split, str, None] = None
        self.why_not: Optional[str] = None  # set when this graph must stay uncaptured
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.names = [n.name for n in placeholders]
        self.past = [i for i, n in enumerate(placeholders) if n.name in past_names]
        unread = unread_inputs(gm, stub_outputs)
        self.skipped = {i for i, n in enumerate(placeholders) if n.name in unread}
        writes = written_inputs(gm)
        # read in place, their addresses in the key: parameters, and inputs the graph writes
        self.params = set(param_idx)
        self.writes = {i for i, n in enumerate(placeholders) if n.name in writes}
        self.in_place = self.params | self.writes
        self.captured = {}  # id(session) -> _Captured
        self.seen = {}      # id(session) -> (key, eager calls with it, key changes in a row)
        self.pools = {}     # stream id -> MemPool shared by this graph's captures
        self.key_inputs: Optional[List[int]] = None  # the args in the key, in order
        self.told = False   # logged why steps are not captured

    def drop(self, sid: int):
        self.captured.pop(sid, None)
        self.seen.pop(sid, None)

    def key(self, args, state):
        """What a capture depends on besides the inputs it does not read (host cost matters:
        ~1000 inputs at 32 layers, every token)."""
        if self.key_inputs is None:
            self.key_inputs = [i for i in range(len(args)) if i not in self.skipped]
        return (torch.cuda.current_stream().stream_id,
                *[self.part(i, args[i]) for i in self.key_inputs],
                *[t.data_ptr() for t in state])

    def part(self, i: int, a):
        if i in self.params:
            return a.data_ptr()
        if not isinstance(a, torch.Tensor):
            return a
        if host_scalar(a):  # read into the graph at capture: a new value needs a new capture
            return a.item()
        if self.reads_in_place(i, a):
            return tuple(a.shape), a.stride(), a.dtype, a.data_ptr()
        return tuple(a.shape), a.dtype, a.device  # a copied input: only its values count

    def reads_in_place(self, i: int, a: torch.Tensor) -> bool:
        """Whether the graph reads input i where it is (its address in the key), not a copy:
        parameters, inputs it writes, large ones, and views whose elements overlap."""
        return (i in self.in_place or a.nbytes > COPY_LIMIT
                or torch._debug_has_internal_overlap(a) != 0)

    def __call__(self, session, args, state):
        if (self.why_not is not None or not state or not state[0].is_cuda
                or torch.cuda.is_current_stream_capturing()):
            return self.call(args, state)
        sid = id(session)
        key = self.key(args, state)
        entry = self.captured.get(sid)
        if entry is not None and entry.key == key:
            return self.replay(entry, args)
        seen_key, calls, changes = self.seen.get(sid, (None, 0, 0))
        if sid not in self.seen:  # the captures go when the session goes
            weakref.finalize(session, self.drop, sid)
        changes = changes + 1 if seen_key not in (None, key) else 0
        calls = calls + 1 if seen_key == key else 1
        self.seen[sid] = (key, calls, changes)
        if changes == EAGER_CALLS and not self.told:
            self.told = True
            changed = [self.names[i] for j, i in enumerate(self.key_inputs)
                       if key[j + 1] != seen_key[j + 1]]
            log.info("shadowpass: decode steps are not captured as one CUDA graph while %s "
                     "change from one token to the next", changed or "the ShadowKV state's buffers")
        if calls <= EAGER_CALLS:
            return self.call(args, state)
        self.captured.pop(sid, None)
        return self.capture(sid, key, args, state)

    def capture(self, sid, key, args, state):
        if any(t.device.type == "cpu" and not is_pinned(t) for t in state):
            return self.give_up("a host value store is not pinned (the step gathers it on the "
                                "host)", args, state)
        on_host = [f"{self.names[i]} {tuple(args[i].shape)}" for i in self.key_inputs
                   if isinstance(args[i], torch.Tensor) and args[i].device.type == "cpu"
                   and not host_scalar(args[i])]
        if on_host:  # a replay would keep the values read at capture (scalars are in the key)
            return self.give_up(f"the step reads CPU tensor inputs: {', '.join(on_host)}",
                                args, state)
        # the buffers keep the inputs' strides (Dynamo's guards check them), e.g. HF's input
        # ids, a column of the whole sequence whose stride grows every token
        static = {i: torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
                  .copy_(a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                  and i not in self.skipped and not host_scalar(a)
                  and not self.reads_in_place(i, a)}
        inputs = [static.get(i, a) for i, a in enumerate(args)]
        pool = graph_pool(self.pools, torch.cuda.current_stream().stream_id)
        graph = torch.cuda.CUDAGraph()
        # lanes capture from several threads: only this one's unsafe calls may end the capture
        mode = "thread_local" if self.lane_parts(args) else "global"
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                outs = self.call(inputs, state)
        except Exception as e:  # capture records only: nothing ran, so run it eagerly
            return self.give_up(f"the capture failed ({type(e).__name__}: {e})", args, state)
        stubs = {i: stub_rule(outs[i], args, self.past) for i in self.stub_outputs}
        zero = None
        if stubs:
            first = outs[self.stub_outputs[0]]
            zero = torch.zeros((1,) * first.dim(), dtype=first.dtype, device=first.device)
        entry = _Captured(key, graph, static, outs, stubs, zero)
        graph.replay()  # capture records without running
        if None in stubs.values():  # cannot tell the stubs' shapes: this step ran, later eager
            self.give_up("a cache stub output is not a stub input grown by the new tokens")
            return self.finish(_Captured(key, graph, static, outs, {}, None), args)
        self.captured[sid] = entry
        return self.finish(entry, args)

    def give_up(self, why: str, args=None, state=None):
        """This graph's steps stay uncaptured (each site still replays its own graph)."""
        self.why_not = why
        log.warning("shadowpass: decode steps are not captured as one CUDA graph: %s", why)
        return None if args is None else self.call(args, state)

    def call(self, args, state):
        """fn on the whole batch, or in batch lanes (``shadowpass.lanes``) where they apply."""
        parts = self.lane_parts(args) if state and state[0].device.type in LANE_DEVICES else None
        if not parts:
            return self.fn(*args, *state)
        split = self.lane_split
        B = parts[-1][1]
        # state with a batch dim is cut; a written one without (a site's generated-token
        # count) gets a copy per further lane, each lane advancing it alike
        cut = [t.dim() > 0 and t.shape[0] == B for t in state]
        written = [not c and len(args) + j in self.writes for j, c in enumerate(cut)]
        copies = [[t.clone() if w else t for t, w in zip(state, written)] for _ in parts[1:]]
        calls = []
        for k, (start, stop) in enumerate(parts):
            own = state if k == 0 else copies[k - 1]
            lane_state = [t[start:stop] if c else o for t, o, c in zip(state, own, cut)]
            calls.append(lambda a=split.slice(args, start, stop), st=lane_state: self.fn(*a, *st))
        outs = lanes.run(calls)
        merged = Merged(split, len(outs[0]), outs[0], B, parts[0][1], 0)
        for (start, stop), part in zip(parts, outs):
            merged.put(part, start, stop)
        return type(outs[0])(merged.outs)

    def lane_parts(self, args) -> Optional[List[Tuple[int, int]]]:
        """The batch rows of each lane, or None to run the batch whole."""
        if self.lanes < 2:
            return None
        if self.lane_split is None:
            self.lane_split = self.split() if self.split is not None else "no batch plan"
            if isinstance(self.lane_split, str):
                log.info("shadowpass: decode steps run the batch whole, not in %d lanes: %s",
                         self.lanes, self.lane_split)
        if isinstance(self.lane_split, str):
            return None
        dims = self.lane_split.inputs
        B = next(args[i].shape[d] for i, d in enumerate(dims) if d is not None)
        n = min(self.lanes, B // MIN_LANE)
        return [(B * k // n, B * (k + 1) // n) for k in range(n)] if n > 1 else None

    def replay(self, entry: _Captured, args):
        for i, buf in entry.static.items():
            buf.copy_(args[i])
        entry.graph.replay()
        return self.finish(entry, args)

    def finish(self, entry: _Captured, args):
        shapes = {}
        for i, (p, d, grow) in entry.stubs.items():
            size = list(args[p].shape)
            size[d] += grow
            shapes[i] = size
        outs = [entry.zero.expand(shapes[i]) if i in shapes
                else (o.clone() if isinstance(o, torch.Tensor) else o)
                for i, o in enumerate(entry.outs)]
        return type(entry.outs)(outs)

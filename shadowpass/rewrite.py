"""Rewrite detected attention sites into ShadowKV ops.

A prefill graph keeps its dense attention and gains one ``shadowkv.prefill_state`` op per site,
whose outputs (the site's state) become extra graph outputs, plus one ``shadowkv.rope_tables``
per distinct pair of rotary tables (shared by the sites that use it). A decode graph gains the state as
extra graph inputs and each site's attention becomes ``shadowkv.decode`` (config
``decode_route="fused"``), or (``decode_route="split"``) ``shadowkv.landmark_scores`` and
``torch.topk`` (the selection), ``shadowkv.decode_plan`` (new tokens, reuse plan, value fetch
into the workspace), ``shadowkv.rebuild_keys``, ``shadowkv.fetch_wait`` and
``shadowkv.sparse_attention`` over the workspace; Inductor lowers the scores, the key rebuild
and the attention to our Triton templates. A prefill graph run on
a sequence that has state (a follow-up turn with the old cache) is rewritten a second time,
with ``extend=True``: its sites become ``shadowkv.decode_extend``, decode steps over the new
tokens in turn. In every phase the model's own cat-style cache receives a zero-stride stub
instead of full-size K/V.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import List

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers torch.ops.shadowkv)
from .config import ShadowKVConfig
from .detect import Site, concrete, example, find_sites, shape
from .policies import BOUNDED, CALIBRATION, KERNEL_POLICIES
from .reference import PrefillState, mask_validity, new_tokens_causal

log = logging.getLogger(__name__)

STATE_FIELDS = PrefillState._fields
TABLE_FIELDS = ("cos", "sin")
GEN_FIELDS = ("gen_k", "gen_v", "gen_len")
WORKSPACE_FIELDS = ("sel_k", "sel_v", "slot_chunk", "chunk_slot", "n_load")
DECODE_INPUTS = STATE_FIELDS + TABLE_FIELDS + GEN_FIELDS + WORKSPACE_FIELDS


@dataclass
class Rewritten:
    gm: fx.GraphModule
    phase: str                      # "prefill", "decode" or "extend"
    sites: List[Site]               # rewritten sites, in graph order
    all_sites: List[Site]           # every site found, rewritten or not
    num_outputs: int                # outputs of the original graph
    seq_len: object = None          # T of the new tokens (int or SymInt)
    past_len: object = None         # length of a cat cache's past (int or SymInt), if any
    site_tables: List[int] = field(default_factory=list)  # prefill: each site's rotary-table pair
    num_tables: int = 0             # prefill: distinct rotary-table pairs (outputs after states)
    stub_outputs: List[int] = field(default_factory=list)  # outputs that are cache stubs
    past_names: List[str] = field(default_factory=list)    # placeholders of a cat cache's past


def replay(graph: fx.Graph, chain: List[fx.Node], x: fx.Node) -> fx.Node:
    for op in chain:
        x = graph.create_node(op.op, op.target, (x,) + tuple(op.args[1:]), dict(op.kwargs))
    return x


def call(graph, target, *args, **kwargs):
    return graph.call_function(target, args, kwargs)


def rotary_tables(graph: fx.Graph, site: Site, k_post: fx.Node):
    """The model's cos/sin as [B, T, rd] nodes (rd = 0 without RoPE)."""
    rope = site.rope
    if rope.style == "none":
        empty = call(graph, operator.getitem, k_post, (slice(None), 0, slice(None), slice(0, 0)))
        return empty, empty
    if rope.form.startswith("complex"):
        cos = call(graph, torch.repeat_interleave, call(graph, torch.real, rope.freqs), 2, dim=-1)
        sin = call(graph, torch.repeat_interleave, call(graph, torch.imag, rope.freqs), 2, dim=-1)
    else:
        cos, sin = rope.cos, rope.sin
    tables = []
    for t in (cos, sin):
        t = graph.call_method("expand_as", (t, rope.x_rot))
        t = replay(graph, site.k.chain, t)
        tables.append(call(graph, operator.getitem, t, (slice(None), 0)))
    return tables


def expression(node, memo=None):
    """A hashable form of the computation that produces `node` from the graph's inputs: two
    nodes with equal expressions hold equal values (HF layers each unsqueeze the shared cos)."""
    memo = {} if memo is None else memo
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            return tuple(expression(a, memo) for a in node)
        return repr(node)
    if node.op in ("placeholder", "get_attr"):
        return node
    if node not in memo:
        memo[node] = (node.op, str(node.target), expression(tuple(node.args), memo),
                      tuple((k, expression(v, memo)) for k, v in node.kwargs.items()))
    return memo[node]


def table_key(site: Site):
    """Sites whose rotary tables are equal computations in the same layout and rotation style
    share one copy."""
    rope = site.rope
    return (rope.style, expression((rope.cos, rope.sin, rope.freqs)),
            str(shape(rope.x_rot)) if rope.x_rot else None,
            tuple((n.op, str(n.target), str(n.args[1:]), str(n.kwargs)) for n in site.k.chain))


def cache_stubs(graph: fx.Graph, site: Site):
    """Hand the model's cache a zero-stride view of the right shape instead of full K/V."""
    out = next(n for n in graph.nodes if n.op == "output")
    stubs = []
    for path in (site.k, site.v):
        full = path.cache_node
        if full is None or full not in out.all_input_nodes:
            continue
        with graph.inserting_before(out):
            one = graph.call_method("new_zeros", (full, (1,) * len(shape(full))))
            stub = graph.call_method("expand_as", (one, full))
        out.args = fx.node.map_arg(out.args, lambda n: stub if n is full else n)
        stubs.append(stub)
    return stubs


# the operator module's in-place functions (its and_, or_, xor_ are not in place)
INPLACE_OPERATORS = {"iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul",
                     "ior", "ipow", "irshift", "isub", "itruediv", "ixor", "setitem", "delitem"}


def impure(n: fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator",
                                                                             "operator"):
        return name in INPLACE_OPERATORS
    mutating_op = isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
    return n.is_impure() or mutating_op or name.endswith("_")


def attention_op(device: torch.device):
    """The op of a split decode step's attention: ``shadowkv::sparse_attention`` (Inductor lowers
    it to our template on CUDA, the CPU runs the reference), or on CUDA without Inductor's
    template API its triton_op twin, so Inductor still sees into the kernels."""
    from .lowering import compat
    if device.type == "cuda" and not compat.TEMPLATE_ROUTE and ops.has_kernels():
        return torch.ops.shadowkv.sparse_attention_triton.default
    return torch.ops.shadowkv.sparse_attention.default


def split_decode(graph: fx.Graph, site: Site, q, k_post, v, state: List[fx.Node], rest,
                 cfg: ShadowKVConfig) -> fx.Node:
    """The landmark scores, top-k, decode_plan (appends the new tokens, plans the loads into
    the workspace and starts the value fetch), the key rebuild, fetch_wait, then the attention
    over [outliers | selected | local | generated] read from the state and the workspace.
    Inductor lowers the scores, the rebuild and the attention to our templates. A policy that
    does not score by landmarks selects, rebuilds and fetches inside decode_gather instead."""
    cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v, slot_chunk, chunk_slot, n_load = rest
    st = dict(zip(STATE_FIELDS, state))
    if cfg.policy in KERNEL_POLICIES:
        radius = st["aux"] if cfg.policy in BOUNDED else None
        scores = call(graph, torch.ops.shadowkv.landmark_scores.default, q, st["landmarks"],
                      st["selectable"], float(site.scale), radius)
        slots = graph.call_method("size", (slot_chunk, 2))  # K: the workspace has K slots
        top = call(graph, torch.topk, scores, slots, dim=-1, sorted=False)
        plan = call(graph, torch.ops.shadowkv.decode_plan.default,
                    call(graph, operator.getitem, top, 1), k_post, v, state, gen_k, gen_v,
                    gen_len, sel_v, slot_chunk, chunk_slot, n_load)
        load_chunk, load_slot = (call(graph, operator.getitem, plan, i) for i in range(2))
        call(graph, torch.ops.shadowkv.rebuild_keys.default, sel_k, st["U"], st["SV"], cos, sin,
             load_chunk, load_slot, n_load, cfg.chunk_size, site.rope.style)
        call(graph, torch.ops.shadowkv.fetch_wait.default, sel_v, sel_k)
    else:
        call(graph, torch.ops.shadowkv.decode_gather.default, q, k_post, v, state, *rest,
             float(site.scale), cfg.chunk_size, cfg.budget_chunks, site.rope.style, cfg.policy)
    device = example(q).device if isinstance(example(q), torch.Tensor) else torch.device("cpu")
    return call(graph, attention_op(device), q, float(site.scale), st["outlier_k"],
                st["outlier_v"], st["outlier_valid"], sel_k, sel_v, slot_chunk,
                st["sparse_valid"], st["selectable"], st["local_k"], st["local_v"],
                st["local_valid"], gen_k, gen_v, gen_len, cfg.chunk_size)


def prefill_mask(graph: fx.Graph, site: Site, memo: dict):
    """(validity [B, T], mask check) nodes of a prefill site, in whole-tensor ops that Inductor
    fuses with the mask's construction; an SDPA site with a mask then attends through
    shadowkv::prefill_attention, so nothing reads the [T, T] mask and it is never built.
    Sites that share a mask (all layers, usually) share one check: memo."""
    n = site.node
    key = (site.mask, site.mask_kind)
    if key not in memo:  # placed before the first site's attention: the mask exists there
        with graph.inserting_before(n):
            checked = call(graph, mask_validity, site.mask, site.mask_kind, site.q)
            memo[key] = tuple(call(graph, operator.getitem, checked, i) for i in range(2))
    valid, mask_ok = memo[key]
    if site.attention == "sdpa" and site.mask is not None:
        q, k, v = (n.args[i] if len(n.args) > i else n.kwargs[name]
                   for i, name in enumerate(("query", "key", "value")))
        with graph.inserting_before(n):
            attn = call(graph, torch.ops.shadowkv.prefill_attention.default, q, k, v, valid,
                        float(site.scale))
        n.replace_all_uses_with(attn)
    return valid, mask_ok


def new_tokens_mask_check(graph: fx.Graph, site: Site, memo: dict):
    """0-d bool node: the site's mask is causal among the new tokens (None without a mask).
    Sites that share a mask share one check: memo."""
    if site.mask is None:
        return None
    key = (site.mask, site.mask_kind)
    if key not in memo:
        memo[key] = call(graph, new_tokens_causal, site.mask, site.mask_kind, site.q)
    return memo[key]


def rewrite(gm: fx.GraphModule, cfg: ShadowKVConfig, extend: bool = False) -> Rewritten:
    """Copy gm, find its sites and rewrite those that fit. `phase` is None if none fit.

    extend: rewrite a prefill graph's sites for new tokens on a sequence that already has
    ShadowKV state (a follow-up turn with the old cache): each site becomes
    ``shadowkv.decode_extend`` over the state, as a decode graph's, and the phase "extend".
    """
    gm = copy.deepcopy(gm)
    graph = gm.graph
    sites = find_sites(gm)
    ok = [s for s in sites if s.rewritable]
    phases = {s.phase for s in ok}
    if len(phases) > 1:
        for s in ok:
            s.reason = "the graph mixes prefill and decode attention"
        ok, phases = [], set()
    if extend:
        if phases != {"prefill"}:
            raise ValueError("shadowkv: only a graph of multi-token (prefill) sites can be "
                             "rewritten to extend a sequence's state")
        phases = {"extend"}
        for s in ok:
            s.phase = "extend"
    out = next(n for n in graph.nodes if n.op == "output")
    num_outputs = len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1
    result = Rewritten(gm=gm, phase=phases.pop() if phases else None, sites=ok, all_sites=sites,
                       num_outputs=num_outputs)
    if not ok:
        return result

    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    state_outputs, tables, stubs = [], {}, []  # tables: key -> (index, [cos, sin] output nodes)
    masks: dict = {}
    for index, site in enumerate(ok):
        kv_heads = concrete(shape(site.q)[1]) // site.gqa_group
        head_dim = concrete(shape(site.q)[-1])
        rank = min(cfg.rank, kv_heads * head_dim)
        if rank < cfg.rank:
            log.info("shadowpass: %s: rank %d capped at H_kv*d = %d", site.name, cfg.rank, rank)
            site.notes.append(f"rank capped at H_kv*d = {rank}")
        stubs += cache_stubs(graph, site)
        if site.phase == "prefill":
            with graph.inserting_before(site.node.next):
                k_pre = replay(graph, site.k.chain, site.rope.x)
                k_post = replay(graph, site.k.chain, site.k.new)
                v = replay(graph, site.v.chain, site.v.new)
                valid, mask_ok = prefill_mask(graph, site, masks)
                calib = ((site.q, float(site.scale), cfg.budget_chunks)
                         if cfg.policy in CALIBRATION else (None, 1.0, 0))  # the op's defaults
                st = call(graph, torch.ops.shadowkv.prefill_state.default, k_pre, k_post, v,
                          valid, "valid", rank, cfg.chunk_size, cfg.outlier_chunks,
                          cfg.local_chunks, len(ok) - index, cfg.policy, mask_ok, *calib,
                          cfg.landmark_dtype)
                state_outputs += [call(graph, operator.getitem, st, i)
                                  for i in range(len(STATE_FIELDS))]
                key = table_key(site)
                if key not in tables:
                    cos, sin = rotary_tables(graph, site, k_post)
                    tab = call(graph, torch.ops.shadowkv.rope_tables.default, cos, sin,
                               cfg.chunk_size, cfg.local_chunks, site.rope.style)
                    tables[key] = (len(tables), [call(graph, operator.getitem, tab, i)
                                                 for i in range(len(TABLE_FIELDS))])
                result.site_tables.append(tables[key][0])
        else:
            inputs = []
            for fname in DECODE_INPUTS:
                with graph.inserting_after(last_ph):
                    last_ph = graph.placeholder(f"shadowkv_site{index}_{fname}")
                inputs.append(last_ph)
            n_state = len(STATE_FIELDS)
            with graph.inserting_before(site.node):
                k_post = replay(graph, site.k.chain, site.k.new)
                v = replay(graph, site.v.chain, site.v.new)
                args = (site.q, k_post, v, inputs[:n_state], *inputs[n_state:],
                        float(site.scale), cfg.chunk_size, cfg.budget_chunks, site.rope.style,
                        cfg.policy)
                if extend:
                    attn = call(graph, torch.ops.shadowkv.decode_extend.default, *args,
                                new_tokens_mask_check(graph, site, masks))
                elif cfg.decode_route == "split":
                    attn = split_decode(graph, site, site.q, k_post, v, inputs[:n_state],
                                        inputs[n_state:], cfg)
                else:
                    attn = call(graph, torch.ops.shadowkv.decode.default, *args)
            site.node.replace_all_uses_with(attn)
    result.num_tables = len(tables)
    extra_outputs = state_outputs + [n for _, pair in tables.values() for n in pair]
    first = ok[0]
    result.seq_len = shape(first.q)[2]
    if first.k.cache == "cat" and first.k.past is not None:
        dim = first.k.cache_node.kwargs.get("dim", first.k.cache_node.args[1]
                                           if len(first.k.cache_node.args) > 1 else 0)
        past = shape(first.k.past)
        # HF starts a DynamicCache from a 1-D empty tensor
        result.past_len = past[dim] if len(past) == len(shape(first.k.cache_node)) else 0
    result.past_names = [p.past.name for s in ok for p in (s.k, s.v)
                         if p.past is not None and p.past.op == "placeholder"]
    outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    result.stub_outputs = [i for i, n in enumerate(outs) if n in stubs]
    if extra_outputs:
        out.args = (tuple(outs) + tuple(extra_outputs),)
    graph.eliminate_dead_code(is_impure_node=impure)
    graph.lint()
    gm.recompile()
    return result

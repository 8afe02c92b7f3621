"""Find attention sites in a Dynamo (torch-level) FX graph.

Per site we find: the attention form and its scale and mask, the GQA group, the model's KV
cache (where the new tokens' keys and values enter it), and the RoPE that produced the keys,
so the rewrite can take the pre-RoPE keys and the model's own rotary factors. Everything is
read off the graph; nothing is re-derived from a model config. A site that does not fit is
returned with ``reason`` set and is left dense.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.fx as fx

from . import reference as ref

Node = fx.Node


class NoMatch(Exception):
    """A site that cannot be rewritten; the message is the reason shown in the report."""


def op_name(n: Any) -> str:
    if not isinstance(n, Node):
        return ""
    if n.op == "call_method":
        return n.target
    if n.op == "call_function":
        name = getattr(n.target, "__name__", str(n.target))
        return {"_C._nn.scaled_dot_product_attention": "scaled_dot_product_attention"}.get(name, name)
    return n.op


def example(n: Any):
    return n.meta.get("example_value") if isinstance(n, Node) else None


def shape(n: Any):
    v = example(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def concrete(s) -> int:
    if isinstance(s, torch.SymInt):
        return int(s.node.hint)
    return int(s)


def constant_scale(s) -> Optional[float]:
    """SDPA's scale as a float. Traced with dynamic=True, HF's 1/sqrt(head_dim) arrives as a
    graph node over the head size, which is fixed by the weights' (static) shapes."""
    if isinstance(s, Node):
        s = example(s)
    if isinstance(s, torch.SymFloat):
        return float(s.node.hint)
    return None if s is None else float(s)


# Ops that only move or cast data; replaying them on another tensor of the same layout is safe.
LAYOUT_OPS = {"transpose", "permute", "contiguous", "to", "float", "half", "bfloat16", "type_as",
              "clone"}
CASTS = {"to", "float", "half", "bfloat16", "type_as"}


@dataclass
class KVPath:
    new: Node                    # new tokens' tensor as it enters the cache (or attention)
    chain: List[Node]            # layout ops from `new` to the attention input, in order
    group: int                   # GQA group size seen on this path (1 if none)
    cache: str                   # "cat", "returned", "index_copy", "index_put", "slice_write", "none"
    cache_node: Optional[Node]   # node whose output goes back to the model's cache (cat/returned)
    past: Optional[Node] = None


@dataclass
class Rope:
    style: str                   # "rotate_half", "interleaved", "none"
    form: str                    # "rotate_half", "interleaved", "complex", "none" (+ " partial")
    x: Node                      # full pre-RoPE keys (same layout as KVPath.new)
    x_rot: Optional[Node]        # the rotated part of x (x itself unless partial)
    cos: Optional[Node] = None
    sin: Optional[Node] = None
    freqs: Optional[Node] = None  # complex factors (complex form)
    rotary_dim: int = 0


@dataclass
class Site:
    name: str
    attention: str = "?"
    node: Optional[Node] = None   # the node producing the attention output [B, Hq, T, d]
    q: Optional[Node] = None
    scale: Optional[float] = None
    mask: Optional[Node] = None
    mask_kind: str = "none"
    gqa_group: int = 1
    k: Optional[KVPath] = None
    v: Optional[KVPath] = None
    rope: Optional[Rope] = None
    phase: str = "?"
    reason: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def rewritable(self) -> bool:
        return self.reason is None


# ----------------------------------------------------------------------------- attention forms

SDPA = "scaled_dot_product_attention"


def scalar(a) -> Optional[float]:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None


def strip_transpose_last2(n: Node) -> Node:
    """kT -> k when kT swaps the last two dims."""
    name = op_name(n)
    nd = len(shape(n) or ())
    if name == "transpose":
        dims = sorted(d % nd for d in n.args[1:3])
        if dims == [nd - 2, nd - 1]:
            return n.args[0]
    if name == "permute":
        perm = n.args[1] if isinstance(n.args[1], (list, tuple)) else n.args[1:]
        perm = [p % nd for p in perm]
        if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return n.args[0]
    if name == "mT":
        return n.args[0]
    raise NoMatch(f"the key operand of q @ k^T is not a transpose of k ({op_name(n)})")


def einsum_roles(eq: str):
    """'bhqd,bhkd->bhqk' -> 'qk'; 'bhqk,bhkd->bhqd' -> 'pv'; else None."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or any(len(p) != 4 for p in parts + [out]):
        return None
    a, b = parts
    if a[:2] == b[:2] == out[:2]:
        if a[3] == b[3] and out == a[:3] + b[2]:
            return "qk"
        if a[3] == b[2] and out == a[:3] + b[3]:
            return "pv"
    return None


def match_scores(n: Node, site: Site, scale: float = 1.0):
    """Walk from softmax's input back to q @ k^T; returns (q, k, scale)."""
    name = op_name(n)
    if name in CASTS:
        return match_scores(n.args[0], site, scale)
    if name in ("mul",) and len(n.args) == 2:
        a, b = n.args
        for t, c in ((a, b), (b, a)):
            if isinstance(t, Node) and scalar(c) is not None:
                return match_scores(t, site, scale * scalar(c))
        raise NoMatch("scores are multiplied by a tensor, not a constant scale")
    if name in ("truediv", "div") and scalar(n.args[1]) is not None:
        return match_scores(n.args[0], site, scale / scalar(n.args[1]))
    if name == "add" and len(n.args) == 2 and all(isinstance(a, Node) for a in n.args):
        for s, m in (n.args, n.args[::-1]):
            try:
                found = match_scores(s, site, scale)
            except NoMatch:
                continue
            site.mask, site.mask_kind = m, "additive"
            return found
        raise NoMatch("neither operand of the score addition leads to q @ k^T")
    if name == "masked_fill":
        fill = scalar(n.args[2]) if len(n.args) > 2 else None
        if fill is None or fill > -1e4:
            raise NoMatch("masked_fill with a value other than -inf")
        site.mask, site.mask_kind = n.args[1], "bool_drop"
        return match_scores(n.args[0], site, scale)
    if name == "where" and len(n.args) == 3 and isinstance(n.args[0], Node):
        cond, a, b = n.args  # where(keep, scores, -inf) or where(drop, -inf, scores)
        for scores, fill, kind in ((a, b, "bool_keep"), (b, a, "bool_drop")):
            if isinstance(scores, Node) and scalar(fill) is not None and scalar(fill) <= -1e4:
                site.mask, site.mask_kind = cond, kind
                return match_scores(scores, site, scale)
        raise NoMatch("torch.where on the scores with a fill other than a constant -inf")
    if name == "matmul":
        return n.args[0], strip_transpose_last2(n.args[1]), scale
    if name == "einsum" and einsum_roles(n.args[0]) == "qk":
        return n.args[1], n.args[2], scale
    if name in ("bmm", "baddbmm"):
        raise NoMatch(f"{name} with heads folded into the batch dimension is not supported yet")
    raise NoMatch(f"unrecognised op {name or n} between q @ k^T and softmax")


def match_softmax_attention(sm: Node, site: Site):
    dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
    nd = len(shape(sm) or ())
    if dim is None or dim % max(nd, 1) != nd - 1:
        raise NoMatch("softmax is not over the last dimension")
    q, k, scale = match_scores(sm.args[0], site)
    p = sm
    while True:
        users = list(p.users)
        if len(users) != 1:
            raise NoMatch("attention probabilities have several users")
        u = users[0]
        name = op_name(u)
        if name in CASTS:
            p = u
            continue
        if name == "dropout":
            prob = u.kwargs.get("p", u.args[1] if len(u.args) > 1 else 0.5)
            training = u.kwargs.get("training", u.args[2] if len(u.args) > 2 else True)
            if prob != 0.0 and training:
                raise NoMatch("attention dropout is active (training mode)")
            p = u
            continue
        if name == "matmul" and u.args[0] is p:
            v, out = u.args[1], u
        elif name == "einsum" and einsum_roles(u.args[0]) == "pv" and u.args[1] is p:
            v, out = u.args[2], u
        else:
            raise NoMatch(f"softmax output goes to {name}, not probabilities @ v")
        break
    site.attention = "einsum_softmax" if op_name(out) == "einsum" else "matmul_softmax"
    site.node, site.q, site.scale = out, q, scale
    return k, v


def match_sdpa(n: Node, site: Site):
    args = list(n.args) + [None] * 3
    q, k, v = args[:3]
    kw = n.kwargs
    mask = kw.get("attn_mask", args[3])
    if (kw.get("dropout_p", 0.0) or 0.0) != 0.0:
        raise NoMatch("SDPA with dropout_p > 0")
    site.attention = "sdpa"
    site.node, site.q = n, q
    site.scale = constant_scale(kw.get("scale"))
    is_causal = kw.get("is_causal", args[5] if len(n.args) > 5 else False)
    qs, ks = shape(q), shape(k)
    if is_causal and qs and ks and concrete(qs[-2]) != concrete(ks[-2]):
        # SDPA aligns is_causal top-left: query i sees keys 0..i, not the whole past
        raise NoMatch("SDPA is_causal=True with fewer queries than keys (its causal mask is "
                      "aligned top-left, so the queries do not see the whole cache); pass an "
                      "explicit attn_mask, or is_causal only when queries and keys match")
    if isinstance(mask, Node):
        mv = example(mask)
        site.mask = mask
        site.mask_kind = "bool_keep" if mv is not None and mv.dtype == torch.bool else "additive"
    elif mask is not None:
        raise NoMatch("SDPA attn_mask is not a tensor")
    return k, v


# ------------------------------------------------------------------------------- KV cache, GQA

def strip_repeat(n: Node):
    """repeat_kv forms -> (kv-head tensor, group)."""
    name = op_name(n)
    if name in ("reshape", "view") and op_name(n.args[0]) == "expand":
        ex = n.args[0]
        src = ex.args[0]
        idx = src.args[1] if op_name(src) == "getitem" else None
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None and all(
                i == slice(None) for i in idx[:2] + idx[3:]):
            return src.args[0], concrete(shape(ex)[2])
        if op_name(src) == "unsqueeze" and src.args[1] in (2, -3):
            return src.args[0], concrete(shape(ex)[2])
    if name == "repeat_interleave":
        reps = n.kwargs.get("repeats", n.args[1] if len(n.args) > 1 else None)
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
        if isinstance(reps, int) and dim == 1:
            return n.args[0], reps
    if name == "expand":
        src_shape, out_shape = shape(n.args[0]), shape(n)
        if src_shape and out_shape and len(src_shape) == 4 and src_shape[1] == 1 \
                and concrete(out_shape[1]) > 1:
            return n.args[0], concrete(out_shape[1])
    return n, 1


MUTATIONS = {"index_copy_": 3, "index_put_": 2, "setitem": 2, "copy_": 1}
CACHE_FORM = {"index_copy_": "index_copy", "index_put_": "index_put", "setitem": "slice_write",
              "copy_": "slice_write"}


def find_cache_write(buf: Node, before: Node):
    """The last in-place write into buffer `buf` that precedes node `before`."""
    order = {n: i for i, n in enumerate(buf.graph.nodes)}
    writes = []
    for u in buf.users:
        name = op_name(u)
        if name in MUTATIONS and u.args[0] is buf and order[u] < order[before]:
            writes.append(u)
        # buf[idx].copy_(new)
        if name == "getitem":
            for w in u.users:
                if op_name(w) == "copy_" and w.args[0] is u and order[w] < order[before]:
                    writes.append(w)
    if not writes:
        return None
    w = max(writes, key=order.get)
    form = CACHE_FORM[op_name(w)]
    index = w.args[1] if isinstance(w.args[1], tuple) else (w.args[1],)
    if op_name(w) == "setitem" and any(isinstance(i, Node) for i in index):
        form = "index_put"  # buf[..., idx_tensor] = new
    return w.args[MUTATIONS[op_name(w)]], form


def walk_kv(n: Node, attn: Node) -> KVPath:
    chain: List[Node] = []
    group, cache, cache_node, past = 1, "none", None, None
    while True:
        name = op_name(n)
        if name in LAYOUT_OPS and isinstance(n.args[0], Node):
            chain.append(n)
            n = n.args[0]
            continue
        if group == 1:
            base, g = strip_repeat(n)
            if base is not n:
                group, n = g, base
                continue
        if cache == "none":
            if name == "cat":
                tensors = n.args[0] if n.args else n.kwargs["tensors"]
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                nd = len(shape(n) or ())
                # a cache appends tokens; a cat over the last (feature) dim is partial RoPE
                if len(tensors) >= 2 and nd and dim % nd != nd - 1:
                    cache, cache_node, past, n = "cat", n, tensors[0], tensors[-1]
                    continue
            buf = n.args[0] if name == "getitem" else n
            if isinstance(buf, Node) and buf.op in ("placeholder", "get_attr"):
                found = find_cache_write(buf, attn)
                if found is not None:
                    n, cache = found
                    continue
        break
    if cache == "none":  # a first call that returns the new K/V as the cache
        returned = [m for m in [n] + chain[::-1] if any(u.op == "output" for u in m.users)]
        if returned:
            cache, cache_node = "returned", returned[0]
    return KVPath(new=n, chain=chain[::-1], group=group, cache=cache, cache_node=cache_node,
                  past=past)


# ------------------------------------------------------------------------------------- RoPE

def evaluate_from(target: Node, src: Node, value: torch.Tensor, memo=None):
    """Evaluate `target` as a function of `src` alone (raises NoMatch if it reads other tensors)."""
    memo = {} if memo is None else memo
    if target is src:
        return value
    if target in memo:
        return memo[target]
    if target.op not in ("call_function", "call_method"):
        raise NoMatch("depends on another tensor")

    def arg(a):
        return evaluate_from(a, src, value, memo) if isinstance(a, Node) else a

    args = fx.node.map_aggregate(target.args, arg)
    kwargs = fx.node.map_aggregate(target.kwargs, arg)
    if target.op == "call_method":
        out = getattr(args[0], target.target)(*args[1:], **kwargs)
    else:
        out = target.target(*args, **kwargs)
    memo[target] = out
    return out


def rotation_of(z: Node, x: Node) -> Optional[str]:
    """Which rotation z computes from x, checked numerically on a random tensor."""
    xs = shape(x)
    if xs is None:
        return None
    t = torch.randn([concrete(s) for s in xs], generator=torch.Generator().manual_seed(0))
    try:
        out = evaluate_from(z, x, t)
    except Exception:
        return None
    for style, fn in ref.ROTATIONS.items():
        want = fn(t)
        if isinstance(out, torch.Tensor) and out.shape == want.shape and torch.allclose(out, want):
            return style
    return None


def match_full_rope(n: Node) -> Optional[Rope]:
    """x * cos + rot(x) * sin, in any operand order."""
    if op_name(n) != "add" or not all(op_name(a) == "mul" for a in n.args[:2]):
        return None
    m1, m2 = n.args[:2]
    for direct, rotated in ((m1, m2), (m2, m1)):
        for x, c in (direct.args[:2], direct.args[1::-1]):
            for z, s in (rotated.args[:2], rotated.args[1::-1]):
                if not (isinstance(x, Node) and isinstance(z, Node) and isinstance(c, Node)
                        and isinstance(s, Node)):
                    continue
                style = rotation_of(z, x)
                if style:
                    rd = concrete(shape(x)[-1])
                    return Rope(style=style, form=style, x=x, x_rot=x, cos=c, sin=s,
                                rotary_dim=rd)
    return None


def strip_casts(n):
    while op_name(n) in CASTS and isinstance(n, Node):
        n = n.args[0]
    return n


def match_complex_rope(n: Node) -> Optional[Rope]:
    """view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs).flatten(...)"""
    if op_name(n) not in ("flatten", "reshape", "view"):
        return None
    r = n.args[0]
    if op_name(r) != "view_as_real" or op_name(r.args[0]) != "mul":
        return None
    for xc, f in (r.args[0].args[:2], r.args[0].args[1::-1]):
        if op_name(xc) == "view_as_complex" and isinstance(f, Node):
            inner = strip_casts(xc.args[0])
            if op_name(inner) in ("reshape", "view"):
                x = strip_casts(inner.args[0])
                rd = concrete(shape(x)[-1])
                return Rope(style="interleaved", form="complex", x=x, x_rot=x, freqs=f,
                            rotary_dim=rd)
    return None


def slice_of_last_dim(n: Node):
    """x[..., a:b] -> (x, a, b)."""
    if op_name(n) != "getitem" or not isinstance(n.args[1], tuple):
        return None
    idx = n.args[1]
    if len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice) and idx[1].step is None:
        return n.args[0], idx[1].start or 0, idx[1].stop
    return None


def match_rope(n: Node) -> Optional[Rope]:
    rope = match_full_rope(n) or match_complex_rope(n)
    if rope:
        return rope
    if op_name(n) == "cat":  # partial rotary: cat(rope(x[..., :rd]), x[..., rd:])
        parts = n.args[0]
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        nd = len(shape(n) or ())
        if len(parts) == 2 and nd and dim % nd == nd - 1:
            inner = match_full_rope(parts[0]) or match_complex_rope(parts[0])
            rot, rest = (slice_of_last_dim(inner.x) if inner else None), slice_of_last_dim(parts[1])
            if rot and rest and rot[0] is rest[0] and rot[1] == 0 and rot[2] == rest[1]:
                inner.x = rot[0]
                inner.form += " partial"
                return inner
    return None


PROJECTION_PATH = {"view", "reshape", "transpose", "permute", "contiguous", "getitem", "chunk",
                   "split", "unflatten", "to", "float", "unbind"}
PROJECTIONS = {"linear", "matmul", "addmm", "mm", "einsum", "conv1d"}


def is_plain_projection(n: Node, depth: int = 8) -> bool:
    """True when n is a projection output seen through layout ops only (no position mixing)."""
    for _ in range(depth):
        name = op_name(n)
        if name in PROJECTIONS or n.op == "placeholder":
            return True
        if name not in PROJECTION_PATH or not isinstance(n.args[0], Node):
            return False
        n = n.args[0]
    return False


# ------------------------------------------------------------------------------------ driver

_DYNAMO_ROOT = re.compile(r"^[LG]\[[^\]]*\](\[[^\]]*\])*\.?")


def module_path(n: Node) -> Optional[str]:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # drop Dynamo's source of the root module: L['self'], or L['args'][0] when the model
    # reaches the traced function as an argument (HF generate, seen with transformers 5.24)
    return _DYNAMO_ROOT.sub("", path) or None


def analyze_site(cand: Node, index: int) -> Site:
    site = Site(name=module_path(cand) or f"site{index}")
    try:
        if op_name(cand) == SDPA:
            k_att, v_att = match_sdpa(cand, site)
        else:
            k_att, v_att = match_softmax_attention(cand, site)
        qs, ks = shape(site.q), shape(k_att)
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
            raise NoMatch("q and k are not 4-D [batch, heads, seq, head_dim]")
        site.k, site.v = walk_kv(k_att, site.node), walk_kv(v_att, site.node)
        if site.k.group != site.v.group:
            raise NoMatch("keys and values are repeated differently for GQA")
        hk = concrete(ks[1]) // site.k.group
        site.gqa_group = concrete(qs[1]) // hk
        if concrete(qs[1]) % hk:
            raise NoMatch("query heads are not a multiple of KV heads")
        if site.scale is None:
            site.scale = 1.0 / math.sqrt(concrete(qs[-1]))
        if site.k.cache == "none":
            raise NoMatch("no KV cache in the graph: every call is a full prefill, so there is "
                          "no decode step to make sparse")
        T = qs[2]
        site.phase = "decode" if isinstance(T, int) and T == 1 else "prefill"

        rope = match_rope(site.k.new)
        if rope is None:
            if not is_plain_projection(site.k.new):
                raise NoMatch(f"keys reach the cache through {op_name(site.k.new)!r}, not a "
                              "recognised RoPE form (rotate_half, interleaved, complex, partial) "
                              "nor a plain projection")
            rope = Rope(style="none", form="none", x=site.k.new, x_rot=None)
        site.rope = rope
    except NoMatch as e:
        site.reason = str(e)
    return site


def find_sites(gm: fx.GraphModule) -> List[Site]:
    sites = []
    for n in gm.graph.nodes:
        name = op_name(n)
        if name == SDPA or (name in ("softmax", "_softmax") and n.op != "placeholder"):
            sites.append(analyze_site(n, len(sites)))
    return sites

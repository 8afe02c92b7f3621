"""Sub-batched prefill: run a prefill graph on slices of its batch when the whole batch does not
fit on the GPU, and merge the slices' results into what one whole-batch call returns.

ShadowKV's decode state per sequence is ~6x smaller than dense K/V, so a decode batch can be far
larger than the batch whose prefill activations fit. When the whole-batch prefill runs out of GPU
memory, ``run`` prefills halves of the batch (then quarters, ... down to single sequences) and
writes each slice's outputs into full-batch buffers allocated once, after the first slice, so the
runtime stores one full-batch state and decode is unchanged.

Only a graph traced with a symbolic batch size can run on a slice of its batch. A graph traced
for one batch size (Dynamo's default on a model's first call) has that size baked into its code
(``torch.arange(4)``, ``view((4, 300, -1, 16))``, ``reshape(4, 4, 300, 16)`` with 4 heads too),
and nothing tells the batch apart from an equal head count. ``plan`` reads which inputs and
outputs carry the batch from the symbolic shapes Dynamo recorded, and gives the reason when the
graph cannot be split.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import sympy
import torch
import torch.fx as fx

from .hostmem import check_host_memory, is_pinned, pinned_empty
from .detect import example, op_name, shape
from .rewrite import STATE_FIELDS, Rewritten, impure

_VALUES = STATE_FIELDS.index("values")


@dataclass
class Split:
    """Where the batch is in a prefill graph's inputs and outputs (read off its symbolic shapes).

    inputs: per graph input, the dim that holds the batch, or None (parameters, unbatched inputs);
    size_inputs: graph inputs that are the batch size itself (Dynamo's SymInt placeholders);
    outputs: per output of the original graph, the dim that holds the batch, or None for an
        output that does not depend on the batch (taken from the first slice);
    stubs: outputs that are zero-stride cache stubs, rebuilt at the full batch, never copied.
    """

    inputs: List[Optional[int]]
    size_inputs: List[int]
    outputs: List[Optional[int]]
    stubs: List[int]

    def slice(self, args: Sequence, start: int, stop: int) -> list:
        out = list(args)
        for i, dim in enumerate(self.inputs):
            if dim is not None:
                out[i] = args[i].narrow(dim, start, stop - start)
        for i in self.size_inputs:
            out[i] = stop - start
        return out


def _batch_dim(value, sym: sympy.Symbol, what: str) -> Union[Optional[int], str]:
    """The dim of `value` that is the batch size; None if none; a reason if it cannot be told."""
    if isinstance(value, torch.SymInt):
        return f"{what} is the value {value}, which depends on the batch size" \
            if sym in value.node.expr.free_symbols else None
    if not isinstance(value, torch.Tensor):
        return None
    dims = [j for j, s in enumerate(value.shape)
            if isinstance(s, torch.SymInt) and sym in s.node.expr.free_symbols]
    if not dims:
        return None
    if len(dims) > 1 or value.shape[dims[0]].node.expr != sym:
        return (f"{what} has shape {tuple(value.shape)}: the batch size {sym} is not exactly one of "
                f"its dims (a flattened batch, or a dim that was equal to the batch when traced)")
    return dims[0]


# ops whose result is a view of their first argument (written through by an in-place op)
VIEW_OPS = {"getitem", "view", "reshape", "narrow", "select", "slice", "transpose", "permute",
            "unsqueeze", "squeeze", "expand", "expand_as", "as_strided", "flatten", "unflatten",
            "t", "view_as", "contiguous", "detach", "split", "chunk", "unbind", "movedim"}


def written(node) -> Optional[fx.Node]:
    """The graph input that an in-place write to `node` lands in, if any."""
    while isinstance(node, fx.Node) and node.op != "placeholder" and op_name(node) in VIEW_OPS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None


def plan(original: fx.GraphModule, rw: Rewritten, param_idx: Sequence[int]) -> Union[Split, str]:
    """Where the batch is in the graph's inputs and outputs, or why the graph cannot be split."""
    batch = shape(rw.sites[0].q)[0]
    if not isinstance(batch, torch.SymInt):
        return (f"the prefill graph was traced for exactly {batch} sequences (static shapes), so "
                "it cannot run on a part of the batch")
    sym = batch.node.expr
    if not isinstance(sym, sympy.Symbol):
        return f"the batch size is the expression {sym}, not an input's size"
    for s in rw.sites:
        b = shape(s.q)[0]
        if not isinstance(b, torch.SymInt) or b.node.expr != sym:
            return f"the attention sites see different batch sizes ({sym} and {b})"
    seq = rw.seq_len
    if isinstance(seq, torch.SymInt) and sym in seq.node.expr.free_symbols:
        return (f"the batch size and the prompt length share one size {sym} (they were equal when "
                "traced)")

    placeholders = [n for n in original.graph.nodes if n.op == "placeholder"]
    params = set(param_idx)
    inputs, size_inputs, batched = [], [], set()
    for i, node in enumerate(placeholders):
        ev = example(node)
        if i in params:
            inputs.append(None)
            continue
        if isinstance(ev, torch.SymInt) and ev.node.expr == sym:
            size_inputs.append(i)
            inputs.append(None)
            batched.add(node)
            continue
        dim = _batch_dim(ev, sym, f"input {node.name}")
        if isinstance(dim, str):
            return dim
        inputs.append(dim)
        if dim is not None:
            batched.add(node)
    if not any(d is not None for d in inputs):
        return "no graph input carries the batch"
    for node in original.graph.nodes:  # a slice of a batched input is a view: writes land right
        if node.op in ("call_function", "call_method") and impure(node) and node.args:
            base = written(node.args[0])
            if base is not None and base not in batched and isinstance(example(base), torch.Tensor):
                return (f"the graph writes into its input {base.name} in place ({op_name(node)}), "
                        "which has no batch dim to split (a preallocated cache?)")

    depends = set(batched)  # nodes whose value depends on a batched input
    for node in original.graph.nodes:
        if any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    out = next(n for n in original.graph.nodes if n.op == "output")
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    outputs = []
    for i, node in enumerate(results):
        ev = example(node)
        dim = _batch_dim(ev, sym, f"output {i} ({getattr(node, 'name', node)})")
        if isinstance(dim, str):
            return dim
        if dim is None and node in depends and isinstance(ev, torch.Tensor):
            return (f"output {i} ({node.name}, shape {tuple(ev.shape)}) depends on the batch but "
                    "has no batch dim (a reduction over the batch cannot be merged from parts)")
        outputs.append(dim)
    for i in rw.stub_outputs:
        if outputs[i] is None:
            return f"the cache stub at output {i} has no batch dim"
    return Split(inputs, size_inputs, outputs, list(rw.stub_outputs))


class Merged:
    """Full-batch outputs filled slice by slice: each buffer allocated once, after the first slice
    (so a slice's outputs are freed as soon as they are copied in; no list of parts is kept)."""

    def __init__(self, split: Split, num_outputs: int, first: Sequence, B: int, b: int, T: int):
        n = num_outputs
        self.dims = list(split.outputs) + [0] * (len(first) - n)  # the state is batch-first
        for i in split.stubs:
            self.dims[i] = None
        # unbatched outputs come from the first slice, cloned: under CUDA graphs the next slice's
        # replay would overwrite them
        stubs = set(split.stubs)  # zero-stride: a clone would allocate the whole cache
        self.outs = [(t.clone() if isinstance(t, torch.Tensor) else t)
                     if dim is None and i not in stubs else None
                     for i, (t, dim) in enumerate(zip(first, self.dims))]
        for i in split.stubs:
            full = list(first[i].shape)
            full[split.outputs[i]] = B
            self.outs[i] = first[i].new_zeros((1,) * first[i].dim()).expand(full)
        for i in range(n, len(first)):
            if first[i].shape[0] != b:
                raise RuntimeError(f"shadowkv: state output {i} has {first[i].shape[0]} rows for "
                                   f"a sub-batch of {b}")
        self.check_host(first, n, B, b, T)
        for i, dim in enumerate(self.dims):
            if dim is None:
                continue
            p = first[i]
            full = list(p.shape)
            full[dim] = B
            if p.device.type == "cpu" and is_pinned(p):
                self.outs[i] = pinned_empty(full, p.dtype)
            else:
                self.outs[i] = torch.empty(full, dtype=p.dtype, device=p.device)

    @staticmethod
    def check_host(first: Sequence, n: int, B: int, b: int, T: int):
        """The whole batch's host values must fit, not only each slice's (the prefill op checks
        only the slice it builds). The first slice's own values are already allocated."""
        values = [first[j] for j in range(n + _VALUES, len(first), len(STATE_FIELDS))
                  if first[j].device.type == "cpu"]
        if values:
            per_site = max(v.numel() * v.element_size() for v in values) * B // b
            check_host_memory(per_site, len(values), any(is_pinned(v) for v in values), B, T)

    def put(self, part: Sequence, start: int, stop: int):
        for i, dim in enumerate(self.dims):
            if dim is not None:
                self.outs[i].narrow(dim, start, stop - start).copy_(part[i])


def free_memory():
    gc.collect()  # tensors of the failed call may be held by reference cycles of its frames
    torch.cuda.empty_cache()


def cause_of(e: BaseException) -> str:
    """The head of an out-of-memory message ('CUDA out of memory. Tried to allocate 2.00 GiB')."""
    return ". ".join(str(e).split(". ")[:2]).splitlines()[0] if str(e) else "out of memory"


def oom(B: int, T: int, why: str, cause: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"shadowkv: the prefill of {B} sequences x {T} tokens ran out of GPU memory ({cause}), "
        f"and {why}. Reduce the batch size or the prompt length, or free GPU memory.")


def run(fn, args: Sequence, split: Split, num_outputs: int, B: int, T: int,
        size: int) -> Tuple[list, List[int]]:
    """Call fn (the rewritten prefill graph) on slices of at most `size` sequences, halving the
    size after each out-of-memory error; returns the merged outputs and the slice sizes used."""
    start, sizes, merged = 0, [], None
    while start < B:
        stop = min(start + size, B)
        cause = None
        try:
            part = fn(*split.slice(args, start, stop))
        except torch.OutOfMemoryError as e:  # keep only the text: the traceback holds activations
            cause = cause_of(e)
        if cause is not None:
            free_memory()
            if size == 1:
                raise oom(B, T, "one sequence at a time did not fit either", cause)
            size = (size + 1) // 2
            continue
        if merged is None:
            try:
                merged = Merged(split, num_outputs, part, B, stop - start, T)
            except torch.OutOfMemoryError as e:
                cause = cause_of(e)
            if cause is not None:
                raise oom(B, T, f"the merged outputs and ShadowKV state of all {B} sequences do "
                          "not fit on the GPU", cause)
        merged.put(part, start, stop)
        kind = type(part)
        del part
        sizes.append(stop - start)
        start = stop
    return kind(merged.outs), sizes


def describe(sizes: List[int]) -> str:
    """[2, 2] -> '2 sub-batches of 2'; [2, 1, 1] -> '3 sub-batches of 2, 1, 1'."""
    if len(set(sizes)) == 1:
        return f"{len(sizes)} sub-batches of {sizes[0]}"
    return f"{len(sizes)} sub-batches of {', '.join(map(str, sizes))}"


"""The ShadowKV decode step composed from the Triton kernels in ``shadowpass.templates``.

``decode_attention_cuda`` has the inputs and output of ``reference.decode_attention`` plus an
optional ``DecodeWorkspace`` that carries the selected-K/V buffers from one step to the next,
so chunks selected again (the paper sees ~60% hits) are neither rebuilt nor fetched. Two op
routes use it:

* ``register_cuda_kernel()`` (done when ``shadowpass.ops`` is imported and Triton is present)
  makes it the CUDA kernel of ``shadowkv::decode``, whose schema carries the workspace, so the
  op stays opaque to Inductor but reuses chunks and overlaps the fetch on a side stream;
* ``shadowkv::decode_triton`` is a ``torch.library.triton_op`` whose schema carries the
  workspace tensors (declared mutated), so Inductor sees into the kernels and reuse works.

The split decode route (``ShadowKVConfig.decode_route="split"``) cuts the step into
``shadowkv::landmark_scores``, ``torch.topk``, ``shadowkv::decode_plan`` (append, reuse plan,
and the value fetch from pinned host memory started on a side stream), ``shadowkv::rebuild_keys``
(overlapping the fetch), ``shadowkv::fetch_wait`` and ``shadowkv::sparse_attention``. Inductor
lowers the scores, the rebuild and the attention to the templates of ``shadowpass.lowering``;
the CUDA kernels here are their opaque implementations (eager calls, fallback), and
``shadowkv::sparse_attention_triton`` is the attention's triton_op twin for a torch without the
template API. Policies without landmark scores use ``shadowkv::decode_gather`` (``gather_step``)
for the part before the attention.

CPU stays on the reference path; these functions need Triton (on CPU only under
``TRITON_INTERPRET=1``, for tests).
"""
from __future__ import annotations

import logging
import weakref

import torch

from . import lanes
from . import reference as ref
from .hostmem import is_pinned
from .policies import BOUNDED, KERNEL_POLICIES
from .reference import DecodeWorkspace, PrefillState
from .templates.chunk_gather import (
    fetch_values_into,
    full_load,
    rebuild_keys_into,
    reuse_plan,
)
from .templates.common import is_fake
from .templates.landmark_scores import landmark_scores, select_top_chunks
from .templates.sparse_decode import sparse_decode

log = logging.getLogger(__name__)

__all__ = ["DecodeWorkspace", "decode_attention_cuda", "decode_triton", "gather_step",
           "load_chunks", "register_cuda_kernel", "sparse_attention_triton"]


_SIDE_STREAMS = {}


def _side_stream(device: torch.device):
    """The fetch stream beside the current one: one per stream, so steps that run on separate
    streams (several sessions, micro-batches) never queue their fetches behind each other's.
    High priority: CUDA graphs keep node priorities, so in a captured step the fetch kernel takes
    its SMs ahead of the key rebuild's blocks instead of queueing behind them (H200, 60K B23:
    83.1 -> 74.8 ms a step, side by side)."""
    main = torch.cuda.current_stream(device)
    key = (device, main.stream_id)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device, priority=-1)
    return _SIDE_STREAMS[key]


def decode_attention_cuda(q, k, v, scale: float, state: PrefillState, cos, sin, gen_k, gen_v,
                          gen_len, chunk_size: int, budget_chunks: int, rope_style: str,
                          workspace: DecodeWorkspace | None = None,
                          overlap: bool = True, parts: int | None = None,
                          policy: str = "shadowkv") -> torch.Tensor:
    """One decode step of a rewritten site on Triton kernels (``reference.decode_attention``).

    Parameters
    ----------
    q : [B, Hq, T, d] post-RoPE queries; k, v : [B, Hkv, T, d] the new tokens' post-RoPE keys
        and values.
    scale : the model's attention scale.
    state : the site's PrefillState (device tensors; ``values`` pinned host memory on CUDA).
    cos, sin : [B, N*C, rd/2] rotary factors of the sparse region, one per rotated pair
        (reference.rope_tables; shared by the model's sites).
    gen_k, gen_v : [B, Hkv, Gcap, d] generated tokens (updated in place);
    gen_len : [1] int64 generated count (updated in place). No host sync anywhere.
    chunk_size, budget_chunks, rope_style : as the reference.
    workspace : buffers from the previous step of this site; None allocates fresh ones and
        loads every selected chunk. With a workspace only chunks not held already are loaded.
    overlap : fetch values on a side stream, overlapped with the key rebuild (CUDA, eager or
        under CUDA-graph capture; not inside an Inductor graph).
    parts : batch slices of the pipeline (see ``gather_step``).
    policy : one of ``KERNEL_POLICIES`` (the scorer reads state.aux for Quest-bound heads).

    Returns
    -------
    [B, Hq, T, d] in q's dtype. Selected keys are rounded to the workspace dtype (the model's),
    where the reference keeps them in fp32.
    """
    if workspace is None:
        workspace = DecodeWorkspace.allocate(state, budget_chunks, chunk_size, dtype=gen_k.dtype)
        reuse = False
    else:
        reuse = True

    def attend(rows: slice, slot_chunk, sel_slot):
        return _attend(_rows(q, rows), scale, _state_rows(state, rows),
                       _workspace_rows(workspace, rows), slot_chunk, sel_slot,
                       _rows(gen_k, rows), _rows(gen_v, rows), gen_len, chunk_size)

    _, out = gather_step(q, k, v, scale, state, cos, sin, gen_k, gen_v, gen_len, chunk_size,
                         budget_chunks, rope_style, workspace, reuse=reuse, overlap=overlap,
                         parts=parts, attend=attend, policy=policy)
    return out


# Batch slices of a decode step's value fetch on CUDA: slice i's attention (HBM-bound) runs
# while slice i+1's values cross PCIe, instead of waiting for the whole batch's fetch. In batch
# lanes the other lane's work covers the fetch and slices only add small launches (H100, 122K,
# 2 lanes, side by side: 34.3 vs 37.9 ms a step at batch 10, 34.5 and 36.4 vs 41.7 ms at 11;
# results/h100/lanes_parts/).
PIPELINE_PARTS = 4
LANE_PARTS = 1


def gather_step(q, k, v, scale: float, state: PrefillState, cos, sin, gen_k, gen_v, gen_len,
                chunk_size: int, budget_chunks: int, rope_style: str,
                workspace: DecodeWorkspace, reuse: bool = True, overlap: bool = True,
                parts: int | None = None, attend=None, policy: str = "shadowkv"):
    """The part of ``decode_attention_cuda`` before the attention (``reference.decode_gather``):
    append the new tokens, select chunks and load the ones the workspace does not hold.

    reuse : the workspace holds the previous step's chunks (False: load every selected chunk
        and leave the workspace's slot maps as they are).
    parts : the fetch runs in this many batch slices (None: where the fetch runs on a side
        stream, ``LANE_PARTS`` in a batch lane, else ``PIPELINE_PARTS``; without a side
        stream 1; never more than B).
    attend : attend(rows, slot_chunk, sel_slot) for the fused step: called on each batch slice
        (a slice object over the batch) once its values are in; its results are concatenated.
        sel_slot: [rows, Hkv, K] the slots of the selected chunks where the workspace is a
        value cache (more slots than the K selected chunks), else None (slot j holds the j-th).
    policy : one of ``KERNEL_POLICIES``.

    Returns (slot_chunk, attended): the chunk of each slot [B, Hkv, S] as the attention must
    read it (the workspace's slot_chunk when reusing), and attend's results ([B, ...]; None
    without attend).
    """
    Hq, H = q.shape[1], k.shape[1]
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({H})")
    ref.append_generated(k, v, gen_k, gen_v, gen_len)
    B, slots = q.shape[0], workspace.slot_chunk.shape[-1]
    if slots == 0:
        return (workspace.slot_chunk,
                attend(ALL_ROWS, workspace.slot_chunk, None) if attend else None)
    # one selection for the whole batch. A selection per batch slice, to overlap slice i+1's
    # scores and top-k with slice i's fetch, was slower (H100, 128K batch 8, one layer in a CUDA
    # graph: 458 -> 709 us at 4 slices; then with torch.topk, whose cost hardly depends on its
    # row count; not retried with chunk_topk).
    radius = state.aux if policy in BOUNDED else None
    idx, scores = select_top_chunks(q, state.landmarks, state.selectable, scale, budget_chunks,
                                    radius)
    K = idx.shape[-1]
    if q.is_cuda and _pageable(state.values):
        slot_chunk, sel_slot = _gather_on_host(idx, scores, state, cos, sin, chunk_size,
                                               rope_style, workspace, reuse)
        return slot_chunk, attend(ALL_ROWS, slot_chunk, sel_slot) if attend else None

    streams = overlap and _can_fork(q)
    n = parts or ((LANE_PARTS if lanes.in_lane() else PIPELINE_PARTS) if streams else 1)
    if n > 1 and B > 1:
        n = min(n, B)
        slices = [slice(B * i // n, B * (i + 1) // n) for i in range(n)]
    else:  # no slicing at all: traced calls keep a symbolic batch free of guards
        slices = [ALL_ROWS]
    load_chunk, load_slot, n_load, slot_chunk, sel_slot = _plan(idx, scores, workspace, reuse)
    # the slices' fetches queue on the side stream; each slice's attention waits for its own
    done = [_fetch_async(_rows(workspace.sel_v, rows), _rows(state.values, rows),
                         _rows(load_chunk, rows), _rows(load_slot, rows), _rows(n_load, rows),
                         streams, K) for rows in slices]
    rebuild_keys_into(workspace.sel_k, state.U, state.SV, cos, sin, load_chunk, load_slot, n_load,
                      chunk_size, rope_style, max_loads=K)
    if streams:
        lanes.handoff()  # another batch lane computes while these values cross PCIe
    attended = []
    for rows, fetched in zip(slices, done):
        if fetched is not None:
            torch.cuda.current_stream(q.device).wait_event(fetched)
        if attend is not None:
            attended.append(attend(rows, _rows(slot_chunk, rows),
                                   None if sel_slot is None else _rows(sel_slot, rows)))
    if attend is None:
        return slot_chunk, None
    return slot_chunk, attended[0] if len(attended) == 1 else torch.cat(attended)


ALL_ROWS = slice(None)


def _rows(t, rows: slice):
    """t's batch rows, or t itself for the whole batch."""
    return t if rows == ALL_ROWS else t[rows]


def _state_rows(state: PrefillState, rows: slice) -> PrefillState:
    return state if rows == ALL_ROWS else PrefillState(*(t[rows] for t in state))


def _workspace_rows(ws: DecodeWorkspace, rows: slice) -> DecodeWorkspace:
    return ws if rows == ALL_ROWS else DecodeWorkspace(*(t[rows] for t in ws.tensors()))


def _plan(idx, scores, workspace, reuse):
    """The selected chunks idx [B, Hkv, K] to load: (load_chunk, load_slot, n_load, slot_chunk,
    sel_slot); sel_slot is None unless the workspace is a value cache (``reuse_plan``)."""
    if reuse:
        load_chunk, load_slot, n_load, sel_slot = reuse_plan(
            idx, workspace.slot_chunk, workspace.chunk_slot, scores)
        slot_chunk = workspace.slot_chunk
        if slot_chunk.shape[-1] == idx.shape[-1]:
            sel_slot = None  # slot j holds the j-th selected chunk's data: read them in order
    else:
        if workspace.slot_chunk.shape[-1] != idx.shape[-1]:
            raise ValueError("a workspace without reuse must have one slot per selected chunk")
        load_chunk, load_slot, n_load = full_load(idx)
        slot_chunk, sel_slot = load_chunk, None
    workspace.n_load.copy_(n_load)
    return load_chunk, load_slot, n_load, slot_chunk, sel_slot


def _gather_on_host(idx, scores, state, cos, sin, chunk_size, rope_style, workspace, reuse):
    """Loads for a pageable value store: the GPU cannot read it, so values are gathered on the
    host (syncs; slow). Returns (slot_chunk, sel_slot) as ``_plan``."""
    load_chunk, load_slot, n_load, slot_chunk, sel_slot = _plan(idx, scores, workspace, reuse)
    rebuild_keys_into(workspace.sel_k, state.U, state.SV, cos, sin,
                      load_chunk, load_slot, n_load, chunk_size, rope_style)
    held = slot_chunk.long()
    workspace.sel_v.copy_(ref.fetch_values(state.values, held.clamp(min=0), idx.device))
    return slot_chunk, sel_slot


def load_chunks(sel_k, sel_v, state: PrefillState, cos, sin, load_chunk, load_slot, n_load,
                chunk_size: int, rope_style: str, overlap: bool = True):
    """Rebuild the listed chunks' keys into sel_k and fetch their values into sel_v.

    overlap : fetch on a side stream while the rebuild runs (``_fetch_async``).
    """
    done = _fetch_async(sel_v, state.values, load_chunk, load_slot, n_load,
                        overlap and _can_fork(sel_k))
    rebuild_keys_into(sel_k, state.U, state.SV, cos, sin, load_chunk, load_slot, n_load,
                      chunk_size, rope_style)
    if done is not None:
        torch.cuda.current_stream(sel_k.device).wait_event(done)


def _can_fork(t: torch.Tensor) -> bool:
    """Whether work on t may go to a side stream: CUDA, eager or under CUDA-graph capture (a
    capture forks onto the side stream and joins back, so replays overlap too), not while
    Inductor traces."""
    return t.is_cuda and not is_fake(t) and not torch.compiler.is_compiling()


def _fetch_async(sel_v, values, load_chunk, load_slot, n_load, fork: bool, max_loads: int = 0):
    """Fetch the listed chunks' values: with fork, on the side stream after the work queued so
    far on the current one, returning the event that marks it done; else now (None)."""
    if not fork:
        fetch_values_into(sel_v, values, load_chunk, load_slot, n_load, max_loads=max_loads)
        return None
    side = _side_stream(sel_v.device)
    side.wait_stream(torch.cuda.current_stream(sel_v.device))
    with torch.cuda.stream(side):
        fetch_values_into(sel_v, values, load_chunk, load_slot, n_load, max_loads=max_loads)
        done = side.record_event()
    for t in (load_chunk, load_slot, n_load):
        t.record_stream(side)  # freed on the current stream after use on the side stream
    return done


def _attend(q, scale, state, workspace, slot_chunk, sel_slot, gen_k, gen_v, gen_len, C):
    return sparse_decode(q, scale, state.outlier_k, state.outlier_v, state.outlier_valid,
                         workspace.sel_k, workspace.sel_v, slot_chunk, state.sparse_valid,
                         state.selectable, state.local_k, state.local_v, state.local_valid,
                         gen_k, gen_v, gen_len, chunk_size=C, sel_slot=sel_slot)


_WARNED = set()


def _pageable(values: torch.Tensor) -> bool:
    """True (and a warning, once) for a host value store that is not pinned."""
    if is_fake(values) or values.is_cuda or is_pinned(values):
        return False
    if "pageable" not in _WARNED:
        _WARNED.add("pageable")
        log.warning("shadowkv: the host value store is not pinned memory, so the GPU cannot read "
                    "it directly; values are gathered on the host each step (slow). Pin it "
                    "(torch.empty(..., pin_memory=True)) for zero-copy fetches.")
    return True


_ROUTE = {"registered": False, "enabled": True}


def _decode_op_cuda(q, k, v, state, cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v, slot_chunk,
                    chunk_slot, n_load, scale, chunk_size, budget_chunks, rope_style,
                    policy="shadowkv"):
    """``shadowkv::decode`` on CUDA: the kernels, with the workspace carried between steps.
    Policies outside ``KERNEL_POLICIES`` (accuracy baselines) run the reference."""
    st = PrefillState(*state)
    if not _ROUTE["enabled"] or policy not in KERNEL_POLICIES:
        return ref.decode_attention(q, k, v, scale, st, cos, sin, gen_k, gen_v, gen_len,
                                    chunk_size, budget_chunks, rope_style, policy)
    ws = DecodeWorkspace(sel_k, sel_v, slot_chunk, chunk_slot, n_load)

    def step(q, k, v):
        return decode_attention_cuda(q, k, v, scale, st, cos, sin, gen_k, gen_v, gen_len,
                                     chunk_size, budget_chunks, rope_style, workspace=ws,
                                     policy=policy)

    return _replayed(step, q, k, v, st, gen_len, [cos, sin, gen_k, gen_v, *ws.tensors()],
                     ("decode", scale, chunk_size, budget_chunks, rope_style, policy))


def _decode_gather_op_cuda(q, k, v, state, cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v,
                           slot_chunk, chunk_slot, n_load, scale, chunk_size, budget_chunks,
                           rope_style, policy="shadowkv"):
    """``shadowkv::decode_gather`` on CUDA: ``gather_step`` with reuse, replayed as a CUDA graph
    like ``shadowkv::decode`` (the attention that follows is Inductor's). Policies outside
    ``KERNEL_POLICIES`` run the reference."""
    st = PrefillState(*state)
    if not _ROUTE["enabled"] or policy not in KERNEL_POLICIES:
        return ref.decode_gather(q, k, v, scale, st, cos, sin, gen_k, gen_v, gen_len, sel_k,
                                 sel_v, slot_chunk, chunk_slot, n_load, chunk_size,
                                 budget_chunks, rope_style, policy)
    ws = DecodeWorkspace(sel_k, sel_v, slot_chunk, chunk_slot, n_load)

    def step(q, k, v):
        gather_step(q, k, v, scale, st, cos, sin, gen_k, gen_v, gen_len, chunk_size,
                    budget_chunks, rope_style, ws, policy=policy)

    _replayed(step, q, k, v, st, gen_len, [cos, sin, gen_k, gen_v, *ws.tensors()],
              ("gather", scale, chunk_size, budget_chunks, rope_style, policy))


# the split route's fetches in flight: (device, sel_v address) -> event recorded when done
_PENDING = {}


def _decode_plan_op_cuda(idx, k, v, state, gen_k, gen_v, gen_len, sel_v, slot_chunk,
                         chunk_slot, n_load):
    """``shadowkv::decode_plan`` on CUDA: append the new tokens, plan the loads with reuse and
    start the value fetch on the side stream (``_PENDING`` holds its event until
    ``shadowkv::fetch_wait``); without a side stream the fetch runs now."""
    st = PrefillState(*state)
    if not _ROUTE["enabled"]:
        return ref.plan_loads(idx, k, v, st, gen_k, gen_v, gen_len, sel_v, slot_chunk,
                              chunk_slot, n_load)
    ref.append_generated(k, v, gen_k, gen_v, gen_len)
    load_chunk, load_slot, n, _ = reuse_plan(idx, slot_chunk, chunk_slot)
    n_load.copy_(n)
    if idx.numel() == 0:
        return load_chunk, load_slot
    if _pageable(st.values):
        sel_v.copy_(ref.fetch_values(st.values, slot_chunk.long(), idx.device))
    else:
        done = _fetch_async(sel_v, st.values, load_chunk, load_slot, n, _can_fork(idx))
        if done is not None:
            _PENDING[(sel_v.device, sel_v.data_ptr())] = done
    return load_chunk, load_slot


def _rebuild_keys_op_cuda(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size,
                          rope_style):
    """``shadowkv::rebuild_keys`` on CUDA where Inductor does not lower it: the kernel."""
    if not _ROUTE["enabled"]:
        return ref.rebuild_into(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load,
                                chunk_size, rope_style)
    rebuild_keys_into(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size,
                      rope_style)


def _fetch_wait_op_cuda(sel_v, sel_k):
    """``shadowkv::fetch_wait`` on CUDA: the current stream waits for the pending fetch into
    sel_v, if any (a batch lane first hands the stream on, as ``gather_step`` does)."""
    done = _PENDING.pop((sel_v.device, sel_v.data_ptr()), None)
    if done is not None:
        lanes.handoff()
        torch.cuda.current_stream(sel_v.device).wait_event(done)


def _landmark_scores_op_cuda(q, landmarks, selectable, scale, radius=None):
    """``shadowkv::landmark_scores`` on CUDA where Inductor does not lower it (eager calls, the
    lowering's fallback): the kernels of ``templates.landmark_scores``."""
    if not _ROUTE["enabled"]:
        return ref.selection_scores(q, landmarks, selectable, scale, radius)
    return landmark_scores(q, landmarks, selectable, scale, fill=-1.0, radius=radius)


def _replayed(step, q, k, v, st: PrefillState, gen_len, buffers, config: tuple):
    """step(q, k, v), replayed as the site's CUDA graph (StepGraphs) when the state allows it:
    not while another graph captures, and only with page-locked values (the GPU reads them
    directly). The graph is keyed by every persistent buffer's address and shape."""
    if (torch.cuda.is_current_stream_capturing() or not is_pinned(st.values)
            or lanes.in_lane()):  # a lane hands the stream on inside the step
        return step(q, k, v)
    key = (tuple((t.data_ptr(), tuple(t.shape)) for t in (*st, gen_len, *buffers)), q.shape,
           q.dtype, k.shape, *config)
    return _STEP_GRAPHS.run(gen_len, key, step, (q, k, v))


def _kernel_takes(q, outlier_k, sel_v, gen_v) -> bool:
    """Whether ``sparse_decode`` takes these shapes (else the reference runs)."""
    G = q.shape[1] // max(outlier_k.shape[1], 1)
    return (sel_v.shape[-1] == q.shape[-1] and gen_v.shape[-1] == q.shape[-1]
            and G * q.shape[2] <= 128)


def _sparse_attention_op_cuda(q, scale, outlier_k, outlier_v, outlier_valid, sel_k, sel_v,
                              slot_chunk, sparse_valid, selectable, local_k, local_v,
                              local_valid, gen_k, gen_v, gen_len, chunk_size):
    """``shadowkv::sparse_attention`` on CUDA where Inductor does not lower it (eager calls, the
    lowering's fallback): the flash-decoding kernels of ``templates.sparse_decode``."""
    args = (q, scale, outlier_k, outlier_v, outlier_valid, sel_k, sel_v, slot_chunk,
            sparse_valid, selectable, local_k, local_v, local_valid, gen_k, gen_v, gen_len)
    if not _ROUTE["enabled"] or not _kernel_takes(q, outlier_k, sel_v, gen_v):
        return ref.sparse_attention(*args, chunk_size)
    contiguous = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    return sparse_decode(*contiguous, chunk_size=chunk_size)


def graph_pool(pools: dict, stream_id: int):
    """The id of the memory pool that the CUDA graphs captured on this stream share, made on
    first use. A MemPool object, not a bare graph_pool_handle: the allocator keeps a handle's
    pool (with use count 0) once all its graphs are gone, and a capture into it then fails an
    internal assert (a new prompt's capture after the last one's graphs went)."""
    if stream_id not in pools:
        pools[stream_id] = torch.cuda.MemPool()
    return pools[stream_id].id


class StepGraphs:
    """One CUDA graph per site for its decode step (about a dozen small kernels).

    Eager launches cost more than the kernels themselves (seen on H100/H200: ~3 ms eager vs
    0.2-0.5 ms replayed for a 128K step), and the surrounding model graph cannot be captured
    whole (its cache length changes every step). A site's first step runs eagerly (it compiles
    the kernels), the second is captured and every later one replays. The state's addresses
    are part of the key: a new prompt or a grown generated-token buffer captures anew.
    """

    def __init__(self):
        self.graphs = {}  # site (id of its gen_len) -> (key, graph, static inputs, output)
        self.seen = {}    # site -> key of its last eager step
        # memory pool per stream: the sites of one stream replay one after another and may
        # share one; graphs replayed on other streams at the same time must not
        self.pools = {}

    def drop(self, site: int):
        self.graphs.pop(site, None)
        self.seen.pop(site, None)

    def run(self, gen_len: torch.Tensor, key, step, inputs):
        site = id(gen_len)
        stream = torch.cuda.current_stream(gen_len.device).stream_id
        key = (key, stream)  # a site that moves to another stream captures again, in its pool
        if site not in self.seen:  # the graph goes when the site's state goes
            weakref.finalize(gen_len, self.drop, site)
        entry = self.graphs.get(site)
        if entry is not None and entry[0] == key:
            _, graph, static, out = entry
            for dst, src in zip(static, inputs):
                dst.copy_(src)
            graph.replay()
            return None if out is None else out.clone()  # the next replay overwrites `out`
        if self.seen.get(site) != key:  # first step with this state: eager, compiles kernels
            self.graphs.pop(site, None)
            self.seen[site] = key
            return step(*inputs)
        static = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=graph_pool(self.pools, stream)):
                out = step(*static)
        except RuntimeError as e:  # capture records only, so the state is untouched: run eager
            log.warning("shadowkv: decode step not capturable in a CUDA graph (%s); eager", e)
            self.seen[site] = None
            return step(*inputs)
        self.graphs[site] = (key, graph, static, out)
        graph.replay()  # capture records without running
        return None if out is None else out.clone()

    def clear(self):
        self.graphs, self.seen, self.pools = {}, {}, {}


_STEP_GRAPHS = StepGraphs()


def register_cuda_kernel(enabled: bool = True) -> None:
    """Route ``shadowkv::decode`` on CUDA tensors to ``decode_attention_cuda`` (and
    ``shadowkv::decode_gather`` to ``gather_step``, the split route's ops to the kernels of the
    same parts, ``shadowkv::sparse_attention`` to ``sparse_decode``).

    Idempotent; ``enabled=False`` routes CUDA back to the reference implementation (tests use
    it to compare the two routes).
    """
    from . import ops
    if not _ROUTE["registered"]:
        ops.decode.register_kernel("cuda")(_decode_op_cuda)
        ops.decode_gather.register_kernel("cuda")(_decode_gather_op_cuda)
        ops.sparse_attention.register_kernel("cuda")(_sparse_attention_op_cuda)
        ops.decode_plan.register_kernel("cuda")(_decode_plan_op_cuda)
        ops.rebuild_keys.register_kernel("cuda")(_rebuild_keys_op_cuda)
        ops.fetch_wait.register_kernel("cuda")(_fetch_wait_op_cuda)
        ops.landmark_scores.register_kernel("cuda")(_landmark_scores_op_cuda)
        _ROUTE["registered"] = True
    _ROUTE["enabled"] = enabled
    log.debug("shadowkv::decode on CUDA: %s", "Triton kernels" if enabled else "reference")


@torch.library.triton_op("shadowkv::decode_triton",
                         mutates_args=("gen_k", "gen_v", "gen_len", "sel_k", "sel_v",
                                       "slot_chunk", "chunk_slot", "n_load"))
def decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: list[torch.Tensor],
                  cos: torch.Tensor, sin: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor,
                  gen_len: torch.Tensor, sel_k: torch.Tensor, sel_v: torch.Tensor,
                  slot_chunk: torch.Tensor, chunk_slot: torch.Tensor, n_load: torch.Tensor,
                  scale: float, chunk_size: int, budget_chunks: int,
                  rope_style: str) -> torch.Tensor:
    """``shadowkv::decode`` as a triton_op, so Inductor sees into the kernels.

    Same schema as ``shadowkv::decode``; sel_k, sel_v, slot_chunk, chunk_slot, n_load are a
    ``DecodeWorkspace``'s tensors. Returns [B, Hq, T, d] in q's dtype.
    """
    ws = DecodeWorkspace(sel_k, sel_v, slot_chunk, chunk_slot, n_load)
    return decode_attention_cuda(q, k, v, scale, PrefillState(*state), cos, sin, gen_k, gen_v,
                                 gen_len, chunk_size, budget_chunks, rope_style, workspace=ws,
                                 overlap=False)


@torch.library.triton_op("shadowkv::sparse_attention_triton", mutates_args=())
def sparse_attention_triton(q: torch.Tensor, scale: float, outlier_k: torch.Tensor,
                            outlier_v: torch.Tensor, outlier_valid: torch.Tensor,
                            sel_k: torch.Tensor, sel_v: torch.Tensor, slot_chunk: torch.Tensor,
                            sparse_valid: torch.Tensor, selectable: torch.Tensor,
                            local_k: torch.Tensor, local_v: torch.Tensor,
                            local_valid: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor,
                            gen_len: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``shadowkv::sparse_attention`` as a triton_op: where Inductor has no template route, it
    still sees into the kernels (``templates.sparse_decode``), as user-defined Triton kernels.
    Same schema and result as ``shadowkv::sparse_attention`` (value head dim = key head dim,
    G*T <= 128)."""
    return sparse_decode(q, scale, outlier_k, outlier_v, outlier_valid, sel_k.contiguous(),
                         sel_v.contiguous(), slot_chunk, sparse_valid, selectable, local_k,
                         local_v, local_valid, gen_k.contiguous(), gen_v.contiguous(), gen_len,
                         chunk_size=chunk_size)

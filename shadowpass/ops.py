"""The ShadowKV custom ops (namespace ``shadowkv``): schema, fake shapes, reference kernels.

Only these run-style ops enter graphs; state reaches them as tensors (never handles).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import policies
from . import reference as ref
from .reference import hit_rate  # noqa: F401  (ops.hit_rate for reports)

_STATE_FIELDS = ref.PrefillState._fields


def _fresh(t: torch.Tensor) -> torch.Tensor:
    # custom-op outputs must not alias inputs and must be contiguous, as the fakes promise
    return t if t.is_contiguous() and not t._is_view() else t.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("shadowkv::prefill_state", mutates_args=())
def prefill_state(k_pre: torch.Tensor, k_post: torch.Tensor, v: torch.Tensor,
                  mask: Optional[torch.Tensor], mask_kind: str, rank: int, chunk_size: int,
                  outlier_chunks: int, local_chunks: int, sites_left: int,
                  policy: str = "shadowkv", mask_ok: Optional[torch.Tensor] = None,
                  q: Optional[torch.Tensor] = None, scale: float = 1.0, budget_chunks: int = 0,
                  landmark_dtype: str = "model") -> List[torch.Tensor]:
    """Build a site's state from the prompt; returns the fields of reference.PrefillState.
    q, scale, budget_chunks: only for policies that calibrate at prefill (shadowkv_hybrid).
    landmark_dtype: ``ShadowKVConfig.landmark_dtype``."""
    state = ref.prefill_state(k_pre, k_post, v, mask, mask_kind, rank, chunk_size,
                              outlier_chunks, local_chunks, sites_left, policy, mask_ok,
                              q, scale, budget_chunks, landmark_dtype)
    return [_fresh(t) for t in state]


@prefill_state.register_fake
def _(k_pre, k_post, v, mask, mask_kind, rank, chunk_size, outlier_chunks, local_chunks,
      sites_left, policy="shadowkv", mask_ok=None, q=None, scale=1.0, budget_chunks=0,
      landmark_dtype="model"):
    B, H, T, d = k_post.shape
    torch._check(k_pre.shape == k_post.shape, lambda: "k_pre and k_post must have equal shapes")
    torch._check(v.shape[:3] == k_post.shape[:3], lambda: "v must be [B, Hkv, T, dv]")
    C = chunk_size
    N, O, L, r = ref.layout(T, C, outlier_chunks, local_chunks, rank, H * d)
    S = N * C
    dev, dv = k_post.device, v.shape[-1]
    new = k_post.new_empty
    b = dict(dtype=torch.bool, device=dev)
    lm = new(B, H, N, d, dtype=ref.landmark_storage_dtype(landmark_dtype, k_post.dtype))
    return [new(B, S, r), new(B, H, r, d), lm, torch.empty(B, H, N, **b),
            torch.empty(B, S, **b), new(B, H, O * C, d), v.new_empty(B, H, O * C, dv),
            torch.empty(B, H, O * C, **b), new(B, H, L, d), v.new_empty(B, H, L, dv),
            torch.empty(B, L, **b), torch.empty(B, H, N, C, dv, dtype=v.dtype, device="cpu"),
            new(*policies.aux_shape(policy, B, H, N, C, d))]


@torch.library.custom_op("shadowkv::prefill_attention", mutates_args=())
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """A prompt's causal attention over its real tokens, without a [T, T] mask (the reference)."""
    return ref.prefill_attention(q, k, v, valid, scale)


@prefill_attention.register_fake
def _(q, k, v, valid, scale):
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of KV heads")
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("shadowkv::rope_tables", mutates_args=())
def rope_tables(cos: torch.Tensor, sin: torch.Tensor, chunk_size: int, local_chunks: int,
                rope_style: str) -> List[torch.Tensor]:
    """The rotary factors of the sparse region, one value per rotated pair of dims
    (reference.rope_tables), one copy shared by all sites that use them."""
    return [_fresh(t) for t in ref.rope_tables(cos, sin, chunk_size, local_chunks, rope_style)]


@rope_tables.register_fake
def _(cos, sin, chunk_size, local_chunks, rope_style):
    torch._check(cos.shape == sin.shape, lambda: "cos and sin must have equal shapes")
    B, T, rd = cos.shape
    S = ref.layout(T, chunk_size, 0, local_chunks, 1, 1)[0] * chunk_size
    half = 0 if rope_style == "none" else rd // 2
    return [cos.new_empty(B, S, half), sin.new_empty(B, S, half)]


def _check_step_inputs(q, k, state):
    torch._check(len(state) == len(_STATE_FIELDS), lambda: "state must hold every PrefillState field")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of KV heads")


@torch.library.custom_op("shadowkv::decode", mutates_args=(
    "gen_k", "gen_v", "gen_len", "sel_k", "sel_v", "slot_chunk", "chunk_slot", "n_load"))
def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: List[torch.Tensor],
           cos: torch.Tensor, sin: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor,
           gen_len: torch.Tensor, sel_k: torch.Tensor, sel_v: torch.Tensor,
           slot_chunk: torch.Tensor, chunk_slot: torch.Tensor, n_load: torch.Tensor,
           scale: float, chunk_size: int, budget_chunks: int, rope_style: str,
           policy: str = "shadowkv") -> torch.Tensor:
    """Sparse decode attention of a rewritten site (see reference.decode_attention).

    sel_k ... n_load are the reuse workspace of the CUDA kernels (shadowpass.kernels); the
    reference recomputes the selection each step and leaves them untouched.
    """
    return ref.decode_attention(q, k, v, scale, ref.PrefillState(*state), cos, sin, gen_k, gen_v,
                                gen_len, chunk_size, budget_chunks, rope_style, policy)


@decode.register_fake
def _(q, k, v, state, cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v, slot_chunk, chunk_slot,
      n_load, scale, chunk_size, budget_chunks, rope_style, policy="shadowkv"):
    _check_step_inputs(q, k, state)
    torch._check(gen_k.shape[:2] == k.shape[:2], lambda: "gen_k must be [B, Hkv, Gcap, d]")
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("shadowkv::decode_extend", mutates_args=(
    "gen_k", "gen_v", "gen_len", "sel_k", "sel_v", "slot_chunk", "chunk_slot", "n_load"))
def decode_extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: List[torch.Tensor],
                  cos: torch.Tensor, sin: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor,
                  gen_len: torch.Tensor, sel_k: torch.Tensor, sel_v: torch.Tensor,
                  slot_chunk: torch.Tensor, chunk_slot: torch.Tensor, n_load: torch.Tensor,
                  scale: float, chunk_size: int, budget_chunks: int, rope_style: str,
                  policy: str = "shadowkv", causal: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """T new tokens on a sequence with ShadowKV state (a follow-up turn with the old cache):
    ``shadowkv::decode`` once per token, in order, so the result is that of decoding them one
    at a time (each token selects its own chunks and sees the new tokens before it).
    causal: 0-d bool from ``reference.new_tokens_causal`` (None: the model passed no mask)."""
    if causal is not None and not bool(causal):
        raise ValueError(ref.NEW_TOKENS_NOT_CAUSAL)
    step = torch.ops.shadowkv.decode.default
    outs = [step(q[:, :, t:t + 1].contiguous(), k[:, :, t:t + 1].contiguous(),
                 v[:, :, t:t + 1].contiguous(), state, cos, sin, gen_k, gen_v, gen_len, sel_k,
                 sel_v, slot_chunk, chunk_slot, n_load, scale, chunk_size, budget_chunks,
                 rope_style, policy)
            for t in range(q.shape[2])]
    return torch.cat(outs, 2)


@decode_extend.register_fake
def _(q, k, v, state, cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v, slot_chunk, chunk_slot,
      n_load, scale, chunk_size, budget_chunks, rope_style, policy="shadowkv", causal=None):
    _check_step_inputs(q, k, state)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("shadowkv::decode_gather", mutates_args=(
    "gen_k", "gen_v", "gen_len", "sel_k", "sel_v", "slot_chunk", "chunk_slot", "n_load"))
def decode_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: List[torch.Tensor],
                  cos: torch.Tensor, sin: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor,
                  gen_len: torch.Tensor, sel_k: torch.Tensor, sel_v: torch.Tensor,
                  slot_chunk: torch.Tensor, chunk_slot: torch.Tensor, n_load: torch.Tensor,
                  scale: float, chunk_size: int, budget_chunks: int, rope_style: str,
                  policy: str = "shadowkv") -> None:
    """The first part of a decode step (``shadowkv::decode``'s schema, no output): append the
    new tokens, select chunks, rebuild their keys and fetch their values into the workspace
    (sel_k ... n_load, which must be allocated: ``workspace(..., gather=True)``). The
    attention is then ``shadowkv::sparse_attention`` over the workspace (reference.decode_gather).
    """
    ref.decode_gather(q, k, v, scale, ref.PrefillState(*state), cos, sin, gen_k, gen_v, gen_len,
                      sel_k, sel_v, slot_chunk, chunk_slot, n_load, chunk_size, budget_chunks,
                      rope_style, policy)


@decode_gather.register_fake
def _(q, k, v, state, cos, sin, gen_k, gen_v, gen_len, sel_k, sel_v, slot_chunk, chunk_slot,
      n_load, scale, chunk_size, budget_chunks, rope_style, policy="shadowkv"):
    _check_step_inputs(q, k, state)
    torch._check(sel_k.shape[2] == slot_chunk.shape[2] * chunk_size,
                 lambda: "sel_k must be [B, Hkv, K*C, d] for slot_chunk [B, Hkv, K]")
    return None


@torch.library.custom_op("shadowkv::landmark_scores", mutates_args=())
def landmark_scores(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor,
                    scale: float, radius: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The chunk scores a split decode step takes its top-k of (reference.selection_scores):
    [B, Hkv, N] fp32, unselectable chunks at -1. Functional, so Inductor can lower it:
    shadowpass.lowering turns it into two Triton templates on CUDA; the CPU runs the reference.
    radius: [B, Hkv, N, d] for the policies that score by Quest's bound, else None."""
    _check_scores_inputs(q, landmarks, selectable, radius)
    return ref.selection_scores(q, landmarks, selectable, scale, radius)


@landmark_scores.register_fake
def _(q, landmarks, selectable, scale, radius=None):
    _check_scores_inputs(q, landmarks, selectable, radius)
    return q.new_empty(q.shape[0], landmarks.shape[1], landmarks.shape[2], dtype=torch.float32)


def _check_scores_inputs(q, landmarks, selectable, radius):
    B, Hq, T, d = q.shape
    H = landmarks.shape[1]
    torch._check(H > 0 and Hq % H == 0,
                 lambda: f"query heads ({Hq}) must be a multiple of KV heads ({H})")
    torch._check(landmarks.dim() == 4 and landmarks.shape[0] == B and landmarks.shape[3] == d,
                 lambda: "landmarks must be [B, Hkv, N, d] with q's batch and head dim")
    torch._check(selectable.shape == landmarks.shape[:3], lambda: "selectable must be [B, Hkv, N]")
    torch._check(radius is None or radius.shape == landmarks.shape,
                 lambda: "radius must have the landmarks' shape")


@torch.library.custom_op("shadowkv::decode_plan", mutates_args=(
    "gen_k", "gen_v", "gen_len", "sel_v", "slot_chunk", "chunk_slot", "n_load"))
def decode_plan(idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: List[torch.Tensor],
                gen_k: torch.Tensor, gen_v: torch.Tensor, gen_len: torch.Tensor,
                sel_v: torch.Tensor, slot_chunk: torch.Tensor, chunk_slot: torch.Tensor,
                n_load: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A split decode step after its top-k idx [B, Hkv, K] (reference.plan_loads): append the
    new tokens, plan which chunks to load into which slots of the workspace, and fetch their
    values into sel_v. Returns the load list (load_chunk, load_slot) for
    ``shadowkv::rebuild_keys``. On CUDA only the chunks the workspace does not hold are loaded,
    and the fetch reads pinned host memory on a side stream until ``shadowkv::fetch_wait``."""
    return ref.plan_loads(idx, k, v, ref.PrefillState(*state), gen_k, gen_v, gen_len, sel_v,
                          slot_chunk, chunk_slot, n_load)


@decode_plan.register_fake
def _(idx, k, v, state, gen_k, gen_v, gen_len, sel_v, slot_chunk, chunk_slot, n_load):
    torch._check(len(state) == len(_STATE_FIELDS), lambda: "state must hold every PrefillState field")
    torch._check(idx.shape == slot_chunk.shape,
                 lambda: "idx must be [B, Hkv, K] for a workspace of K slots")
    return torch.empty_like(slot_chunk), torch.empty_like(slot_chunk)


@torch.library.custom_op("shadowkv::rebuild_keys", mutates_args=("sel_k",))
def rebuild_keys(sel_k: torch.Tensor, U: torch.Tensor, SV: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, load_chunk: torch.Tensor, load_slot: torch.Tensor,
                 n_load: torch.Tensor, chunk_size: int, rope_style: str) -> None:
    """Rebuild the post-RoPE keys of the load list's chunks (``shadowkv::decode_plan``) into
    their slots of sel_k [B, Hkv, K*C, d] (reference.rebuild_into): U[rows] @ SV[head], RoPE at
    the rows' prompt positions. shadowpass.lowering turns it into a Triton template on CUDA."""
    ref.rebuild_into(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size,
                     rope_style)


@rebuild_keys.register_fake
def _(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load, chunk_size, rope_style):
    torch._check(sel_k.shape[2] == load_chunk.shape[2] * chunk_size,
                 lambda: "sel_k must be [B, Hkv, K*C, d] for a load list [B, Hkv, K]")
    torch._check(SV.shape[-1] == sel_k.shape[-1], lambda: "SV must be [B, Hkv, r, d]")
    return None


@torch.library.custom_op("shadowkv::fetch_wait", mutates_args=("sel_v",))
def fetch_wait(sel_v: torch.Tensor, sel_k: torch.Tensor) -> None:
    """The values that ``shadowkv::decode_plan`` fetches into sel_v are in: on CUDA the
    current stream waits for the side stream's fetch (a no-op elsewhere). It takes sel_k so
    that it follows the key rebuild, which overlaps the fetch."""


@fetch_wait.register_fake
def _(sel_v, sel_k):
    return None


@torch.library.custom_op("shadowkv::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, scale: float, outlier_k: torch.Tensor,
                     outlier_v: torch.Tensor, outlier_valid: torch.Tensor, sel_k: torch.Tensor,
                     sel_v: torch.Tensor, slot_chunk: torch.Tensor, sparse_valid: torch.Tensor,
                     selectable: torch.Tensor, local_k: torch.Tensor, local_v: torch.Tensor,
                     local_valid: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor,
                     gen_len: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Exact attention of q over [outliers | selected | local | generated] (reference.
    sparse_attention, which gives shapes and dtypes). Functional, so Inductor can lower it:
    shadowpass.lowering turns it into a Triton template on CUDA; the CPU runs the reference."""
    return _fresh(ref.sparse_attention(q, scale, outlier_k, outlier_v, outlier_valid, sel_k,
                                       sel_v, slot_chunk, sparse_valid, selectable, local_k,
                                       local_v, local_valid, gen_k, gen_v, gen_len, chunk_size))


@sparse_attention.register_fake
def _(q, scale, outlier_k, outlier_v, outlier_valid, sel_k, sel_v, slot_chunk, sparse_valid,
      selectable, local_k, local_v, local_valid, gen_k, gen_v, gen_len, chunk_size):
    B, Hq, T, d = q.shape
    H = outlier_k.shape[1]
    torch._check(Hq % H == 0, lambda: f"query heads ({Hq}) must be a multiple of KV heads ({H})")
    for name, t in (("outlier_k", outlier_k), ("sel_k", sel_k), ("local_k", local_k),
                    ("gen_k", gen_k)):
        torch._check(t.dim() == 4 and t.shape[0] == B and t.shape[1] == H and t.shape[3] == d,
                     lambda name=name: f"{name} must be [B, Hkv, L, d]")
    dv = outlier_v.shape[-1]
    for name, t, keys in (("outlier_v", outlier_v, outlier_k), ("sel_v", sel_v, sel_k),
                          ("local_v", local_v, local_k), ("gen_v", gen_v, gen_k)):
        torch._check(t.shape[:3] == keys.shape[:3] and t.shape[3] == dv,
                     lambda name=name: f"{name} must match its keys, with head dim {dv}")
    torch._check(outlier_valid.shape == outlier_k.shape[:3], lambda: "outlier_valid must be [B, Hkv, Lo]")
    torch._check(sel_k.shape[2] == slot_chunk.shape[2] * chunk_size,
                 lambda: "sel_k must be [B, Hkv, K*C, d] for slot_chunk [B, Hkv, K]")
    torch._check(sparse_valid.shape[1] == selectable.shape[2] * chunk_size,
                 lambda: "sparse_valid must be [B, N*C] for selectable [B, Hkv, N]")
    torch._check(local_valid.shape == (B, local_k.shape[2]), lambda: "local_valid must be [B, Ll]")
    torch._check(gen_len.numel() == 1, lambda: "gen_len must be a [1] tensor")
    return q.new_empty(B, Hq, T, dv)


def workspace(state: ref.PrefillState, budget_chunks: int, chunk_size: int,
              gather: bool = False, chunk_cache: int = 1) -> List[torch.Tensor]:
    """The decode workspace of a site: the CUDA kernels' reuse buffers, and always allocated
    when ``gather`` (the decode step is decode_gather + sparse_attention, which attends every
    slot: no value cache); else empty where the reference runs. chunk_cache: slots per
    selected chunk (``ShadowKVConfig.chunk_cache``)."""
    if gather:
        return ref.DecodeWorkspace.allocate(state, budget_chunks, chunk_size).tensors()
    if _KERNELS is not None and state.U.is_cuda:
        return ref.DecodeWorkspace.allocate(state, budget_chunks, chunk_size,
                                            chunk_cache=chunk_cache).tensors()
    B, H, _, d = state.local_k.shape
    i32 = dict(dtype=torch.int32, device=state.U.device)
    return [state.local_k.new_empty(B, H, 0, d), state.local_v.new_empty(B, H, 0, d),
            torch.empty(B, H, 0, **i32), torch.empty(B, H, 0, **i32), torch.empty(B, H, **i32)]


def has_kernels() -> bool:
    """Whether the Triton kernels (shadowpass.kernels) are importable here."""
    return _KERNELS is not None


try:  # the Triton kernels become the CUDA implementation of shadowkv::decode
    from . import kernels as _KERNELS
    _KERNELS.register_cuda_kernel()
except ImportError:  # no Triton: the reference runs everywhere
    _KERNELS = None

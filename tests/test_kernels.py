"""Triton decode kernels against the reference ops (``shadowpass.reference``).

Without a GPU every kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set here
before Triton is imported) on small CPU tensors; with a GPU the same tests run the compiled
kernels on CUDA. Tests marked ``gpu`` use real sizes (Llama-3.1-8B layer) and need CUDA:

    pytest -m gpu tests/test_kernels.py
"""
import functools
import math
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the kernels need Triton (pip install triton numpy)")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(triton.language.standard.max, InterpretedFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its library "
                           "functions are not interpreted; set it in the environment (conftest.py "
                           "does so on machines without CUDA)")

from shadowpass.templates.chunk_gather import (
    fetch_values_into,
    full_load,
    rebuild_keys_into,
    reuse_plan,
)
from shadowpass.templates import chunk_topk as chunk_topk_mod
from shadowpass.templates.chunk_topk import chunk_topk
from shadowpass.templates.common import INTERPRET, as_bytes
from shadowpass.templates.landmark_scores import landmark_scores, select_top_chunks
from shadowpass.templates.sparse_decode import sparse_decode
from tolerances import KERNEL_BF16, KERNEL_FP16, KERNEL_FP32, SCORES

from shadowpass import ops, policies
from shadowpass.hostmem import is_pinned
from shadowpass import reference as ref
from shadowpass.kernels import (
    KERNEL_POLICIES,
    DecodeWorkspace,
    decode_attention_cuda,
    register_cuda_kernel,
)

DEV = "cpu" if INTERPRET else "cuda"
if DEV == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and there is no CUDA GPU", allow_module_level=True)

TOL = {torch.float32: KERNEL_FP32, torch.float16: KERNEL_FP16, torch.bfloat16: KERNEL_BF16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def rope_tables(B, S, rd, style, device=DEV, dtype=torch.float32, theta=10000.0):
    """cos/sin [B, S, rd] laid out for the rotation style (halves or interleaved pairs)."""
    if rd == 0:
        z = torch.zeros(B, S, 0, device=device, dtype=dtype)
        return z, z
    inv = 1.0 / theta ** (torch.arange(0, rd, 2).double() / rd)
    f = torch.arange(S).double()[:, None] * inv  # [S, rd/2]
    emb = torch.cat([f, f], -1) if style == "rotate_half" else f.repeat_interleave(2, -1)
    cos = emb.cos()[None].expand(B, S, rd).to(device, dtype).contiguous()
    sin = emb.sin()[None].expand(B, S, rd).to(device, dtype).contiguous()
    return cos, sin


class KernelState(NamedTuple):
    """A site's PrefillState fields plus its rotary tables (which the runtime shares), one value
    per rotated pair as reference.rope_tables keeps them."""

    U: torch.Tensor
    SV: torch.Tensor
    landmarks: torch.Tensor
    selectable: torch.Tensor
    sparse_valid: torch.Tensor
    outlier_k: torch.Tensor
    outlier_v: torch.Tensor
    outlier_valid: torch.Tensor
    local_k: torch.Tensor
    local_v: torch.Tensor
    local_valid: torch.Tensor
    values: torch.Tensor
    aux: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def triton_state(st):
    """decode_triton's state arguments: the PrefillState as a list, then cos and sin."""
    prefill, cos, sin = split(st)
    return list(prefill), cos, sin


def split(st):
    """(PrefillState, cos, sin): the decode functions' arguments."""
    return ref.PrefillState(*st[:len(ref.PrefillState._fields)]), st.cos, st.sin


def synthetic_state(B, H, N, C, d, r, rd, O, L, style, dtype, device=DEV, pad=0):
    """A PrefillState with random factors and the invariants prefill_state guarantees:
    outlier chunks and all-padding chunks are not selectable, padding is a prefix of sequence 0.
    """
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    sparse_valid = torch.ones(B, N * C, dtype=torch.bool)
    sparse_valid[0, :pad] = False
    chunk_valid = sparse_valid.view(B, 1, N, C).any(-1).expand(B, H, N)
    selectable = chunk_valid.clone()
    for b in range(B):
        for h in range(H):
            selectable[b, h, torch.randperm(N, generator=g)[:O]] = False
    outlier_valid = torch.ones(B, H, O * C, dtype=torch.bool)
    if O:
        outlier_valid[0, :, :3] = False
    local_valid = torch.ones(B, L, dtype=torch.bool)
    values = torch.randn(B, H, N, C, d, generator=g).to(dtype)
    if device == "cuda":
        values = values.pin_memory()
    cos, sin = ref.pair_tables(*rope_tables(B, N * C, rd, style, device, dtype), style)
    return KernelState(
        U=rnd(B, N * C, r, scale=r ** -0.5), SV=rnd(B, H, r, d), landmarks=rnd(B, H, N, d),
        selectable=selectable.to(device), sparse_valid=sparse_valid.to(device),
        outlier_k=rnd(B, H, O * C, d), outlier_v=rnd(B, H, O * C, d),
        outlier_valid=outlier_valid.to(device), local_k=rnd(B, H, L, d), local_v=rnd(B, H, L, d),
        local_valid=local_valid.to(device), values=values,
        aux=torch.empty(B, H, 0, d, device=device, dtype=dtype), cos=cos, sin=sin)


def distinct_chunks(B, H, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * H)]).view(B, H, K)


def test_masks_reach_kernels_without_a_copy():
    """A bool mask reaches a kernel as a uint8 view of its own bytes (a copy is a kernel launch
    per mask, per attention call); a traced one, which Inductor cannot view, as a uint8 copy."""
    mask = torch.rand(3, 5, device=DEV) > 0.5
    viewed = as_bytes(mask)
    assert viewed.dtype == torch.uint8 and viewed.data_ptr() == mask.data_ptr()
    assert torch.equal(viewed.bool(), mask)
    with torch._subclasses.FakeTensorMode() as mode:
        traced = as_bytes(mode.from_tensor(mask))
    assert traced.dtype == torch.uint8 and traced.shape == mask.shape


# ----------------------------------------------------------------------------- landmark scores
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_landmark_scores_match_reference(dtype, G, d):
    B, H, N = 2, 2, 45  # N not a multiple of the block
    q = torch.randn(B, H * G, 1, d, device=DEV, dtype=dtype)
    lm = torch.randn(B, H, N, d, device=DEV, dtype=dtype)
    sel = torch.rand(B, H, N, device=DEV) > 0.2
    sel[1, 0] = False  # a head with nothing selectable: reference gives zeros
    scale = 1 / math.sqrt(d)
    got = landmark_scores(q, lm, sel, scale, block_n=16)
    want = ref.score_chunks(q, lm, sel, scale)
    torch.testing.assert_close(got, want, atol=SCORES[0], rtol=SCORES[1])
    assert (got[1, 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,d", [(1, 64), (4, 128)])
def test_fp8_landmark_scores_match_reference(dtype, G, d):
    """Landmarks stored as float8_e4m3fn (ShadowKVConfig.landmark_dtype) are widened to q's
    dtype for the dot, as the reference widens both to fp32."""
    B, H, N = 2, 2, 70
    q = torch.randn(B, H * G, 1, d, device=DEV, dtype=dtype)
    lm = ref.store_landmarks(3 * torch.randn(B, H, N, d, device=DEV), "float8_e4m3fn", dtype)
    sel = torch.rand(B, H, N, device=DEV) > 0.2
    got = landmark_scores(q, lm, sel, d ** -0.5)
    want = ref.score_chunks(q, lm, sel, d ** -0.5)
    torch.testing.assert_close(got, want, atol=SCORES[0], rtol=SCORES[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_bound_scores_match_reference(dtype, d):
    """With a radius (quest, shadowkv_hybrid) each logit adds |q| . radius; a head with zero
    radius keeps the landmark scores."""
    B, H, G, N = 2, 2, 2, 37
    q = torch.randn(B, H * G, 1, d, device=DEV, dtype=dtype)
    lm = torch.randn(B, H, N, d, device=DEV, dtype=dtype)
    radius = torch.rand(B, H, N, d, device=DEV, dtype=dtype)
    radius[:, 1] = 0  # a landmark head beside a Quest-bound head
    sel = torch.rand(B, H, N, device=DEV) > 0.2
    scale = 1 / math.sqrt(d)
    got = landmark_scores(q, lm, sel, scale, block_n=16, radius=radius)
    torch.testing.assert_close(got, policies.landmark_scores(q, lm, sel, scale, radius),
                               atol=SCORES[0], rtol=SCORES[1])
    torch.testing.assert_close(got[:, 1], ref.score_chunks(q, lm, sel, scale)[:, 1],
                               atol=SCORES[0], rtol=SCORES[1])


@pytest.mark.parametrize("T", [2, 3])
def test_landmark_scores_sum_over_query_positions(T):
    B, H, G, N, d = 1, 2, 2, 30, 64
    q = torch.randn(B, H * G, T, d, device=DEV)
    lm = torch.randn(B, H, N, d, device=DEV)
    sel = torch.rand(B, H, N, device=DEV) > 0.3
    got = landmark_scores(q, lm, sel, 0.2, block_n=16)
    torch.testing.assert_close(got, ref.score_chunks(q, lm, sel, 0.2), atol=SCORES[0], rtol=SCORES[1])


@pytest.mark.parametrize("budget_chunks", [1, 7, 40])  # 40 > N: K = N
def test_selected_scores_match_reference_topk(budget_chunks):
    B, H, G, N, d = 2, 2, 4, 33, 64
    q = torch.randn(B, H * G, 1, d, device=DEV, dtype=torch.bfloat16)
    lm = torch.randn(B, H, N, d, device=DEV, dtype=torch.bfloat16)
    sel = torch.rand(B, H, N, device=DEV) > 0.25
    idx, _ = select_top_chunks(q, lm, sel, 0.125, budget_chunks)
    want_scores = ref.score_chunks(q, lm, sel, 0.125)
    want_idx, want_ok = ref.select_chunks(want_scores, sel, budget_chunks)
    assert idx.shape == want_idx.shape
    key = want_scores.masked_fill(~sel, -1.0)  # ties are possible: compare the chosen scores
    torch.testing.assert_close(key.gather(2, idx).sort(-1).values,
                               key.gather(2, want_idx).sort(-1).values, atol=1e-6, rtol=0)
    assert torch.equal(sel.gather(2, idx).sum(-1), want_ok.sum(-1))
    assert all(len(set(row.tolist())) == row.numel() for row in idx.view(B * H, -1))


def same_selection(scores, idx, k):
    """idx picks k distinct ids per row whose scores are torch.topk's (ties may differ)."""
    assert idx.shape == (*scores.shape[:-1], k) and idx.dtype == torch.int64
    rows = idx.reshape(-1, k).cpu()
    assert all(len(set(r.tolist())) == k for r in rows), "an id was picked twice"
    want = scores.topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(scores.gather(-1, idx).sort(-1).values, want)


def topk_scores(kind, shape, device=DEV):
    g = torch.Generator().manual_seed(7)
    if kind == "softmax":  # landmark scores: probabilities, unselectable chunks at -1
        s = torch.softmax(3 * torch.randn(shape, generator=g), -1)
        s[..., 2::7] = -1.0
    elif kind == "ties":
        s = torch.randint(0, 3, shape, generator=g).float()
    else:  # both signs, -0.0 included
        s = torch.randn(shape, generator=g)
        s[..., ::5] = -0.0
    return s.to(device)


@pytest.mark.parametrize("N,k,kind", [(n, k, kind)
                                      for n, k in [(33, 7), (64, 64), (257, 16), (5, 1), (1, 1)]
                                      for kind in ("softmax", "ties", "signed")]
                         + [(700, 33, "softmax")])  # 256 groups of 2 or 3 members
def test_chunk_topk_selects_the_largest_scores(N, k, kind):
    s = topk_scores(kind, (2, 2, N))
    same_selection(s, chunk_topk(s, k), k)


@pytest.mark.parametrize("N,k", [(257, 16), (64, 3)])
def test_chunk_topk_without_tl_topk(N, k, monkeypatch):
    monkeypatch.setattr(chunk_topk_mod, "HAS_TOPK", False)  # triton < 3.5: a full sort
    s = topk_scores("softmax", (2, 2, N))
    same_selection(s, chunk_topk(s, k), k)


def test_chunk_topk_falls_back_to_torch_where_a_sort_would_not_fit(monkeypatch):
    monkeypatch.setattr(chunk_topk_mod, "MAX_SORT", 32)
    assert chunk_topk_mod.group_count(1000, 33) == 0
    s = topk_scores("signed", (2, 1000))
    same_selection(s, chunk_topk(s, 33), 33)


def test_chunk_topk_groups_balance_the_two_sorts():
    assert chunk_topk_mod.group_count(16380, 256) == 2048  # 2048 maxima, 256 x 8 members
    assert chunk_topk_mod.group_count(4092, 256) == 1024
    assert chunk_topk_mod.group_count(100, 7) == 32


def test_chunk_topk_rejects_bad_input():
    with pytest.raises(TypeError, match="float32"):
        chunk_topk(torch.zeros(2, 8, dtype=torch.bfloat16, device=DEV), 2)
    with pytest.raises(ValueError, match=r"k=9 must be in \[0, 8\]"):
        chunk_topk(torch.zeros(2, 8, device=DEV), 9)


# ----------------------------------------------------------------------------- key rebuild
@pytest.mark.parametrize("style,rd_frac", [("rotate_half", 1.0), ("interleaved", 1.0),
                                           ("none", 0.0), ("rotate_half", 0.5),
                                           ("interleaved", 0.25)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_rebuild_keys_match_reference(style, rd_frac, dtype, d):
    B, H, N, C, r, K = 2, 2, 11, 8, 40, 5
    rd = int(d * rd_frac)
    st = synthetic_state(B, H, N, C, d, r, rd, 0, 0, style, dtype)
    idx = distinct_chunks(B, H, N, K).to(DEV)
    want = ref.rebuild_keys(st.U, st.SV, st.cos, st.sin, idx, C, style)
    out = torch.full((B, H, K * C, d), float("nan"), device=DEV)  # fp32 buffer, as the reference
    rebuild_keys_into(out, st.U, st.SV, st.cos, st.sin, *full_load(idx), C, style, block_rows=16)
    close(out, want, torch.float32 if dtype == torch.float32 else torch.float16, "fp32 buffer")
    out16 = torch.full((B, H, K * C, d), float("nan"), device=DEV, dtype=dtype)
    rebuild_keys_into(out16, st.U, st.SV, st.cos, st.sin, *full_load(idx), C, style)
    close(out16, want, dtype, "model-dtype buffer")


@pytest.mark.parametrize("shared", ["one_row", "expanded"])
def test_rebuild_keys_with_one_rope_table_for_the_batch(shared):
    B, H, N, C, d, r, K = 3, 2, 7, 8, 64, 16, 3
    st = synthetic_state(B, H, N, C, d, r, d, 0, 0, "rotate_half", torch.float32)
    idx = distinct_chunks(B, H, N, K, seed=4).to(DEV)
    want = ref.rebuild_keys(st.U, st.SV, st.cos, st.sin, idx, C, "rotate_half")
    cos, sin = (t[:1] if shared == "one_row" else t[:1].expand(B, -1, -1) for t in (st.cos, st.sin))
    out = torch.empty(B, H, K * C, d, device=DEV)
    rebuild_keys_into(out, st.U, st.SV, cos, sin, *full_load(idx), C, "rotate_half")
    close(out, want, torch.float32)


def test_rebuild_keys_odd_chunk_and_rank():
    B, H, N, C, d, r, K = 1, 3, 9, 3, 64, 20, 4  # C=3: load rows straddle program blocks
    st = synthetic_state(B, H, N, C, d, r, 32, 0, 0, "rotate_half", torch.float32)
    idx = distinct_chunks(B, H, N, K, seed=3).to(DEV)
    want = ref.rebuild_keys(st.U, st.SV, st.cos, st.sin, idx, C, "rotate_half")
    out = torch.empty(B, H, K * C, d, device=DEV)
    rebuild_keys_into(out, st.U, st.SV, st.cos, st.sin, *full_load(idx), C, "rotate_half",
                      block_rows=16)
    close(out, want, torch.float32)


# ----------------------------------------------------------------------------- value fetch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,d", [(8, 64), (8, 128), (3, 64)])
@pytest.mark.parametrize("programs", [0, 3])  # 3: each persistent program loops over tiles
def test_fetch_values_equal_reference(dtype, C, d, programs):
    B, H, N, K = 2, 2, 10, 4
    st = synthetic_state(B, H, N, C, d, 8, 0, 0, 0, "none", dtype)
    idx = distinct_chunks(B, H, N, K, seed=1).to(DEV)
    out = torch.full((B, H, K * C, d), float("nan"), device=DEV, dtype=dtype)
    fetch_values_into(out, st.values, *full_load(idx), block_rows=16, programs=programs)
    assert torch.equal(out, ref.fetch_values(st.values, idx, DEV))  # a copy: bit-exact


@pytest.mark.parametrize("programs", [0, 2])
def test_fetch_values_of_uneven_load_lists(programs):
    """Each (b, h) loads its own number of chunks (none for some): exactly those slots change."""
    B, H, N, C, d, K = 3, 2, 12, 3, 64, 5
    st = synthetic_state(B, H, N, C, d, 8, 0, 0, 0, "none", torch.float32)
    lc, ls, _ = full_load(distinct_chunks(B, H, N, K, seed=3).to(DEV))
    ls = torch.stack([torch.randperm(K) for _ in range(B * H)]).view(B, H, K).to(DEV, torch.int32)
    n = torch.tensor([[0, 5], [2, 0], [1, 4]], dtype=torch.int32, device=DEV)
    out = torch.zeros(B, H, K * C, d, device=DEV)
    fetch_values_into(out, st.values, lc, ls, n, block_rows=16, programs=programs)
    want = torch.zeros(B, H, K, C, d)
    for b in range(B):
        for h in range(H):
            for j in range(n[b, h]):
                want[b, h, ls[b, h, j]] = st.values[b, h, lc[b, h, j]].float()
    assert torch.equal(out.cpu(), want.view(B, H, K * C, d))


# ----------------------------------------------------------------------------- reuse plan
def check_plan(idx, old_slots, slot_chunk, chunk_slot, load_chunk, load_slot, n_load, sel_slot,
               scores=None):
    """The plan's invariants; with scores (a value cache, more slots than K), also that the
    evicted chunks are the lowest-scoring unselected ones, after the empty slots."""
    B, H, K = idx.shape
    N, S = chunk_slot.shape[-1], slot_chunk.shape[-1]
    for b in range(B):
        for h in range(H):
            new, old = slot_chunk[b, h].tolist(), old_slots[b, h].tolist()
            want = set(idx[b, h].tolist())
            if S == K:
                assert set(new) == want, "slots must hold exactly the selection"
            assert all(new[s] == old[s] for s in range(S) if old[s] in want), \
                "a chunk selected again must stay put"
            n = n_load[b, h].item()
            assert n == len(want - set(old)), "only misses are loaded"
            loaded = load_slot[b, h, :n].tolist()
            assert sorted(loaded) == [s for s in range(S) if new[s] != old[s]]
            assert [new[s] for s in loaded] == load_chunk[b, h, :n].tolist()
            assert [new[s] for s in sel_slot[b, h].tolist()] == idx[b, h].tolist()
            where = {c: s for s, c in enumerate(new) if c >= 0}
            assert chunk_slot[b, h].tolist() == [where.get(c, -1) for c in range(N)]
            if scores is not None:  # evicted: empties first, then by score
                spare = [s for s in range(S) if old[s] not in want]
                rank = sorted(spare, key=lambda s: (old[s] >= 0, scores[b, h, old[s]].item()
                                                    if old[s] >= 0 else 0.0))
                assert sorted(loaded) == sorted(rank[:n]), "evict the lowest scores first"


def test_reuse_plan_keeps_hits_in_place():
    B, H, N, K = 2, 3, 24, 6
    slot_chunk = torch.full((B, H, K), -1, dtype=torch.int32, device=DEV)
    chunk_slot = torch.full((B, H, N), -1, dtype=torch.int16, device=DEV)
    g = torch.Generator().manual_seed(5)
    prev = None
    steps = ["fresh", "same", "disjoint", "partial", "partial", "permuted"]
    for kind in steps:
        if kind == "fresh":
            idx = distinct_chunks(B, H, N, K, seed=9)
        elif kind == "same":
            idx = prev.clone()  # all hits
        elif kind == "permuted":  # all hits, new order
            idx = prev[..., torch.randperm(K, generator=g)]
        elif kind == "disjoint":  # no hits
            idx = torch.stack([torch.tensor([c for c in torch.randperm(N, generator=g).tolist()
                                             if c not in set(p.tolist())][:K])
                               for p in prev.view(B * H, K)]).view(B, H, K)
        else:
            idx = torch.stack([torch.cat([p[torch.randperm(K, generator=g)[:K // 2]],
                                          torch.tensor([c for c in torch.randperm(N, generator=g).tolist()
                                                        if c not in set(p.tolist())][:K - K // 2])])
                               for p in prev.view(B * H, K)]).view(B, H, K)
        old = slot_chunk.clone()
        plan = reuse_plan(idx.to(DEV), slot_chunk, chunk_slot)
        check_plan(idx, old.cpu(), slot_chunk.cpu(), chunk_slot.cpu(), *(t.cpu() for t in plan))
        n = plan[2].cpu()
        if kind == "fresh" or kind == "disjoint":
            assert (n == K).all()
        if kind in ("same", "permuted"):
            assert (n == 0).all()
        if kind == "partial":
            assert (n == K - K // 2).all()
        prev = idx


@pytest.mark.parametrize("N, K, S", [
    (40, 6, 15),
    pytest.param(2200, 6, 2100, id="int64-sort",  # minutes under the interpreter
                 marks=[pytest.mark.gpu, pytest.mark.skipif(INTERPRET, reason="GPU only")]),
])
def test_reuse_plan_as_a_value_cache(N, K, S):
    """More slots than selected chunks: held chunks stay until a miss needs their slot, and the
    unselected ones that score lowest at this step go first (after the empty slots)."""
    B, H = 2, 3
    g = torch.Generator().manual_seed(11)
    held = torch.stack([torch.randperm(N, generator=g)[:S] for _ in range(B * H)]).view(B, H, S)
    held[..., :2] = -1  # two empty slots
    slot_chunk = held.to(DEV, torch.int32)
    chunk_slot = torch.full((B * H, N), -1, dtype=torch.int16)
    for r, row in enumerate(held.view(B * H, S).tolist()):
        for slot, c in enumerate(row):
            if c >= 0:
                chunk_slot[r, c] = slot
    chunk_slot = chunk_slot.view(B, H, N).to(DEV)
    hits = []
    for step in range(4):
        # distinct scores, far apart: the int32 sort keeps 12 bits of mantissa
        scores = torch.stack([torch.randperm(N, generator=g) for _ in range(B * H)]).view(
            B, H, N).float().div(N)
        if step == 2:
            scores[..., :4] = -1.0  # unselectable chunks score -1
        idx = scores.topk(K, dim=-1).indices
        old = slot_chunk.clone()
        plan = reuse_plan(idx.to(DEV), slot_chunk, chunk_slot, scores.to(DEV))
        check_plan(idx, old.cpu(), slot_chunk.cpu(), chunk_slot.cpu(), *(t.cpu() for t in plan),
                   scores=scores)
        hits.append(1 - plan[2].sum().item() / (B * H * K))
    assert max(hits) > 0.0 and min(hits) < 1.0, hits


def test_reuse_plan_when_every_chunk_is_selected():
    B, H, N = 1, 2, 5  # N < budget: K = N, every step selects everything
    K = N
    slot_chunk = torch.full((B, H, K), -1, dtype=torch.int32, device=DEV)
    chunk_slot = torch.full((B, H, N), -1, dtype=torch.int16, device=DEV)
    for step in range(3):
        idx = distinct_chunks(B, H, N, K, seed=step).to(DEV)
        _, _, n, _ = reuse_plan(idx, slot_chunk, chunk_slot)
        assert (n.cpu() == (K if step == 0 else 0)).all()


# ----------------------------------------------------------------------------- sparse attention
def reference_segments(q, scale, st, sel_k, sel_v, slot_chunk, gen_k, gen_v, gen_len, C):
    """Exact attention over the four segments, written out directly in fp64."""
    B, Hq, T, d = q.shape
    H = sel_k.shape[1]
    chunk = slot_chunk.long()
    tok = (chunk.clamp(min=0)[..., None] * C + torch.arange(C, device=q.device)).flatten(2)
    sel_ok = (st.sparse_valid[:, None].expand(B, H, -1).gather(2, tok)
              & st.selectable.gather(2, chunk.clamp(min=0)).repeat_interleave(C, -1)
              & (chunk >= 0).repeat_interleave(C, -1))
    Lg = int(gen_len.item())
    keys = torch.cat([st.outlier_k, sel_k, st.local_k, gen_k[:, :, :Lg]], 2).double()
    vals = torch.cat([st.outlier_v, sel_v, st.local_v, gen_v[:, :, :Lg]], 2).double()
    ok = torch.cat([st.outlier_valid, sel_ok, st.local_valid[:, None].expand(B, H, -1)], 2)
    ok = ok[:, :, None].expand(B, H, T, -1)
    gen_ok = torch.arange(Lg, device=q.device)[None] <= (Lg - T + torch.arange(T, device=q.device))[:, None]
    ok = torch.cat([ok, gen_ok[None, None].expand(B, H, T, Lg)], 3)
    qg = q.double().view(B, H, Hq // H, T, d)
    s = torch.einsum("bhgtd,bhsd->bhgts", qg, keys) * scale
    s = s.masked_fill(~ok[:, :, None], -math.inf)
    return torch.einsum("bhgts,bhsd->bhgtd", s.softmax(-1), vals).reshape(B, Hq, T, d)


# 33 splits: more than the merge loads at once, and splits past the last key
@pytest.mark.parametrize("splits", [1, 3, 8, 33])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,T", [(1, 1), (2, 1), (4, 1), (2, 3)])
def test_sparse_decode_matches_direct_attention(splits, dtype, G, T):
    B, H, N, C, d, K, O, L, Gcap = 2, 2, 12, 8, 64, 4, 2, 13, 9
    st = synthetic_state(B, H, N, C, d, 8, 0, O, L, "none", dtype, pad=11)
    slot_chunk = distinct_chunks(B, H, N, K, seed=2).to(DEV, torch.int32)
    slot_chunk[1, 1, 2] = -1  # an empty slot is attended by nobody
    sel_k = torch.randn(B, H, K * C, d, device=DEV, dtype=dtype)
    sel_v = torch.randn(B, H, K * C, d, device=DEV, dtype=dtype)
    gen_k = torch.randn(B, H, Gcap, d, device=DEV, dtype=dtype)
    gen_v = torch.randn(B, H, Gcap, d, device=DEV, dtype=dtype)
    gen_len = torch.tensor([5], device=DEV)
    q = torch.randn(B, H * G, T, d, device=DEV, dtype=dtype)
    got = sparse_decode(q, 0.125, st.outlier_k, st.outlier_v, st.outlier_valid, sel_k, sel_v,
                        slot_chunk, st.sparse_valid, st.selectable, st.local_k, st.local_v,
                        st.local_valid, gen_k, gen_v, gen_len, chunk_size=C, num_splits=splits)
    assert got.dtype == dtype and got.shape == q.shape
    want = reference_segments(q, 0.125, st, sel_k, sel_v, slot_chunk, gen_k, gen_v, gen_len, C)
    close(got, want, dtype)


def test_sparse_decode_with_empty_segments():
    B, H, N, C, d, K = 1, 2, 6, 8, 128, 2
    st = synthetic_state(B, H, N, C, d, 8, 0, 0, 0, "none", torch.float32)  # no outliers, no local
    slot_chunk = distinct_chunks(B, H, N, K).to(DEV, torch.int32)
    sel_k, sel_v = (torch.randn(B, H, K * C, d, device=DEV) for _ in range(2))
    gen = torch.randn(B, H, 4, d, device=DEV)
    q = torch.randn(B, 2 * H, 1, d, device=DEV)
    gl = torch.tensor([1], device=DEV)
    got = sparse_decode(q, 0.1, st.outlier_k, st.outlier_v, st.outlier_valid, sel_k, sel_v,
                        slot_chunk, st.sparse_valid, st.selectable, st.local_k, st.local_v,
                        st.local_valid, gen, gen, gl, chunk_size=C, num_splits=4)
    close(got, reference_segments(q, 0.1, st, sel_k, sel_v, slot_chunk, gen, gen, gl, C),
          torch.float32)


# ----------------------------------------------------------------------------- whole decode step
DECODE_CASES = [  # dtype, G, d, style, rd_frac, budget, chunk, N, prompt tail, workspace dtype
    pytest.param(torch.float32, 1, 64, "rotate_half", 1.0, 24, 8, 14, 5, None, id="fp32-mha"),
    pytest.param(torch.float32, 4, 128, "interleaved", 0.5, 20, 8, 12, 0, None,
                 id="fp32-gqa4-budget-not-multiple-of-C"),
    pytest.param(torch.bfloat16, 2, 64, "rotate_half", 0.5, 16, 8, 10, 3, None, id="bf16-gqa2"),
    pytest.param(torch.bfloat16, 4, 128, "rotate_half", 1.0, 24, 8, 12, 7, torch.float32,
                 id="bf16-fp32-workspace"),
    pytest.param(torch.float16, 2, 128, "none", 0.0, 96, 8, 9, 1, None, id="fp16-budget-above-N"),
    pytest.param(torch.float32, 2, 64, "interleaved", 1.0, 12, 3, 11, 2, None, id="fp32-chunk3"),
]


@pytest.mark.parametrize("dtype,G,d,style,rd_frac,budget,C,N,tail,ws_dtype", DECODE_CASES)
def test_decode_step_matches_reference(dtype, G, d, style, rd_frac, budget, C, N, tail, ws_dtype):
    B, H, r, O = 2, 2, 24, 2
    L = 2 * C + tail  # prompt length N*C + O... + tail: the local window holds the remainder
    st = synthetic_state(B, H, N, C, d, r, int(d * rd_frac), O, L, style, dtype, pad=5)
    budget_chunks = budget // C
    ws = DecodeWorkspace.allocate(st, budget_chunks, C, dtype=ws_dtype or dtype)
    Gcap = 6
    gk, gv = (torch.zeros(B, H, Gcap, d, device=DEV, dtype=dtype) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device=DEV)
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    tol_dtype = torch.float32 if ws_dtype == torch.float32 and dtype == torch.float32 else dtype
    g = torch.Generator().manual_seed(7)
    q_prev = None
    for step in range(3):
        q = torch.randn(B, H * G, 1, d, generator=g).to(DEV, dtype)
        if step == 2:
            q = q_prev  # the same query selects the same chunks: every chunk hits
        k, v = (torch.randn(B, H, 1, d, generator=g).to(DEV, dtype) for _ in range(2))
        got = decode_attention_cuda(q, k, v, d ** -0.5, *split(st), gk, gv, gl, C, budget_chunks, style,
                                    workspace=ws)
        want = ref.decode_attention(q, k, v, d ** -0.5, *split(st), rk, rv, rl, C, budget_chunks, style)
        assert got.dtype == dtype
        close(got, want, tol_dtype, f"step {step}")
        assert torch.equal(gk, rk) and torch.equal(gl, rl)
        if step == 2:
            assert (ws.n_load == 0).all(), "a repeated query must reuse every chunk"
        # every slot holds exactly its chunk's rebuilt keys and fetched values
        held = ws.slot_chunk.long()
        close(ws.sel_k, ref.rebuild_keys(st.U, st.SV, st.cos, st.sin, held, C, style),
              tol_dtype if ws.sel_k.dtype == torch.float32 else dtype, "held keys")
        assert torch.equal(ws.sel_v.cpu(), ref.fetch_values(st.values, held.cpu(), "cpu")
                           .to(ws.sel_v.dtype))
        q_prev = q


@pytest.mark.parametrize("parts, shared_table", [(2, False), (3, True), (8, False)])
def test_decode_step_in_batch_slices_matches_reference(parts, shared_table):
    """The pipelined step (each batch slice's values fetched and attended in turn, uneven slices,
    more parts than rows, one rotary table for the whole batch) equals the reference, with reuse
    across steps and without a workspace."""
    B, H, G, N, C, d = 3, 2, 2, 12, 4, 32
    st = synthetic_state(B, H, N, C, d, 12, d, 1, 2 * C + 3, "rotate_half", torch.float32, pad=5)
    if shared_table:  # every row's positions are the same: one table, batch-expanded
        assert torch.equal(st.cos, st.cos[:1].expand_as(st.cos))
        st = st._replace(cos=st.cos[:1].expand_as(st.cos), sin=st.sin[:1].expand_as(st.sin))
    ws = DecodeWorkspace.allocate(st, 4, C)
    gk, gv = (torch.zeros(B, H, 4, d, device=DEV) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device=DEV)
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        q = torch.randn(B, H * G, 1, d, generator=g).to(DEV)
        k, v = (torch.randn(B, H, 1, d, generator=g).to(DEV) for _ in range(2))
        workspace = None if step == 2 else ws
        got = decode_attention_cuda(q, k, v, 0.2, *split(st), gk, gv, gl, C, 4, "rotate_half",
                                    workspace=workspace, parts=parts)
        want = ref.decode_attention(q, k, v, 0.2, *split(st), rk, rv, rl, C, 4, "rotate_half")
        close(got, want, torch.float32, f"step {step}")
        assert torch.equal(gk, rk) and torch.equal(gl, rl)
        held = ws.slot_chunk.long()  # every slice's slots hold their chunks
        assert torch.equal(ws.sel_v.cpu(), ref.fetch_values(st.values, held.cpu(), "cpu"))


@pytest.mark.parametrize("cache, parts, dtype", [(2, 1, torch.float32), (3, 2, torch.bfloat16),
                                                 (8, 1, torch.float32)])
def test_decode_step_with_a_value_cache_matches_reference(cache, parts, dtype):
    """A workspace of cache x K slots (8: more slots than chunks, so it holds them all) gives
    the reference's output at every step, while queries that come back find their chunks
    still on the device: a step after another query's selects fewer misses than K."""
    B, H, G, N, C, d, K = 2, 2, 2, 20, 4, 32, 4
    st = synthetic_state(B, H, N, C, d, 12, d, 1, 2 * C + 3, "rotate_half", dtype, pad=5)
    ws = DecodeWorkspace.allocate(st, K, C, chunk_cache=cache)
    assert ws.slot_chunk.shape[-1] == min(cache * K, N)
    gk, gv = (torch.zeros(B, H, 8, d, device=DEV, dtype=dtype) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device=DEV)
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    g = torch.Generator().manual_seed(4)
    qa, qb = (torch.randn(B, H * G, 1, d, generator=g).to(DEV, dtype) for _ in range(2))
    misses = []
    for step, q in enumerate([qa, qb, qa, qb, qa + 0.3 * qb]):
        k, v = (torch.randn(B, H, 1, d, generator=g).to(DEV, dtype) for _ in range(2))
        got = decode_attention_cuda(q, k, v, 0.2, *split(st), gk, gv, gl, C, K, "rotate_half",
                                    workspace=ws, parts=parts)
        want = ref.decode_attention(q, k, v, 0.2, *split(st), rk, rv, rl, C, K, "rotate_half")
        close(got, want, dtype, f"step {step}")
        misses.append(ws.n_load.sum().item())
        held = ws.slot_chunk.long()  # every held slot holds its chunk's keys and values
        rows = (held >= 0).repeat_interleave(C, -1)
        want_v = ref.fetch_values(st.values, held.clamp(min=0).cpu(), "cpu").to(dtype)
        assert torch.equal(ws.sel_v.cpu()[rows.cpu()], want_v[rows.cpu()])
        want_k = ref.rebuild_keys(st.U, st.SV, st.cos, st.sin, held.clamp(min=0), C,
                                  "rotate_half")
        close(ws.sel_k[rows], want_k[rows], dtype, "held keys")
    assert misses[0] == B * H * K
    assert misses[2] == misses[3] == 0, f"qa and qb's chunks fit in the cache: {misses}"
    assert ws.hit_rate(K) == 1 - misses[-1] / (B * H * K)


def test_decode_step_with_no_sparse_chunks():
    """A prompt no longer than the local window: nothing to select, attention over the rest.
    (reference.rebuild_keys cannot reshape an empty selection, so the check is the direct
    formula.)"""
    B, H, G, d, C = 1, 2, 2, 64, 8
    st = synthetic_state(B, H, 0, C, d, 8, d, 0, 13, "rotate_half", torch.float32)
    gk, gv = (torch.zeros(B, H, 4, d, device=DEV) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device=DEV)
    q, k, v = (torch.randn(B, n, 1, d, device=DEV) for n in (H * G, H, H))
    ws = DecodeWorkspace.allocate(st, 4, C)
    got = decode_attention_cuda(q, k, v, 0.125, *split(st), gk, gv, gl, C, 4, "rotate_half", workspace=ws)
    assert ws.sel_k.shape[2] == 0 and gl.item() == 1
    want = reference_segments(q, 0.125, st, ws.sel_k, ws.sel_v, ws.slot_chunk, gk, gv, gl, C)
    close(got, want, torch.float32)


@pytest.mark.parametrize("policy", KERNEL_POLICIES)
def test_decode_without_workspace_and_real_prefill_state(policy):
    """A state built by the real prefill op (prompt length not a multiple of C, padding), for
    every policy the kernels run, in batch slices."""
    B, H, G, T, d, C = 2, 2, 2, 203, 64, 8
    kpre = torch.randn(B, H, T, d, device=DEV)
    cos, sin = rope_tables(B, T, d, "rotate_half")
    kpost = ref.apply_rope(kpre, cos[:, None], sin[:, None], "rotate_half")
    v = torch.randn(B, H, T, d, device=DEV)
    keep = torch.ones(B, T, T, dtype=torch.bool, device=DEV).tril()
    keep[0, :, :13] = False
    q_prompt = torch.randn(B, H * G, T, d, device=DEV)
    st = KernelState(*ops.prefill_state(kpre, kpost, v, keep[:, None], "bool_keep", 32, C, 2, 3,
                                        1, policy, None, q_prompt, 0.125, 5),
                     *ops.rope_tables(cos, sin, C, 3, "rotate_half"))
    gk, gv = (torch.zeros(B, H, 4, d, device=DEV) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device=DEV)
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    for _ in range(2):
        q = torch.randn(B, H * G, 1, d, device=DEV)
        k, vn = torch.randn(B, H, 1, d, device=DEV), torch.randn(B, H, 1, d, device=DEV)
        got = decode_attention_cuda(q, k, vn, 0.125, *split(st), gk, gv, gl, C, 5, "rotate_half",
                                    policy=policy, parts=2)
        want = ref.decode_attention(q, k, vn, 0.125, *split(st), rk, rv, rl, C, 5, "rotate_half",
                                    policy)
        close(got, want, torch.float32)


def test_decode_triton_op_eager():
    B, H, G, N, C, d = 1, 2, 2, 10, 8, 64
    st = synthetic_state(B, H, N, C, d, 16, d, 1, 11, "rotate_half", torch.float32)
    ws = DecodeWorkspace.allocate(st, 3, C)
    gk, gv = (torch.zeros(B, H, 4, d, device=DEV) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device=DEV)
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    q, k, v = (torch.randn(B, n, 1, d, device=DEV) for n in (H * G, H, H))
    got = torch.ops.shadowkv.decode_triton(q, k, v, *triton_state(st), gk, gv, gl, *ws.tensors(), 0.125,
                                           C, 3, "rotate_half")
    want = ref.decode_attention(q, k, v, 0.125, *split(st), rk, rv, rl, C, 3, "rotate_half")
    close(got, want, torch.float32)
    assert (ws.slot_chunk >= 0).all() and gl.item() == 1


# ----------------------------------------------------------------------------- GPU, real sizes
def gpu(fn):
    """Real-size test on the GPU machine: pytest -m gpu tests/test_kernels.py. It fails (not
    skips) when the interpreter is on, so a GPU run cannot pass without compiled kernels."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        assert not INTERPRET, "GPU tests must run compiled kernels: unset TRITON_INTERPRET"
        return fn(*args, **kwargs)
    run = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(run)
    return pytest.mark.gpu(run)


# the Llama-3.1-8B layer at 32K context
LLAMA = {"B": 2, "H": 8, "G": 4, "d": 128, "r": 160, "C": 8, "N": 4096, "O": 48, "L": 37,
         "budget": 2048}


def llama_state(dtype=torch.bfloat16, **over):
    p = {**LLAMA, **over}
    st = synthetic_state(p["B"], p["H"], p["N"], p["C"], p["d"], p["r"], p["d"], p["O"], p["L"],
                         "rotate_half", dtype, device="cuda", pad=5)
    return st, p


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@gpu
def test_gpu_kernels_at_llama_shape(dtype):
    st, p = llama_state(dtype)
    B, H, G, d, C = p["B"], p["H"], p["G"], p["d"], p["C"]
    K = p["budget"] // C
    q = torch.randn(B, H * G, 1, d, device="cuda", dtype=dtype)
    scale = d ** -0.5
    got = landmark_scores(q, st.landmarks, st.selectable, scale)
    want = ref.score_chunks(q, st.landmarks, st.selectable, scale)
    torch.testing.assert_close(got, want, atol=SCORES[0], rtol=SCORES[1])
    idx, _ = select_top_chunks(q, st.landmarks, st.selectable, scale, K)
    key = want.masked_fill(~st.selectable, -1)
    want_idx, _ = ref.select_chunks(want, st.selectable, K)
    torch.testing.assert_close(key.gather(2, idx).sort(-1).values,
                               key.gather(2, want_idx).sort(-1).values, atol=1e-6, rtol=1e-4)
    sel_k = torch.empty(B, H, K * C, d, device="cuda", dtype=torch.float32)
    rebuild_keys_into(sel_k, st.U, st.SV, st.cos, st.sin, *full_load(want_idx), C, "rotate_half")
    close(sel_k, ref.rebuild_keys(st.U, st.SV, st.cos, st.sin, want_idx, C, "rotate_half"),
          torch.float32 if dtype == torch.float32 else torch.float16)
    sel_v = torch.empty(B, H, K * C, d, device="cuda", dtype=dtype)
    assert is_pinned(st.values)
    fetch_values_into(sel_v, st.values, *full_load(want_idx))
    assert torch.equal(sel_v, ref.fetch_values(st.values, want_idx, "cuda"))


@gpu
@pytest.mark.parametrize("N,k", [(4092, 256), (16380, 256), (16380, 512), (131068, 256),
                                 (300, 256)])
def test_gpu_chunk_topk_at_real_sizes(N, k):
    B, H, G, d = 8, 8, 4, 128
    lm = torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, H * G, 1, d, device="cuda", dtype=torch.bfloat16)
    sel = torch.rand(B, H, N, device="cuda") > 0.01
    s = landmark_scores(q, lm, sel, d ** -0.5, fill=-1.0)
    same_selection(s, chunk_topk(s, k), k)
    for kind in ("ties", "signed"):
        s = topk_scores(kind, (B, H, N), "cuda")
        same_selection(s, chunk_topk(s, k), k)


@gpu
@pytest.mark.parametrize("chunk_cache", [1, 4])
def test_gpu_decode_steps_with_reuse(chunk_cache):
    st, p = llama_state()
    B, H, G, d, C = p["B"], p["H"], p["G"], p["d"], p["C"]
    K = p["budget"] // C
    ws = DecodeWorkspace.allocate(st, K, C, chunk_cache=chunk_cache)
    gk, gv = (torch.zeros(B, H, 64, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device="cuda")
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    q0 = torch.randn(B, H * G, 1, d, device="cuda", dtype=torch.bfloat16)
    hits = []
    for step in range(6):
        q = q0 + 0.3 * torch.randn_like(q0)  # nearby queries: partial reuse
        k, v = (torch.randn(B, H, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        got = decode_attention_cuda(q, k, v, d ** -0.5, *split(st), gk, gv, gl, C, K, "rotate_half",
                                    workspace=ws)
        want = ref.decode_attention(q, k, v, d ** -0.5, *split(st), rk, rv, rl, C, K, "rotate_half")
        close(got, want, torch.bfloat16, f"step {step}")
        hits.append(ws.hit_rate(K))
    assert hits[0] == 0.0 and max(hits[1:]) > 0.0, hits  # reuse really happened


@gpu
def test_gpu_registered_op_compiled_and_cuda_graph():
    st, p = llama_state(N=1024)
    B, H, G, d, C = p["B"], p["H"], p["G"], p["d"], p["C"]
    K = 64
    register_cuda_kernel()  # what importing shadowpass.ops does when Triton is present
    gk, gv = (torch.zeros(B, H, 16, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device="cuda")
    q, k, v = (torch.randn(B, n, 1, d, device="cuda", dtype=torch.bfloat16) for n in (H * G, H, H))
    snapshot = [t.clone() for t in (gk, gv, gl)]
    want = ref.decode_attention(q, k, v, 0.09, *split(st), *(t.clone() for t in snapshot), C, K,
                                "rotate_half")
    # 1. shadowkv::decode dispatches to the Triton kernels on CUDA
    got = ops.decode(q, k, v, *triton_state(st), gk, gv, gl,
                     *DecodeWorkspace.allocate(st, K, C).tensors(), 0.09, C, K, "rotate_half")
    close(got, want, torch.bfloat16, "shadowkv::decode")
    # 2. the triton_op compiled by Inductor (fullgraph), with the reuse workspace
    ws = DecodeWorkspace.allocate(st, K, C)

    def step(q, k, v, gk, gv, gl, *ws_t):
        return torch.ops.shadowkv.decode_triton(q, k, v, *triton_state(st), gk, gv, gl, *ws_t, 0.09, C, K,
                                                "rotate_half")

    gk, gv, gl = (t.clone() for t in snapshot)
    got = torch.compile(step, fullgraph=True)(q, k, v, gk, gv, gl, *ws.tensors())
    close(got, want, torch.bfloat16, "compiled decode_triton")
    assert gl.item() == 1
    # 3. one eager step captured in a CUDA graph and replayed (static shapes, no host sync)
    gk, gv, gl = (t.clone() for t in snapshot)
    ws.reset()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up compiles the kernels outside the capture
        decode_attention_cuda(q, k, v, 0.09, *split(st), gk, gv, gl, C, K, "rotate_half", workspace=ws)
    torch.cuda.current_stream().wait_stream(s)
    gk, gv, gl = (t.clone() for t in snapshot)
    gk_s, gv_s, gl_s = gk, gv, gl
    ws.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_cuda(q, k, v, 0.09, *split(st), gk_s, gv_s, gl_s, C, K, "rotate_half",
                                    workspace=ws)
    gk_s.copy_(snapshot[0])
    gv_s.copy_(snapshot[1])
    gl_s.copy_(snapshot[2])
    ws.reset()
    graph.replay()
    torch.cuda.synchronize()
    close(out, want, torch.bfloat16, "CUDA graph replay")
    assert gl_s.item() == 1


@gpu
def test_gpu_fetch_rejects_pageable_host_memory():
    values = torch.randn(1, 1, 4, 8, 64)  # not pinned
    out = torch.empty(1, 1, 16, 64, device="cuda")
    idx = torch.tensor([[[0, 2]]], device="cuda")
    with pytest.raises(ValueError, match="pinned"):
        fetch_values_into(out, values, *full_load(idx))


# ----------------------------------------------------------------------------- prefill landmarks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,d", [(8, 64), (8, 128), (3, 64)])
def test_chunk_landmarks_match_reference(dtype, C, d):
    from shadowpass.templates.chunk_landmarks import chunk_landmarks
    B, H, N, T = 2, 2, 9, 9 * C + 5
    k = torch.randn(B, H, T, d, device=DEV, dtype=dtype)
    valid = torch.ones(B, N * C, dtype=torch.bool, device=DEV)
    valid[0, :C + 2] = False  # one chunk all padding (+inf), one partly padding
    k_sparse = k[:, :, :N * C]  # a strided slice, as prefill passes it
    lm, min_cos = chunk_landmarks(k_sparse, valid, C, block_ch=4)
    want_lm, want_cos = ref.chunk_landmarks(k_sparse, valid, C)
    torch.testing.assert_close(lm, want_lm, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(min_cos, want_cos, atol=2e-6, rtol=2e-6)
    assert torch.isinf(min_cos[0, :, 0]).all()


def test_landmark_scores_many_blocks():
    """More blocks than one tile of block statistics (64): the merge loops."""
    B, H, G, N, d = 1, 1, 2, 1100, 64
    q = torch.randn(B, H * G, 1, d, device=DEV)
    lm = torch.randn(B, H, N, d, device=DEV)
    sel = torch.rand(B, H, N, device=DEV) > 0.1
    got = landmark_scores(q, lm, sel, 0.3, block_n=16)
    torch.testing.assert_close(got, ref.score_chunks(q, lm, sel, 0.3), atol=SCORES[0], rtol=SCORES[1])


@gpu
def test_gpu_decode_triton_opcheck():
    st, p = llama_state(N=256, B=1, O=4)
    B, H, G, d, C = p["B"], p["H"], p["G"], p["d"], p["C"]
    ws = DecodeWorkspace.allocate(st, 16, C)
    gk, gv = (torch.zeros(B, H, 8, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device="cuda")
    q, k, v = (torch.randn(B, n, 1, d, device="cuda", dtype=torch.bfloat16) for n in (H * G, H, H))
    args = (q, k, v, *triton_state(st), gk, gv, gl, *ws.tensors(), 0.09, C, 16, "rotate_half")
    torch.library.opcheck(torch.ops.shadowkv.decode_triton, args,
                          test_utils=("test_schema", "test_faketensor"))


@gpu
def test_gpu_decode_falls_back_for_pageable_values():
    st, p = llama_state(N=512, B=1)
    st = st._replace(values=st.values.clone())  # a clone is pageable, not pinned
    assert not is_pinned(st.values)
    B, H, G, d, C = p["B"], p["H"], p["G"], p["d"], p["C"]
    gk, gv = (torch.zeros(B, H, 8, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long, device="cuda")
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    q, k, v = (torch.randn(B, n, 1, d, device="cuda", dtype=torch.bfloat16) for n in (H * G, H, H))
    got = decode_attention_cuda(q, k, v, 0.09, *split(st), gk, gv, gl, C, 32, "rotate_half",
                                workspace=DecodeWorkspace.allocate(st, 32, C))
    want = ref.decode_attention(q, k, v, 0.09, *split(st), rk, rv, rl, C, 32, "rotate_half")
    close(got, want, torch.bfloat16)


# ----------------------------------------------------------------------------- GPU compilation
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not compile kernels; this compiles each one for sm_90 ahead of time
    (scripts/compile_kernels.py: Triton -> PTX -> cubin with Triton's own ptxas)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"this Triton install has no NVIDIA ptxas ({ptxas})")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script, "--quick", "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 failed to compile" in out.stdout
    assert out.stdout.count("_kernel") >= 18, out.stdout  # every kernel of both variants

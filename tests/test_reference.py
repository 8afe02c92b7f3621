"""Each reference op against a direct formula on small inputs, and opcheck of the custom ops."""
import math

import pytest
import torch

from shadowpass import hostmem, ops, reference as ref
from tolerances import ATTENTION_TOL, FP32_OP


def rope_tables(B, T, rd, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, rd, 2).float() / rd)
    f = torch.arange(T).float()[:, None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos()[None].expand(B, T, rd).contiguous(), emb.sin()[None].expand(B, T, rd).contiguous()


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_svd_error_matches_rank(rank):
    B, H, S, d = 2, 2, 64, 16
    k = torch.randn(B, H, S, d)
    valid = torch.ones(B, S, dtype=torch.bool)
    U, SV = ref.svd_keys(k, valid, rank)
    approx = torch.einsum("bsr,bhrd->bhsd", U, SV)
    K = k.transpose(1, 2).reshape(B, S, H * d).double()
    s = torch.linalg.svdvals(K)
    bound = s[:, rank:].pow(2).sum(-1).sqrt()  # Eckart-Young: best rank-r error (Frobenius)
    err = (approx.double() - k.double()).transpose(1, 2).reshape(B, S, -1).norm(dim=(1, 2))
    torch.testing.assert_close(err, bound, atol=1e-3, rtol=1e-3)


def test_svd_ignores_padding_rows():
    k = torch.randn(1, 2, 16, 8)
    valid = torch.ones(1, 16, dtype=torch.bool)
    valid[0, :5] = False
    U, SV = ref.svd_keys(k, valid, 16)
    approx = torch.einsum("bsr,bhrd->bhsd", U, SV)
    assert approx[:, :, :5].abs().max() < 1e-4  # padding contributes nothing to the basis
    torch.testing.assert_close(approx[:, :, 5:], k[:, :, 5:], atol=1e-4, rtol=1e-4)


def test_landmarks_are_chunk_means_and_min_cosine():
    B, H, N, C, d = 2, 3, 5, 4, 8
    k = torch.randn(B, H, N * C, d)
    valid = torch.ones(B, N * C, dtype=torch.bool)
    lm, min_cos = ref.chunk_landmarks(k, valid, C)
    for b in range(B):
        for h in range(H):
            for n in range(N):
                chunk = k[b, h, n * C:(n + 1) * C]
                mean = chunk.mean(0)
                torch.testing.assert_close(lm[b, h, n], mean, atol=FP32_OP, rtol=FP32_OP)
                cos = torch.stack([torch.dot(t, mean) / (t.norm() * mean.norm()) for t in chunk])
                torch.testing.assert_close(min_cos[b, h, n], cos.min(), atol=1e-5, rtol=1e-5)


def test_outliers_are_lowest_min_cosine():
    B, H, T, d, C = 1, 2, 96, 8, 8
    k = torch.randn(B, H, T, d)
    v = torch.randn(B, H, T, d)
    cos, sin = rope_tables(B, T, d)
    st = ref.prefill_state(k, k, v, None, "none", 16, C, 3, 2)
    N = T // C - 2
    _, min_cos = ref.chunk_landmarks(k[:, :, :N * C], torch.ones(B, N * C, dtype=torch.bool), C)
    for h in range(H):
        want = set(min_cos[0, h].argsort()[:3].tolist())
        got = set(torch.nonzero(~st.selectable[0, h]).flatten().tolist())
        assert got == want
        kept = torch.cat([k[0, h, i * C:(i + 1) * C] for i in sorted(want)])
        torch.testing.assert_close(st.outlier_k[0, h], kept)


def test_topk_is_largest_group_max_score():
    B, H, G, T, N, d = 2, 2, 3, 1, 20, 8
    q, lm = torch.randn(B, H * G, T, d), torch.randn(B, H, N, d)
    selectable = torch.ones(B, H, N, dtype=torch.bool)
    selectable[:, :, 0] = False
    scale = 0.3
    scores = ref.score_chunks(q, lm, selectable, scale)
    idx, ok = ref.select_chunks(scores, selectable, 5)
    for b in range(B):
        for h in range(H):
            per_head = []
            for g in range(G):
                logits = lm[b, h, 1:] @ q[b, h * G + g, 0] * scale
                per_head.append(torch.softmax(logits, -1))
            direct = torch.cat([torch.zeros(1), torch.stack(per_head).amax(0)])
            torch.testing.assert_close(scores[b, h], direct, atol=FP32_OP, rtol=FP32_OP)
            top = direct.topk(5).values
            torch.testing.assert_close(direct[idx[b, h]].sort().values, top.sort().values)
    assert ok.all()


@pytest.mark.parametrize("style", ["rotate_half", "interleaved"])
def test_rope_matches_complex_rotation(style):
    x, theta = torch.randn(3, 8), torch.rand(3, 4) * 6
    c, s = theta.cos(), theta.sin()
    if style == "rotate_half":
        cos, sin = torch.cat([c, c], -1), torch.cat([s, s], -1)
        pairs = torch.complex(x[:, :4], x[:, 4:]) * torch.polar(torch.ones_like(theta), theta)
        want = torch.cat([pairs.real, pairs.imag], -1)
    else:
        cos, sin = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        pairs = torch.view_as_complex(x.reshape(3, 4, 2)) * torch.polar(torch.ones_like(theta), theta)
        want = torch.view_as_real(pairs).flatten(1)
    torch.testing.assert_close(ref.apply_rope(x, cos, sin, style), want)


@pytest.mark.parametrize("style,rd", [("rotate_half", 16), ("interleaved", 16),
                                      ("rotate_half", 8), ("interleaved", 4)])
def test_rebuild_from_paired_tables_gives_the_model_keys(style, rd):
    """rope_tables keeps one value per rotated pair; at full rank the rebuilt keys equal the
    keys the model rotated with its full tables (partial rotary: rd < d)."""
    B, H, T, d, C = 2, 2, 48, 16, 4
    theta = torch.rand(B, T, rd // 2) * 6
    full = (lambda t: torch.cat([t, t], -1)) if style == "rotate_half" else \
        (lambda t: t.repeat_interleave(2, -1))
    cos, sin = full(theta.cos()), full(theta.sin())
    kpre = torch.randn(B, H, T, d)
    kpost = ref.apply_rope(kpre, cos[:, None], sin[:, None], style)
    st = ref.prefill_state(kpre, kpost, torch.randn(B, H, T, d), None, "none", H * d, C, 1, 1)
    tables = ref.rope_tables(cos, sin, C, 1, style)
    N = st.landmarks.shape[2]
    assert tables[0].shape == (B, N * C, rd // 2)
    idx = torch.arange(N).expand(B, H, N)
    got = ref.rebuild_keys(st.U, st.SV, *tables, idx, C, style)
    torch.testing.assert_close(got, kpost[:, :, :N * C], atol=FP32_OP, rtol=FP32_OP)
    with pytest.raises(ValueError, match="shadowkv: the model's rotary tables"):
        ref.rope_tables(cos, sin + torch.rand_like(sin), C, 1, style)


def make_state(B=2, H=2, T=100, d=16, C=8, rank=None, outliers=2, local=4, pad=0):
    kpre = torch.randn(B, H, T, d)
    cos, sin = rope_tables(B, T, d)
    kpost = ref.apply_rope(kpre, cos[:, None], sin[:, None], "rotate_half")
    v = torch.randn(B, H, T, d)
    mask = None
    if pad:
        keep = torch.ones(B, T, T, dtype=torch.bool).tril()
        keep[0, :, :pad] = False
        mask = keep[:, None]
    st = ops.prefill_state(kpre, kpost, v, mask, "bool_keep" if pad else "none",
                           rank or H * d, C, outliers, local, 1)
    tables = ops.rope_tables(cos, sin, C, local, "rotate_half")
    return kpost, v, ref.PrefillState(*st), tables


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("pad", [0, 13])
def test_decode_full_budget_equals_dense(G, pad):
    B, H, d = 2, 2, 16
    kpost, v, st, tables = make_state(B, H, d=d, pad=pad)
    gk, gv = torch.zeros(B, H, 8, d), torch.zeros(B, H, 8, d)
    gl = torch.zeros(1, dtype=torch.long)
    K, V = [kpost], [v]
    for step in range(3):
        q, k, vn = torch.randn(B, H * G, 1, d), torch.randn(B, H, 1, d), torch.randn(B, H, 1, d)
        out = ops.decode(q, k, vn, st, *tables, gk, gv, gl, *ops.workspace(st, 1000, 8),
                         1 / math.sqrt(d), 8, 1000, "rotate_half")
        K.append(k)
        V.append(vn)
        keys = torch.cat(K, 2).repeat_interleave(G, 1)
        vals = torch.cat(V, 2).repeat_interleave(G, 1)
        keep = torch.ones(B, 1, 1, keys.shape[2], dtype=torch.bool)
        keep[0, ..., :pad] = False
        dense = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=keep)
        torch.testing.assert_close(out, dense, atol=FP32_OP, rtol=FP32_OP)
    assert gl.item() == 3


def test_decode_attends_only_budget_tokens():
    """With a budget of one chunk, the output is attention over outliers + 1 chunk + local + new."""
    B, H, d, C = 1, 1, 16, 8
    kpost, v, st, tables = make_state(B, H, d=d, outliers=1, local=1)
    q, k, vn = torch.randn(B, H, 1, d), torch.randn(B, H, 1, d), torch.randn(B, H, 1, d)
    gk, gv, gl = torch.zeros(B, H, 4, d), torch.zeros(B, H, 4, d), torch.zeros(1, dtype=torch.long)
    out = ops.decode(q, k, vn, st, *tables, gk, gv, gl, *ops.workspace(st, 1, C), 0.25, C, 1,
                     "rotate_half")
    scores = ref.score_chunks(q, st.landmarks, st.selectable, 0.25)
    chosen = scores.argmax(-1).item()
    outlier = torch.nonzero(~st.selectable[0, 0]).item()
    rows = [*range(outlier * C, outlier * C + C), *range(chosen * C, chosen * C + C),
            *range(kpost.shape[2] - st.local_k.shape[2], kpost.shape[2])]
    keys = torch.cat([kpost[:, :, rows], k], 2)
    vals = torch.cat([v[:, :, rows], vn], 2)
    dense = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, scale=0.25)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)


def test_opcheck():
    kpre = torch.randn(1, 2, 40, 8)
    cos, sin = rope_tables(1, 40, 8)
    v = torch.randn(1, 2, 40, 8)
    torch.library.opcheck(ops.prefill_state, (kpre, kpre.clone(), v, None, "none", 8, 8, 1, 1, 1))
    torch.library.opcheck(ops.rope_tables, (cos, sin, 8, 1, "rotate_half"))
    _, _, st, tables = make_state(1, 2, T=40, d=8)
    args = (torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), list(st),
            *tables, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, dtype=torch.long),
            *ops.workspace(st, 2, 8), 0.3, 8, 2, "rotate_half")
    torch.library.opcheck(ops.decode, args)


def test_mask_that_is_not_causal_is_rejected():
    B, T = 1, 32
    keep = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    keep[..., 20:, :4] = False  # a sliding window
    kpre = torch.randn(B, 1, T, 8)
    with pytest.raises(ValueError, match="not causal"):
        ref.prefill_state(kpre, kpre, kpre, keep, "bool_keep", 8, 8, 1, 1)


def test_host_memory_is_checked_before_allocating(monkeypatch):
    """Too little host memory for the values of the remaining layers: a clear error, no OOM."""
    B, H, T, d = 2, 2, 64, 8
    k = torch.randn(B, H, T, d)
    per_layer = B * H * (T - 8) * d * 4  # local_chunks=1 keeps the last chunk on the device
    monkeypatch.setattr(hostmem, "host_bytes_available", lambda: math.ceil(per_layer * 10 / 0.9))
    ref.prefill_state(k, k, k, None, "none", 8, 8, 1, 1, sites_left=10)  # exactly fits
    with pytest.raises(MemoryError, match=r"GiB .*Reduce the batch size"):
        ref.prefill_state(k, k, k, None, "none", 8, 8, 1, 1, sites_left=11)


def test_cgroup_limit_caps_host_memory(tmp_path):
    """In a container the cgroup limit, not MemAvailable, decides when the OOM killer acts."""
    assert hostmem._cgroup_bytes_left(str(tmp_path)) is None  # no cgroup files: unknown
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("123\n")
    assert hostmem._cgroup_bytes_left(str(tmp_path)) is None  # unlimited
    (tmp_path / "memory.max").write_text(f"{10 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{4 << 30}\n")
    (tmp_path / "memory.stat").write_text(f"anon 1\ninactive_file {1 << 30}\n")
    assert hostmem._cgroup_bytes_left(str(tmp_path)) == 7 << 30  # limit - usage + droppable cache


def test_is_pinned_is_false_for_pageable_and_fake_tensors():
    """Kernels ask whether the value store is page-locked while torch.compile traces them with
    FakeTensors, which have no memory: that must answer False, not raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert not hostmem.is_pinned(torch.empty(4))
    with FakeTensorMode():
        fake = torch.empty(4)
    assert not hostmem.is_pinned(fake)


# ----------------------------------------------------------------- prefill mask and attention
def causal_padding_mask(valid):
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return causal[None] & valid[:, None, :]  # [B, T, T]


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_matches_sdpa_with_the_mask(Hq, Hkv, dtype):
    torch.manual_seed(0)
    B, T, d = 5, 70, 16
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :9] = False           # left padding
    valid[2, :9] = False           # same length: grouped with row 1
    valid[3, 60:] = False          # right padding: the blockwise route
    valid[4] = False               # all padding
    q, k, v = (torch.randn(B, H, T, d, dtype=dtype) for H in (Hq, Hkv, Hkv))
    got = ref.prefill_attention(q, k, v, valid, 0.3)
    mask = causal_padding_mask(valid)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3, enable_gqa=Hq != Hkv)
    want = want.masked_fill(~valid[:, None, :, None], 0.0)  # padding queries: zero
    tol = ATTENTION_TOL["bf16" if dtype == torch.bfloat16 else "fp32"]
    torch.testing.assert_close(got.float(), want, **tol)
    assert (got[4] == 0).all()


def as_kind(kind, keep):
    """A [B, q, k] bool keep-mask as the model would pass it: [B, 1, q, k] of `kind`."""
    if kind == "bool_keep":
        return keep[:, None]
    if kind == "bool_drop":
        return ~keep[:, None]
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("kind", ["bool_keep", "bool_drop", "additive"])
def test_mask_validity_reads_padding_and_refuses_other_masks(kind):
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, :5] = False
    keep = causal_padding_mask(valid)

    q = torch.empty(2, 4, 40, 8)
    got, ok = ref.mask_validity(as_kind(kind, keep), kind, q)
    assert torch.equal(got, valid) and bool(ok)
    window = keep & ~torch.ones(40, 40, dtype=torch.bool).tril(-16)  # a sliding window
    assert not bool(ref.mask_validity(as_kind(kind, window), kind, q)[1])
    with pytest.raises(ValueError, match="not causal \\+ padding"):
        ref.prefill_state(q, q, q, as_kind(kind, window), kind, 8, 8, 1, 1)
    if kind == "additive":  # a finite bias where keys are kept (ALiBi)
        bias = as_kind(kind, keep) - 0.5 * keep[:, None].float()
        assert not bool(ref.mask_validity(bias, kind, q)[1])


def test_decode_extend_is_decode_once_per_token():
    """The op's specification: T new tokens give what T single-token decode steps give, with
    the generated buffers left the same. Budget one chunk: each token selects its own."""
    B, H, G, d, C, T = 2, 2, 2, 16, 8, 5
    _, _, st, tables = make_state(B, H, d=d, outliers=1, local=1)
    q, k, vn = torch.randn(B, H * G, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    bufs = [[torch.zeros(B, H, 8, d), torch.zeros(B, H, 8, d), torch.zeros(1, dtype=torch.long)]
            for _ in range(2)]
    steps = [ops.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], vn[:, :, t:t + 1], st, *tables,
                        *bufs[0], *ops.workspace(st, C, C), 0.3, C, C, "rotate_half")
             for t in range(T)]
    got = ops.decode_extend(q, k, vn, st, *tables, *bufs[1], *ops.workspace(st, C, C), 0.3, C,
                            C, "rotate_half", "shadowkv", torch.tensor(True))
    torch.testing.assert_close(got, torch.cat(steps, 2), atol=0, rtol=0)
    for a, b in zip(*bufs):
        assert torch.equal(a, b)
    assert bufs[1][2].item() == T
    one_query = ops.decode(q, k, vn, st, *tables, torch.zeros(B, H, 8, d), torch.zeros(B, H, 8, d),
                           torch.zeros(1, dtype=torch.long), *ops.workspace(st, C, C), 0.3, C, C,
                           "rotate_half")  # one selection for all T: not what decode_extend does
    assert not torch.allclose(got, one_query)
    with pytest.raises(ValueError, match="not causal among the new tokens"):
        ops.decode_extend(q, k, vn, st, *tables, *bufs[1], *ops.workspace(st, C, C), 0.3, C, C,
                          "rotate_half", "shadowkv", torch.tensor(False))
    room = [torch.zeros(B, H, 64, d), torch.zeros(B, H, 64, d), torch.zeros(1, dtype=torch.long)]
    torch.library.opcheck(ops.decode_extend, (q, k, vn, list(st), *tables, *room,
                                              *ops.workspace(st, C, C), 0.3, C, C, "rotate_half"))


@pytest.mark.parametrize("kind", ["bool_keep", "bool_drop", "additive"])
def test_new_tokens_causal_reads_the_last_block(kind):
    """A follow-up's mask [B, 1, T, P+T]: the new tokens' block must be causal; the past's
    columns (prompt padding) are not checked."""
    P, T = 30, 6
    keep = torch.ones(2, T, P + T, dtype=torch.bool)
    keep[..., P:] = torch.ones(T, T, dtype=torch.bool).tril()
    keep[0, :, :4] = False  # the prompt's left padding

    q = torch.empty(2, 4, T, 8)
    assert bool(ref.new_tokens_causal(as_kind(kind, keep), kind, q))
    padded = keep.clone()
    padded[1, :, P:P + 2] = False  # padding inside the new tokens
    assert not bool(ref.new_tokens_causal(as_kind(kind, padded), kind, q))
    if kind == "additive":
        assert not bool(ref.new_tokens_causal(as_kind(kind, keep) - 0.5 * keep[:, None], kind, q))

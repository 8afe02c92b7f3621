"""Selection policies (shadowpass/policies.py) against direct formulas on small tensors, the
policy config field, and opcheck of the ops with each policy's auxiliary state."""
import math

import pytest
import torch

from shadowpass import ShadowKVConfig, ops, policies, reference as ref
from tolerances import FP32_OP

B, Hq, H, T, d, C, N = 2, 4, 2, 1, 8, 4, 6


def group_reduce(per_head):
    """[B, Hq, T, N] probabilities -> max over each GQA group, sum over T: [B, H, N]."""
    G = Hq // H
    out = torch.zeros(B, H, per_head.shape[-1])
    for b in range(B):
        for h in range(H):
            out[b, h] = per_head[b, h * G:(h + 1) * G].amax(0).sum(0)
    return out


def test_quest_bounds_and_scores_match_formula():
    torch.manual_seed(0)
    k = torch.randn(B, H, N * C, d)
    valid = torch.ones(B, N * C, dtype=torch.bool)
    valid[0, :3] = False  # left padding inside chunk 0 of sequence 0
    valid[1, :C] = False  # an all-padding chunk
    landmarks = torch.randn(B, H, N, d)
    mid, radius = policies.prefill_selection("quest", k, valid, landmarks, C)
    assert radius.shape == policies.aux_shape("quest", B, H, N, C, d)
    # min/max over the real tokens of each chunk only
    lo, hi = mid - radius, mid + radius
    torch.testing.assert_close(lo[0, :, 0], k[0, :, 3:4].amin(1))
    torch.testing.assert_close(hi[0, :, 0], k[0, :, 3:4].amax(1))
    torch.testing.assert_close(lo[1, :, 2], k[1, :, 2 * C:3 * C].amin(1))
    torch.testing.assert_close(hi[1, :, 2], k[1, :, 2 * C:3 * C].amax(1))
    assert not mid[1, :, 0].any() and not radius[1, :, 0].any()

    q = torch.randn(B, Hq, T, d)
    selectable = torch.ones(B, H, N, dtype=torch.bool)
    selectable[1, 0, 4] = False
    scale = 0.3
    ub = torch.zeros(B, Hq, T, N)
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // H)
            for n in range(N):
                ub[b, hq, 0, n] = sum(max(q[b, hq, 0, i] * lo[b, h, n, i],
                                          q[b, hq, 0, i] * hi[b, h, n, i]) for i in range(d))
    # the bound is an upper bound of every real token's q . k in the chunk
    qk = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(Hq // H, 1))
    assert (qk.view(B, Hq, T, N, C)[1, :, :, 1:] <= ub[1, :, :, 1:, None] + 1e-5).all()
    sel = selectable.repeat_interleave(Hq // H, 1)[:, :, None]
    p = torch.softmax((ub * scale).masked_fill(~sel, -math.inf), -1)
    expected = group_reduce(p)
    got = policies.landmark_scores(q, mid, selectable, scale, radius)
    torch.testing.assert_close(got, expected, atol=FP32_OP, rtol=FP32_OP)
    assert got[1, 0, 4] == 0


def test_streaming_keeps_sinks_then_recent():
    valid = torch.ones(B, N * C, dtype=torch.bool)
    valid[0, :C + 2] = False  # sequence 0: first real token is the 3rd of chunk 1
    selectable = valid.view(B, N, C).any(-1)[:, None].expand(B, H, N).clone()
    s = policies.streaming_scores(selectable, valid, C)
    k = 3
    top = s.topk(k, -1).indices.sort(-1).values
    # sequence 1: sink chunk 0 + the two most recent chunks
    assert top[1, 0].tolist() == [0, N - 2, N - 1]
    # sequence 0: chunk 1 holds 2 real tokens (< 4 sinks), so chunks 1 and 2 are both sinks
    assert top[0, 0].tolist() == [1, 2, N - 1]
    assert (s[0, :, 0] == 0).all()  # all-padding chunk


def test_oracle_is_exact_attention_mass_per_chunk():
    torch.manual_seed(1)
    k = torch.randn(B, H, N * C, d)
    valid = torch.ones(B, N * C, dtype=torch.bool)
    valid[1, :5] = False
    landmarks = torch.randn(B, H, N, d)
    same, keys = policies.prefill_selection("oracle", k, valid, landmarks, C)
    assert same is landmarks
    assert torch.equal(keys, k) and keys.data_ptr() != k.data_ptr()
    q = torch.randn(B, Hq, T, d)
    selectable = valid.view(B, N, C).any(-1)[:, None].expand(B, H, N).clone()
    selectable[0, 1, 3] = False
    scale = 0.5
    got = policies.oracle_scores(q, keys, selectable, valid, scale, C)
    mass = torch.zeros(B, Hq, T, N)
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // H)
            ok = valid[b] & selectable[b, h].repeat_interleave(C)
            logits = (k[b, h] @ q[b, hq, 0]) * scale
            p = torch.softmax(logits[ok], 0)
            full = torch.zeros(N * C)
            full[ok] = p
            mass[b, hq, 0] = full.view(N, C).sum(-1)
    torch.testing.assert_close(got, group_reduce(mass), atol=FP32_OP, rtol=FP32_OP)


def test_shadowkv_policy_has_empty_aux():
    k = torch.randn(B, H, N * C, d)
    landmarks = torch.randn(B, H, N, d)
    same, aux = policies.prefill_selection("shadowkv", k, torch.ones(B, N * C, dtype=torch.bool),
                                           landmarks, C)
    assert same is landmarks and aux.shape == (B, H, 0, d) and aux.numel() == 0


def test_policy_config_field():
    assert ShadowKVConfig().policy == "shadowkv"
    assert ShadowKVConfig.from_options({"policy": "quest"}).policy == "quest"
    with pytest.raises(ValueError, match="policy='h2o'"):
        ShadowKVConfig(policy="h2o")


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_ops_with_policy(policy):
    """Fake shapes match the real op for every policy's aux, and decode runs with each policy."""
    torch.manual_seed(2)
    Tp, rd = 48, 8
    kpre = torch.randn(1, 2, Tp, 8)
    inv = 1.0 / 10000.0 ** (torch.arange(0, rd, 2).float() / rd)
    emb = torch.arange(Tp).float()[:, None] * inv
    emb = torch.cat([emb, emb], -1)[None]
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    kpost = ref.apply_rope(kpre, cos[:, None], sin[:, None], "rotate_half")
    v = torch.randn(1, 2, Tp, 8)
    q_prompt = torch.randn(1, 4, Tp, 8)
    args = (kpre, kpost, v, None, "none", 16, 4, 1, 1, 1, policy, None, q_prompt, 0.3, 3)
    torch.library.opcheck(ops.prefill_state, args)
    st = ops.prefill_state(*args)
    tables = ops.rope_tables(cos, sin, 4, 1, "rotate_half")
    dargs = (torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), st,
             *tables, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8),
             torch.zeros(1, dtype=torch.long), *ops.workspace(ref.PrefillState(*st), 3, 4),
             0.3, 4, 3, "rotate_half", policy)
    torch.library.opcheck(ops.decode, dargs)


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_full_budget_every_policy_is_exact(policy):
    """Budget >= all chunks at full rank: any policy attends to everything -> dense output."""
    torch.manual_seed(3)
    Tp, rd, Hkv = 40, 8, 2
    kpre = torch.randn(1, Hkv, Tp, 8)
    inv = 1.0 / 10000.0 ** (torch.arange(0, rd, 2).float() / rd)
    emb = torch.arange(Tp + 1).float()[:, None] * inv
    emb = torch.cat([emb, emb], -1)[None]
    cos, sin = emb.cos(), emb.sin()
    k_all = ref.apply_rope(kpre, cos[:, None, :Tp], sin[:, None, :Tp], "rotate_half")
    v = torch.randn(1, Hkv, Tp + 1, 8)
    st = ref.prefill_state(kpre, k_all, v[:, :, :Tp], None, "none", 16, 4, 1, 1, 1, policy,
                           q=torch.randn(1, 4, Tp, 8), scale=0.35, budget_chunks=100)
    tables = ref.rope_tables(cos[:, :Tp], sin[:, :Tp], 4, 1, "rotate_half")
    q, knew = torch.randn(1, 4, 1, 8), torch.randn(1, Hkv, 1, 8)
    out = ref.decode_attention(q, knew, v[:, :, Tp:], 0.35, st, *tables, torch.zeros(1, Hkv, 4, 8),
                               torch.zeros(1, Hkv, 4, 8), torch.zeros(1, dtype=torch.long), 4,
                               100, "rotate_half", policy)
    keys = torch.cat([k_all, knew], 2).repeat_interleave(2, 1)
    expected = torch.softmax(q @ keys.transpose(-1, -2) * 0.35, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def needle_prompt():
    """Keys and queries where landmarks fail on KV head 0 and are exact on KV head 1.

    Head 0: every chunk's keys point along e0 except chunk NEEDLE, whose first key is a strong
    e0 "needle" and whose other keys cancel it in the mean, so its landmark scores lowest while
    it holds nearly all the attention mass. Head 1: the keys of a chunk are all equal, so each
    landmark is its chunk's key and the landmark ranking is the exact one. The local window's
    queries (and the decode query) point along e0.
    """
    torch.manual_seed(4)
    Bn, Hqn, Hn, Nn, Cn, dn, Ln = 1, 4, 2, 6, 4, 8, 4  # Ln: local tokens (one chunk)
    S = Nn * Cn
    e0 = torch.zeros(dn)
    e0[0] = 1.0
    k = torch.zeros(Bn, Hn, S + Ln, dn)
    k[0, 0, :S] = e0 + 0.01 * torch.randn(S, dn)
    k[0, 0, NEEDLE * Cn] = 12 * e0
    k[0, 0, NEEDLE * Cn + 1:(NEEDLE + 1) * Cn] = -4 * e0
    k[0, 1, :S] = torch.randn(Nn, dn).repeat_interleave(Cn, 0)
    q = torch.randn(Bn, Hqn, S + Ln, dn)
    q[:, :2] = 2 * e0  # the query heads of KV head 0
    return q, k, Cn


NEEDLE = 2


def gap_by_loops(q, k_all, key_valid, landmarks, selectable, scale, K, C):
    """landmark_gap written out per sequence, KV head, query and query head."""
    B, Hq, T, d = q.shape
    H, N = landmarks.shape[1], landmarks.shape[2]
    S, G = N * C, Hq // H
    out = torch.zeros(B, H)
    for b in range(B):
        for h in range(H):
            for t in range(S, T):
                mass, lm = [], []
                for g in range(G):
                    qv = q[b, h * G + g, t]
                    logits = (k_all[b, h, :t + 1] @ qv * scale)
                    p = torch.softmax(logits.masked_fill(~key_valid[b, :t + 1], -math.inf), 0)
                    m = p[:S].view(N, C).sum(-1) * selectable[b, h]
                    mass.append(m)
                    lg = (landmarks[b, h] @ qv * scale).masked_fill(~selectable[b, h], -math.inf)
                    lm.append(torch.softmax(lg, 0))
                lm_top = torch.stack(lm).amax(0).masked_fill(~selectable[b, h], -1).topk(K).indices
                or_top = torch.stack(mass).amax(0).topk(K).indices
                out[b, h] += max((m[or_top].sum() - m[lm_top].sum()).item() for m in mass)
            out[b, h] /= T - S
    return out


def test_landmark_gap_flags_the_head_landmarks_fail(monkeypatch):
    q, k, C_ = needle_prompt()
    S = k.shape[2] - 4
    valid = torch.ones(1, S, dtype=torch.bool)
    landmarks, _ = ref.chunk_landmarks(k[:, :, :S], valid, C_)
    selectable = torch.ones(1, 2, S // C_, dtype=torch.bool)
    selectable[0, 1, 0] = False  # an outlier chunk on head 1
    key_valid = torch.ones(1, k.shape[2], dtype=torch.bool)
    gap = policies.landmark_gap(q, k, key_valid, landmarks, selectable, 0.5, 1, C_)
    torch.testing.assert_close(gap, gap_by_loops(q, k, key_valid, landmarks, selectable, 0.5, 1,
                                                 C_), atol=FP32_OP, rtol=FP32_OP)
    # a padding key takes no mass: hiding the needle removes head 0's gap
    key_valid[0, NEEDLE * C_] = False
    no_needle = policies.landmark_gap(q, k, key_valid, landmarks, selectable, 0.5, 1, C_)
    torch.testing.assert_close(no_needle, gap_by_loops(q, k, key_valid, landmarks, selectable,
                                                       0.5, 1, C_), atol=FP32_OP, rtol=FP32_OP)
    assert no_needle[0, 0] < 0.05
    key_valid[0, NEEDLE * C_] = True
    assert gap[0, 0] > 0.5 and gap[0, 1].abs() < 1e-6  # head 0 fails, head 1 is exact

    calibration = (q, k, key_valid, landmarks, selectable, 0.5, 1)
    centers, radius = policies.prefill_selection("shadowkv_hybrid", k[:, :, :S], valid,
                                                 landmarks, C_, calibration)
    assert radius.shape == policies.aux_shape("shadowkv_hybrid", 1, 2, S // C_, C_, k.shape[-1])
    mid, quest_radius = policies.prefill_selection("quest", k[:, :, :S], valid, landmarks, C_)
    # head 0 falls back to Quest's bound (mid-range keys and their radius); head 1 keeps its
    # landmarks and no radius
    assert torch.equal(centers[:, 0], mid[:, 0]) and torch.equal(radius[:, 0], quest_radius[:, 0])
    assert torch.equal(centers[:, 1], landmarks[:, 1]) and not radius[:, 1].any()
    monkeypatch.setattr(policies, "HYBRID_GAP", gap[0, 0].item() + 1e-3)  # above both heads
    calm = policies.prefill_selection("shadowkv_hybrid", k[:, :, :S], valid, landmarks, C_,
                                      calibration)
    assert torch.equal(calm[0], landmarks) and not calm[1].any()  # no fallback head
    monkeypatch.undo()

    # decode: the fallback head ranks the needle chunk first (landmarks rank it last); the
    # other head keeps ShadowKV's landmark scores exactly
    qd = q[:, :, -1:]
    got = policies.landmark_scores(qd, centers, selectable, 0.5, radius)
    lm = ref.score_chunks(qd, landmarks, selectable, 0.5)
    assert got[0, 0].argmax() == NEEDLE and lm[0, 0].argmin() == NEEDLE
    torch.testing.assert_close(
        got[:, 0], policies.landmark_scores(qd, mid, selectable, 0.5, quest_radius)[:, 0])
    torch.testing.assert_close(got[:, 1], lm[:, 1])


def test_hybrid_prefill_needs_queries():
    k = torch.randn(B, H, N * C + C, d)
    with pytest.raises(ValueError, match="shadowkv_hybrid: prefill needs the prompt's queries"):
        ref.prefill_state(k, k, k, None, "none", 16, C, 1, 1, 1, "shadowkv_hybrid")

"""Which chunk selector keeps the attention mass that landmarks lose, per KV head?

Follows scripts/selection_coverage.py (teacher-forced dense answer, SmolLM2 fp32 on the CPU,
budget 1024, chunks of 8, default outliers): at each answer position it measures, per layer
and KV head, the exact attention mass outside what a ShadowKV step attends, for several
selectors of the top-k chunks:

  landmark   ShadowKV's mean-key landmarks (the method)
  oracle     chunks by exact attention mass (upper bound)
  quest      Quest's per-chunk min/max key bound on every head
  hybrid@t   per-head choice made at prefill: heads whose landmark top-k, for the prompt's
             last queries (the local window, positions S..T-1), misses more than t of the
             attention mass beyond what the oracle top-k misses use Quest bounds; the rest
             landmarks
  top1/top2  Quest on the 1 or 2 heads of each layer with the largest prefill gap

Prints per sample the flagged heads and, per answer position, the mean missed mass of each
selector over all layers and KV heads, and that of layer 7's worst head (the head that loses
93-100% with landmarks in results/cpu/selection_coverage.txt). Output:
results/cpu/perhead_selectors.txt.

    SHADOWPASS_SMOLLM2_GGUF=... python scripts/perhead_selectors.py [sample ...]
"""
import math
import sys

import torch

from shadowpass import policies
from shadowpass import reference as ref
from shadowpass.eval.harness import default_outlier_chunks

from niah_probe import every, model, prompt_state, recorded, scale, tok  # loads SmolLM2 (scripts/niah_probe.py)

BUDGET, C, LOCAL_CHUNKS = 1024, 8, 4
THRESHOLDS = (0.05, 0.1, 0.2)
torch.set_grad_enabled(False)


def top(scores, st, K):
    return ref.select_chunks(scores, st.selectable, K)[0]


def missed_mass(q, k_post, st, sel, p):
    """Exact attention mass [H] (worst query head of the group) of query rows q [1, Hq, W, d]
    at positions p [W] outside outliers, local/generated and chunks sel [1, H, W, K] (per row)."""
    H, G = k_post.shape[1], q.shape[1] // k_post.shape[1]
    W = q.shape[2]
    N = st.landmarks.shape[2]
    S = N * C
    P = int(p.max()) + 1
    keys = k_post[:, :, :P].float()
    att = torch.einsum("bhgwd,bhsd->bhgws", q.float().view(1, H, G, W, -1), keys) * scale
    causal = torch.arange(P)[None, :] <= p[:, None]  # [W, P]
    att = torch.softmax(att.masked_fill(~causal, -math.inf), -1)
    kept = torch.zeros(1, H, W, P, dtype=torch.bool)
    kept[..., S:] = True
    outl = (~st.selectable[..., None].expand(1, H, N, C).reshape(1, H, S)) & st.sparse_valid[:, None]
    kept[..., :S] |= outl[:, :, None]
    on = torch.zeros(1, H, W, N, dtype=torch.bool).scatter_(3, sel, True)
    kept[..., :S] |= on[..., None].expand(1, H, W, N, C).reshape(1, H, W, S)
    return (att * (~kept[:, :, None]).float()).sum(-1).amax(2)[0]  # [H, W]


def per_row(fn, q):
    """Selection per query row: q [1, Hq, W, d] -> [1, H, W, K]."""
    return torch.stack([fn(q[:, :, w:w + 1]) for w in range(q.shape[2])], 2)


samples = [int(a) for a in sys.argv[1:]] or [3, 14, 25, 27]
for i in samples:
    s = every[i]
    answer = tok(" " + s.answers[0], add_special_tokens=False).input_ids
    T = s.num_tokens
    recorded.clear()
    model(torch.tensor([s.input_ids + answer]))
    print(f"\nsample {i}: answer {s.answers[0]!r}, prompt {T} tokens", flush=True)
    O = default_outlier_chunks(BUDGET, C)
    layers = []
    flagged_gap = []
    for q, k_pre, k_post in recorded:
        st = prompt_state(k_pre, k_post, T, C, O, LOCAL_CHUNKS)
        N = st.landmarks.shape[2]
        S = N * C
        K = min(BUDGET // C, N)
        bounds = policies.chunk_ranges(k_post[:, :, :S], st.sparse_valid, C)  # (mid, radius)
        # prefill calibration on the local-window queries (all their keys are known)
        qc = q[:, :, S:T]
        pc = torch.arange(S, T)
        lm = per_row(lambda x: top(ref.score_chunks(x, st.landmarks, st.selectable, scale),
                                   st, K), qc)
        orc = per_row(lambda x: top(policies.oracle_scores(x, k_post[:, :, :S], st.selectable,
                                                           st.sparse_valid, scale, C), st, K), qc)
        gap = (missed_mass(qc, k_post, st, lm, pc) - missed_mass(qc, k_post, st, orc, pc)).mean(1)
        flagged_gap.append(gap)
        layers.append((q, k_post, st, bounds, K, gap))
    gaps = torch.stack(flagged_gap)  # [layers, H]
    for t in THRESHOLDS:
        f = (gaps > t).nonzero().tolist()
        print(f"  prefill gap > {t}: {len(f)} of {gaps.numel()} heads: "
              + " ".join(f"L{a}h{b}({gaps[a, b]:.2f})" for a, b in f), flush=True)
    for j in range(1, len(answer)):
        p = T + j - 1
        res = {}
        for q, k_post, st, bounds, K, gap in layers:
            qp = q[:, :, p:p + 1]
            pp = torch.tensor([p])
            sc_lm = ref.score_chunks(qp, st.landmarks, st.selectable, scale)
            sc_q = policies.landmark_scores(qp, bounds[0], st.selectable, scale, bounds[1])
            sc_o = policies.oracle_scores(qp, k_post[:, :, :st.landmarks.shape[2] * C],
                                          st.selectable, st.sparse_valid, scale, C)
            sels = {"landmark": top(sc_lm, st, K), "oracle": top(sc_o, st, K),
                    "quest": top(sc_q, st, K)}
            for t in THRESHOLDS:
                use_q = (gap > t)[None, :, None]
                sels[f"hybrid@{t}"] = top(torch.where(use_q, sc_q, sc_lm), st, K)
            for f in (1, 2):  # the f heads of the layer with the largest prefill gap
                use_q = torch.zeros_like(gap, dtype=torch.bool)
                use_q[gap.topk(f).indices] = True
                sels[f"top{f}"] = top(torch.where(use_q[None, :, None], sc_q, sc_lm), st, K)
            for name, sel in sels.items():
                res.setdefault(name, []).append(missed_mass(qp, k_post, st, sel[:, :, None], pp)[:, 0])
        line = "  ".join(f"{n} {torch.stack(v).mean():.3f}/{torch.stack(v)[7].max():.2f}"
                         for n, v in res.items())
        print(f"  predicts {tok.decode([answer[j]])!r}: mean / layer-7 worst head missed: {line}", flush=True)

"""Where does landmark selection lose attention mass that the oracle keeps?

For the niah_single prompts at 8K that ShadowKV (budget 1024, chunks of 8) answers wrongly
(see scripts/selection_probe.py), teacher-force the dense answer through the plain SmolLM2 in
fp32 on the CPU, record every layer's post-RoPE queries and keys, and at each decode position
measure, per layer and KV head, the exact attention mass that falls outside what a ShadowKV step
attends (outliers, local window, generated tokens and the top-k chunks), for the landmark top-k
and for the oracle top-k (chunks by exact attention mass). Prints per position the mean missed
mass and the layers where landmarks miss most beyond the oracle.

    SHADOWPASS_SMOLLM2_GGUF=... python scripts/selection_coverage.py
"""
import torch

from shadowpass import policies
from shadowpass import reference as ref
from shadowpass.eval.harness import default_outlier_chunks

from niah_probe import every, model, prompt_state, recorded, scale, tok  # loads SmolLM2 (scripts/niah_probe.py)

BUDGET, C, LOCAL_CHUNKS = 1024, 8, 4

for i in (3, 14, 25, 27):
    s = every[i]
    answer = tok(" " + s.answers[0], add_special_tokens=False).input_ids
    T = s.num_tokens
    ids = torch.tensor([s.input_ids + answer])
    recorded.clear()
    with torch.no_grad():
        model(ids)
    print(f"\nsample {i}: answer {s.answers[0]!r} = tokens "
          f"{[tok.decode([t]) for t in answer]}, prompt {T} tokens", flush=True)
    O = default_outlier_chunks(BUDGET, C)
    states = []
    for q, k_pre, k_post in recorded:
        states.append(prompt_state(k_pre, k_post, T, C, O, LOCAL_CHUNKS))
    for j in range(1, len(answer)):  # the query at T + j - 1 predicts answer[j] (j = 0: prefill)
        p = T + j - 1
        rows = []
        for (q, _, k_post), st in zip(recorded, states):
            H, G = k_post.shape[1], q.shape[1] // k_post.shape[1]
            N = st.landmarks.shape[2]
            S = N * C
            qp = q[:, :, p:p + 1]
            K = min(BUDGET // C, N)
            lm = ref.select_chunks(ref.score_chunks(qp, st.landmarks, st.selectable, scale),
                                   st.selectable, K)[0]
            orc = ref.select_chunks(policies.oracle_scores(qp, k_post[:, :, :S], st.selectable,
                                                           st.sparse_valid, scale, C),
                                    st.selectable, K)[0]
            keys = k_post[:, :, :p + 1].repeat_interleave(G, 1).float()  # [1, Hq, p+1, d]
            att = torch.softmax((qp.float() @ keys.transpose(-1, -2)) * scale, -1)
            att = att.view(1, H, G, p + 1)
            kept = torch.zeros(1, H, p + 1, dtype=torch.bool)
            kept[:, :, S:] = True  # local window and generated tokens
            outliers = ~st.selectable[..., None].expand(1, H, N, C).reshape(1, H, S)
            kept[:, :, :S] |= outliers & st.sparse_valid[:, None, :]
            missed = []
            for sel in (lm, orc):
                m = kept.clone()
                on = torch.zeros(1, H, N, dtype=torch.bool).scatter_(2, sel, True)
                m[:, :, :S] |= on[..., None].expand(1, H, N, C).reshape(1, H, S)
                # missed mass per KV head: its group's worst query head
                missed.append((att * (~m[:, :, None, :]).float()).sum(-1).amax(2)[0])
            rows.append(missed)
        lm_all = torch.stack([r[0] for r in rows])  # [layers, H]
        orc_all = torch.stack([r[1] for r in rows])
        gap = (lm_all - orc_all).amax(1)
        worst = gap.topk(3).indices.tolist()
        print(f"  predicts {tok.decode([answer[j]])!r}: missed mass mean landmark "
              f"{lm_all.mean():.3f} / oracle {orc_all.mean():.3f}; worst layers (landmark vs "
              f"oracle, worst head): " + ", ".join(
                  f"L{w} {lm_all[w].max():.2f} vs {orc_all[w].max():.2f}" for w in worst),
              flush=True)

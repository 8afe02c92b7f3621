"""Would the landmarks select the same chunks in fp8? (Half the bytes of the landmark scores,
the largest kernel of a 128K decode step: 114 us of the 340 us at batch 8 with chunk_cache 4.)

SmolLM2 in fp32 on the CPU reads the first PROMPT tokens of issue 5's 8K niah_single prompts
(essay haystack) and is teacher-forced through the next STEPS tokens (scripts/niah_probe.py
records every layer's queries and keys). For every layer, KV head and decode step, the top-K
chunks by landmark score (``reference.score_chunks``, outliers and the local window excluded)
are taken with the landmarks in fp32, in bf16 (today's model dtype), and in float8_e4m3 with one
scale per KV head, one per chunk, or none (a plain cast). Printed: the share of fp32's selection each picks, and the
attention mass the selected chunks hold: each query head's exact softmax of q . k over the
sparse region's tokens, per token the max over the KV head's query group, summed over the
selected chunks' tokens.

    SHADOWPASS_SMOLLM2_GGUF=... python scripts/landmark_precision.py [--budgets 256 512]
"""
from __future__ import annotations

import argparse

import torch

from shadowpass import reference as ref
from shadowpass.eval import tasks

from niah_probe import scale, teacher_forced_layers, tok  # loads SmolLM2 (scripts/niah_probe.py)

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
ap.add_argument("--prompt", type=int, default=6000)
ap.add_argument("--steps", type=int, default=32)
ap.add_argument("--samples", type=int, default=3)
args = ap.parse_args()
prompts = tasks.make_samples(tok, "niah_single", [8000], args.samples, 0, haystack="essay")
C, LOCAL_CHUNKS = 8, 4
F8 = torch.float8_e4m3fn
F8_MAX = torch.finfo(F8).max


def fp8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x rounded through float8_e4m3 with the scale that maps amax to its largest value."""
    s = (amax / F8_MAX).clamp(min=1e-12)
    return (x / s).to(F8).float() * s


VARIANTS = {
    "bf16": lambda lm: lm.bfloat16().float(),
    "fp8, a scale per KV head": lambda lm: fp8(lm, lm.abs().amax(dim=(2, 3), keepdim=True)),
    "fp8, a scale per chunk": lambda lm: fp8(lm, lm.abs().amax(dim=3, keepdim=True)),
    # no scale to store: a plain cast (keys' chunk means sit well inside e4m3's range)
    "fp8, no scale": lambda lm: lm.clamp(-F8_MAX, F8_MAX).to(F8).float(),
}
agree = {(b, v): [] for b in args.budgets for v in VARIANTS}
mass = {(b, v): [] for b in args.budgets for v in ["fp32", *VARIANTS]}
for budget, qs, st, k_post in teacher_forced_layers(prompts, args.prompt, args.steps,
                                                    args.budgets, C, LOCAL_CHUNKS):
    H, N, d = st.landmarks.shape[1:]
    K = min(budget // C, N)
    G = qs.shape[1] // H
    # exact attention of each step over the sparse region's tokens, per KV head
    logits = torch.einsum("bhgtd,bhsd->bhgts", qs.view(1, H, G, -1, d),
                          k_post[:, :, :N * C]) * scale
    att = logits.softmax(-1).amax(2)[0].view(H, -1, N, C).sum(-1)  # [H, steps, N]
    for name, lm in [("fp32", st.landmarks.float()),
                     *((v, f(st.landmarks.float())) for v, f in VARIANTS.items())]:
        sel = torch.stack([ref.select_chunks(
            ref.score_chunks(qs[:, :, s:s + 1], lm, st.selectable, scale),
            st.selectable, K)[0][0] for s in range(args.steps)], 1)  # [H, steps, K]
        mass[(budget, name)].append(att.gather(2, sel).sum(-1).mean().item())
        if name == "fp32":
            want = sel
        else:
            same = (sel[..., :, None] == want[..., None, :]).any(-1).float().mean()
            agree[(budget, name)].append(same.item())

print(f"\nSmolLM2-135M, essay haystack, prompt {args.prompt} tokens, {args.steps} teacher-forced "
      f"steps, {args.samples} prompts, chunks of {C}; means over layers, KV heads and steps")
for budget in args.budgets:
    print(f"budget {budget}:")
    print(f"  {'landmarks':<26} {'same chunks as fp32':>20} {'attention mass held':>20}")
    print(f"  {'fp32':<26} {'':>20} {sum(mass[(budget, 'fp32')]) / len(mass[(budget, 'fp32')]):>20.2%}")
    for v in VARIANTS:
        a, m = agree[(budget, v)], mass[(budget, v)]
        print(f"  {v:<26} {sum(a) / len(a):>20.2%} {sum(m) / len(m):>20.2%}")

"""Shared set-up of the CPU selection diagnostics (scripts/selection_coverage.py and
scripts/perhead_selectors.py): SmolLM2 in fp32, issue 5's 8K niah_single prompts, and a RoPE
hook that records, for every layer of each forward, (post-RoPE queries, pre-RoPE keys,
post-RoPE keys) in ``recorded``; ``teacher_forced_layers`` for the decode-step probes."""
import torch
import transformers.models.llama.modeling_llama as llama

from shadowpass import reference as ref
from shadowpass.eval import tasks
from shadowpass.eval.harness import default_outlier_chunks
from shadowpass.eval.smollm2 import load_smollm2

model, tok = load_smollm2("cpu", torch.float32)
cfg = model.config
scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
every = tasks.make_samples(tok, "niah_single", [8000], 50, 0, depths=[i / 10 for i in range(11)])
recorded = []
_plain_rope = llama.apply_rotary_pos_emb


def _recording_rope(q, k, cos, sin, *args, **kwargs):
    q2, k2 = _plain_rope(q, k, cos, sin, *args, **kwargs)
    recorded.append((q2.detach(), k.detach(), k2.detach()))
    return q2, k2


llama.apply_rotary_pos_emb = _recording_rope


def prompt_state(k_pre, k_post, T: int, C: int, outlier_chunks: int, local_chunks: int):
    """One layer's PrefillState over the first T tokens, at full rank (values unused: zeros)."""
    H = k_post.shape[1]
    return ref.prefill_state(k_pre[:, :, :T], k_post[:, :, :T], torch.zeros_like(k_post[:, :, :T]),
                             torch.ones(1, T, dtype=torch.bool), "valid", H * k_post.shape[-1], C,
                             outlier_chunks, local_chunks)


def teacher_forced_layers(prompts, prompt_len: int, steps: int, budgets, C: int = 8,
                          local_chunks: int = 4):
    """For each prompt, SmolLM2 reads its first prompt_len tokens and is teacher-forced through
    the next `steps`; yields, per budget and layer, (budget, the decode queries [1, Hq, steps,
    d], the layer's PrefillState over the prompt at full rank with the budget's outliers, its
    post-RoPE keys [1, Hkv, prompt_len + steps, d])."""
    for i, sample in enumerate(prompts):
        ids = torch.tensor([sample.input_ids[:prompt_len + steps]])
        recorded.clear()
        with torch.no_grad():
            model(ids)
        T = prompt_len
        for budget in budgets:
            O = default_outlier_chunks(budget, C)
            for q, k_pre, k_post in recorded:
                yield budget, q[:, :, T:T + steps], prompt_state(k_pre, k_post, T, C, O,
                                                                 local_chunks), k_post
        print(f"sample {i} done", flush=True)

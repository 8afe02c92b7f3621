"""Shared set-up of the CPU selection diagnostics (scripts/selection_coverage.py and
scripts/perhead_selectors.py): SmolLM2 in fp32, issue 5's 8K niah_single prompts, and a RoPE
hook that records, for every layer of each forward, (post-RoPE queries, pre-RoPE keys,
post-RoPE keys) in ``recorded``."""
import torch
import transformers.models.llama.modeling_llama as llama

from shadowpass.eval import tasks
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

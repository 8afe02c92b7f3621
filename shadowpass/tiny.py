"""Tiny random-weight Hugging Face models built from configs (no download).

The one table of model cases that tests, examples and the CLI share. Each entry names a
transformers config class and the overrides that make it tiny yet representative (GQA, partial
or interleaved rotary). transformers is imported only when a model is built, so importing this
module (and ``shadowpass --help``) stays cheap.

    model = tiny_model("glm", attn="eager")     # 2 layers, hidden 64, vocab 256
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

TINY: Dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=2048)

# name -> (transformers config class name, overrides on top of TINY)
HF_MODELS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.25)),
    "glm": ("GlmConfig", dict(num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                              pad_token_id=0)),
}

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def tiny_config(name: str, attn: str = "sdpa", **overrides):
    """The transformers config of tiny model `name` with attention implementation `attn`."""
    import transformers

    if name not in HF_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(HF_MODELS)}")
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {attn!r}; choose one of "
                         f"{list(ATTENTION_IMPLEMENTATIONS)}")
    cls_name, kw = HF_MODELS[name]
    cfg = getattr(transformers, cls_name)(**{**TINY, **kw, **overrides})
    cfg._attn_implementation = attn
    return cfg


def tiny_model(name: str, attn: str = "sdpa", **overrides):
    """A tiny random-weight causal LM (eval mode, CPU, fp32) built from tiny_config(...)."""
    import transformers

    cfg = tiny_config(name, attn, **overrides)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()

"""The one table of model cases that the end-to-end tests are parametrized over."""
import transformers as T

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=2048)

# name -> (config class, overrides). Each is a tiny random-weight model built from a config.
HF_MODELS = {
    "llama": (T.LlamaConfig, dict(num_key_value_heads=2)),
    "qwen2": (T.Qwen2Config, dict(num_key_value_heads=2)),
    "mistral": (T.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "phi3": (T.Phi3Config, dict(num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0)),
    "gpt_neox": (T.GPTNeoXConfig, dict(rotary_pct=0.25)),
    "glm": (T.GlmConfig, dict(num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                             pad_token_id=0)),
}

EXPECTED_ROPE = {"llama": "rotate_half", "qwen2": "rotate_half", "mistral": "rotate_half",
                 "phi3": "rotate_half partial", "gpt_neox": "rotate_half partial",
                 "glm": "interleaved partial"}


def hf_model(name: str, attn: str = "sdpa", **overrides):
    cls, kw = HF_MODELS[name]
    cfg = cls(**{**TINY, **kw, **overrides})
    cfg._attn_implementation = attn
    return T.AutoModelForCausalLM.from_config(cfg).eval()

"""The one table of model cases that the end-to-end tests are parametrized over.

The table itself lives in the package (shadowpass/tiny.py) so the CLI and examples share it.
"""
from shadowpass.tiny import HF_MODELS, TINY, tiny_model  # noqa: F401

EXPECTED_ROPE = {"llama": "rotate_half", "qwen2": "rotate_half", "mistral": "rotate_half",
                 "phi3": "rotate_half partial", "gpt_neox": "rotate_half partial",
                 "glm": "interleaved partial"}


def hf_model(name: str, attn: str = "sdpa", **overrides):
    return tiny_model(name, attn, **overrides)

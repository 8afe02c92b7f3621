"""Hugging Face call conventions across transformers 5.x (shadowpass.hf)."""
import warnings

import torch

from shadowpass.hf import cache_kwargs, returned_cache
from shadowpass.tiny import tiny_model


def test_cache_passes_under_the_name_the_installed_transformers_takes():
    """The cache returned by one forward feeds the next without a deprecation warning, and the
    next forward extends it (a cache passed under an unknown name would be ignored)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = returned_cache(model(ids, use_cache=True))
        assert cache.get_seq_length() == 8
        out = model(ids[:, -1:], **cache_kwargs(model, cache), use_cache=True)
    assert returned_cache(out).get_seq_length() == 9


def test_cache_name_from_a_compiled_forward():
    """The dense benchmark looks the name up on ``torch.compile(model.forward)`` (a function, no
    ``.forward``): the same name as on the module."""
    model = tiny_model("llama")
    forward = torch.compile(model.forward)
    assert cache_kwargs(forward, None) == cache_kwargs(model, None)

"""Hugging Face call conventions across transformers 5.x (shadowpass.hf)."""
import warnings

import pytest
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


def test_beam_search_equals_dense():
    """Beam search reorders the cache every step: the ShadowKV rows move with it (full rank
    and budget, so the beams and their scores equal dense attention's)."""
    import shadowpass
    torch.manual_seed(0)
    model, dense = tiny_model("llama"), tiny_model("llama")
    dense.load_state_dict(model.state_dict())
    model.compile(backend="shadowkv", options={"min_sparse_len": 0, "rank": 4096,
                                               "budget": 1 << 16, "outlier_chunks": 1})
    ids = torch.randint(0, 256, (2, 100))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=4,
              do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours, theirs = model.generate(ids, **kw), dense.generate(ids, **kw)
        assert shadowpass.runtime_of(model).sites  # the decode steps read ShadowKV state
        cache = returned_cache(ours)
        with pytest.raises(ValueError, match="reordered across rows of different prompts"):
            cache.reorder_cache(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))  # prompt 1 <-> prompt 0
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)


def test_prompt_lookup_decoding_equals_dense():
    """Prompt-lookup (speculative) decoding verifies candidate tokens in one multi-token step
    and crops the rejected ones, the first time out of the prompt itself (its first forward is
    prompt + candidates): the ShadowKV state is cut with the cache (full rank and budget, so
    the tokens equal dense attention's)."""
    import shadowpass
    torch.manual_seed(0)
    model, dense = tiny_model("llama"), tiny_model("llama")
    dense.load_state_dict(model.state_dict())
    model.compile(backend="shadowkv", options={"min_sparse_len": 0, "rank": 4096,
                                               "budget": 1 << 16, "outlier_chunks": 1})
    for _ in range(3):  # without the cut, 2 of these 3 prompts gave other tokens
        base = torch.randint(0, 256, (1, 30))
        ids = torch.cat([base, base, base, base[:, :5]], 1)  # repeats: lookups find candidates
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                  prompt_lookup_num_tokens=4, return_dict_in_generate=True)
        with torch.no_grad():
            ours, theirs = model.generate(ids, **kw), dense.generate(ids, **kw)
        assert torch.equal(ours.sequences, theirs.sequences)
    site = shadowpass.runtime_of(model).sites["model.layers.0.self_attn"]
    cache = returned_cache(ours)
    assert cache.get_seq_length() == 95 + site.used
    with pytest.raises(ValueError, match="exist only in compressed form"):
        cache.crop(-cache.get_seq_length() + 10)


def test_eager_step_on_stubs_is_refused_with_the_fix():
    """A forward that bypasses the compiled model (here a force_eager stance; in practice
    Dynamo's recompile limit) would attend to the stubs' zeros: it raises and says what to do."""
    model = tiny_model("llama")
    model.compile(backend="shadowkv", options={"min_sparse_len": 0, "outlier_chunks": 1})
    with torch.no_grad():
        cache = returned_cache(model(torch.randint(0, 256, (1, 64)), use_cache=True))
        with torch.compiler.set_stance("force_eager"), \
                pytest.raises(RuntimeError, match="ran eagerly.*recompile_limit"):
            model(torch.randint(0, 256, (1, 1)), **cache_kwargs(model, cache), use_cache=True)

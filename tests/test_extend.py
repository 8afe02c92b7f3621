"""Multi-token steps on a sequence with ShadowKV state (a follow-up turn with the old cache):
the graph's second rewrite decodes the new tokens in turn over the state."""
import pytest
import torch
from transformers import DynamicCache

import shadowpass
from cases import hf_model
from shadowpass.hf import cache_kwargs, returned_cache

ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]
SPARSE = {"min_sparse_len": 0, "rank": 16, "budget": 16, "outlier_chunks": 1, "local_chunks": 1}
EXACT = {"min_sparse_len": 0, "rank": 4096, "budget": 1 << 16, "outlier_chunks": 1}


def twins(name="llama", attn="sdpa", options=SPARSE, device="cpu"):
    """Two compiled copies of one random model, and a dense copy."""
    torch.manual_seed(0)
    models = [hf_model(name, attn).to(device) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    for m in models[:2]:
        m.compile(backend="shadowkv", options=options)
    return models


def step(model, cache, ids, **kw):
    with torch.no_grad():
        return model(ids.to(model.device), **cache_kwargs(model, cache), **kw).logits


@pytest.mark.parametrize("attn,device", [
    ("sdpa", "cpu"), ("eager", "cpu"), pytest.param("sdpa", "cuda", marks=ON_GPU)])
def test_follow_up_turn_equals_decoding_its_tokens_one_by_one(attn, device):
    """Budget 2 chunks of a 120-token prompt, rank 16: the selection matters, and each new
    token selects its own chunks, as when decoded alone (on CUDA: the decode kernels, and the
    one-by-one side's step graph)."""
    whole, one_by_one, _ = twins(attn=attn, device=device)
    prompt, turn = torch.randint(0, 256, (2, 120)), torch.randint(0, 256, (2, 6))
    caches = [DynamicCache(config=whole.config) for _ in range(2)]
    for m, c in zip((whole, one_by_one), caches):
        step(m, c, prompt)
        step(m, c, prompt[:, -1:])  # a decode step before the follow-up
    got = step(whole, caches[0], turn)
    want = torch.cat([step(one_by_one, caches[1], turn[:, t:t + 1]) for t in range(6)], 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    nxt = want[:, -1:].argmax(-1)  # and the decode steps after it read the same state
    torch.testing.assert_close(step(whole, caches[0], nxt), step(one_by_one, caches[1], nxt),
                               rtol=1e-4, atol=1e-5)
    site = shadowpass.runtime_of(whole).sites["model.layers.0.self_attn"]
    assert site.gen_len.item() == 1 + 6 + 1 and caches[0].get_seq_length() == 128


@pytest.mark.parametrize("device", DEVICES)
def test_follow_up_turns_through_generate_equal_dense(device):
    """Full rank and budget: two turns of generate, the second passed the first's cache, give
    dense attention's tokens."""
    sparse, _, dense = twins(options=EXACT, device=device)
    first = torch.randint(0, 256, (2, 90), device=device)
    outs = []  # they own the caches, and so the ShadowKV state
    for model in (sparse, dense):
        kw = dict(do_sample=False, max_new_tokens=4, return_dict_in_generate=True)
        with torch.no_grad():
            one = model.generate(first, attention_mask=torch.ones_like(first), **kw)
            new = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
            ids = torch.cat([one.sequences, new.to(device)], 1)
            two = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 **cache_kwargs(model, returned_cache(one)), **kw)
        outs.append(two)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    # 3 decode steps, the 6 tokens not yet cached (turn one's last and the 5 new), 3 steps
    site = shadowpass.runtime_of(sparse).sites["model.layers.0.self_attn"]
    assert site.gen_len.item() == 3 + 6 + 3


def test_padding_inside_the_new_tokens_is_refused_with_the_fix():
    model, _, _ = twins()
    cache = DynamicCache(config=model.config)
    step(model, cache, torch.randint(0, 256, (2, 64)))
    mask = torch.ones(2, 64 + 5, dtype=torch.long)
    mask[1, 64:66] = 0  # the second follow-up is 2 tokens shorter, padded on the left
    with pytest.raises(ValueError, match="not causal among the new tokens.*equal length"):
        step(model, cache, torch.randint(0, 256, (2, 5)), attention_mask=mask)


def test_long_follow_up_of_a_dense_first_turn_stays_dense(caplog):
    """A first turn below min_sparse_len keeps its keys and values; a long follow-up then runs
    dense (ShadowKV needs the prompt's pre-RoPE keys), with no warning."""
    model, _, dense = twins(options={"min_sparse_len": 64})
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    for ids in (torch.randint(0, 256, (1, 20)), torch.randint(0, 256, (1, 100)),
                torch.randint(0, 256, (1, 1))):
        torch.testing.assert_close(step(model, caches[0], ids), step(dense, caches[1], ids),
                                   rtol=1e-4, atol=1e-5)
    assert not shadowpass.runtime_of(model).sites
    assert "dense attention from now on" not in caplog.text


def test_follow_up_graph_dumps_its_extend_rewrite(tmp_path):
    model = shadowpass.compile(hf_model("llama"), dump_dir=str(tmp_path), **SPARSE)
    cache = DynamicCache(config=model.config)
    step(model, cache, torch.randint(0, 256, (1, 64)))
    assert not list(tmp_path.glob("*_extend.py"))  # a first prompt has no past
    step(model, cache, torch.randint(0, 256, (1, 4)))
    (extend,) = tmp_path.glob("graph_*_extend.py")
    assert "shadowkv.decode_extend" in extend.read_text()


def test_a_dense_sequence_never_reads_another_sequences_state():
    """Sequence A (long: ShadowKV state) and B (short: dense) decoded in turn with one model:
    B's decode step and follow-up read B's own keys and values, not the state that A's step
    left in the runtime (before: B attended over A's state)."""
    model, _, dense = twins(options={**EXACT, "min_sparse_len": 64})
    a, b = torch.randint(0, 256, (1, 100)), torch.randint(0, 256, (1, 20))
    ours, theirs = ([DynamicCache(config=model.config) for _ in range(2)] for _ in range(2))
    for m, caches in ((model, ours), (dense, theirs)):
        step(m, caches[0], a)
        step(m, caches[1], b)
    for ids, cache in ((a[:, :1], 0), (b[:, :1], 1), (b[:, :4], 1), (a[:, :3], 0)):
        torch.testing.assert_close(step(model, ours[cache], ids), step(dense, theirs[cache], ids),
                                   rtol=1e-4, atol=1e-5)


def test_a_long_prompt_in_chunks_warns_with_the_fix(caplog):
    """A second chunk as long as a prompt that would get ShadowKV runs token by token: said."""
    model, _, _ = twins(options={**SPARSE, "min_sparse_len": 48})
    cache = DynamicCache(config=model.config)
    step(model, cache, torch.randint(0, 256, (1, 64)))
    step(model, cache, torch.randint(0, 256, (1, 8)))
    assert "decode steps" not in caplog.text  # a short follow-up: no warning
    step(model, cache, torch.randint(0, 256, (1, 48)))
    assert "48 new tokens on a sequence with ShadowKV state run as 48 decode steps" in caplog.text
    assert "prefill_chunk_size" in caplog.text

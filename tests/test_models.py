"""End to end on tiny random-weight Hugging Face models built from configs (no download)."""
import pytest
import torch
from transformers import DynamicCache

import shadowpass
from cases import EXPECTED_ROPE, HF_MODELS, hf_model
from tolerances import FP32_LOGITS

EXACT = {"rank": 4096, "budget": 1 << 16, "min_sparse_len": 0, "outlier_chunks": 3}


def prompt(B, S, pad=7):
    ids = torch.randint(0, 256, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    if B > 1:
        mask[0, :pad] = 0  # left padding on the first sequence
    return ids, mask


def greedy(model, ids, mask, n=32):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_exactness_anchor(name, batch):
    """Full rank and budget: 32 greedy tokens after a 300-token prompt equal eager dense."""
    model = hf_model(name)
    ids, mask = prompt(batch, 300)
    dense = greedy(model, ids, mask)
    model.compile(backend="shadowkv", options=EXACT)
    out = greedy(model, ids, mask)
    rt = shadowpass.runtime_of(model)
    assert rt is not None and len(rt.sites) == model.config.num_hidden_layers  # ShadowKV ran
    assert torch.equal(out.sequences, dense.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, dense.logits))
    assert diff < FP32_LOGITS
    # the model's own cache keeps no full-size K/V on rewritten layers
    layer = out.past_key_values.layers[0]
    assert layer.keys.shape[-2] == 300 + 31
    assert layer.keys.untyped_storage().nbytes() < 64 and layer.values.untyped_storage().nbytes() < 64


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_explain_one_site_per_layer(name, attn):
    model = hf_model(name, attn)
    report = shadowpass.explain(model, torch.randint(0, 256, (1, 16)))
    assert len(report.rewritten) == model.config.num_hidden_layers, str(report)
    for site in report.rewritten:
        assert site.rope.startswith(EXPECTED_ROPE[name]) and site.pre_rope_keys
        assert site.pattern == ("sdpa" if attn == "sdpa" else "matmul_softmax")
        assert site.kv_cache == "cat"
    assert "rewritten" in str(report) and '"sites"' in report.to_json()


@pytest.mark.parametrize("name", ["llama", "glm"])
def test_eager_attention_exact(name):
    model = hf_model(name, "eager")
    ids, mask = prompt(2, 300)
    dense = greedy(model, ids, mask, n=8)
    model.compile(backend="shadowkv", options=EXACT)
    out = greedy(model, ids, mask, n=8)
    assert len(shadowpass.runtime_of(model).sites) == 2
    assert torch.equal(out.sequences, dense.sequences)


def test_small_budget_state_sizes():
    """Budget 64 on a 1K prompt: generation runs, logits finite, state sized as configured."""
    model = hf_model("llama")
    B, T, C, budget, outliers, local, rank = 2, 1000, 8, 64, 6, 4, 24
    ids, mask = prompt(B, T)
    model.compile(backend="shadowkv", options=dict(budget=budget, rank=rank, min_sparse_len=0,
                                                   outlier_chunks=outliers, local_chunks=local))
    out = greedy(model, ids, mask, n=16)
    assert all(torch.isfinite(l).all() for l in out.logits)
    cfg = model.config
    H, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    N = T // C - local
    L = T - N * C
    sites = shadowpass.runtime_of(model).sites
    assert len(sites) == cfg.num_hidden_layers
    for s in sites.values():
        st = s.prefill
        assert st.U.shape == (B, N * C, rank) and st.SV.shape == (B, H, rank, d)
        assert st.landmarks.shape == (B, H, N, d)
        assert st.outlier_k.shape == (B, H, outliers * C, d) == st.outlier_v.shape
        assert st.local_k.shape == (B, H, L, d)
        assert st.values.shape == (B, H, N, C, d) and st.values.device.type == "cpu"
        assert st.cos.shape == (B, N * C, d)
        # outliers are excluded from selection; the padded first chunk of sequence 0 too
        assert (st.selectable.sum(-1)[1] == N - outliers).all()
        assert s.used == 15
    # budget // C chunks are attended per step: far fewer than the prompt
    assert budget // C < N


def test_short_prompt_stays_dense():
    model = hf_model("llama")
    ids, mask = prompt(1, 100)
    dense = greedy(model, ids, mask, n=8)
    model.compile(backend="shadowkv", options={"budget": 256, "outlier_chunks": 4})  # threshold 320
    out = greedy(model, ids, mask, n=8)
    assert shadowpass.runtime_of(model).sites == {}
    assert torch.equal(out.sequences, dense.sequences)


def test_no_recompilation_per_decode_step():
    model = hf_model("llama")
    model.compile(backend="shadowkv", options=EXACT)
    ids = torch.randint(0, 256, (1, 300))
    cache = DynamicCache(config=model.config)
    stats = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits
        for step in range(35):
            if step == 3:
                warm = stats["unique_graphs"]
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, past_key_values=cache).logits
    assert stats["unique_graphs"] - warm <= 1


def test_new_generate_starts_fresh_state_and_models_do_not_share():
    a, b = hf_model("llama"), hf_model("llama")
    for m in (a, b):
        m.compile(backend="shadowkv", options=EXACT)
    ids, mask = prompt(1, 300)
    greedy(a, ids, mask, n=4)
    first = shadowpass.runtime_of(a).sites["model.layers.0.self_attn"]
    ids2, mask2 = prompt(1, 320)
    greedy(b, ids2, mask2, n=4)
    assert shadowpass.runtime_of(a) is not shadowpass.runtime_of(b)
    assert shadowpass.runtime_of(a).sites["model.layers.0.self_attn"] is first
    greedy(a, ids2, mask2, n=4)
    second = shadowpass.runtime_of(a).sites["model.layers.0.self_attn"]
    assert second is not first and second.used == 3 and second.prefill.U.shape[1] == (320 // 8 - 4) * 8

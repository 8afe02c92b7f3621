"""End to end on tiny random-weight Hugging Face models built from configs (no download)."""
import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

import shadowpass
from shadowpass import runtime
from shadowpass.hf import cache_kwargs, returned_cache
from cases import EXPECTED_ROPE, HF_MODELS, hf_model
from tolerances import ATTENTION_TOL, FP32_LOGITS

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


# every architecture at batch 2 with left padding; batch 1 (no padding: HF's shared mask code
# then passes no mask or a plain causal one) on llama only, to keep the suite short
@pytest.mark.parametrize("name,batch", [(n, 2) for n in HF_MODELS] + [("llama", 1)])
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
    layer = returned_cache(out).layers[0]
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


def test_sliding_window_model_runs_dense_and_says_why(caplog):
    """A sliding window shorter than the prompt is not causal attention over the whole prompt:
    the prefill falls back to dense with a warning naming the window, the decode steps say
    their prefill ran dense (not that it missed the backend), and the tokens equal dense."""
    model = hf_model("mistral", sliding_window=64)
    ids, mask = prompt(1, 300)
    dense = greedy(model, ids, mask, n=4)
    model.compile(backend="shadowkv", options=EXACT)
    with caplog.at_level("INFO", logger="shadowpass"):
        out = greedy(model, ids, mask, n=4)
    assert torch.equal(out.sequences, dense.sequences)
    assert not shadowpass.runtime_of(model).sites
    assert "sliding window" in caplog.text and "runs dense attention from now on" in caplog.text
    assert "its prefill ran dense (shadowkv: the prefill attention mask is not causal" in caplog.text


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
        assert s.cos.shape == (B, N * C, d // 2) == s.sin.shape  # one value per rotated pair
        # outliers are excluded from selection; the padded first chunk of sequence 0 too
        assert (st.selectable.sum(-1)[1] == N - outliers).all()
        assert s.used == 15
    # budget // C chunks are attended per step: far fewer than the prompt
    assert budget // C < N


def test_fp8_landmarks_are_the_cast_chunk_means():
    """landmark_dtype="float8_e4m3fn": each site keeps the fp8 cast of the landmarks it keeps
    otherwise (chunk means: rank and budget do not change them), decoding scores chunks with
    them, and with every chunk in budget the output is still dense's."""
    model = hf_model("llama")
    ids, mask = prompt(2, 600)
    dense = greedy(model, ids, mask, n=6)
    kept = {}
    sparse = dict(budget=64, rank=24, min_sparse_len=0)
    for dtype, options in (("model", sparse), ("float8_e4m3fn", EXACT)):
        torch._dynamo.reset()
        model.compile(backend="shadowkv", options=dict(options, landmark_dtype=dtype))
        out = greedy(model, ids, mask, n=6)
        assert all(torch.isfinite(l).all() for l in out.logits)
        kept[dtype] = [s.prefill.landmarks for s in shadowpass.runtime_of(model).sites.values()]
    assert torch.equal(out.sequences, dense.sequences)
    for fp32, fp8 in zip(*kept.values()):
        assert fp32.dtype == torch.float32 and fp8.dtype == torch.float8_e4m3fn
        assert torch.equal(fp8, fp32.clamp(-448, 448).to(torch.float8_e4m3fn))


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
        logits = model(ids, **cache_kwargs(model, cache)).logits
        for step in range(35):
            if step == 3:
                warm = stats["unique_graphs"]
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, **cache_kwargs(model, cache)).logits
    assert stats["unique_graphs"] - warm <= 1


def test_new_generate_starts_fresh_state_and_models_do_not_share():
    a, b = hf_model("llama"), hf_model("llama")
    for m in (a, b):
        m.compile(backend="shadowkv", options=EXACT)
    ids, mask = prompt(1, 300)
    out_a = greedy(a, ids, mask, n=4)  # the returned cache keeps a's state alive
    first = shadowpass.runtime_of(a).sites["model.layers.0.self_attn"]
    ids2, mask2 = prompt(1, 320)
    out_b = greedy(b, ids2, mask2, n=4)
    assert shadowpass.runtime_of(a) is not shadowpass.runtime_of(b)
    assert shadowpass.runtime_of(a).sites["model.layers.0.self_attn"] is first
    out_a2 = greedy(a, ids2, mask2, n=4)
    second = shadowpass.runtime_of(a).sites["model.layers.0.self_attn"]
    assert second is not first and second.used == 3 and second.prefill.U.shape[1] == (320 // 8 - 4) * 8
    del out_a, out_b, out_a2


def test_sequences_decoded_in_turn_each_read_their_own_state():
    """A decode step reads the state of the cache it is given (its stubs name their session),
    not the latest prefill's: two prompts prefilled one after the other and then decoded in
    turn give the logits each gives alone."""
    model = hf_model("llama")
    model.compile(backend="shadowkv", options=dict(EXACT, budget=16, rank=8))  # sparse, low rank
    prompts = [torch.randint(0, 256, (1, 300)), torch.randint(0, 256, (1, 300))]

    def decode(order, steps=3):
        caches = {i: DynamicCache(config=model.config) for i in set(order)}
        tokens = {i: [prompts[i]] for i in caches}
        logits = {i: [] for i in caches}
        with torch.no_grad():
            for _ in range(steps + 1):
                for i in order:
                    out = model(tokens[i][-1], **cache_kwargs(model, caches[i])).logits[:, -1:]
                    logits[i].append(out)
                    tokens[i].append(out.argmax(-1))
        return {i: torch.cat(t, 1) for i, t in logits.items()}

    alone = {i: decode([i])[i] for i in (0, 1)}
    together = decode([0, 1])
    assert not torch.allclose(alone[0], alone[1])
    for i in (0, 1):
        torch.testing.assert_close(together[i], alone[i], atol=FP32_LOGITS, rtol=FP32_LOGITS)


def test_state_is_freed_when_generate_ends():
    """The model's cache owns the state: when generate() drops it, the state goes with it."""
    model = hf_model("llama")
    model.compile(backend="shadowkv", options=EXACT)
    ids, mask = prompt(2, 300)
    out = greedy(model, ids, mask, n=4)
    rt = shadowpass.runtime_of(model)
    alive = weakref.ref(rt.sites["model.layers.0.self_attn"].prefill.U)
    assert alive() is not None
    del out  # the last reference to the cache
    gc.collect()
    assert rt.sites == {} and alive() is None
    with torch.no_grad():  # no return_dict: generate's own cache dies inside generate
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert rt.sites == {}


def test_decode_after_the_state_was_released_is_refused():
    model = hf_model("llama")
    model.compile(backend="shadowkv", options=EXACT)
    ids = torch.randint(0, 256, (1, 300))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(model, cache)).logits
        shadowpass.runtime_of(model).clear()
        for layer in cache.layers:  # the stubs own the state: drop their reference too
            del layer.keys._shadowkv_session, layer.values._shadowkv_session
        with pytest.raises(RuntimeError, match="state was released"):
            model(logits[:, -1:].argmax(-1), **cache_kwargs(model, cache))


def test_generation_grows_past_the_generated_buffer(monkeypatch):
    """Generated tokens have no fixed cap: the exact buffer doubles and stays exact."""
    monkeypatch.setattr(runtime, "GEN_CAPACITY", 4)
    model = hf_model("llama")
    ids, mask = prompt(2, 300)
    dense = greedy(model, ids, mask, n=24)
    model.compile(backend="shadowkv", options=EXACT)
    out = greedy(model, ids, mask, n=24)
    site = shadowpass.runtime_of(model).sites["model.layers.0.self_attn"]
    assert site.gen_k.shape[2] >= 23 and site.used == 23
    assert torch.equal(out.sequences, dense.sequences)


def test_state_bytes_per_token():
    """GPU-resident state grows by U (2r B) + landmarks (2*Hkv*d/C B) + ~2 B of masks per token
    and layer, plus the shared rotary tables (cos and sin, one value per rotated pair: 2 * d/2
    bf16); values are on the host."""
    model = hf_model("llama").to(torch.bfloat16)
    cfg = model.config
    H, d, C, r = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, 8, 8
    model.compile(backend="shadowkv", options=dict(rank=r, budget=64, min_sparse_len=0,
                                                   outlier_chunks=2, local_chunks=1))
    device, host = {}, {}
    for T in (512, 1024):
        ids = torch.randint(0, 256, (1, T))
        out = greedy(model, ids, torch.ones_like(ids), n=2)
        session = shadowpass.runtime_of(model).session
        device[T], host[T] = session.nbytes("device"), session.nbytes("host")
        del out, session
    layers = cfg.num_hidden_layers
    per_token = (device[1024] - device[512]) / 512 / layers
    expected = 2 * r + 2 * H * d / C + 2 + 2 * 2 * (d // 2) / layers  # U, landmarks, masks, tables
    assert per_token == pytest.approx(expected, rel=0.02), per_token
    assert (host[1024] - host[512]) / 512 / layers == 2 * H * d  # bf16 values, all on the host


def test_rotary_tables_that_do_not_repeat_fall_back_to_dense(caplog):
    """ShadowKV keeps one rotary value per rotated pair; a model whose cos/sin differ inside a
    pair (not a rotation) runs dense, with a warning, and stays exact."""
    model = hf_model("llama")
    rotary = model.model.rotary_emb
    plain = rotary.forward

    def unpaired(x, position_ids):
        cos, sin = plain(x, position_ids)
        return cos * torch.linspace(0.9, 1.1, cos.shape[-1]), sin

    rotary.forward = unpaired
    ids, mask = prompt(1, 300)
    dense = greedy(model, ids, mask, n=8)
    model.compile(backend="shadowkv", options=EXACT)
    out = greedy(model, ids, mask, n=8)
    assert torch.equal(out.sequences, dense.sequences)
    assert shadowpass.runtime_of(model).sites == {}
    assert "rotary tables do not repeat" in caplog.text


def test_sampling_generate_matches_dense():
    model = hf_model("llama")
    ids, mask = prompt(2, 300)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=50, temperature=0.8)
    with torch.no_grad():
        torch.manual_seed(0)
        dense = model.generate(ids, **kw)
        model.compile(backend="shadowkv", options=EXACT)
        torch.manual_seed(0)
        out = model.generate(ids, **kw)
    assert torch.equal(out, dense)


def test_static_cache_route_is_correct():
    """generate(cache_implementation="static", compile_config=...) compiles only the decode step
    (HF runs the prefill eagerly): no ShadowKV state exists, and the decode stays dense."""
    from transformers import CompileConfig
    model = hf_model("llama")
    ids, mask = prompt(2, 300)
    config = CompileConfig(backend="shadowkv")  # mode="reduce-overhead" by default
    config._compile_all_devices = True  # HF auto-compiles on accelerators only
    with torch.no_grad():
        dense = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             cache_implementation="static", compile_config=config)
    assert torch.equal(out, dense)
    assert shadowpass.runtime_of(model).sites == {}


def test_prefill_never_builds_the_square_mask():
    """HF builds a [B, 1, T, T] mask under torch.compile; the rewritten prefill reads only what
    Inductor can fuse into its construction (validity + check), so no T x T buffer exists (at
    122K tokens it would be 15-28 GiB). Outputs stay those of the dense model."""
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    model = hf_model("llama")
    ids, mask = prompt(2, 300)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits[:, -1]
        model.compile(backend="shadowkv", options=EXACT)
        out, code = run_and_get_code(lambda: model(ids, attention_mask=mask,
                                                   **cache_kwargs(model, DynamicCache(config=model.config))))
    assert shadowpass.runtime_of(model).sites, "the prefill did not build ShadowKV state"
    assert not [c for c in code if "300, 300)" in c], "a T x T buffer is allocated"
    torch.testing.assert_close(out.logits[:, -1], want, **ATTENTION_TOL["fp32"])


def test_hybrid_policy_gets_the_prompt_queries_and_stays_exact():
    """policy="shadowkv_hybrid": the rewrite hands each prefill site its queries (the op
    refuses to build the state without them), the state carries a chunk radius per head (zero
    on the heads that keep landmarks), and at full rank and budget the output is dense's."""
    model = hf_model("llama")
    ids, mask = prompt(2, 300)
    dense = greedy(model, ids, mask, n=8)
    model.compile(backend="shadowkv", options=dict(EXACT, policy="shadowkv_hybrid"))
    out = greedy(model, ids, mask, n=8)
    assert torch.equal(out.sequences, dense.sequences)
    cfg = model.config
    H, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    sites = shadowpass.runtime_of(model).sites
    assert len(sites) == cfg.num_hidden_layers
    for s in sites.values():
        st = s.prefill
        assert st.aux.shape == st.landmarks.shape == (2, H, st.landmarks.shape[2], d)
        assert (st.aux >= 0).all()

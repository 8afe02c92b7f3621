"""Backend contract: options, config validation, fallback, unsupported forms, dumps, example."""
import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F

import shadowpass
from shadowpass import ShadowKVConfig
from cases import hf_model


# ------------------------------------------------------------------------------------ config

def test_paper_defaults():
    c = ShadowKVConfig()
    assert (c.rank, c.chunk_size, c.budget, c.outlier_chunks, c.local_chunks) == (160, 8, 2048, 48, 4)
    assert c.sparse_threshold == 2048 + (48 + 4) * 8
    assert ShadowKVConfig(min_sparse_len=0).sparse_threshold == 0


@pytest.mark.parametrize("field,value,msg", [
    ("rank", 0, "rank=0 is out of range: must be an int >= 1"),
    ("chunk_size", 1000, "chunk_size=1000 is out of range: must be an int >= 1 and <= 256"),
    ("budget", -5, "budget=-5 is out of range"),
    ("outlier_chunks", -1, "outlier_chunks=-1 is out of range: must be an int >= 0"),
    ("local_chunks", 1.5, "local_chunks=1.5: must be an int >= 0"),
    ("min_sparse_len", -1, "min_sparse_len=-1 is out of range"),
    ("budget", 4, "budget=4 is smaller than chunk_size=8"),
    ("chunk_cache", 0, "chunk_cache=0 is out of range: must be an int >= 1 and <= 64"),
])
def test_invalid_config_names_field_value_and_range(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        ShadowKVConfig(**{field: value})


def test_chunk_cache_needs_the_fused_route():
    assert ShadowKVConfig(chunk_cache=4).chunk_cache == 4
    with pytest.raises(ValueError, match="chunk_cache=2 needs decode_route='fused'"):
        ShadowKVConfig(chunk_cache=2, decode_route="split")


def test_landmark_dtype_is_checked():
    assert ShadowKVConfig(landmark_dtype="float8_e4m3fn").landmark_dtype == "float8_e4m3fn"
    with pytest.raises(ValueError, match="landmark_dtype='fp4': must be one of"):
        ShadowKVConfig(landmark_dtype="fp4")
    with pytest.raises(ValueError, match="needs policy='shadowkv'"):
        ShadowKVConfig(landmark_dtype="float8_e4m3fn", policy="quest")


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match=r"unknown shadowkv option\(s\) \['bugdet'\]"):
        ShadowKVConfig.from_options({"bugdet": 10})
    model = torch.compile(torch.nn.Linear(2, 2), backend="shadowkv", options={"bugdet": 10})
    with pytest.raises(Exception, match="bugdet"):
        model(torch.randn(1, 2))


def test_options_and_mode_reach_the_backend():
    model = torch.compile(torch.nn.Linear(4, 4), backend="shadowkv", mode="max-autotune-no-cudagraphs")
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), model._orig_mod(x))


def test_inductor_cache_keys_on_our_sources(monkeypatch):
    """Inductor's FX graph cache reuses a graph compiled by the same shadowpass sources, never
    one compiled by other sources (their ops may have other shapes)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from shadowpass import backend

    def f(x):
        return torch.sin(x) * 2 + 1

    x = torch.randn(4, 4)
    hits = []
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True):
        for version in ("sources A", "sources A", "sources B"):
            monkeypatch.setattr(backend, "source_hash", lambda v=version: v)
            torch._dynamo.reset()
            counters.clear()
            torch.testing.assert_close(torch.compile(f, backend="shadowkv")(x), f(x))
            hits.append(counters["inductor"]["fxgraph_cache_hit"])
    assert hits == [0, 1, 0]


# ---------------------------------------------------------------------------------- fallback

def test_graph_without_attention_compiles_as_inductor():
    def f(x, w):
        return torch.relu(x @ w).sum(-1)
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    report = shadowpass.explain(f, x, w)
    assert report.sites == [] and report.graphs == 1
    torch.testing.assert_close(torch.compile(f, backend="shadowkv")(x, w), f(x, w))


def folded_heads_attention(q, k, v, past_k, past_v):
    """Heads folded into the batch dimension with bmm: not supported yet, must stay dense."""
    k = torch.cat([past_k, k], 1)
    v = torch.cat([past_v, v], 1)
    s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    return torch.bmm(torch.softmax(s, -1), v), k, v


def test_unsupported_form_left_dense_with_reason():
    args = [torch.randn(4, 1, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8),
            torch.randn(4, 20, 8), torch.randn(4, 20, 8)]
    report = shadowpass.explain(folded_heads_attention, *args)
    assert len(report.sites) == 1 and report.sites[0].action == "left dense"
    assert "folded into the batch" in report.sites[0].reason
    out = torch.compile(folded_heads_attention, backend="shadowkv")(*args)
    torch.testing.assert_close(out[0], folded_heads_attention(*args)[0])


def unrecognised_position_mixing(q, k, v, past_k, past_v, bias):
    k = torch.cat([past_k, k * bias + 1.0], 2)  # not RoPE, not a projection: unknown transform
    v = torch.cat([past_v, v], 2)
    return F.scaled_dot_product_attention(q, k, v), k, v


def test_unrecognised_key_transform_left_dense():
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    args = [q, k, v, torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(8)]
    report = shadowpass.explain(unrecognised_position_mixing, *args)
    assert report.sites[0].action == "left dense" and "not a recognised RoPE form" in report.sites[0].reason
    out = torch.compile(unrecognised_position_mixing, backend="shadowkv")(*args)
    torch.testing.assert_close(out[0], unrecognised_position_mixing(*args)[0])


def test_attention_without_cache_left_dense():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q = torch.randn(1, 2, 16, 8)
    report = shadowpass.explain(f, q, q, q)
    assert "no KV cache" in report.sites[0].reason


def test_exception_in_pass_falls_back(monkeypatch, caplog):
    import shadowpass.backend as backend

    def broken(*a, **k):
        raise RuntimeError("synthetic failure")
    monkeypatch.setattr(backend, "rewrite", broken)
    model = hf_model("llama")
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="shadowkv")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "synthetic failure" in caplog.text


def test_failed_graph_is_dumped_with_its_error(monkeypatch, tmp_path):
    import shadowpass.backend as backend

    def broken(*a, **k):
        raise RuntimeError("synthetic failure")
    monkeypatch.setattr(backend, "rewrite", broken)
    model = shadowpass.compile(hf_model("llama"), dump_dir=str(tmp_path))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 40)))
    (report,) = tmp_path.glob("graph_*_report.json")
    stem = report.name[:-len("_report.json")]
    assert "synthetic failure" in json.loads(report.read_text())["errors"][0]
    assert (tmp_path / f"{stem}_after.py").read_text().startswith("# unchanged")


def test_call_with_gradients_enabled_compiles_with_plain_inductor(caplog):
    """AOTAutograd would trace a backward through the ShadowKV ops, which have none."""
    model = hf_model("llama")
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        want = model(ids).logits
    report = shadowpass.Report()
    model.compile(backend=shadowpass.backend.make_backend(
        ShadowKVConfig(min_sparse_len=0, outlier_chunks=2), report=report))
    got = model(ids).logits  # grad mode on, parameters require grad
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    assert "inference-only" in caplog.text and "gradients enabled" in report.errors[0]
    assert shadowpass.runtime_of(model) is None or not shadowpass.runtime_of(model).built
    with torch.no_grad():
        model(ids)
    assert shadowpass.runtime_of(model).built, "under no_grad the same model runs ShadowKV"


def test_generate_routes(caplog):
    """shadowpass.compile wraps like torch.compile, so the wrapper's generate() would call the
    uncompiled model: it says so and names the in-place route; the decorator on an instance
    compiles in place, and its generate() runs ShadowKV."""
    model = hf_model("llama")
    wrapper = shadowpass.compile(model, options={"min_sparse_len": 0, "outlier_chunks": 2})
    assert wrapper is not model and 'model.compile(backend="shadowkv"' in caplog.text
    decorated = shadowpass.shadowkv(min_sparse_len=0, outlier_chunks=2)(hf_model("llama"))
    decorated.generate(torch.randint(0, 256, (1, 40)), max_new_tokens=3, do_sample=False)
    assert shadowpass.runtime_of(decorated).built


def test_explain_a_compiled_model_runs_no_shadowkv():
    model = hf_model("llama")
    model.compile(backend="shadowkv", options={"min_sparse_len": 0, "outlier_chunks": 2})
    report = shadowpass.explain(model, torch.randint(0, 256, (1, 40)))
    assert len(report.rewritten) == 2 and not report.errors
    rt = shadowpass.runtime_of(model)
    assert rt is None or not rt.built
    assert model._compiled_call_impl is not None, "the model stays compiled"


def test_explain_leaves_no_compiled_entries_behind():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    model = hf_model("llama")
    ids = torch.randint(0, 256, (1, 40))
    with torch._dynamo.config.patch(recompile_limit=2):
        reports = [shadowpass.explain(model, ids) for _ in range(3)]
    assert [(r.graphs, r.errors) for r in reports] == [(1, [])] * 3
    codes = {type(model).forward.__code__, inspect.unwrap(type(model).forward).__code__}
    assert not any(_debug_get_cache_entry_list(c) for c in codes)


def test_explain_says_so_when_nothing_was_traced():
    with torch.compiler.set_stance("force_eager"):
        report = shadowpass.explain(hf_model("llama"), torch.randint(0, 256, (1, 40)))
    assert report.graphs == 0 and "explain traced no graph" in report.errors[0]


# ---------------------------------------------------------------------------- dumps, example

def test_dump_dir_writes_graphs_and_report(tmp_path):
    model = hf_model("qwen2")
    compiled = shadowpass.compile(model, dump_dir=str(tmp_path), min_sparse_len=0, outlier_chunks=2)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 64)))
    names = sorted(p.name for p in tmp_path.iterdir())
    stem = names[0].rsplit("_", 1)[0]
    for suffix in ("after.py", "before.py", "report.json", "report.txt"):
        assert f"{stem}_{suffix}" in names
    assert "shadowkv.prefill_state" in (tmp_path / f"{stem}_after.py").read_text()
    data = json.loads((tmp_path / f"{stem}_report.json").read_text())
    assert [s["action"] for s in data["sites"]] == ["rewritten", "rewritten"]


def test_handwritten_decoder_example():
    import handwritten_decoder
    r = handwritten_decoder.run(prompt_len=300, new_tokens=8, budget=64)
    assert r["tokens_equal"] and r["max_logit_diff"] < 1e-4
    assert r["cache_shape"] == (1, 308, 2, 16)
    assert r["cache_bytes"] < 64 < r["dense_cache_bytes"]


def test_handwritten_decoder_report():
    import handwritten_decoder
    model = handwritten_decoder.Decoder()
    report = shadowpass.explain(model, torch.randint(0, 256, (1, 16)), 0)
    assert len(report.rewritten) == 2
    site = report.rewritten[0]
    assert (site.pattern, site.rope, site.kv_cache, site.gqa_group) == (
        "matmul_softmax", "complex (rotary_dim=16)", "returned", 4)


def test_decorator_on_class_and_function():
    import handwritten_decoder

    @shadowpass.shadowkv(min_sparse_len=0, rank=4096, budget=4096, outlier_chunks=2)
    class Fast(handwritten_decoder.Decoder):
        pass
    torch.manual_seed(0)
    ref = handwritten_decoder.Decoder().eval()
    fast = Fast().eval()
    fast.load_state_dict(ref.state_dict())
    prompt = torch.randint(0, 256, (1, 200))
    a, _, _ = handwritten_decoder.generate(ref, prompt, 6)
    b, _, _ = handwritten_decoder.generate(fast, prompt, 6)
    assert torch.equal(a, b)
    assert shadowpass.runtime_of(fast).sites


@pytest.mark.parametrize("dynamic", [None, True])
def test_many_graphs_and_shapes_stay_compiled(dynamic, caplog):
    """Each nested graph keeps its own Dynamo cache: new batch sizes and prompt lengths never
    hit a recompile limit shared by all graphs (which would leave them silently eager), and a
    graph traced with dynamic=True is rewritten too (HF's scale is then a node)."""
    torch.manual_seed(0)
    model = hf_model("llama")
    model.compile(backend="shadowkv", dynamic=dynamic,
                  options=dict(rank=32, budget=1 << 16, min_sparse_len=0, outlier_chunks=1))
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        for B, T in ((1, 300), (3, 300), (5, 300), (2, 333), (4, 301)):
            ids = torch.randint(0, 256, (B, T))
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                     do_sample=False, return_dict_in_generate=True)
            site = shadowpass.runtime_of(model).sites["model.layers.0.self_attn"]
            assert site.gen_k.shape[0] == B and site.gen_len.item() == 3  # 3 ShadowKV decode steps
            del out
    assert "pass failed" not in caplog.text


def test_dynamic_compile_has_no_graph_break():
    """Under dynamic=True Dynamo hands the backend float attributes as 0-d tensors read with
    .item(); the nested compile of the rewritten graph captures them instead of breaking the
    graph (and warning) at every compile."""
    from torch._dynamo.utils import counters
    model = hf_model("llama")
    model.compile(backend="shadowkv", dynamic=True, options={"min_sparse_len": 0,
                                                             "outlier_chunks": 1})
    counters.clear()
    with torch.no_grad():
        model.generate(torch.randint(0, 256, (1, 80)), max_new_tokens=3, do_sample=False)
    assert shadowpass.runtime_of(model).built == model.config.num_hidden_layers
    assert not counters["graph_break"], dict(counters["graph_break"])

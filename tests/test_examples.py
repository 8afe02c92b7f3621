"""Every example runs at small sizes on the CPU and produces the right result (not just no crash).

handwritten_decoder.run() is checked in test_backend.py (tokens equal, cache bytes).
"""
import ast
import json
import os
import sys
import types

import graph_dump_walkthrough
import hf_generate
import pytest
import real_model_generate
import torch

import shadowpass
from shadowpass.tiny import tiny_model


def test_hf_generate():
    r = hf_generate.run(prompt_len=160, new_tokens=4, budget=32, device="cpu")
    assert r["rewritten_sites"] == 2
    assert r["tokens_equal"]
    assert 0.0 <= r["agreement"] <= 1.0
    assert r["cache_shape"][-2] == 160 + 3 and r["cache_bytes"] < 64  # a stub, not full K/V
    assert r["state_kib"] > 0 and r["host_values_kib"] > 0


def test_real_model_generate_falls_back_to_tiny():
    # budget=None skips the small-budget leg: test_hf_generate runs that same flow
    r = real_model_generate.run(prompt_len=120, new_tokens=4, budget=None, prefer_real=False,
                                device="cpu")
    assert not r["real"] and r["model"] == "tiny random-weight Llama"
    assert r["fallback_reason"] == "--tiny was given"
    assert r["shadowkv_sites"] == 2 and r["tokens_equal"] and r["agreement"] is None


class CharTokenizer:
    """A stand-in tokenizer (one id per character) for the fake SmolLM2 loader below."""

    chat_template = None

    def __call__(self, text, return_tensors=None):
        ids = [ord(c) % 256 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def test_real_model_generate_uses_the_loader_when_present(monkeypatch):
    """The real-model path (prompt from text, decoded texts) with a fake shadowpass.eval.smollm2
    that returns a tiny model: what the example does when SmolLM2 is installed."""
    pkg, mod = types.ModuleType("shadowpass.eval"), types.ModuleType("shadowpass.eval.smollm2")
    mod.is_available = lambda: True
    mod.load_smollm2 = lambda device="cpu", dtype=torch.float32: (
        tiny_model("llama").to(device), CharTokenizer())
    pkg.smollm2 = mod
    monkeypatch.setitem(sys.modules, "shadowpass.eval", pkg)
    monkeypatch.setitem(sys.modules, "shadowpass.eval.smollm2", mod)
    r = real_model_generate.run(prompt_len=100, new_tokens=3, budget=None, device="cpu")
    assert r["real"] and r["model"] == "SmolLM2-135M-Instruct" and r["tokens_equal"]
    assert r["prompt_tokens"] > 100 and set(r["texts"]) == {"dense"}


def test_real_model_loader_says_why_when_unavailable():
    model, tok, why = real_model_generate.load_real("cpu")
    if model is not None:
        pytest.skip("SmolLM2 is available here; the fallback message is not exercised")
    assert tok is None and why and ("not importable" in why or "SmolLM2" in why)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SHADOWPASS_TEST_REAL_MODEL") != "1",
                    reason="set SHADOWPASS_TEST_REAL_MODEL=1 to run SmolLM2 (minutes on a CPU)")
def test_real_model_generate_on_smollm2():
    if real_model_generate.load_real("cpu")[0] is None:
        pytest.skip("SmolLM2-135M-Instruct is not available on this machine")
    r = real_model_generate.run(prompt_len=200, new_tokens=4, device="cpu")
    assert r["real"] and r["tokens_equal"]


def test_graph_dump_walkthrough(tmp_path, capsys):
    assert graph_dump_walkthrough.main(["--dump-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    files = sorted(p.name for p in tmp_path.iterdir())
    stems = sorted({f.rsplit("_", 1)[0] for f in files})
    assert len(stems) >= 2  # a prefill graph and at least one decode graph
    phases = set()
    for stem in stems:
        for suffix in ("before.py", "after.py", "report.txt", "report.json"):
            assert f"{stem}_{suffix}" in files
        for suffix in ("before.py", "after.py"):
            ast.parse((tmp_path / f"{stem}_{suffix}").read_text())
        data = json.loads((tmp_path / f"{stem}_report.json").read_text())
        assert data["errors"] == [] and [s["action"] for s in data["sites"]] == ["rewritten"] * 2
        phases |= {s["phase"] for s in data["sites"]}
        assert (tmp_path / f"{stem}_report.txt").read_text().startswith("shadowpass: 2 of 2")
    assert phases == {"prefill", "decode"}
    assert "tokens equal to the uncompiled model: True" in out
    assert "shadowkv.decode, shadowkv.prefill_state" in out


def test_walkthrough_explains_every_report_column():
    report = shadowpass.explain(tiny_model("llama"), torch.randint(0, 256, (1, 8)))
    header = str(report).splitlines()[1].split()
    assert header == list(graph_dump_walkthrough.COLUMNS)


def test_multi_turn_generate():
    import multi_turn_generate
    r = multi_turn_generate.run(prompt_len=120, new_tokens=6, device="cpu")
    assert r["follow_up_equal"] and r["beam_equal"] and r["lookup_equal"]
    # turn one: 5 decode steps; turn two: its last token + 24 new, then 5 steps
    assert r["tokens_after_prompt"] == 5 + 25 + 5
    assert r["conversation_len"] == 120 + 6 + 24 + 6 - 1

"""Batch lanes (shadowpass/lanes.py): the turn order of the lanes, and a decode step run in lanes
equal to the whole batch's (on the CPU, where lanes are off unless a test turns them on)."""
import threading

import pytest
import torch

import shadowpass
from shadowpass import lanes, stepgraph
from shadowpass.hf import cache_kwargs
from cases import hf_model


def test_lanes_take_turns_at_each_handoff():
    """Lane 0 to its first handoff, lane 1 to its first, lane 0 to its second, ...; a lane that
    finishes early leaves the others running; results come back in lane order."""
    order = []

    def lane(name, sites):
        def run():
            for s in range(sites):
                order.append((name, s, threading.current_thread().name))
                lanes.handoff()
            return name
        return run

    assert lanes.run([lane("a", 3), lane("b", 3), lane("c", 1)]) == ["a", "b", "c"]
    assert [(n, s) for n, s, _ in order] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1),
                                             ("a", 2), ("b", 2)]
    assert len({t for n, _, t in order if n == "a"}) == 1  # a lane stays on its thread
    assert not lanes.in_lane() and lanes.handoff() is None  # outside lanes: nothing


def test_a_failing_lane_raises_in_the_caller_and_frees_the_others():
    def bad():
        lanes.handoff()
        raise ValueError("lane failed")

    def good():
        lanes.handoff()
        lanes.handoff()
        return 1

    with pytest.raises(ValueError, match="lane failed"):
        lanes.run([bad, good])
    assert lanes.run([good, good]) == [1, 1]  # the threads are free again


def generate_logits(model, ids, steps):
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    kw = cache_kwargs(model, cache)
    out, logits = model(ids, **kw), []
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(nxt, **kw)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1), cache  # the cache keeps the session alive


@pytest.mark.parametrize("B", [5, 4])
def test_decode_in_lanes_equals_the_whole_batch(monkeypatch, B):
    """A tiny Llama compiled with dynamic=True, decoded with decode_lanes=2 (lanes forced on the
    CPU): each step runs as two lane calls of 2-3 sequences, the generated-token counts advance
    once per step, and the logits equal those of the whole batch."""
    monkeypatch.setattr(stepgraph, "LANE_DEVICES", ("cuda", "cpu"))
    calls = []
    real_run = lanes.run
    monkeypatch.setattr(lanes, "run", lambda c: calls.append(len(c)) or real_run(c))
    model = hf_model("llama")
    ids = torch.randint(0, 256, (B, 300))
    results = {}
    for n in (1, 2):
        torch._dynamo.reset()
        model.compile(backend="shadowkv", dynamic=True,
                      options={"min_sparse_len": 0, "budget": 64, "decode_lanes": n})
        with torch.no_grad():
            results[n], cache = generate_logits(model, ids, 4)
        site = next(iter(shadowpass.runtime_of(model).session.sites.values()))
        assert site.used == 4 and int(site.gen_len) == 4
        assert calls == ([2] * 4 if n == 2 else []), calls
        del cache
    torch.testing.assert_close(results[2], results[1], rtol=1e-4, atol=1e-4)


def test_static_batch_runs_whole_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(stepgraph, "LANE_DEVICES", ("cuda", "cpu"))
    model = hf_model("llama")
    torch._dynamo.reset()
    model.compile(backend="shadowkv", options={"min_sparse_len": 0, "decode_lanes": 2})
    with torch.no_grad(), caplog.at_level("INFO", logger="shadowpass"):
        generate_logits(model, torch.randint(0, 256, (4, 300)), 2)
    assert "not in 2 lanes" in caplog.text and "static shapes" in caplog.text

"""The whole-step CUDA graph's checks, on the CPU: which decode graphs may be captured once and
replayed at every later cache length, which inputs must be read in place, and the stub shapes
rebuilt at replay. (The capture and replay themselves: tests/test_gpu.py.)"""
from types import SimpleNamespace

import torch

import shadowpass
from shadowpass import runtime
from shadowpass.hf import cache_kwargs
from shadowpass.stepgraph import stub_rule, unread_inputs, written_inputs
from cases import hf_model


def dynamo_graph(fn, *args):
    """The FX graph Dynamo captures for fn (dynamic shapes), with its example values."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, dynamic=True)(*args)
    torch._dynamo.reset()
    return graphs[0]


def placeholders(gm):
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def stub_input(gm):
    """The placeholder of the 4-D cache input (Dynamo names it after the argument)."""
    return [n for n in placeholders(gm) if "past" in n]


def test_unread_inputs_are_those_only_the_stub_outputs_need():
    past = torch.zeros(2, 3, 40, 8)
    mask = torch.ones(2, 41)
    x = torch.ones(2, 3, 8)

    def grown(x, past):
        return torch.cat([past, x[:, :, None].expand(2, 3, 1, 8)], dim=2)

    def free(x, past, mask):  # the logits need only x; the cache output grows
        return x * 2, grown(x, past)

    def length(x, past, mask):  # position from the cache length: a capture would replay it
        return x * past.shape[2], grown(x, past)

    def data(x, past, mask):  # reads the cache's values
        return x + past.sum(2), grown(x, past)

    def masked(x, past, mask):  # reads the mask
        return x * mask[:, -1:, None], grown(x, past)

    def side_effect(x, past, mask):  # writes the mask from x: both are read
        mask.add_(x.sum())
        return x * 2, grown(x, past)

    for fn, read in ((free, {"x"}), (length, {"x"}), (data, {"x", "past"}),
                     (masked, {"x", "mask"}), (side_effect, {"x", "mask"})):
        gm = dynamo_graph(fn, x, past, mask)
        unread = unread_inputs(gm, stub_outputs=[1])
        tensors = {n: next(a for a in ("x", "past", "mask") if a in n.lower())
                   for n in placeholders(gm) if not n.startswith("s")}
        assert {a for n, a in tensors.items() if n not in unread} == read, (fn.__name__, unread)
        symbols = {n for n in placeholders(gm) if n.startswith("s")}
        if fn is length:  # read as a SymInt input
            assert symbols - unread
        if fn is free:
            assert symbols <= unread


def test_written_inputs_are_found_through_views():
    def step(x, buf, counter):
        buf[0].add_(x)          # through a view
        counter.add_(1)         # directly
        return x * 2

    gm = dynamo_graph(step, torch.ones(4), torch.zeros(3, 4), torch.zeros(1))
    written = written_inputs(gm)
    names = placeholders(gm)
    assert {n for n in names if "buf" in n or "counter" in n} == written
    assert not [n for n in names if "_x" in n.lower() and n in written]


def test_stub_rule_finds_the_grown_dim():
    past = torch.zeros(2, 3, 40, 8)
    args = [torch.ones(2, 1), past]
    assert stub_rule(torch.zeros(2, 3, 41, 8), args, [1]) == (1, 2, 1)
    assert stub_rule(torch.zeros(2, 3, 40, 8), args, [1]) == (1, 0, 0)
    assert stub_rule(torch.zeros(2, 4, 41, 8), args, [1]) is None  # two dims differ
    assert stub_rule(torch.zeros(2, 3, 39, 8), args, [1]) is None  # shrank


def decode_graphs(monkeypatch):
    """Record every DecodeGraphs built, and the key of each call (on the CPU the graph runs as
    is)."""
    made = []

    class Recording(runtime.DecodeGraphs):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.keys = []
            made.append(self)

        def __call__(self, session, args, state):
            self.keys.append(self.key(args, state))
            return super().__call__(session, args, state)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(stream_id=0))
    monkeypatch.setattr(runtime, "DecodeGraphs", Recording)
    return made


def check_capturable(made, model):
    assert made, "no decode graph was built"
    g = made[-1]
    assert len(g.keys) >= 4 and len(set(g.keys)) == 1, "the key changes from token to token"
    layers = model.config.num_hidden_layers
    assert len(g.past) == 2 * layers and set(g.past) <= g.skipped
    written = {g.names[i] for i in g.in_place - g.params}
    assert written and all(n.startswith("shadowkv_site") for n in written), \
        "a model input other than the ShadowKV state is written in place"
    return g


def test_hf_generate_decode_graph_has_one_key(monkeypatch):
    """generate() on HF Llama (DynamicCache): the cache stubs and their lengths are left out of
    the key, nothing but the ShadowKV state is written, the key is the same at every token."""
    made = decode_graphs(monkeypatch)
    model = hf_model("llama")
    model.compile(backend="shadowkv", options={"min_sparse_len": 0})
    ids = torch.randint(0, 256, (1, 300))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, return_dict_in_generate=True)  # keeps the state
    assert shadowpass.runtime_of(model).sites
    del out
    g = check_capturable(made, model)
    assert len(g.skipped) > len(g.past), "the cache lengths (SymInt inputs) stay in the key"


def test_growing_attention_mask_is_not_read_by_the_decode_step(monkeypatch):
    """A decode step called with the whole attention mask (as generate() passes it on CUDA): the
    rewritten step no longer reads it (HF's mask code for the replaced SDPA is dead, and
    operator.and_ is not an in-place op), so the key stays the same while the mask grows.
    Without position ids HF derives the positions from the cache length, an int the step
    reads: then every token has its own key."""
    from transformers import DynamicCache
    made = decode_graphs(monkeypatch)
    model = hf_model("llama")
    model.compile(backend="shadowkv", options={"min_sparse_len": 0})
    B, T = 3, 300
    for with_positions in (True, False):
        ids, mask = torch.randint(0, 256, (B, T)), torch.ones(B, T, dtype=torch.long)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, **cache_kwargs(model, cache))
            for step in range(6):
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
                pos = {"position_ids": torch.full((B, 1), T + step)} if with_positions else {}
                out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask,
                            **cache_kwargs(model, cache), **pos)
        if with_positions:
            g = check_capturable(made, model)
            assert not [n for i, n in enumerate(g.names) if "mask" in n and i not in g.skipped]
        else:
            assert len(set(made[-1].keys)) == len(made[-1].keys)
        made.clear()

"""Attention forms, GQA forms and cache forms on a configurable toy layer: each one is either
rewritten and exact at full budget, or (see test_backend) left dense with a reason."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shadowpass
from shadowpass.reference import rotate_half

EXACT = dict(rank=4096, budget=1 << 16, min_sparse_len=0, outlier_chunks=3)
MAX_LEN = 256


class ToyAttention(nn.Module):
    """One attention layer whose attention, GQA and cache are written in the chosen form."""

    def __init__(self, form, cache, gqa, H=4, d=16, dim=64):
        super().__init__()
        self.form, self.cache, self.gqa = form, cache, gqa
        self.H, self.Hkv, self.d = H, (1 if gqa == "mqa_expand" else 2), d
        self.wq = nn.Linear(dim, H * d, bias=False)
        self.wk = nn.Linear(dim, self.Hkv * d, bias=False)
        self.wv = nn.Linear(dim, self.Hkv * d, bias=False)
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
        self.register_buffer("inv_freq", inv, persistent=False)
        if cache != "cat":
            self.register_buffer("k_cache", torch.zeros(1, self.Hkv, MAX_LEN, d), persistent=False)
            self.register_buffer("v_cache", torch.zeros(1, self.Hkv, MAX_LEN, d), persistent=False)

    def repeat(self, x):
        rep = self.H // self.Hkv
        if self.gqa == "repeat_kv":
            B, H, S, d = x.shape
            return x[:, :, None].expand(B, H, rep, S, d).reshape(B, H * rep, S, d)
        if self.gqa == "repeat_interleave":
            return x.repeat_interleave(rep, dim=1)
        if self.gqa == "mqa_expand":
            return x.expand(-1, self.H, -1, -1)
        return x  # enable_gqa

    def forward(self, x, pos, past=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.H, self.d).transpose(1, 2)
        k = self.wk(x).view(B, T, self.Hkv, self.d).transpose(1, 2)
        v = self.wv(x).view(B, T, self.Hkv, self.d).transpose(1, 2)
        f = pos.float()[:, None] * self.inv_freq
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        mask = None
        if self.cache == "cat":
            if past is not None:
                k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            if T > 1:
                mask = torch.ones(T, T, dtype=torch.bool).tril()
            out_cache = (k, v)
        else:
            if self.cache == "index_copy":
                self.k_cache.index_copy_(2, pos, k)
                self.v_cache.index_copy_(2, pos, v)
            elif self.cache == "index_put":
                self.k_cache[:, :, pos] = k
                self.v_cache[:, :, pos] = v
            k, v = self.k_cache, self.v_cache
            mask = torch.arange(MAX_LEN)[None, :] <= pos[:, None]  # [T, MAX_LEN]
            out_cache = None
        kr, vr = self.repeat(k), self.repeat(v)
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask,
                                               enable_gqa=self.gqa == "enable_gqa")
        else:
            if self.form == "einsum":
                s = torch.einsum("bhqd,bhkd->bhqk", q, kr) / math.sqrt(self.d)
            else:
                s = q @ kr.transpose(-2, -1) * (1.0 / math.sqrt(self.d))
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.softmax(s.float(), dim=-1).to(q.dtype)
            o = torch.einsum("bhqk,bhkd->bhqd", p, vr) if self.form == "einsum" else p @ vr
        return o, out_cache


CASES = [
    ("sdpa", "cat", "repeat_kv"),
    ("sdpa", "index_copy", "enable_gqa"),
    ("einsum", "index_put", "repeat_interleave"),
    ("matmul", "index_copy", "mqa_expand"),
    ("sdpa", "cat", "mqa_expand"),
    ("matmul", "cat", "repeat_interleave"),
]


class Outputs(list):
    """Per-step outputs; `.cache` holds the last cache, which owns the ShadowKV state."""
    cache = None


def run(layer, xs, prompt_len):
    outs, past = Outputs(), None
    with torch.no_grad():
        for i, x in enumerate(xs):
            start = 0 if i == 0 else prompt_len + i - 1
            pos = torch.arange(start, start + x.shape[1])
            o, cache = layer(x, pos, past)
            past = cache
            outs.append(o)
    outs.cache = past
    return outs


@pytest.mark.parametrize("form,cache,gqa", CASES)
def test_form_rewritten_and_exact(form, cache, gqa):
    torch.manual_seed(0)
    eager = ToyAttention(form, cache, gqa).eval()
    twin = ToyAttention(form, cache, gqa).eval()
    twin.load_state_dict(eager.state_dict())
    T = 120
    xs = [torch.randn(1, T, 64)] + [torch.randn(1, 1, 64) for _ in range(5)]

    report = shadowpass.explain(ToyAttention(form, cache, gqa).eval(), xs[0], torch.arange(T))
    assert [s.action for s in report.sites] == ["rewritten"], str(report)
    assert report.sites[0].kv_cache == (cache if cache != "cat" else "returned")

    want = run(eager, xs, T)
    got = run(shadowpass.compile(twin, **EXACT), xs, T)
    # got.cache owns the state (index_copy_/index_put_ buffers leave it with the runtime)
    assert shadowpass.runtime_of(twin).sites, "ShadowKV state was not built"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source,name", [
    ("L['self'].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),  # transformers 5.24
    ("L['self']", None),
    ("model.layers.3.attn", "model.layers.3.attn"),
])
def test_site_names_drop_the_dynamo_root_source(source, name):
    from shadowpass.detect import module_path
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"key": (source, nn.Module)}
    assert module_path(node) == name

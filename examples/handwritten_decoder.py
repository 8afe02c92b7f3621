"""A hand-written decoder (Meta-reference style) accelerated by the shadowkv backend.

It is accelerated with the decorator ``@shadowpass.shadowkv(...)``, on the class (see
fast_decoder) or on an instance (``shadowpass.shadowkv(budget=...)(model)``). It writes attention
the way many hand-written models do: [B, S, H, d] layout, RoPE by complex multiplication, GQA by
repeat_interleave, scores divided by sqrt(d), a causal mask applied with masked_fill(-inf),
softmax in fp32, and its own KV cache returned from forward (cat of past and new). The pass
finds all of it; the cache it hands back holds no full-size K/V.

    python examples/handwritten_decoder.py            # prompt 600 tokens, 32 new, CPU or GPU
"""
from __future__ import annotations

import argparse
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import shadowpass

Cache = List[Tuple[torch.Tensor, torch.Tensor]]


def rope_factors(head_dim: int, max_len: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex rotary factors [max_len, head_dim // 2]."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), inv)
    return torch.polar(torch.ones_like(angles), angles)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, freqs, past: Optional[Tuple[torch.Tensor, torch.Tensor]]):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim)
        f = freqs.view(1, T, 1, -1)
        q = torch.view_as_real(torch.view_as_complex(q.float().reshape(B, T, self.n_heads, -1, 2)) * f).flatten(3).type_as(x)
        k = torch.view_as_real(torch.view_as_complex(k.float().reshape(B, T, self.n_kv, -1, 2)) * f).flatten(3).type_as(x)
        if past is not None:                      # cache in [B, S, H, d]
            k = torch.cat([past[0], k], dim=1)
            v = torch.cat([past[1], v], dim=1)
        new_cache = (k, v)
        rep = self.n_heads // self.n_kv
        keys = k.transpose(1, 2).repeat_interleave(rep, dim=1)      # [B, H, S, d]
        values = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        scores = q.transpose(1, 2) @ keys.transpose(2, 3) / math.sqrt(self.head_dim)
        if T > 1:
            S = keys.shape[2]
            future = torch.ones(T, S, dtype=torch.bool, device=x.device).triu(S - T + 1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        out = (probs @ values).transpose(1, 2).reshape(B, T, -1)
        return self.wo(out), new_cache


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.SiLU(),
                                 nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x, freqs, past):
        h, cache = self.attn(self.attn_norm(x), freqs, past)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Decoder(nn.Module):
    def __init__(self, vocab=256, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, max_len=4096):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("freqs", rope_factors(dim // n_heads, max_len), persistent=False)

    def forward(self, tokens: torch.Tensor, start: int, cache: Optional[Cache] = None):
        """tokens [B, T] at positions start..start+T-1 -> (logits [B, T, vocab], new cache)."""
        x = self.embed(tokens)
        freqs = self.freqs[start:start + tokens.shape[1]]
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, freqs, cache[i] if cache else None)
            new_cache.append(c)
        return self.head(self.norm(x)), new_cache


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy decoding; returns (tokens [B, new_tokens], logits per step, final cache)."""
    logits, cache = model(prompt, 0)
    out, all_logits = [], []
    pos = prompt.shape[1]
    for _ in range(new_tokens):
        all_logits.append(logits[:, -1])
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits, cache = model(nxt, pos, cache)
        pos += 1
    return torch.cat(out, 1), all_logits, cache


def fast_decoder(budget: int = 128, rank: int = 16):
    """The Decoder class accelerated with the decorator: every forward goes through shadowkv."""

    @shadowpass.shadowkv(budget=budget, rank=rank, outlier_chunks=4, min_sparse_len=0)
    class FastDecoder(Decoder):
        """Decoder with ShadowKV attention (small budget, low-rank keys)."""

    return FastDecoder


def run(prompt_len: int = 600, new_tokens: int = 32, budget: int = 128) -> dict:
    """Dense vs shadowkv (exact settings, then a small budget) on one random-weight model."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Decoder().to(device).eval()
    twin = fast_decoder(budget)().to(device).eval()      # decorated class
    twin.load_state_dict(model.state_dict())
    prompt = torch.randint(0, 256, (1, prompt_len), device=device)

    dense, dense_logits, dense_cache = generate(model, prompt, new_tokens)
    # decorated instance, at settings that keep everything (full rank, full budget)
    exact = shadowpass.shadowkv(rank=4096, budget=1 << 20, outlier_chunks=4,
                                min_sparse_len=0)(model)
    same, same_logits, cache = generate(exact, prompt, new_tokens)
    approx, _, _ = generate(twin, prompt, new_tokens)
    return dict(
        tokens_equal=torch.equal(same, dense),
        max_logit_diff=max((a - b).abs().max().item() for a, b in zip(same_logits, dense_logits)),
        agreement=(approx == dense).float().mean().item(),
        shadowkv_sites=shadowpass.runtime_of(twin).built,
        cache_shape=tuple(cache[0][0].shape),
        cache_bytes=cache[0][0].untyped_storage().nbytes(),
        dense_cache_bytes=dense_cache[0][0].untyped_storage().nbytes())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=600)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=128)
    args = p.parse_args()
    r = run(args.prompt_len, args.new_tokens, args.budget)
    print(f"full rank and budget: tokens equal to dense: {r['tokens_equal']} "
          f"(max logit diff {r['max_logit_diff']:.2e})")
    print(f"budget {args.budget}, rank 16: {r['agreement']:.0%} of greedy tokens agree with dense")
    print(f"layer-0 cache K: shape {r['cache_shape']}, {r['cache_bytes']} bytes held "
          f"(dense: {r['dense_cache_bytes']})")


if __name__ == "__main__":
    main()

"""Sub-batched prefill (shadowpass/subbatch.py): a batch whose whole prefill runs out of GPU memory
is prefilled in halves, quarters, ... and merged into one full-batch state.

The CPU has no CUDA out-of-memory error, so the prefill op is made to raise one for batches
larger than a limit: the error then leaves the compiled graph the way a real one would.
"""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shadowpass
from shadowpass import hostmem, reference
from shadowpass.hf import returned_cache
from shadowpass.reference import rotate_half
from cases import hf_model
from tolerances import FP32_LOGITS

EXACT = {"rank": 4096, "budget": 1 << 16, "min_sparse_len": 0, "outlier_chunks": 3}
B, T = 4, 300


def prompt():
    ids = torch.randint(0, 256, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :7] = 0   # left padding, of a different length on two sequences
    mask[2, :21] = 0
    return ids, mask


def greedy(model, ids, mask, n=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


@pytest.fixture
def gpu_fits(monkeypatch):
    """gpu_fits(limit): the prefill op raises torch.OutOfMemoryError for batches above `limit`;
    returns the list of batch sizes the op was called with."""
    calls = []
    real = reference.prefill_state

    def install(limit):
        def prefill_state(k_pre, k_post, v, *rest):
            calls.append(k_post.shape[0])
            if k_post.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB "
                                             "(simulated)")
            return real(k_pre, k_post, v, *rest)
        monkeypatch.setattr(reference, "prefill_state", prefill_state)
        return calls
    return install


def test_sub_batched_prefill_equals_whole_batch(gpu_fits, caplog):
    """Whole batch out of memory -> two halves: same tokens as the whole-batch prefill and as
    dense, one merged full-batch state, cache stubs still zero-stride."""
    model = hf_model("llama")
    ids, mask = prompt()
    dense = greedy(model, ids, mask)
    model.compile(backend="shadowkv", options=EXACT, dynamic=True)
    whole = greedy(model, ids, mask)
    rt = shadowpass.runtime_of(model)
    whole_sites = dict(rt.sites)
    assert len(whole_sites) == 2 and all(s.used == 11 for s in whole_sites.values())

    calls = gpu_fits(2)
    with caplog.at_level(logging.INFO, logger="shadowpass"):
        out = greedy(model, ids, mask)
    assert calls == [4, 2, 2, 2, 2]  # the whole batch fails at the first site; 2 halves x 2 sites
    assert "ran it as 2 sub-batches of 2" in caplog.text and "simulated" in caplog.text

    assert torch.equal(out.sequences, whole.sequences)
    assert torch.equal(out.sequences, dense.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, dense.logits))
    assert diff < FP32_LOGITS

    sites = rt.sites
    assert sites.keys() == whole_sites.keys()
    for name, site in sites.items():
        ref_site = whole_sites[name]
        assert site.used == 11  # every decode step ran ShadowKV on the merged state
        for field, a, b in zip(reference.PrefillState._fields, site.prefill, ref_site.prefill):
            assert a.shape == b.shape and a.shape[0] == B and a.dtype == b.dtype, field
            assert a.device == b.device, field
            if field in ("U", "SV"):  # eigenvectors: compare what decode uses, U @ SV per head
                continue
            torch.testing.assert_close(a, b, atol=FP32_LOGITS, rtol=FP32_LOGITS, msg=field)
        U, SV = site.prefill.U, site.prefill.SV
        U0, SV0 = ref_site.prefill.U, ref_site.prefill.SV
        torch.testing.assert_close(U[:, None] @ SV, U0[:, None] @ SV0, atol=1e-4, rtol=1e-4)
        values = site.prefill.values
        assert values.device.type == "cpu" and values.is_contiguous()
        # pinned exactly when the op pins (model on CUDA); the CPU cannot pin
        assert values.is_pinned() == ref_site.prefill.values.is_pinned()
        torch.testing.assert_close(site.cos, ref_site.cos)
        assert site.cos.shape[0] == B and site.gen_k.shape[0] == B

    # the next prefill of this shape starts at the sub-batch size that fitted; a prefill alone
    # (one new token) leaves the model's cache the prefill's stubs: full batch, zero-stride
    calls.clear()
    again = greedy(model, ids, mask, n=1)
    assert calls == [2, 2, 2, 2]
    assert torch.equal(again.sequences, dense.sequences[:, :T + 1])
    for layer in returned_cache(again).layers:
        for t in (layer.keys, layer.values):
            assert t.shape[0] == B and t.shape[-2] == T
            assert t.untyped_storage().nbytes() < 64


def test_static_batch_graph_is_not_split(gpu_fits):
    """A graph traced for one batch size (Dynamo's default on a first call) has it in its code:
    the error says so and how to fix it."""
    model = hf_model("llama")
    model.compile(backend="shadowkv", options=EXACT)
    calls = gpu_fits(2)
    ids, mask = prompt()
    with pytest.raises(torch.OutOfMemoryError, match=r"traced for exactly 4 sequences \(static "
                       r"shapes\).*dynamic=True.*Reduce the batch size"):
        greedy(model, ids, mask, n=2)
    assert calls == [4]

class SliceCache(nn.Module):
    """Meta-style attention: a preallocated cache of max_batch rows written at [:B, :, positions]."""

    def __init__(self, dim=32, heads=2, d=16, max_batch=8, max_len=64):
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Linear(dim, heads * d, bias=False) for _ in range(3))
        self.h, self.d = heads, d
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d),
                             persistent=False)
        self.register_buffer("k_cache", torch.zeros(max_batch, heads, max_len, d), persistent=False)
        self.register_buffer("v_cache", torch.zeros(max_batch, heads, max_len, d), persistent=False)

    def forward(self, x, start: int):
        B, T, _ = x.shape
        ang = torch.arange(start, start + T).float()[:, None] * self.inv_freq
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos(), ang.sin()
        q = self.wq(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.wk(x).view(B, T, self.h, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache[:B, :, start:start + T] = k
        self.v_cache[:B, :, start:start + T] = self.wv(x).view(B, T, self.h, self.d).transpose(1, 2)
        S = start + T
        keep = torch.arange(S)[None, :] <= torch.arange(start, S)[:, None]
        return F.scaled_dot_product_attention(q, self.k_cache[:B, :, :S], self.v_cache[:B, :, :S],
                                              attn_mask=keep)


def test_graph_writing_an_unbatched_input_is_not_split(gpu_fits):
    """A slice of the batch would write its rows at [:b] of the model's own buffer (rows of
    another sequence): refused, naming the buffer."""
    model = SliceCache().eval()
    fast = shadowpass.compile(model, dynamic=True, **EXACT)
    calls = gpu_fits(2)
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError,
                                        match=r"writes into its input \S*k_cache\S* in place"):
        fast(torch.randn(4, 40, 32), 0)
    assert calls == [4]


class CatCache(nn.Module):
    """One attention layer that returns its own cache (k, v), as a first decoder call does."""

    def __init__(self, dim=32, heads=2, d=16):
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Linear(dim, heads * d, bias=False) for _ in range(3))
        self.h, self.d = heads, d
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d),
                             persistent=False)

    def forward(self, x, pos):
        B, T, _ = x.shape
        ang = pos.float()[:, None] * self.inv_freq
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos(), ang.sin()
        q = self.wq(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.wk(x).view(B, T, self.h, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        v = self.wv(x).view(B, T, self.h, self.d).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), (k, v)


def test_returned_cache_is_rebuilt_as_full_batch_stubs(gpu_fits, monkeypatch):
    """A graph that returns its cache: the merged outputs equal eager, the returned cache is a
    zero-stride stub of the whole batch, never materialized (a sub-batch's stub cloned would
    be a cache-sized allocation per layer), the state has every sequence."""
    model = CatCache().eval()
    fast = shadowpass.compile(model, dynamic=True, **EXACT)
    x, pos = torch.randn(4, 40, 32), torch.arange(40)
    calls = gpu_fits(2)
    with torch.no_grad():
        want, _ = model(x, pos)
        real_clone, stubs_cloned = torch.Tensor.clone, []

        def clone(t, *args, **kwargs):
            if t.numel() > 1 and not any(t.stride()):  # a stub: every stride 0
                stubs_cloned.append(tuple(t.shape))
            return real_clone(t, *args, **kwargs)

        fast(x, pos)  # compiles
        monkeypatch.setattr(torch.Tensor, "clone", clone)
        got, (k, v) = fast(x, pos)
    assert stubs_cloned == []
    assert calls == [4, 2, 2, 2, 2]  # the second call splits at once
    torch.testing.assert_close(got, want, atol=FP32_LOGITS, rtol=FP32_LOGITS)
    for t in (k, v):
        assert t.shape == (4, 2, 40, 16) and t.stride() == (0, 0, 0, 0)
    state = shadowpass.runtime_of(model).sites["site0"].prefill
    assert state.local_k.shape[0] == 4 and state.values.shape[0] == 4


def test_batch_equal_to_prompt_length_is_not_split(gpu_fits):
    """Traced with as many sequences as tokens, the batch and the prompt length are one symbol
    (Dynamo's duck sizing): no slice of the inputs is safe, and the error says why."""
    fast = shadowpass.compile(CatCache().eval(), dynamic=True, **EXACT)
    calls = gpu_fits(2)
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError,
                                        match="the batch size and the prompt length share"):
        fast(torch.randn(40, 40, 32), torch.arange(40))
    assert calls == [40]


def layer_inputs(B, T=40):
    return torch.randn(B, T, 32), torch.arange(T)


def test_halves_down_to_single_sequences(gpu_fits):
    model = CatCache().eval()
    fast = shadowpass.compile(model, dynamic=True, **EXACT)
    x, pos = layer_inputs(4)
    calls = gpu_fits(1)
    with torch.no_grad():
        want, _ = model(x, pos)
        got, _ = fast(x, pos)
    assert calls == [4, 2, 1, 1, 1, 1]
    torch.testing.assert_close(got, want, atol=FP32_LOGITS, rtol=FP32_LOGITS)
    assert shadowpass.runtime_of(model).sites["site0"].prefill.U.shape[0] == 4


def test_out_of_memory_for_one_sequence_propagates(gpu_fits):
    fast = shadowpass.compile(CatCache().eval(), dynamic=True, **EXACT)
    calls = gpu_fits(0)
    with torch.no_grad(), pytest.raises(
            torch.OutOfMemoryError, match=r"4 sequences x 40 tokens ran out of GPU memory \(CUDA "
            r"out of memory.*simulated\).*one sequence at a time did not fit"):
        fast(*layer_inputs(4))
    assert calls == [4, 2, 1]


def test_single_sequence_is_not_split(gpu_fits):
    fast = shadowpass.compile(CatCache().eval(), dynamic=True, **EXACT)
    calls = gpu_fits(0)
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError,
                                        match="a single sequence cannot be split"):
        fast(*layer_inputs(1))
    assert calls == [1]


def test_host_memory_is_checked_for_the_whole_batch(gpu_fits, monkeypatch):
    """Each half's values fit in host memory but the whole batch's do not: refused after the
    first half, naming the whole batch."""
    fast = shadowpass.compile(CatCache().eval(), dynamic=True, **EXACT)
    N = 40 // 8 - 4
    whole = 4 * 2 * N * 8 * 16 * 4  # fp32 values [B, Hkv, N, C, d] of the one layer
    # a half needs whole / 2 <= 0.9 * available; the whole batch needs more than that
    monkeypatch.setattr(hostmem, "host_bytes_available", lambda: int(whole / 0.9 * 0.75))
    calls = gpu_fits(2)
    with torch.no_grad(), pytest.raises(MemoryError,
                                        match=r"this batch \(4 sequences x 40 prompt tokens\)"):
        fast(*layer_inputs(4))
    assert calls == [4, 2]  # the first half was built, then the whole batch was checked

"""@shadowpass.shadowkv(...) on an nn.Module subclass, an instance and a plain function; bad
options fail at decoration time. (The class form on the hand-written decoder: test_backend.)"""
import pytest
import torch
import torch.nn.functional as F
from test_patterns import EXACT, ToyAttention, run
from tolerances import ATTENTION_TOL

import shadowpass
from shadowpass import ShadowKVConfig

T = 48


def toy_pair():
    torch.manual_seed(0)
    a = ToyAttention("sdpa", "cat", "repeat_kv").eval()
    b = ToyAttention("sdpa", "cat", "repeat_kv").eval()
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(1, T, 64)] + [torch.randn(1, 1, 64) for _ in range(2)]
    return a, b, xs


def assert_all_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **ATTENTION_TOL["fp32"])


def test_decorated_instance():
    eager, fast, xs = toy_pair()
    fast = shadowpass.shadowkv(**EXACT)(fast)
    assert_all_close(run(fast, xs, T), run(eager, xs, T))
    assert shadowpass.runtime_of(fast).built


def test_decorated_subclass_and_bare_decorator():
    @shadowpass.shadowkv(config=ShadowKVConfig(**EXACT))
    class Fast(ToyAttention):
        pass

    @shadowpass.shadowkv
    class DefaultFast(ToyAttention):
        pass

    eager, _, xs = toy_pair()
    fast = Fast("sdpa", "cat", "repeat_kv").eval()
    fast.load_state_dict(eager.state_dict())
    assert_all_close(run(fast, xs, T), run(eager, xs, T))
    assert shadowpass.runtime_of(fast).built
    # paper defaults: a 48-token prompt is far below min_sparse_len, so it stays dense (and exact)
    default = DefaultFast("sdpa", "cat", "repeat_kv").eval()
    default.load_state_dict(eager.state_dict())
    assert_all_close(run(default, xs, T), run(eager, xs, T))
    assert not shadowpass.runtime_of(default).built


def test_decorated_function():
    torch.manual_seed(0)
    wk = torch.randn(2, 16, 16)

    def attend(q, k, v, past):
        k = k @ wk  # a key projection (per KV head), no RoPE
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        rep = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                             v.repeat_interleave(rep, 1), is_causal=past is None)
        return out, (k, v)

    fast = shadowpass.shadowkv(**EXACT)(attend)
    q, k, v = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    want, cache = attend(q, k, v, None)
    got, fcache = fast(q, k, v, None)
    torch.testing.assert_close(got, want, **ATTENTION_TOL["fp32"])
    for _ in range(2):
        q1, k1, v1 = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
        want, cache = attend(q1, k1, v1, cache)
        got, fcache = fast(q1, k1, v1, fcache)
        torch.testing.assert_close(got, want, **ATTENTION_TOL["fp32"])
    from shadowpass.runtime import _GLOBAL  # a function has no parameters to key its state on
    assert _GLOBAL.sites and next(iter(_GLOBAL.sites.values())).used == 2
    report = shadowpass.explain(attend, q, k, v, None)
    assert report.sites[0].action == "rewritten", str(report)


@pytest.mark.parametrize("options,message", [
    ({"bugdet": 1024}, r"unknown shadowkv option\(s\) \['bugdet'\]; valid options"),
    ({"rank": 0}, r"ShadowKVConfig.rank=0 is out of range"),
    ({"budget": 4, "chunk_size": 8}, r"budget=4 is smaller than chunk_size=8"),
    ({"config": {"rank": 1}}, r"option 'config' must be a ShadowKVConfig"),
])
def test_bad_options_fail_at_decoration_time(options, message):
    with pytest.raises(ValueError, match=message):
        shadowpass.shadowkv(**options)  # before anything is decorated or run

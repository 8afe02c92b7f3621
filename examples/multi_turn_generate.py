"""Chat-style generation with the shadowkv backend: follow-up turns, beam search, prompt lookup.

The cache that generate returns holds stubs that name the ShadowKV state, so it can be passed
back: a second turn decodes its new tokens over the state (no new prefill), beam search reorders
the state with the cache, and prompt-lookup decoding cuts the candidates it rejects. At full
rank and budget each must give dense attention's tokens; the example checks that side by side
on a tiny random-weight Llama (no download). Runs on the GPU if there is one, else CPU.

    python examples/multi_turn_generate.py [--prompt-len 600] [--new-tokens 16]
"""
import argparse

import torch

import shadowpass
from hf_generate import tiny_llama
from shadowpass.hf import cache_kwargs, returned_cache

EXACT = {"rank": 4096, "budget": 1 << 20, "outlier_chunks": 8, "min_sparse_len": 0}


def two_turns(model, first, second, n):
    """Turn one, then turn two on the cache turn one returned: (sequences, cache)."""
    kw = dict(max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    one = model.generate(first, attention_mask=torch.ones_like(first), **kw)
    ids = torch.cat([one.sequences, second], 1)
    two = model.generate(ids, attention_mask=torch.ones_like(ids),
                         **cache_kwargs(model, returned_cache(one)), **kw)
    return two.sequences, returned_cache(two)


def run(prompt_len: int = 600, new_tokens: int = 16, device=None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dense = tiny_llama(device)
    model = tiny_llama(device)
    model.load_state_dict(dense.state_dict())
    model.compile(backend="shadowkv", dynamic=True, options=EXACT)  # one graph per kind of call
    first = torch.randint(0, 512, (1, prompt_len), device=device)
    second = torch.randint(0, 512, (1, 24), device=device)
    base = first[:, :prompt_len // 4]
    repeats = torch.cat([base] * 4, 1)  # prompt lookup finds candidates in repeated text
    beam = dict(max_new_tokens=new_tokens, num_beams=4, do_sample=False)
    lookup = dict(max_new_tokens=new_tokens, do_sample=False, prompt_lookup_num_tokens=4)
    with torch.no_grad():
        ours, cache = two_turns(model, first, second, new_tokens)
        theirs, _ = two_turns(dense, first, second, new_tokens)
        site = next(iter(shadowpass.runtime_of(model).sites.values()))  # alive with `cache`
        results = dict(
            follow_up_equal=torch.equal(ours, theirs), conversation_len=cache.get_seq_length(),
            tokens_after_prompt=site.used,  # exact in the state: turn two did not prefill again
            beam_equal=torch.equal(model.generate(first, **beam), dense.generate(first, **beam)),
            lookup_equal=torch.equal(model.generate(repeats, **lookup),
                                     dense.generate(repeats, **lookup)))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=600, help="first turn's prompt length")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per call")
    args = p.parse_args(argv)
    r = run(args.prompt_len, args.new_tokens)
    print(f"two turns on one cache ({r['conversation_len']} tokens, {r['tokens_after_prompt']} "
          f"of them after the first prompt): equal to dense: {r['follow_up_equal']}")
    print(f"beam search (4 beams): equal to dense: {r['beam_equal']}")
    print(f"prompt-lookup decoding: equal to dense: {r['lookup_equal']}")


if __name__ == "__main__":
    main()

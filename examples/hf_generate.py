"""Main demo: a Hugging Face model compiled with the shadowkv backend, generating.

Builds a tiny random-weight Llama from a config (no download), reports the attention sites the
pass found, then generates greedily with dense attention and with ShadowKV (once at settings that
must reproduce dense exactly, once at a small budget). Runs on the GPU if there is one, else CPU.

    python examples/hf_generate.py [--prompt-len 1200] [--new-tokens 32] [--budget 128]
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import shadowpass


def tiny_llama(device):
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def generate(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=1200)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=128, help="tokens of selected chunks per step")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = tiny_llama(device)
    ids = torch.randint(0, 512, (1, args.prompt_len), device=device)

    print(shadowpass.explain(model, ids[:, :32]))
    dense = generate(model, ids, args.new_tokens).sequences

    model.compile(backend="shadowkv", options={"rank": 4096, "budget": 1 << 20,
                                               "outlier_chunks": 8, "min_sparse_len": 0})
    exact = generate(model, ids, args.new_tokens)
    print(f"\nfull rank + full budget: tokens equal to dense: {torch.equal(exact.sequences, dense)}")

    torch._dynamo.reset()
    sparse_model = tiny_llama(device)
    sparse_model.load_state_dict(model.state_dict())
    sparse_model.compile(backend="shadowkv", options={"rank": 40, "budget": args.budget,
                                                      "outlier_chunks": 8, "min_sparse_len": 0})
    out = generate(sparse_model, ids, args.new_tokens)
    agree = (out.sequences[:, -args.new_tokens:] == dense[:, -args.new_tokens:]).float().mean()
    print(f"rank 40, budget {args.budget} of {args.prompt_len}: {agree:.0%} of greedy tokens "
          "agree with dense")
    site = next(iter(shadowpass.runtime_of(sparse_model).sites.values()))
    keys = out.past_key_values.layers[0].keys
    print(f"layer 0: model cache K {tuple(keys.shape)} holds {keys.untyped_storage().nbytes()} B; "
          f"ShadowKV device state {site.nbytes() / 1024:.1f} KiB, host values "
          f"{site.prefill.values.numel() * site.prefill.values.element_size() / 1024:.1f} KiB")


if __name__ == "__main__":
    main()

"""Hugging Face generate() with the shadowkv backend on a real model, or a tiny one if absent.

Uses SmolLM2-135M-Instruct when its offline loader (``shadowpass.eval.smollm2``) is importable
and the model files are on this machine; otherwise it says so and falls back to a tiny
random-weight Llama (no download either way). Then: dense greedy generation, ShadowKV at
settings that must reproduce dense exactly (full rank, full budget), and ShadowKV at a small
budget, with the share of greedy tokens that agree with dense.

    python examples/real_model_generate.py [--tiny] [--prompt-len 600] [--new-tokens 24]
"""
from __future__ import annotations

import argparse
import copy
from typing import Optional, Tuple

import torch

import shadowpass
from shadowpass.tiny import tiny_model

PASSAGE = ("The lighthouse keeper wrote in the log every evening: the wind, the ships that "
           "passed, the colour of the sea. On the ninth day of the storm she noted that the "
           "supply boat was late and that the lamp oil would last until Sunday. ")
QUESTION = "Until which day would the lamp oil last? Answer in one word."


def load_real(device: str) -> Tuple[Optional[torch.nn.Module], object, str]:
    """(model, tokenizer, why) for SmolLM2-135M-Instruct; model is None if unavailable."""
    try:
        from shadowpass.eval import smollm2
    except ImportError as e:
        return None, None, f"the loader shadowpass.eval.smollm2 is not importable ({e})"
    try:
        if hasattr(smollm2, "is_available") and not smollm2.is_available():
            return None, None, "SmolLM2-135M-Instruct files are not on this machine"
        model, tok = smollm2.load_smollm2(device=device)
    except (FileNotFoundError, OSError, ImportError) as e:
        return None, None, f"SmolLM2-135M-Instruct could not be loaded ({type(e).__name__}: {e})"
    return model, tok, "SmolLM2-135M-Instruct"


def real_prompt(tok, prompt_len: int, device: str) -> torch.Tensor:
    """A chat prompt of about prompt_len tokens: a passage repeated, then a question."""
    per = len(tok(PASSAGE)["input_ids"])
    text = PASSAGE * max(1, prompt_len // per) + QUESTION
    msgs = [{"role": "user", "content": text}]
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"]
    return ids.to(device)


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=model.config.eos_token_id or 0)
    return out[:, ids.shape[1]:]


def run(prompt_len: int = 600, new_tokens: int = 24, budget: Optional[int] = 128,
        prefer_real: bool = True, device: Optional[str] = None) -> dict:
    """Dense, exact-settings ShadowKV and small-budget ShadowKV generations on one model.

    Returns a dict: model (name), real (bool), fallback_reason, prompt_tokens, tokens_equal
    (exact settings vs dense), agreement (small budget vs dense; None when budget is None, which
    skips that run), texts (when a tokenizer exists).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, tok, why = load_real(device) if prefer_real else (None, None, "--tiny was given")
    real = model is not None
    if real:
        ids = real_prompt(tok, prompt_len, device)
        name = why
    else:
        model = tiny_model("llama").to(device)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
        name = "tiny random-weight Llama"
    sparse_model = copy.deepcopy(model) if budget is not None else None

    dense = greedy(model, ids, new_tokens)
    model.compile(backend="shadowkv", options={"rank": 1 << 14, "budget": 1 << 20,
                                               "outlier_chunks": 4, "min_sparse_len": 0})
    exact = greedy(model, ids, new_tokens)
    exact_sites = shadowpass.runtime_of(model).built

    result = dict(model=name, real=real, fallback_reason=None if real else why,
                  prompt_tokens=ids.shape[1], shadowkv_sites=exact_sites,
                  tokens_equal=torch.equal(exact, dense), agreement=None)
    texts = {"dense": dense}
    if budget is not None:
        torch._dynamo.reset()  # the second model gets its own compiled code and options
        sparse_model.compile(backend="shadowkv", options={"budget": budget, "outlier_chunks": 4,
                                                          "local_chunks": 4, "min_sparse_len": 0})
        texts["shadowkv"] = approx = greedy(sparse_model, ids, new_tokens)
        result["agreement"] = (approx == dense).float().mean().item()
    if tok is not None:
        result["texts"] = {k: tok.decode(v[0], skip_special_tokens=True) for k, v in texts.items()}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="use the tiny random-weight Llama even if SmolLM2 is available")
    p.add_argument("--prompt-len", type=int, default=600, help="prompt length in tokens (about)")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens to generate")
    p.add_argument("--budget", type=int, default=128,
                   help="ShadowKV budget: tokens of selected chunks attended per decode step")
    args = p.parse_args(argv)
    r = run(args.prompt_len, args.new_tokens, args.budget, prefer_real=not args.tiny)
    if r["real"]:
        print(f"model: {r['model']}")
    else:
        print(f"model: {r['model']} (fallback: {r['fallback_reason']})")
    print(f"prompt: {r['prompt_tokens']} tokens; {r['shadowkv_sites']} attention sites run "
          "ShadowKV")
    print(f"full rank + full budget: tokens equal to dense: {r['tokens_equal']}")
    if r["agreement"] is not None:
        print(f"budget {args.budget}: {r['agreement']:.0%} of greedy tokens agree with dense")
    for k, text in r.get("texts", {}).items():
        print(f"{k:>8}: {text!r}")
    return 0 if r["tokens_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

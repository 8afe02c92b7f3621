"""Walkthrough of the debugging output: graph dumps and the report, and how to read them.

Compiles a tiny random-weight Llama with ``shadowpass.compile(model, dump_dir=...)``, runs a
prompt and a few greedy decode steps (checking the tokens against the uncompiled model), then
lists what the dump folder holds and prints the report with a legend for each column.

    python examples/graph_dump_walkthrough.py [--dump-dir DIR]

The same files come from ``SHADOWPASS_DUMP_DIR=DIR`` with ``torch.compile(model,
backend="shadowkv")``, or from ``shadowpass explain --model llama --decode --dump-dir DIR``.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch

import shadowpass
from shadowpass.hf import cache_kwargs, returned_cache
from shadowpass.tiny import tiny_model

# What each file of the dump folder holds (N: the backend's graph counter in this process).
FILES = {
    "before.py": "the FX graph Dynamo handed to the backend, as readable Python (torch-level "
                 "ops: scaled_dot_product_attention, matmul, softmax, cat, ...)",
    "after.py": "the same graph after the rewrite: a prefill graph gains shadowkv.prefill_state "
                "per site (its state becomes extra outputs); a decode graph takes the state as "
                "extra inputs and calls shadowkv.decode instead of dense attention. Absent when "
                "nothing was rewritten",
    "report.txt": "the report of this graph as the table below",
    "report.json": "the same report as JSON (Report.to_json(): graphs, errors, sites)",
}

# How to read each column of the report.
COLUMNS = {
    "graph": "which compiled graph the site is in; Dynamo traces the prompt (prefill) and the "
             "one-token step (decode) as different graphs, and may retrace when shapes change (a "
             "dump's own graph_N_report holds one graph, numbered 0)",
    "site": "the attention layer's module path (from nn_module_stack), or siteN",
    "phase": "prefill (a prompt: dense attention kept, ShadowKV state built from it) or decode "
             "(one new token: attention replaced by ShadowKV's sparse attention)",
    "pattern": "how the attention is written: sdpa, matmul_softmax or einsum_softmax",
    "gqa_group": "query heads per key/value head: 1 for MHA, all query heads for MQA",
    "rope": "rotary embedding found on the keys: rotate_half, interleaved, complex; 'partial' "
            "and rotary_dim when only part of the head rotates; none without RoPE",
    "pre_rope_keys": "whether the keys before RoPE were found: ShadowKV's low-rank SVD is taken "
                     "on them, and the model's own cos/sin re-apply RoPE at decode",
    "kv_cache": "how new keys/values enter the model's cache: cat (HF DynamicCache), "
                "index_copy / index_put / slice_write (a preallocated buffer), returned (the "
                "first call returns K/V as the cache), none",
    "action": "rewritten (runs ShadowKV) or left dense (compiled exactly as Inductor would)",
    "reason": "why a site was left dense; empty when rewritten",
}


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens with the model's own (DynamicCache) KV cache, one forward per token."""
    out, toks = model(ids, use_cache=True), []
    for _ in range(n):
        nxt = out.logits[:, -1:].argmax(-1)
        toks.append(nxt)
        out = model(nxt, **cache_kwargs(model, returned_cache(out)), use_cache=True)
    return torch.cat(toks, 1)


def run(dump_dir: Optional[str] = None, prompt_len: int = 64, new_tokens: int = 3) -> dict:
    """Compile with dump_dir, run, read the dump back. Returns a dict describing what was found."""
    dump_dir = dump_dir or tempfile.mkdtemp(prefix="shadowpass_dump_")
    torch.manual_seed(0)
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    # settings that keep everything, so the tokens must equal the uncompiled model's
    compiled = shadowpass.compile(model, dump_dir=dump_dir, rank=4096, budget=1 << 16,
                                  outlier_chunks=2, min_sparse_len=0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    with torch.no_grad():
        want = greedy(reference, ids, new_tokens)
        got = greedy(compiled, ids, new_tokens)

    files = sorted(p.name for p in Path(dump_dir).iterdir())
    reports, graphs_parse = {}, True
    for name in files:
        path = Path(dump_dir) / name
        if name.endswith("_report.json"):
            reports[name] = json.loads(path.read_text())
        elif name.endswith(".py"):
            try:
                ast.parse(path.read_text())
            except SyntaxError:
                graphs_parse = False
    ops = sorted({op for name in files if name.endswith("_after.py")
                  for op in ("shadowkv.prefill_state", "shadowkv.decode")
                  if op in (Path(dump_dir) / name).read_text()})
    return dict(dump_dir=dump_dir, files=files, reports=reports, graphs_parse=graphs_parse,
                shadowkv_ops=ops, tokens_equal=torch.equal(got, want))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dump-dir", default=None,
                   help="folder for the dumps (default: a new temporary folder)")
    args = p.parse_args(argv)
    r = run(args.dump_dir)
    d = Path(r["dump_dir"])
    print(f"tokens equal to the uncompiled model: {r['tokens_equal']}")
    print(f"\n{d} holds {len(r['files'])} files:")
    for name in r["files"]:
        print(f"  {name:28} {(d / name).stat().st_size:7d} B")
    print("\nper graph N:")
    for suffix, what in FILES.items():
        print(f"  graph_N_{suffix:12} {what}")
    print(f"\nShadowKV ops in the rewritten graphs: {', '.join(r['shadowkv_ops'])}")
    print("\nThe reports, graph by graph:")
    for name in r["files"]:
        if name.endswith("_report.txt"):
            print(f"--- {name}\n{(d / name).read_text().rstrip()}")
    print("\nHow to read the columns:")
    for col, what in COLUMNS.items():
        print(f"  {col:14} {what}")
    return 0 if r["tokens_equal"] and r["graphs_parse"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

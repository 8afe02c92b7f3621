#!/usr/bin/env bash
# GPU machine: the issue-5 grid, one process per task in parallel (a 135M model leaves the GPU
# mostly idle per process). usage: scripts/gpu/eval_all.sh SECONDS TASK...
limit=$1; shift
python3 -c "from shadowpass.eval.smollm2 import load_smollm2; load_smollm2('cpu')" 2>&1 | tail -1
for task in "$@"; do
  timeout "$limit" python3 -m shadowpass.cli eval "$task" --lengths 4096 8000 --samples 50 \
    --batch-size 25 --methods dense shadowkv quest streaming oracle --budgets 128 256 512 1024 \
    --ranks 64 --no-progress --out "/root/ev/$task" > "/root/ev_$task.log" 2>&1 &
done
wait
mkdir -p "$OUT/ev"
for task in "$@"; do
  grep -v "arn\|Load\|Conv\|Writ" "/root/ev_$task.log" | tail -5
  cp "/root/ev/$task/results.json" "$OUT/ev/$task.json" 2>/dev/null
  cp /root/ev/$task/*.png "$OUT/ev/" 2>/dev/null
done; true

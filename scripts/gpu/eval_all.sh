#!/usr/bin/env bash
# GPU machine: the issue-5 grid, one process per group of tasks, the groups in parallel (a 135M
# model leaves the GPU partly idle per process). Each process writes results.json after each task.
# usage: scripts/gpu/eval_all.sh SECONDS "TASK..." ["TASK..." ...]   (extra eval flags: $EVAL_FLAGS)
limit=$1; shift
python3 -c "from shadowpass.eval.smollm2 import load_smollm2; load_smollm2('cpu')" 2>&1 | tail -1
n=0
for group in "$@"; do
  n=$((n + 1))
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m shadowpass.cli eval $group --lengths 4096 8000 --samples 50 \
    --batch-size 25 --methods dense shadowkv quest streaming --budgets 128 256 512 1024 \
    --ranks 64 --no-progress --out "/root/ev/g$n" $EVAL_FLAGS > "/root/ev_g$n.log" 2>&1 &
done
wait
mkdir -p "$OUT/ev"
for i in $(seq 1 "$n"); do
  grep -v "arn\|Load\|Conv\|Writ" "/root/ev_g$i.log" | tail -60
  cp "/root/ev/g$i/results.json" "$OUT/ev/g$i.json" 2>/dev/null
  mkdir -p "$OUT/ev/g$i" && cp /root/ev/g$i/*.png "$OUT/ev/g$i/" 2>/dev/null
done; true

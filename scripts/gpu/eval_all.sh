#!/usr/bin/env bash
# GPU machine: the issue-5 grid, one process per group of tasks, the groups in parallel (a 135M
# model leaves the GPU partly idle per process; but each process pays its own graph rewrites, so
# one group of all tasks is what finished most in a 10-minute call). Logs and results go straight
# to $OUT (results.json is rewritten after each batch x method), so a run cut by the call's limit
# keeps what it finished.
# usage: scripts/gpu/eval_all.sh DEADLINE_SECONDS "TASK..." ["TASK..." ...]   (extra flags: $EVAL_FLAGS)
deadline=$1; shift
python3 -c "from shadowpass.eval.smollm2 import load_smollm2; load_smollm2('cpu')" 2>&1 | tail -1
echo "model converted at ${SECONDS} s"
n=0
for group in "$@"; do
  n=$((n + 1))
  mkdir -p "$OUT/ev/g$n"
  # shellcheck disable=SC2086
  timeout $((deadline - SECONDS)) python3 -m shadowpass.cli eval $group --lengths 8000 4096 \
    --samples 50 --batch-size 25 --methods dense shadowkv quest streaming \
    --budgets 128 256 512 1024 --ranks 64 --no-progress --out "$OUT/ev/g$n" $EVAL_FLAGS \
    > "$OUT/ev/g$n.log" 2>&1 &
done
wait
for i in $(seq 1 "$n"); do grep -v "arn\|Load\|Conv\|Writ" "$OUT/ev/g$i.log" | tail -40; done; true

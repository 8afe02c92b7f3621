#!/usr/bin/env bash
# GPU machine: run a long job across several device calls. A command's processes end when the
# call returns, except one in a new process session (device README), which runs on while the
# machine stays warm (calls back to back, under 30 s apart). Each call copies the job's
# log, data files and exit status (once done) to $OUT, so every call returns what is finished.
#   scripts/gpu/detached.sh start NAME WAIT_S CMD...   start CMD in /root/jobs/NAME, then wait
#   scripts/gpu/detached.sh wait NAME WAIT_S           wait for it (at most WAIT_S), copy back
set -u
mode=$1 name=$2 wait_s=$3; shift 3
dir=/root/jobs/$name
if [ "$mode" = start ]; then
  mkdir -p "$dir"
  # $JOB is the job's folder (for its --out); rc appears when the command ends
  JOB=$dir setsid bash -c "{ $*; } > $dir/log 2>&1; echo \$? > $dir/rc" < /dev/null > /dev/null 2>&1 &
fi
end=$((SECONDS + wait_s))
while [ ! -f "$dir/rc" ] && [ $SECONDS -lt $end ]; do sleep 5; done
# only the log and the data files: a call returns a limited number of files (PNGs can be
# redrawn from results.json), and one over the limit is dropped whole
(cd /root/jobs && find "$name" -type f \( -name log -o -name rc -o -name "*.json" -o -name "*.txt" \) \
  -exec cp --parents {} "$OUT/" \;)
echo "job $name: $( [ -f "$dir/rc" ] && echo "exit $(cat "$dir/rc")" || echo running) at ${SECONDS} s"
grep -v "arn\|Load\|Conv\|Writ\|^V1" "$dir/log" | tail -30
true

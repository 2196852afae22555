#!/usr/bin/env bash
# Tune full-size SD1.5 (cuda sm_90, float16) on the GPU machine into a MetaSchedule database.
# Run from the repository root after `source .dev/tvm-b/activate.sh` (see benchmarks/README.md).
# Resumable: run it again (the machine keeps .dev/ while warm) and it continues; it stops itself
# (as Ctrl-C would) after TUNE_SECONDS so the database comes back in $OUT within one device call.
set -u
source "$(dirname "$0")/gpu_env.sh"
DB=${DB:-.dev/cuda-sm_90}
# The log goes to a file, not through a pipe, so what was printed survives the time limit. SIGINT stops
# the tuner like Ctrl-C; -k kills it if a measurement does not return within 60 s of that.
timeout -k 60 -s INT "${TUNE_SECONDS:-420}" python3 -m mlcweb.cli tune stable-diffusion --target cuda \
  --dtype float16 --set size=full --db "$DB" --trials "${TRIALS:-32}" --max-tasks "${MAX_TASKS:-12}" \
  ${TASKS:+--tasks "$TASKS"} > "$OUT/tune.log" 2>&1
grep -v "Warning\|warn(\|INFO\|DEBUG\|^ *[0-9]* |\|^---\|^Total\|ID |\|^\s*$" "$OUT/tune.log" | tail -60
# The workload file holds every workload seen (tens of MB for SD): bring back the records and the state;
# keep the workload file on the machine, or compress it into $OUT when the run is final.
mkdir -p "$OUT/db" && cp "$DB"/database_tuning_record.json "$DB"/mlcweb-tune.json "$OUT/db/" 2>/dev/null
xz -9 -c "$DB"/database_workload.json > "$OUT/db/database_workload.json.xz" 2>/dev/null; ls -la "$OUT/db"

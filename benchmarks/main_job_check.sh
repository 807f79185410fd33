#!/bin/bash
# Issue 23's main-job check: does a candidate default stop the README's main job (Textual Inversion of the bundled
# concept on the embedded mini-SD, the trainer's 1000-step budget)? Exit 0 when it stopped early, 1 when it ran to
# the budget (or failed); the stop and its reason are printed either way.
#   bash benchmarks/main_job_check.sh NAME [--early-stop-* flags]
#   e.g. bash benchmarks/main_job_check.sh hb40 --early-stop-preset auto --early-stop-signal bands \
#            --early-stop-threshold 1.5 --early-stop-min-steps 400
set -u
name=${1:?a name for the run (its output goes to ${TMPDIR:-/tmp}/main-job/NAME)}; shift
out=${TMPDIR:-/tmp}/main-job/$name
mkdir -p "$out"
rm -f "$out/dvar_summary.json"  # a summary left by an earlier run of this NAME must not stand in for this one's
python integrations/textual_inversion.py --early-stop --overwrite_output_dir --output_dir "$out" "$@" > "$out.log" 2>&1
code=$?
python - "$out/dvar_summary.json" "$name" "$code" <<'PY'
import json, sys
path, name, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    summary = json.load(open(path))
except OSError as error:
    sys.exit(f"{name}: the run failed (exit {code}) before writing {path}: {error}")
print(f"{name}: exit {code}, stopped early: {summary['stopped_early']}, step {summary['stop_step']}; {summary['message']}")
sys.exit(0 if code == 0 and summary["stopped_early"] else 1)
PY

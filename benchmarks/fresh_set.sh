#!/usr/bin/env bash
# Issue 23's fresh confirmation set (benchmarks/results/rules/default-candidates.md, ninth session): 12 concepts per
# method that no candidate rule was replayed on, at 0.5x, 1x and 2x each method's learning rate, on mini-SD.
#   bash benchmarks/fresh_set.sh run      # train them (two 1-thread lanes; resumable: run it again to go on)
#   bash benchmarks/fresh_set.sh pack     # keep what is done across sessions: raw-fresh.tar.xz (no weights)
#   bash benchmarks/fresh_set.sh report   # once all 108 are done: fresh.md and fresh.csv for the shipped default
# `run` starts from raw-fresh.tar.xz when runs/fresh-* are missing, so a new checkout goes on where the last stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
results=benchmarks/results/rules
scales=(1 0.5 2)
default_rule="M textual_inversion: Bf level=0.8 x1.75; dreambooth_lora: H B level=0.8 x2 from 50%; custom_diffusion: S level=0.9 x2"

concepts() {  # the world's seed-1 concept set without the objects of seed 0's (the benchmark's 48)
  python - "$1" <<'PY'
import json, shutil, sys
from pathlib import Path
from dvar_lab.world.concepts import design_concepts, write_concepts
out = Path(sys.argv[1])
staging = out.with_name(out.name + ".tmp")
shutil.rmtree(staging, ignore_errors=True)
write_concepts(staging, 1, "seen")
benchmark = {c.name for c in design_concepts(0, "seen")}
index = json.loads((staging / "index.json").read_text())
for entry in index["concepts"]:
    if entry["name"] in benchmark:
        shutil.rmtree(staging / entry["name"])
        (staging / f"{entry['name']}.json").unlink()
index["concepts"] = [e for e in index["concepts"] if e["name"] not in benchmark]
(staging / "index.json").write_text(json.dumps(index, indent=2) + "\n")
staging.rename(out)
print(f"{out}: {len(index['concepts'])} concepts")
PY
}

case "${1:-}" in
  run)
    if [ ! -d runs/fresh-lr1 ] && [ -f $results/raw-fresh.tar.xz ]; then
      mkdir -p runs && tar xJf $results/raw-fresh.tar.xz -C runs
    fi
    for s in "${scales[@]}"; do
      [ -f runs/fresh-lr$s/concepts/index.json ] || { mkdir -p runs/fresh-lr$s; concepts runs/fresh-lr$s/concepts; }
    done
    lane() {
      for s in "${scales[@]}"; do
        python -m benchmarks.personalization.run --preset full --lr-scale "$s" --concepts-per-method 12 --traces-only \
          --world-concepts "runs/fresh-lr$s/concepts" --out "runs/fresh-lr$s" --shard "$1/2" --threads 1 --no-report \
          || return 1
      done
    }
    lane 1 > runs/fresh-lane1.log 2>&1 & a=$!
    lane 2 > runs/fresh-lane2.log 2>&1 & b=$!
    status=0
    wait $a || status=1
    wait $b || status=1
    exit $status
    ;;
  pack)
    tar cJf $results/raw-fresh.tar.xz -C runs --exclude=weights --exclude=work --exclude='*.tmp*' \
      $(for s in "${scales[@]}"; do echo fresh-lr$s; done)
    for s in "${scales[@]}"; do
      echo "fresh-lr$s: $(find runs/fresh-lr$s/traces -name '*.json' 2>/dev/null | wc -l) of 36 trajectories"
    done
    ;;
  report)
    python benchmarks/rules.py $(for s in "${scales[@]}"; do echo runs/fresh-lr$s; done) --pooled \
      --rule "$default_rule" --markdown $results/fresh.md --default-csv $results/fresh.csv
    ;;
  *)
    echo "usage: bash benchmarks/fresh_set.sh run|pack|report" >&2
    exit 2
    ;;
esac

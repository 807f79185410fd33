#!/usr/bin/env bash
# The check of dvar.integrations.kohya on a real kohya-ss/sd-scripts checkout (CPU, offline, ~3 min):
#   1. the mixin attaches to NetworkTrainer, SdxlNetworkTrainer, Sd3NetworkTrainer, FluxNetworkTrainer;
#   2. LoRA training of mini-SD with --early_stop stops before --max_train_steps with a reason
#      (saving kohya states every 20 steps on the way);
#   3. a plain kohya run of that many steps, same seed, saves a bitwise-equal LoRA, and both files
#      say ss_steps = the steps trained, ss_epoch = the epoch they ended in;
#   4. the LoRA loads with kohya's networks.lora and with diffusers' load_lora_weights;
#   5. --resume from the state of step 20 reaches a stop (kohya's resume itself is not step-exact);
#   6. bad input exits 2: no sd-scripts, a window the budget cannot fill, --deepspeed.
#
#   bash benchmarks/kohya_check.sh SD_SCRIPTS_PATH [OUT]
#
# Run it with the python of the environment that has sd-scripts' requirements and dvar installed
# (PYTHON=..., default: python). The diffusers load runs with DVAR_PYTHON (default: PYTHON); it needs
# peft, which sd-scripts does not install. Results: OUT/kohya_check.json (default OUT=/tmp/dvar-kohya-check).
set -uo pipefail
sd=${1:?usage: bash benchmarks/kohya_check.sh SD_SCRIPTS_PATH [OUT]}
out=${2:-/tmp/dvar-kohya-check}
py=${PYTHON:-python}
dvar_py=${DVAR_PYTHON:-$py}
here=$(cd "$(dirname "$0")" && pwd)
sd=$(cd "$sd" && pwd) || exit 2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
rm -rf "$out" && mkdir -p "$out"
commit=$(git -C "$sd" rev-parse HEAD 2>/dev/null || echo unknown)
echo "sd-scripts $sd at $commit; output in $out"
failed=0
record() { echo "$1: $2" | tee -a "$out/results.txt"; case "$2" in *'"ok": false'*|FAIL*) failed=1;; esac; }

data=$("$py" "$here/kohya_check.py" data "$out/data") || exit 1
field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$data" "$1"; }
common=(--pretrained_model_name_or_path "$(field model)" --tokenizer_cache_dir "$(field tokenizer_cache_dir)"
        --train_data_dir "$(field train_data_dir)" --caption_extension .txt --resolution 64
        --network_module networks.lora --network_dim 4 --network_alpha 4 --learning_rate 1e-3
        --train_batch_size 1 --seed 42 --cache_latents --max_data_loader_n_workers 0 --mixed_precision no
        --save_model_as safetensors --output_name lora)
# every step, as when the README's result (stop at 114 of 300) was recorded; the default stride would be 100 // 30 = 3
early=(--early_stop --early_stop_window 100 --early_stop_threshold 0.4 --early_stop_eval_every 1)
kohya() { (cd "$sd" && "$py" -m dvar.integrations.kohya train_network "$@"); }

record hooks "$(cd "$sd" && "$py" "$here/kohya_check.py" hooks "$sd" 2>/dev/null | tail -1)"

start=$(date +%s)
kohya "${common[@]}" --output_dir "$out/early" --max_train_steps 300 "${early[@]}" \
  --save_every_n_steps 20 --save_state > "$out/early.log" 2>&1
record early "rc=$? $(($(date +%s) - start)) s; $(grep -o 'DVAR stopped.*budget, saved)' "$out/early.log")"
stop=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['stop_step'])" "$out/early/dvar_summary.json")

start=$(date +%s)
kohya "${common[@]}" --output_dir "$out/plain" --max_train_steps "$stop" > "$out/plain.log" 2>&1
record plain "rc=$? $(($(date +%s) - start)) s, --max_train_steps $stop"
record compare "$("$py" "$here/kohya_check.py" compare "$out/early" "$out/plain" 2>/dev/null | tail -1)"
record load-kohya "$("$py" "$here/kohya_check.py" load-kohya "$sd" "$out/early/lora.safetensors" 2>/dev/null | tail -1)"
record load-diffusers "$("$dvar_py" "$here/kohya_check.py" load-diffusers "$out/early/lora.safetensors" 2>/dev/null | tail -1)"

kohya "${common[@]}" --output_dir "$out/resumed" --max_train_steps 300 "${early[@]}" \
  --resume "$out/early/lora-step00000020-state" --skip_until_initial_step > "$out/resumed.log" 2>&1
resumed=$("$py" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/{run}/dvar_summary.json")) for run in ("early", "resumed"))
rows = lambda run: open(f"{out}/{run}/dvar_history.csv").read().splitlines()[1:21]
print(json.dumps({"stop_step": b["stop_step"], "uninterrupted_stop_step": a["stop_step"],
                  "first_20_rows_restored": rows("early") == rows("resumed"), "ok": rows("early") == rows("resumed")}))
PY
)
record resume "$resumed"

bad() {  # name, expected message, flags...
  local name=$1 message=$2; shift 2
  err=$("$py" -m dvar.integrations.kohya train_network "$@" 2>&1 >/dev/null); rc=$?
  if [ $rc -eq 2 ] && grep -qF -- "$message" <<< "$err"; then record "bad-$name" "exit 2: $(tail -1 <<< "$err")"
  else record "bad-$name" "FAIL rc=$rc: $(tail -2 <<< "$err")"; fi
}
bad no-sd-scripts "sd-scripts not found" --sd_scripts "$out" "${common[@]}" --output_dir "$out/bad"
bad window "could never fire" --sd_scripts "$sd" "${common[@]}" --output_dir "$out/bad" --max_train_steps 30 "${early[@]}"
bad deepspeed "does not support --deepspeed" --sd_scripts "$sd" "${common[@]}" --output_dir "$out/bad" --deepspeed "${early[@]}"

"$py" - "$out" "$commit" <<'PY'
import json, sys
out, commit = sys.argv[1], sys.argv[2]
results = {"sd_scripts_commit": commit}
for line in open(f"{out}/results.txt"):
    name, _, value = line.partition(": ")
    try:
        results[name] = json.loads(value)
    except json.JSONDecodeError:
        results[name] = value.strip()
json.dump(results, open(f"{out}/kohya_check.json", "w"), indent=1)
PY
[ $failed -eq 0 ] && echo "kohya check passed ($out/kohya_check.json)" || echo "kohya check FAILED ($out/results.txt)"
exit $failed

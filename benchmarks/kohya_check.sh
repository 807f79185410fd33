#!/usr/bin/env bash
# The check of dvar.integrations.kohya on a real kohya-ss/sd-scripts checkout (CPU, offline, ~5 min):
#   1. the mixin attaches to NetworkTrainer, SdxlNetworkTrainer, Sd3NetworkTrainer, FluxNetworkTrainer;
#   2. LoRA training of mini-SD with --early_stop stops before --max_train_steps with a reason
#      (saving kohya states every 20 steps on the way), and prints one line for the idle epochs after it;
#   3. a plain kohya run of that many steps, same seed, saves a bitwise-equal LoRA, and both files
#      say ss_steps = the steps trained, ss_epoch = the epoch they ended in;
#   4. the LoRA loads with kohya's networks.lora and with diffusers' load_lora_weights;
#   5. --resume from the state of step 60 (past two epochs, where kohya's global_step restarts at 10)
#      restores the history and reaches a stop whose LoRA says the steps it trained (kohya's resume itself
#      is not step-exact, so the stop may move);
#   6. runs that diverge (--learning_rate 1e6, 30) exit 3 with outcome "diverged" and save no NaN weights:
#      nothing, or the LoRA of the last finite evaluation;
#   7. bad input exits 2 with dvar's message: no sd-scripts, a window the budget cannot fill, --deepspeed,
#      and a bad flag value, refused before sd-scripts is imported (its time is recorded).
#
#   bash benchmarks/kohya_check.sh SD_SCRIPTS_PATH [OUT]
#
# Run it with the python of the environment that has sd-scripts' requirements and dvar installed
# (PYTHON=..., default: python). The diffusers load runs with DVAR_PYTHON (default: PYTHON); it needs
# peft, which sd-scripts does not install. A step passes only when it exits 0 and prints its result
# (a JSON line must not say "ok": false); the script exits 1 if any step fails.
# Results: OUT/kohya_check.json (default OUT=/tmp/dvar-kohya-check), with the versions they come from.
set -uo pipefail
sd=${1:?usage: bash benchmarks/kohya_check.sh SD_SCRIPTS_PATH [OUT]}
out=${2:-/tmp/dvar-kohya-check}
py=${PYTHON:-python}
dvar_py=${DVAR_PYTHON:-$py}
here=$(cd "$(dirname "$0")" && pwd)
sd=$(cd "$sd" && pwd) || exit 2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
rm -rf "$out" && mkdir -p "$out"
failed=0
record() {  # name, exit code, output
  local verdict=PASS
  if [ "$2" -ne 0 ] || [ -z "$3" ] || grep -q '"ok": false' <<< "$3"; then verdict=FAIL; failed=1; fi
  echo "$verdict $1: rc=$2 ${3:-(no output; last error: $(tail -1 "$out/helpers.err" 2>/dev/null))}" | tee -a "$out/results.txt"
}
helper() { "$py" "$here/kohya_check.py" "$@" 2>>"$out/helpers.err" | tail -1; return "${PIPESTATUS[0]}"; }

versions=$(helper versions "$sd") || { echo "the environment in $py cannot run the check: $versions" >&2; exit 1; }
echo "sd-scripts in $sd; output in $out; versions: $versions"
data=$(helper data "$out/data") || { echo "could not write the check's data" >&2; exit 1; }
field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$data" "$1"; }
common=(--pretrained_model_name_or_path "$(field model)" --tokenizer_cache_dir "$(field tokenizer_cache_dir)"
        --train_data_dir "$(field train_data_dir)" --caption_extension .txt --resolution 64
        --network_module networks.lora --network_dim 4 --network_alpha 4 --train_batch_size 1 --seed 42
        --cache_latents --max_data_loader_n_workers 0 --mixed_precision no --save_model_as safetensors --output_name lora)
# every step, as when the recorded stops were measured; the default stride would be 100 // 30 = 3
early=(--early_stop --early_stop_window 100 --early_stop_threshold 0.4 --early_stop_eval_every 1)
kohya() { (cd "$sd" && "$py" -m dvar.integrations.kohya train_network "$@"); }
summary() { "$py" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1/dvar_summary.json" "$2" 2>/dev/null; }

o=$(cd "$sd" && helper hooks "$sd"); record hooks $? "$o"

start=$(date +%s)
kohya "${common[@]}" --learning_rate 1e-3 --output_dir "$out/early" --max_train_steps 300 "${early[@]}" \
  --save_every_n_steps 20 --save_state > "$out/early.log" 2>&1
rc=$?; line=$(grep -o 'DVAR stopped.*budget, saved)' "$out/early.log") || rc=1
record early $rc "$(($(date +%s) - start)) s; ${line:-no DVAR stop in $out/early.log}"
o=$(helper idle-epochs "$out/early" "$out/early.log"); record idle-epochs $? "$o"
stop=$(summary "$out/early" stop_step)

start=$(date +%s)
kohya "${common[@]}" --learning_rate 1e-3 --output_dir "$out/plain" --max_train_steps "${stop:-1}" > "$out/plain.log" 2>&1
record plain $? "$(($(date +%s) - start)) s, --max_train_steps ${stop:-'(no stop to compare with)'}"
o=$(helper compare "$out/early" "$out/plain"); record compare $? "$o"
o=$(helper load-kohya "$sd" "$out/early/lora.safetensors"); record load-kohya $? "$o"
o=$("$dvar_py" "$here/kohya_check.py" load-diffusers "$out/early/lora.safetensors" 2>>"$out/helpers.err" | tail -1)
record load-diffusers "${PIPESTATUS[0]}" "$o"

kohya "${common[@]}" --learning_rate 1e-3 --output_dir "$out/resumed" --max_train_steps 300 "${early[@]}" \
  --resume "$out/early/lora-step00000060-state" --skip_until_initial_step > "$out/resumed.log" 2>&1
rc=$?; o=$(helper resume "$out/early" "$out/resumed" 60); record resume $((rc | $?)) "$o"

# learning rate 1e6: NaN at the first evaluation, nothing to keep; 30: NaN at step 2, the LoRA of step 1 kept
for lr in 1e6 30; do
  kohya "${common[@]}" --learning_rate $lr --output_dir "$out/diverged-lr$lr" --max_train_steps 20 --early_stop \
    --early_stop_window 10 --early_stop_eval_every 1 > "$out/diverged-lr$lr.log" 2>&1
  o=$(helper diverged "$out/diverged-lr$lr" $?); record "diverged-lr$lr" $? "$o"
done

bad() {  # name, expected message, flags...
  local name=$1 message=$2 start rc err took; shift 2
  start=$(date +%s%N)
  err=$("$py" -m dvar.integrations.kohya train_network "$@" 2>&1 >/dev/null); rc=$?
  took=$(( ($(date +%s%N) - start) / 1000000 ))
  took="$((took / 1000)).$(( (took % 1000) / 100 ))"
  if [ $rc -eq 2 ] && grep -qF -- "$message" <<< "$err" && ! grep -q "^usage:" <<< "$err"; then
    record "bad-$name" 0 "exit 2 in $took s: $(tail -1 <<< "$err")"
  else
    record "bad-$name" 1 "exit $rc in $took s (expected 2 and '$message'): $(tail -2 <<< "$err")"
  fi
}
bad no-sd-scripts "sd-scripts not found" --sd_scripts "$out" "${common[@]}" --output_dir "$out/bad"
bad window "could never fire" --sd_scripts "$sd" "${common[@]}" --output_dir "$out/bad" --max_train_steps 30 "${early[@]}"
bad window-epochs "could never fire" --sd_scripts "$sd" "${common[@]}" --output_dir "$out/bad" --max_train_epochs 1 "${early[@]}"
bad deepspeed "does not support --deepspeed" --sd_scripts "$sd" "${common[@]}" --output_dir "$out/bad" --deepspeed "${early[@]}"
bad eval-every-abc "'abc' is not a stride" --sd_scripts "$sd" "${common[@]}" --output_dir "$out/bad" --early_stop \
  --early_stop_eval_every abc
o=$(ls "$out/bad" 2>/dev/null | tr '\n' ' '); record bad-wrote-nothing "$([ -z "$o" ]; echo $?)" "${o:-$out/bad holds nothing}"

"$py" - "$out" "$versions" <<'PY'
import json, sys
out, versions = sys.argv[1], json.loads(sys.argv[2])
results = {"versions": versions}
for line in open(f"{out}/results.txt"):
    verdict, _, rest = line.partition(" ")
    name, _, value = rest.partition(": ")
    code, _, value = value.partition(" ")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        value = value.strip()
    results[name] = {"passed": verdict == "PASS", code.split("=")[0]: int(code.split("=")[1]), "result": value}
json.dump(results, open(f"{out}/kohya_check.json", "w"), indent=1)
PY
[ $failed -eq 0 ] && echo "kohya check passed ($out/kohya_check.json)" || echo "kohya check FAILED ($out/results.txt)"
exit $failed

#!/usr/bin/env bash
# CUDA check of the real trainer path: Textual Inversion on a randomly initialised
# SD-1.5-shaped pipeline at 512px.
#  1. fp32 / bf16 / fp16 (accelerate mixed precision), each without and with DVAR evaluating
#     every step: median step time, peak GPU memory, finite DVAR losses (table.md);
#  2. what watching costs: benchmarks/overhead.py in bf16 at training batch 1 and 4, s/step
#     without DVAR, at the default stride (eval_every="auto") and at every step, in interleaved
#     blocks of one run (overhead.md);
#  3. the other trainers' CUDA paths: DreamBooth-LoRA, Custom Diffusion and DreamBooth in fp16 and
#     bf16 with DVAR watching (window 20: the auto stride is 1): exit code, s/step, peak GPU memory (trainers.md);
#  4. the timed stride and the auto rule on CUDA: Textual Inversion in bf16 without DVAR, with
#     --early-stop-eval-every 5% (the stride chosen from timed steps, which must wait for the GPU)
#     and at the default stride; DreamBooth-LoRA with --early-stop-preset auto (stride.md).
# Writes few files (the device tool brings back at most 8): gpu.txt, results.json, table.md,
# overhead.md, overhead.json, trainers.md, stride.md, logs.txt.
#   [GPU_CHECK_PARTS=1234] [GPU_CHECK_TRAINERS="dreambooth_lora custom_diffusion dreambooth"] \
#   bash benchmarks/gpu_check.sh OUTDIR [STEPS] [MODEL]
# MODEL "mini" runs everything on the embedded mini-SD at its own resolution instead (the CPU
# dry run of this script's logic: bash benchmarks/gpu_check.sh /tmp/gpu_check 6 mini).
set -uo pipefail
out=${1:-/tmp/gpu_check}
steps=${2:-100}
model=${3:-random-sd15}
parts=${GPU_CHECK_PARTS:-1234}
trainers=${GPU_CHECK_TRAINERS:-dreambooth_lora custom_diffusion dreambooth}
mkdir -p "$out"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
else
  echo "no nvidia-smi: CPU run" | tee "$out/gpu.txt"
fi
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
if [ "$model" = mini ]; then
  model_flags=(); resolution_flags=(); rounds=2
else
  python3 benchmarks/make_random_sd.py /tmp/random-sd15 > /dev/null 2>&1 || exit 1
  model_flags=(--pretrained_model_name_or_path /tmp/random-sd15); resolution_flags=(--resolution 512); rounds=10
fi
window=$(( steps < 20 ? steps : 20 ))  # any window: the threshold never fires
concept=$(ls -d lab/dvar_lab/assets/concepts/*/ | head -1)  # the first concept folder
if [[ $parts == *1* ]]; then
for mp in bf16 fp16 no; do
  for es in off on; do
    flags=(); [ "$es" = on ] && flags=(--early-stop --early-stop-window $window --early-stop-threshold 1e-9 --early-stop-eval-every 1)
    python3 integrations/textual_inversion.py "${model_flags[@]}" "${resolution_flags[@]}" \
      --train_data_dir "$concept" --output_dir /tmp/ti-$mp-$es --overwrite_output_dir --max_train_steps "$steps" \
      --mixed_precision $mp --num_validation_images 0 --checkpointing_steps 100000 \
      --placeholder_token "<c>" --initializer_token object "${flags[@]}" > /tmp/log-$mp-$es.txt 2>&1
    echo "$mp early-stop=$es rc=$?" | tee -a "$out/logs.txt"
    tail -c 1500 /tmp/log-$mp-$es.txt | tr '\r' '\n' | tail -4 >> "$out/logs.txt"
  done
done
python3 - "$out" <<'PY'
import csv, json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
results, lines = {}, ["| precision | median s/step without DVAR | with (every step) | ratio | peak GB without | with | DVAR loss step 1 / last | all finite |", "|---|---|---|---|---|---|---|---|"]
for mp in ("no", "bf16", "fp16"):
    try:
        off = json.loads(pathlib.Path(f"/tmp/ti-{mp}-off/dvar_summary.json").read_text())
        on = json.loads(pathlib.Path(f"/tmp/ti-{mp}-on/dvar_summary.json").read_text())
        losses = [float(r["eval_loss"]) for r in csv.DictReader(open(f"/tmp/ti-{mp}-on/dvar_history.csv"))]
        results[mp] = {"off": off, "on": on, "eval_losses": losses}
        lines.append(f"| {mp} | {off['median_step_s']:.4f} | {on['median_step_s']:.4f} | {on['median_step_s'] / off['median_step_s']:.3f} | "
                     f"{off.get('peak_gpu_memory_gb')} | {on.get('peak_gpu_memory_gb')} | {losses[0]:.5f} / {losses[-1]:.5f} | {all(map(math.isfinite, losses))} |")
    except Exception as error:
        lines.append(f"| {mp} | failed: {error} |")
(out / "results.json").write_text(json.dumps(results, indent=1))
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
fi
# 2. default stride vs every step vs no stopper, interleaved in one run per batch size
if [[ $parts == *2* ]]; then
mp_flags=(--mixed-precision bf16); [ "$model" = mini ] && mp_flags=()
overhead_model=(); [ "$model" != mini ] && overhead_model=(--model /tmp/random-sd15 --resolution 512)
python3 benchmarks/overhead.py --methods textual_inversion --batch-sizes 1 4 --rounds $rounds \
  "${overhead_model[@]}" "${mp_flags[@]}" --json "$out/overhead.json" > "$out/overhead.md" 2>> "$out/logs.txt"
echo "overhead rc=$?" | tee -a "$out/logs.txt"
cat "$out/overhead.md"
fi
# 3. the other trainers in fp16 / bf16 (trainable weights stay fp32, frozen ones in the compute dtype)
if [[ $parts == *3* ]]; then
echo "| method | precision | rc | outcome | median s/step | peak GB |" > "$out/trainers.md"
echo "|---|---|---|---|---|---|" >> "$out/trainers.md"
for method in $trainers; do
  prompt="a photo of sks object"; extra=()
  [ $method = custom_diffusion ] && prompt="a photo of <new1> object" && extra=(--modifier_token "<new1>" --initializer_token object)
  for mp in fp16 bf16; do
    [ "$model" = mini ] && [ $mp = fp16 ] && continue  # CPU autocast has no fp16 training path worth timing
    python3 integrations/$method.py "${model_flags[@]}" "${resolution_flags[@]}" --instance_data_dir "$concept" \
      --instance_prompt "$prompt" "${extra[@]}" --output_dir /tmp/$method-$mp --overwrite_output_dir \
      --max_train_steps "$steps" --mixed_precision $mp --num_validation_images 0 --checkpointing_steps 100000 \
      --early-stop --early-stop-window $window --early-stop-threshold 1e-9 > /tmp/log-$method-$mp.txt 2>&1
    rc=$?
    echo "$method $mp rc=$rc" >> "$out/logs.txt"
    tail -c 1500 /tmp/log-$method-$mp.txt | tr '\r' '\n' | tail -4 >> "$out/logs.txt"
    python3 - "$method" "$mp" "$rc" >> "$out/trainers.md" <<'PY'
import json, pathlib, sys
method, mp, rc = sys.argv[1:]
try:
    s = json.loads(pathlib.Path(f"/tmp/{method}-{mp}/dvar_summary.json").read_text())
    print(f"| {method} | {mp} | {rc} | {s['outcome']} | {s['median_step_s']:.4f} | {s.get('peak_gpu_memory_gb')} |")
except Exception as error:
    print(f"| {method} | {mp} | {rc} | failed: {error} | | |")
PY
  done
done
cat "$out/trainers.md"
fi
# 4. the timed stride (eval_every="5%") and the auto rule on CUDA
if [[ $parts == *4* ]]; then
mp=bf16; [ "$model" = mini ] && mp=no
stride_steps=$(( steps * 3 ))  # the timed stride spends its first 11 steps probing
for mode in off 5% auto; do
  flags=(); [ "$mode" != off ] && flags=(--early-stop --early-stop-window $window --early-stop-threshold 1e-9 --early-stop-eval-every $mode)
  python3 integrations/textual_inversion.py "${model_flags[@]}" "${resolution_flags[@]}" \
    --train_data_dir "$concept" --output_dir "/tmp/stride-${mode%\%}" --overwrite_output_dir --max_train_steps $stride_steps \
    --mixed_precision $mp --num_validation_images 0 --checkpointing_steps 100000 \
    --placeholder_token "<c>" --initializer_token object "${flags[@]}" > "/tmp/log-stride-${mode%\%}.txt" 2>&1
  echo "stride $mode rc=$?" | tee -a "$out/logs.txt"
  tail -c 1500 "/tmp/log-stride-${mode%\%}.txt" | tr '\r' '\n' | tail -4 >> "$out/logs.txt"
done
python3 integrations/dreambooth_lora.py "${model_flags[@]}" "${resolution_flags[@]}" --instance_data_dir "$concept" \
  --instance_prompt "a photo of sks object" --output_dir /tmp/lora-auto --overwrite_output_dir \
  --max_train_steps $stride_steps --mixed_precision $mp --num_validation_images 0 --checkpointing_steps 100000 \
  --early-stop --early-stop-preset auto > /tmp/log-lora-auto.txt 2>&1
echo "lora preset auto rc=$?" | tee -a "$out/logs.txt"
tail -c 1500 /tmp/log-lora-auto.txt | tr '\r' '\n' | tail -4 >> "$out/logs.txt"
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
load = lambda folder: json.loads(pathlib.Path(folder, "dvar_summary.json").read_text())
lines = ["| run | outcome | stop / budget | stride | evaluations | mean s/step | ratio to without | timing probe |", "|---|---|---|---|---|---|---|---|"]
try:
    base = load("/tmp/stride-off")["mean_step_s"]
except Exception as error:
    base = None
    lines.append(f"| TI without DVAR | failed: {error} |")
for name, folder in [("TI without DVAR", "/tmp/stride-off"), ("TI eval_every 5%", "/tmp/stride-5"),
                     ("TI eval_every auto", "/tmp/stride-auto"), ("LoRA preset auto", "/tmp/lora-auto")]:
    try:
        s = load(folder)
        ratio = f"{s['mean_step_s'] / base:.3f}" if base and "TI" in name else ""
        lines.append(f"| {name} | {s['outcome']} | {s['final_step']} / {s['max_train_steps']} | {s.get('eval_every', '')} | "
                     f"{s.get('num_evaluations', '')} | {s['mean_step_s']:.4f} | {ratio} | {s.get('eval_every_timing', '')} |")
        if s.get("reason"):
            lines.append(f"| | reason: {s['reason']} | | | | | | |")
    except Exception as error:
        if folder != "/tmp/stride-off":
            lines.append(f"| {name} | failed: {error} |")
(out / "stride.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
fi

#!/usr/bin/env bash
# CUDA check of the real trainer path: Textual Inversion on a randomly initialised
# SD-1.5-shaped pipeline at 512px, fp32 / bf16 / fp16 (accelerate mixed precision),
# each without and with DVAR: step time, peak GPU memory, finite DVAR losses.
#   bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
python3 benchmarks/make_random_sd.py /tmp/random-sd15 || exit 1
for mp in bf16 fp16 no; do
  for es in off on; do
    flags=""; [ "$es" = on ] && flags="--early-stop --early-stop-window 20 --early-stop-threshold 1e-9"
    python3 integrations/textual_inversion.py --pretrained_model_name_or_path /tmp/random-sd15 \
      --train_data_dir dvar/assets/concepts/$(ls dvar/assets/concepts | head -1) --resolution 512 \
      --output_dir /tmp/ti-$mp-$es --max_train_steps 30 --mixed_precision $mp --num_validation_images 0 \
      --num_inference_steps 10 --checkpointing_steps 1000 --placeholder_token "<c>" --initializer_token object $flags \
      > "$out/log-$mp-$es.txt" 2>&1
    echo "$mp early-stop=$es rc=$?"
    cp /tmp/ti-$mp-$es/dvar_summary.json "$out/summary-$mp-$es.json" 2>/dev/null
    [ "$es" = on ] && cp /tmp/ti-$mp-$es/dvar_history.csv "$out/history-$mp.csv" 2>/dev/null
  done
done
python3 - "$out" <<'PY'
import json, sys, csv, math, pathlib
out = pathlib.Path(sys.argv[1])
print("| precision | median s/step without DVAR | s/step with | ratio | peak GB without | peak GB with | DVAR loss first/last | all finite |")
print("|---|---|---|---|---|---|---|---|")
for mp in ("no", "bf16", "fp16"):
    try:
        off = json.loads((out / f"summary-{mp}-off.json").read_text()); on = json.loads((out / f"summary-{mp}-on.json").read_text())
        rows = list(csv.DictReader(open(out / f"history-{mp}.csv")))
        losses = [float(r["eval_loss"]) for r in rows]
        print(f"| {mp} | {off['median_step_s']:.4f} | {on['median_step_s']:.4f} | {on['median_step_s']/off['median_step_s']:.3f} | "
              f"{off.get('peak_gpu_memory_gb')} | {on.get('peak_gpu_memory_gb')} | {losses[0]:.5f}/{losses[-1]:.5f} | {all(map(math.isfinite, losses))} |")
    except Exception as error:
        print(f"| {mp} | failed: {error} |")
PY

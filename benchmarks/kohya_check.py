"""Helpers of benchmarks/kohya_check.sh (the check of dvar.integrations.kohya on a real sd-scripts checkout).

    python benchmarks/kohya_check.py versions SD_SCRIPTS     # what the figures were measured with
    python benchmarks/kohya_check.py data OUT               # mini-SD photos and tokenizer folder in kohya's layout
    python benchmarks/kohya_check.py hooks SD_SCRIPTS        # the mixin attaches to every supported trainer class
    python benchmarks/kohya_check.py compare EARLY PLAIN     # bitwise-equal LoRAs, kohya's ss_steps/ss_epoch
    python benchmarks/kohya_check.py idle-epochs EARLY LOG   # after the stop, one line instead of kohya's epoch lines
    python benchmarks/kohya_check.py load-kohya SD_SCRIPTS LORA   # kohya's networks.lora loads it onto mini-SD
    python benchmarks/kohya_check.py load-diffusers LORA     # diffusers' load_lora_weights loads it (needs peft)
    python benchmarks/kohya_check.py resume EARLY RESUMED STEP    # --resume from the state of STEP: history, ss_steps
    python benchmarks/kohya_check.py diverged OUT RC         # a NaN run: exit 3, outcome diverged, no NaN weights

Each prints one JSON line and exits non-zero when its check fails.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

CONCEPT = "purple_solid_heart"  # the first DreamBooth concept bundled with dvar
REPEATS = 5  # kohya's <repeats>_<class tokens> folder: 5 photos x 5 = 25 steps per epoch at batch 1
PROMPT = "a photo of a large sks heart on the left, on a blue background"


def versions(sd_scripts: str) -> dict:
    """The versions the recorded figures come from (the stop step moves with the torch build)."""
    import importlib.metadata
    import platform
    import subprocess

    def version(name: str):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "-C", sd_scripts, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch

    return {"sd_scripts_commit": commit or None, "python": platform.python_version(), "machine": platform.machine(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),  # the build: +cpu, +cu130, ...
            **{name: version(name) for name in ("torchvision", "diffusers", "transformers", "accelerate",
                                                "safetensors", "huggingface-hub", "peft", "numpy", "dvar")}}


def data(out: str) -> dict:
    from dvar.models import mini_sd
    from dvar_lab.world import concept_dir
    from dvar_lab.world.concepts import metadata_path

    root = Path(out)
    folder = root / "img" / f"{REPEATS}_sks heart"
    folder.mkdir(parents=True, exist_ok=True)
    concept = json.loads(metadata_path(concept_dir(CONCEPT)).read_text())
    for image in concept["images"]:
        shutil.copy(concept_dir(CONCEPT) / image["file"], folder / image["file"])
        (folder / image["file"]).with_suffix(".txt").write_text(image["prompt"].format("sks heart"))
    # kohya loads its tokenizer by hub name; offline it reads <tokenizer_cache_dir>/openai_clip-vit-large-patch14
    tokenizer = root / "tokenizers" / "openai_clip-vit-large-patch14"
    if not tokenizer.exists():
        shutil.copytree(mini_sd() / "tokenizer", tokenizer)
    return {"train_data_dir": str(root / "img"), "tokenizer_cache_dir": str(root / "tokenizers"),
            "model": str(mini_sd()), "images": len(concept["images"]), "repeats": REPEATS}


def hooks(sd_scripts: str) -> dict:
    import importlib

    from dvar.integrations.kohya import SCRIPTS, check_trainer, make_trainer_class

    sys.path.insert(0, sd_scripts)
    result = {}
    for script, (module, name, family) in SCRIPTS.items():
        base = getattr(importlib.import_module(module), name)
        trainer = make_trainer_class(base, family)()
        result[script] = {"class": type(trainer).__name__, "problems": check_trainer(type(trainer))}
    result["ok"] = all(not entry["problems"] for entry in result.values())
    return result


def _lora(path: str):
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def compare(early: str, plain: str) -> dict:
    import torch

    summary = json.loads((Path(early) / "dvar_summary.json").read_text())
    stop = summary["stop_step"]
    a, meta_a = _lora(str(Path(early) / "lora.safetensors"))
    b, meta_b = _lora(str(Path(plain) / "lora.safetensors"))
    epoch = math.ceil(stop / (REPEATS * 5))
    result = {
        "stop_step": stop,
        "budget": summary["max_train_steps"],
        "reason": summary["reason"],
        "tensors": len(a),
        "bitwise_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "early_ss_steps_epoch": [meta_a.get("ss_steps"), meta_a.get("ss_epoch")],
        "plain_ss_steps_epoch": [meta_b.get("ss_steps"), meta_b.get("ss_epoch")],
        "expected_ss_steps_epoch": [str(stop), str(epoch)],
        "early_ss_max_train_steps": meta_a.get("ss_max_train_steps"),
    }
    result["ok"] = (
        summary["outcome"] == "early_stop" and stop < summary["max_train_steps"] and result["bitwise_equal"]
        and result["early_ss_steps_epoch"] == result["plain_ss_steps_epoch"] == result["expected_ss_steps_epoch"]
    )
    return result


def idle_epochs(early: str, log: str) -> dict:
    """kohya prints "epoch N/M" as each epoch starts, and its dataset logs "epoch is incremented": none after
    the stop's epoch, one DVAR line instead."""
    import re

    text = Path(log).read_text()
    stop_epoch = json.loads((Path(early) / "dvar_summary.json").read_text())["stop_epoch"]
    started = [int(n) for n in re.findall(r"^epoch (\d+)/\d+$", text, flags=re.M)]
    total = int(re.search(r"^epoch \d+/(\d+)$", text, flags=re.M).group(1))
    idle_lines = text.count(f"DVAR: the epochs after epoch {stop_epoch} are idle")
    incremented = text.count("epoch is incremented")  # kohya's dataset, once per epoch started
    result = {"stop_epoch": stop_epoch, "epochs_in_budget": total, "epoch_lines": len(started),
              "epoch_is_incremented_records": incremented, "dvar_idle_lines": idle_lines}
    result["ok"] = (started == list(range(1, stop_epoch + 1)) and incremented == stop_epoch and idle_lines == 1
                    and total > stop_epoch)
    return result


def resume(early: str, resumed: str, state_step: str) -> dict:
    """A run resumed from the state of step STEP (past the first epoch, where kohya's global_step restarts
    lower): the history up to STEP restored, and ss_steps/ss_epoch of its LoRA are the steps it trained."""
    a, b = (json.loads((Path(run) / "dvar_summary.json").read_text()) for run in (early, resumed))
    rows = lambda run: (Path(run) / "dvar_history.csv").read_text().splitlines()[1 : int(state_step) + 1]
    _, meta = _lora(str(Path(resumed) / "lora.safetensors"))
    stop = b["stop_step"]
    result = {"state_step": int(state_step), "stop_step": stop, "uninterrupted_stop_step": a["stop_step"],
              "outcome": b["outcome"], "history_restored": rows(early) == rows(resumed),
              "ss_steps_epoch": [meta.get("ss_steps"), meta.get("ss_epoch")],
              "expected_ss_steps_epoch": [str(stop), str(math.ceil(stop / (REPEATS * 5)))],
              "kohya_global_step_at_stop": b["kohya_global_step_at_stop"]}
    result["ok"] = (b["outcome"] == "early_stop" and result["history_restored"]
                    and result["ss_steps_epoch"] == result["expected_ss_steps_epoch"])
    return result


def diverged(out: str, rc: str) -> dict:
    """A run that diverges (NaN/inf) with --early_stop: exit 3, outcome "diverged", and no NaN weights
    saved: either no model, or the weights of the last finite evaluation with that step in ss_steps."""
    import torch

    summary = json.loads((Path(out) / "dvar_summary.json").read_text())
    model = Path(out) / "lora.safetensors"
    result = {"exit_code": int(rc), "outcome": summary["outcome"], "stop_step": summary["stop_step"],
              "reason": summary["reason"], "model_step": summary["model_step"], "model_file": summary["model_file"]}
    finite = True
    if model.is_file():
        weights, meta = _lora(str(model))
        finite = all(bool(torch.isfinite(w).all()) for w in weights.values())
        result.update(model_finite=finite, ss_steps=meta.get("ss_steps"),
                      largest_weight=max(float(w.abs().max()) for w in weights.values()))
    consistent = (summary["model_file"] is None) if summary["model_step"] is None else (
        model.is_file() and result.get("ss_steps") == str(summary["model_step"]))
    result["ok"] = int(rc) == 3 and summary["outcome"] == "diverged" and finite and consistent
    return result


def load_kohya(sd_scripts: str, lora: str) -> dict:
    """kohya's own loader: every LoRA module of the file found in mini-SD (text encoder and UNet)."""
    import argparse

    import torch

    sys.path.insert(0, sd_scripts)
    from networks import lora as kohya_lora  # kohya's

    from dvar.integrations.kohya.diffusers_model import load_as_is
    from dvar.models import mini_sd

    args = argparse.Namespace(pretrained_model_name_or_path=str(mini_sd()), vae=None, xformers=False, v2=False,
                              v_parameterization=False)
    holder = argparse.Namespace()
    _, text_encoder, vae, unet = load_as_is(holder, args, torch.float32, None)
    network, weights = kohya_lora.create_network_from_weights(1.0, lora, vae, text_encoder, unet, for_inference=True)
    network.apply_to(text_encoder, unet)
    info = network.load_state_dict(weights, strict=False)
    ids = torch.zeros(1, 77, dtype=torch.long)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_lora = unet(latents, torch.tensor([500]), text_encoder(ids)[0]).sample
        network.set_multiplier(0.0)
        without = unet(latents, torch.tensor([500]), text_encoder(ids)[0]).sample
    result = {"modules": len(network.text_encoder_loras) + len(network.unet_loras),
              "missing_keys": len(info.missing_keys), "unexpected_keys": len(info.unexpected_keys),
              "mean_abs_change_of_unet_output": float((with_lora - without).abs().mean())}
    result["ok"] = not info.missing_keys and not info.unexpected_keys and result["mean_abs_change_of_unet_output"] > 0
    return result


def load_diffusers(lora: str) -> dict:
    """diffusers' own loader (kohya's format is converted by load_lora_weights), on the mini-SD pipeline."""
    import diffusers
    import torch

    from dvar_lab.models import load_mini_sd_pipeline

    pipe = load_mini_sd_pipeline(scheduler="ddim")
    generate = lambda: pipe(PROMPT, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                            output_type="np").images
    before = generate()
    # by folder and file name: a bare file path makes diffusers 0.32 ask the Hub (refused offline)
    pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)
    after = generate()
    layers = {name: sum(1 for n, _ in getattr(pipe, name).named_modules() if n.endswith("lora_A.default_0"))
              for name in ("unet", "text_encoder")}
    result = {"diffusers": diffusers.__version__, "lora_layers": layers,
              "mean_abs_change_of_image": float(abs(after - before).mean())}
    result["ok"] = all(layers.values()) and result["mean_abs_change_of_image"] > 0
    return result


COMMANDS = {"versions": versions, "data": data, "hooks": hooks, "compare": compare, "idle-epochs": idle_epochs,
            "load-kohya": load_kohya, "load-diffusers": load_diffusers, "resume": resume, "diverged": diverged}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    outcome = COMMANDS[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(outcome))
    raise SystemExit(0 if outcome.get("ok", True) else 1)

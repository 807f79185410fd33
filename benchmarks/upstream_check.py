"""The hand check of the upstream-script guide, in one command: diffusers' own example scripts,
patched by ``docs/diffusers-scripts.md`` (``check_guide.py --write``), run for real.

    python benchmarks/upstream_check.py PATH_TO_DIFFUSERS [--work /tmp/dvar-upstream-check]

* textual_inversion.py on the bundled mini-SD, with a bundled concept folder as
  ``--train_data_dir`` (600 steps, the ``textual_inversion`` preset);
* train_dreambooth_lora_flux.py on the bundled mini-flow (when ``dvar-lab`` has its weights), 64x64 with
  its 32 T5 tokens, a bundled DreamBooth concept (400 steps, lr 1e-3, window 100, threshold 0.15);
* train_dreambooth_lora_sdxl.py and train_dreambooth_lora_flux.py on tiny randomly initialised
  SDXL and Flux pipelines saved to disk (``dvar_lab.tiny``; 40 steps, window 5, threshold 0.2),
  plus, for each: the unmodified script against the patched one with a threshold that cannot
  fire (LoRA weights must be bit-identical), a run resumed from ``checkpoint-8`` (its first
  8 history rows must be the uninterrupted run's), and a run at ``--learning_rate 1e6`` that
  diverges (it must exit non-zero with the divergence message and save no LoRA).

Each stopping run must print the stop line, write ``dvar_history.csv`` (stop row) and
``dvar_summary.json``, and finish the script (the SDXL/Flux scripts reload their LoRA with
``pipeline.load_lora_weights`` at the end). The scripts import torchvision: install it as a pair
that matches torch (checked: ``pip install torch==2.14.1 torchvision==0.29.1``). Exit 1 on any
failed check, 2 when torchvision is missing. About 7 minutes on 2 quiet CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import check_guide  # noqa: E402

#: a torch/torchvision pair with which every check here passed (x86_64, CPU, PyPI)
WORKING_PAIR = "torch==2.14.1 torchvision==0.29.1"
#: the C ops whose schemas torchvision's import registers fake kernels for
TORCHVISION_OPS = ("nms", "qnms")


def make_torchvision_importable() -> str:
    """Import torchvision; return how it went.

    With a torchvision built for this torch (``WORKING_PAIR``) the import just works: ``"matching"``.
    A torchvision built for another torch cannot load its C ops, and its import then fails with
    "operator torchvision::nms does not exist". The scripts use only ``torchvision.transforms`` (pure
    Python), so in that case, and only then, define the missing op schemas and import again:
    ``"schemas defined"``. The ops are looked up, never loaded from the library file by hand: loading
    it a second time is what registers an operator twice.
    """
    import importlib

    import torch

    try:
        importlib.import_module("torchvision")
        return "matching"
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    missing = []
    for op in TORCHVISION_OPS:
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            missing.append(op)
    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in missing:
        library.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    make_torchvision_importable.library = library  # keep the definitions alive
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left its submodules behind
    importlib.import_module("torchvision")
    return f"schemas defined ({', '.join(missing)}): this torchvision does not match torch; use {WORKING_PAIR}"


def save_tiny_pipelines(work: Path) -> Dict[str, Path]:
    from dvar_lab.tiny import save_tiny_pipeline

    paths = {"sdxl": work / "tiny-sdxl", "flux": work / "tiny-flux"}
    for kind, path in paths.items():
        if not path.exists():
            save_tiny_pipeline(kind, path)
    return paths


def run(script: Path, args: Sequence[str], out: Path, expect_failure: bool = False) -> str:
    """Run one script in a subprocess; its log (stdout + stderr) is also written beside ``out``.

    A non-zero exit ends the check, unless ``expect_failure``, where a zero exit does."""
    if out.exists() and "--resume_from_checkpoint" not in args:
        shutil.rmtree(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    command = [sys.executable, __file__, "--exec", str(script), *args, "--output_dir", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    log = done.stdout + done.stderr
    (out.parent / f"{out.name}.log").write_text(log)
    if (done.returncode != 0) != expect_failure:
        expected = "a failure" if expect_failure else "success"
        raise SystemExit(f"{script.name} exited {done.returncode}, expected {expected}; the end of its log:\n{log[-3000:]}")
    return log


def stop_lines(log: str) -> List[str]:
    return [line.split(" - dvar.callback - ")[1] for line in log.replace("\r", "\n").splitlines() if " - dvar.callback - " in line]


def history(out: Path) -> List[dict]:
    with open(out / "dvar_history.csv") as handle:
        return list(csv.DictReader(handle))


def check_stop(name: str, out: Path, log: str, failures: List[str]) -> dict:
    summary = json.loads((out / "dvar_summary.json").read_text())
    rows = history(out)
    ok = (
        stop_lines(log) == [summary["message"]] and summary["stopped_early"]
        and rows[-1]["stop_reason"] == summary["reason"] and int(rows[-1]["step"]) == summary["stop_step"]
    )
    print(f"{'OK  ' if ok else 'FAIL'} {name}: {summary['message']}")
    if not ok:
        failures.append(f"{name}: stop line, history and summary disagree (see {out})")
    return summary


def mini_flow_or_none() -> Path | None:
    """The bundled mini-flow's folder, or None when this ``dvar-lab`` has no mini-flow weights."""
    try:
        from dvar.models import mini_flow

        return Path(mini_flow())
    except (ImportError, FileNotFoundError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("diffusers", type=Path, help="a diffusers checkout (the folder holding examples/)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dvar-upstream-check"))
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if check_guide.check(args.diffusers, write=work / "patched"):
        return 1
    for script in ("train_dreambooth_lora_sdxl.py", "train_dreambooth_lora_flux.py"):
        target = work / "unpatched" / "examples" / "dreambooth" / script
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.diffusers / "examples" / "dreambooth" / script, target)
    try:
        print(f"torchvision: {make_torchvision_importable()}")
    except ImportError:
        print(f"error: the scripts import torchvision; install a pair that matches torch: pip install {WORKING_PAIR}",
              file=sys.stderr)
        return 2
    from dvar.models import mini_sd
    from dvar_lab.world import list_concepts

    patched = work / "patched" / "examples"
    failures: List[str] = []

    ti = list_concepts("textual_inversion")[0]
    out = work / "ti"
    log = run(patched / "textual_inversion" / "textual_inversion.py", [
        "--pretrained_model_name_or_path", str(mini_sd()), "--train_data_dir", str(ti.path), "--learnable_property",
        "object", "--placeholder_token", "<sks>", "--initializer_token", ti.class_word, "--resolution", "64",
        "--train_batch_size", "1", "--max_train_steps", "600", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--seed", "0",
    ], out)
    check_stop(f"textual_inversion.py, mini-SD, {ti.name}", out, log, failures)

    db = list_concepts("dreambooth")[0]
    flow = mini_flow_or_none()
    if flow is None:
        print("SKIP train_dreambooth_lora_flux.py on mini-flow: dvar-lab has no mini-flow weights")
    else:
        out = work / "flux-mini-flow"
        log = run(patched / "dreambooth" / "train_dreambooth_lora_flux.py", [
            "--pretrained_model_name_or_path", str(flow), "--instance_data_dir", str(db.path),
            "--instance_prompt", f"a photo of sks {db.class_word}", "--resolution", "64", "--max_sequence_length", "32",
            "--train_batch_size", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
            "--max_train_steps", "400", "--checkpointing_steps", "1000", "--dvar_window", "100",
            "--dvar_threshold", "0.15",
        ], out)
        check_stop(f"train_dreambooth_lora_flux.py, mini-flow, {db.name}", out, log, failures)

    pipelines = save_tiny_pipelines(work)
    for kind in ("sdxl", "flux"):
        script = patched / "dreambooth" / f"train_dreambooth_lora_{kind}.py"
        common = [
            "--pretrained_model_name_or_path", str(pipelines[kind]), "--instance_data_dir", str(db.path),
            "--instance_prompt", f"a photo of sks {db.class_word}", "--resolution", "16", "--train_batch_size", "1",
            "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "tensorboard",
        ]
        out = work / kind
        log = run(script, [*common, "--max_train_steps", "40", "--checkpointing_steps", "4", "--dvar_window", "5",
                           "--dvar_threshold", "0.2"], out)
        full = check_stop(f"train_dreambooth_lora_{kind}.py, tiny {kind}", out, log, failures)

        resumed = work / f"{kind}-resumed"
        if resumed.exists():
            shutil.rmtree(resumed)
        resumed.mkdir()
        shutil.copytree(out / "checkpoint-8", resumed / "checkpoint-8")
        run(script, [*common, "--max_train_steps", "40", "--checkpointing_steps", "4", "--dvar_window", "5",
                     "--dvar_threshold", "0.2", "--resume_from_checkpoint", "checkpoint-8"], resumed)
        same = [r["eval_loss"] for r in history(resumed)[:8]] == [r["eval_loss"] for r in history(out)[:8]]
        stop = json.loads((resumed / "dvar_summary.json").read_text())["stop_step"]
        print(f"{'OK  ' if same else 'FAIL'} {kind} resumed from checkpoint-8: history rows 1-8 "
              f"{'identical' if same else 'differ'}; stopped at {stop} (uninterrupted: {full['stop_step']})")
        if not same:
            failures.append(f"{kind}: the resumed run's first 8 history rows differ")

        diverged = work / f"{kind}-diverged"
        log = run(script, [*common, "--max_train_steps", "40", "--checkpointing_steps", "100", "--dvar_window", "5",
                           "--dvar_threshold", "0.2", "--learning_rate", "1e6"], diverged, expect_failure=True)
        said = [line for line in stop_lines(log) if "because it diverged" in line]
        saved = (diverged / "pytorch_lora_weights.safetensors").exists()
        ok = bool(said) and not saved
        print(f"{'OK  ' if ok else 'FAIL'} {kind} at --learning_rate 1e6: exit non-zero, "
              f"{said[0] if said else 'no divergence line'}; LoRA {'SAVED' if saved else 'not saved'}")
        if not ok:
            failures.append(f"{kind}: a diverged run must say so and save no LoRA (see {diverged}.log)")

        from safetensors.torch import load_file

        short = [*common, "--max_train_steps", "12", "--checkpointing_steps", "100", "--random_flip"]
        run(work / "unpatched" / "examples" / "dreambooth" / script.name, short, work / f"{kind}-plain")
        run(script, [*short, "--dvar_window", "5", "--dvar_threshold", "1e-9"], work / f"{kind}-attached")
        plain = load_file(str(work / f"{kind}-plain" / "pytorch_lora_weights.safetensors"))
        attached = load_file(str(work / f"{kind}-attached" / "pytorch_lora_weights.safetensors"))
        equal = sorted(plain) == sorted(attached) and all((plain[k] == attached[k]).all() for k in plain)
        print(f"{'OK  ' if equal else 'FAIL'} {kind}: 12 steps with and without the guide's lines: {len(plain)} LoRA "
              f"tensors {'bit-identical' if equal else 'DIFFER'}")
        if not equal:
            failures.append(f"{kind}: attaching the stopper changed the LoRA weights")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--exec"]:  # run one script (the subprocesses above)
        make_torchvision_importable()
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        sys.exit(main())

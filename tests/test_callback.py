"""The callback in real training loops: stops early, resumes, agrees across processes."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dvar import DVARConfig, DVAREarlyStopping
from dvar_lab import demo


def run(tmp_path, name, *flags):
    return demo.main(["--output_dir", str(tmp_path / name), *flags])


def test_short_training_loop_stops_early_and_writes_its_history(tmp_path):
    result = run(tmp_path, "run", "--early_stop", "--max_train_steps", "200")
    assert result["stop_step"] == result["global_step"]
    assert 15 <= result["stop_step"] < 200
    assert result["reason"].startswith("plateau: var(last 15)")
    with open(tmp_path / "run" / "dvar_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, result["stop_step"] + 1))
    assert float(rows[-1]["normalized_variance"]) < 0.3 <= float(rows[-2]["normalized_variance"])
    assert math.isnan(float(rows[0]["normalized_variance"])) and not math.isnan(float(rows[0]["train_loss"]))
    assert (tmp_path / "run" / "dvar_history.png").stat().st_size > 10_000


def test_same_seed_same_stop_step(tmp_path):
    first = run(tmp_path, "a", "--early_stop")
    second = run(tmp_path, "b", "--early_stop")
    assert first["stop_step"] == second["stop_step"] and first["eval_losses"] == second["eval_losses"]


def test_attaching_the_stopper_does_not_change_training(tmp_path):
    plain = run(tmp_path, "plain", "--max_train_steps", "25")
    attached = run(tmp_path, "attached", "--max_train_steps", "25", "--attach_only")
    assert attached["stop_step"] is None and len(attached["eval_losses"]) == 25
    assert attached["checksum"] == plain["checksum"]
    weights_plain = torch.load(tmp_path / "plain" / "unet_rank0.pt")
    weights_attached = torch.load(tmp_path / "attached" / "unet_rank0.pt")
    assert all(torch.equal(weights_plain[k], weights_attached[k]) for k in weights_plain)


def test_resume_from_accelerate_checkpoint_stops_at_the_same_step(tmp_path):
    # No random flips: accelerate's dataloader fetches one batch ahead, so a dataset that draws
    # from the global RNG has already advanced it when the checkpoint is saved.
    uninterrupted = run(tmp_path, "full", "--early_stop", "--no_flip")
    interrupted = run(tmp_path, "resumed", "--early_stop", "--no_flip", "--checkpointing_steps", "7", "--interrupt_at_step", "8")
    assert interrupted["stop_step"] is None and interrupted["global_step"] == 8
    resumed = run(tmp_path, "resumed", "--early_stop", "--no_flip", "--resume_from_checkpoint", "latest")
    assert resumed["stop_step"] == uninterrupted["stop_step"]
    assert resumed["eval_losses"] == uninterrupted["eval_losses"]


@pytest.mark.parametrize("eval_every", [2, 5])
def test_eval_every_keeps_the_window_in_optimizer_steps(tmp_path, eval_every):
    result = run(tmp_path, f"every{eval_every}", "--early_stop", "--eval_every", str(eval_every), "--window", "20")
    assert result["stop_step"] % eval_every == 0 and result["stop_step"] >= 20
    assert len(result["eval_losses"]) == result["stop_step"] // eval_every
    assert f"var(last {math.ceil(20 / eval_every)})" in result["reason"]


def test_two_processes_stop_together(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        demo.__file__, "--output_dir", str(tmp_path / "ddp"), "--early_stop",
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads((tmp_path / "ddp" / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["stop_step"] == results[1]["stop_step"] == results[0]["global_step"] == results[1]["global_step"]
    assert results[0]["eval_losses"] == results[1]["eval_losses"]
    # the batch was split over the ranks but the value is the single-process one
    single = run(tmp_path, "single", "--early_stop")
    assert results[0]["initial_eval_loss"] == pytest.approx(single["initial_eval_loss"], rel=1e-6)


def test_logs_to_accelerate_trackers(toy_dataset):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory, main_process_only = "recorder", False, True

        def __init__(self):
            super().__init__()
            self.logged = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    recorder = Recorder()
    accelerator = Accelerator(log_with=[recorder])
    accelerator.init_trackers("dvar-test")
    losses = iter([3.0, 2.0, 1.5])
    stopper = DVAREarlyStopping(
        objective=lambda models, batch: torch.tensor(next(losses)), train_dataset=toy_dataset,
        accelerator=accelerator, window=2, threshold=1e-9,
    )
    for step in (1, 2, 3):
        stopper.step(step, train_loss=torch.tensor(0.5))
    assert [s for s, _ in recorder.logged] == [1, 2, 3]
    assert set(recorder.logged[-1][1]) == {"dvar/eval_loss", "dvar/normalized_variance"}
    assert recorder.logged[-1][1]["dvar/eval_loss"] == stopper.history[-1].eval_loss


def test_nan_loss_stops_with_a_reason(toy_dataset):
    stopper = DVAREarlyStopping(
        objective=lambda models, batch: torch.tensor(float("nan")), train_dataset=toy_dataset, preset="dreambooth_lora",
        eval_every=1,
    )
    assert stopper.step(1) is True
    assert stopper.stop_step == 1 and stopper.reason.startswith("non-finite")


def test_state_dict_from_other_settings_is_refused(toy_dataset):
    def objective(models, batch):
        return batch.pixel_values.mean()

    saved = DVAREarlyStopping(objective=objective, train_dataset=toy_dataset, window=10, threshold=0.2).state_dict()
    other = DVAREarlyStopping(objective=objective, train_dataset=toy_dataset, window=12, threshold=0.2)
    with pytest.raises(ValueError, match="window is 10 but this run uses 12"):
        other.load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "Give DVAR a preset"),
        ({"window": 10}, "Give DVAR a preset"),
        ({"preset": "nope"}, "Unknown DVAR preset"),
        ({"window": 10, "threshold": 0.0}, "threshold must be a finite number > 0"),
        ({"window": 1, "threshold": 0.1}, "window must be an integer >= 2"),
        ({"preset": "textual_inversion", "max_train_steps": 300}, r"window \(310 steps\) is larger than the step budget \(300\)"),
        ({"window": 10, "threshold": 0.1, "eval_every": 0}, "eval_every must be >= 1"),
    ],
)
def test_impossible_settings(toy_dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DVAREarlyStopping(objective=lambda m, b: torch.tensor(1.0), train_dataset=toy_dataset, **kwargs)


def test_config_object_and_keywords_are_exclusive(toy_dataset):
    with pytest.raises(TypeError, match="either config"):
        DVAREarlyStopping(
            objective=lambda m, b: torch.tensor(1.0), train_dataset=toy_dataset,
            config=DVARConfig(preset="custom_diffusion"), window=3,
        )
    stopper = DVAREarlyStopping(
        objective=lambda m, b: torch.tensor(1.0), train_dataset=toy_dataset, config=DVARConfig(preset="custom_diffusion")
    )
    assert (stopper.window, stopper.threshold) == (180, 0.15)

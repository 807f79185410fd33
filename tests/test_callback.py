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
    assert float(rows[-1]["statistic"]) < 0.3 <= float(rows[-2]["statistic"])
    assert math.isnan(float(rows[0]["statistic"])) and not math.isnan(float(rows[0]["train_loss"]))
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
    assert set(recorder.logged[-1][1]) == {"dvar/eval_loss", "dvar/statistic"}
    assert recorder.logged[-1][1]["dvar/eval_loss"] == stopper.history[-1].eval_loss


@pytest.mark.parametrize(
    "eval_losses, train_losses, stop_step, kind, reason_start, last_finite_step",
    [
        # a plateau: the concept is learned, the run succeeded
        ([1.0, 0.5, 0.4, 0.4, 0.4, 0.4], [0.9] * 6, 4, "plateau", "plateau: var(last 3)", 4),
        # the frozen-batch loss diverges: a failure, whatever the rule would have said
        ([1.0, 0.5, float("nan"), 0.4], [0.9] * 4, 3, "non_finite", "non-finite: loss became nan at value 3", 2),
        ([1.0, float("inf")], [0.9] * 2, 2, "non_finite", "non-finite: loss became inf at value 2", 1),
        # the training loss diverges first (checked on evaluation steps)
        ([1.0, 0.5, 0.45], [0.9, float("nan"), 0.9], 2, "non_finite", "non-finite: the training loss became nan", 1),
        # no training loss given: nothing to check there
        ([1.0, 0.9, 0.8], [None] * 3, None, None, None, 3),
    ],
)
def test_a_divergence_is_not_an_early_stop(toy_dataset, eval_losses, train_losses, stop_step, kind, reason_start,
                                           last_finite_step):
    values = iter(eval_losses)
    stopper = DVAREarlyStopping(objective=lambda m, b: torch.tensor(next(values)), train_dataset=toy_dataset,
                                window=3, threshold=0.1, eval_every=1, max_train_steps=10)
    stop = next((step for step, loss in enumerate(train_losses, 1) if stopper.step(step, loss)), None)
    assert stop == stopper.stop_step == stop_step
    assert (stopper.stop_kind.value if stopper.stop_kind else None) == kind
    assert stopper.diverged is (kind == "non_finite")
    assert (stopper.reason or "").startswith(reason_start or "")
    assert stopper.last_finite_step == last_finite_step
    summary = stopper.summary()
    assert summary["diverged"] is stopper.diverged and summary["stop_kind"] == kind
    assert summary["stopped_early"] is (kind == "plateau")
    assert summary["steps_saved"] == (10 - stop_step if kind == "plateau" else 0)
    if kind == "non_finite":
        assert stopper.status_line().startswith(f"DVAR ended training at step {stop_step} of 10 because it diverged")


def test_a_dvar_0_1_checkpoint_resumes(toy_dataset):
    """The callback's state as dvar 0.1 wrote it (``criterion``, rows with ``normalized_variance``) loads, and the
    run continues to the stop the uninterrupted run makes."""
    trace = [1.0, 0.7, 0.5, 0.45, 0.44, 0.43, 0.43, 0.43, 0.43, 0.43]
    make = lambda: DVAREarlyStopping(objective=lambda m, b: torch.tensor(trace[step - 1]), train_dataset=toy_dataset,
                                     window=4, threshold=0.05, eval_every=1)
    straight = make()
    step = 0
    for step in range(1, len(trace) + 1):
        if straight.step(step):
            break
    first = make()
    for step in range(1, 4):
        first.step(step)
    state = first.state_dict()
    inner = state["rule"]["state"]
    legacy = {
        "settings": state["settings"], "eval_batch": state["eval_batch"], "stop_step": None, "reason": None,
        "eval_seconds": 0.0, "stride_timing": None,
        "history": [{"step": r["step"], "eval_loss": r["eval_loss"], "normalized_variance": r["statistic"],
                     "train_loss": r["train_loss"]} for r in state["history"]],
        "criterion": {"window": 4, "threshold": 0.05, **{k: inner[k] for k in ("shift", "all", "recent", "window_values",
                      "slides_since_exact")}, "normalized_variance": inner["statistic"], "stopped": False,
                      "stop_step": None, "reason": None, "last_value": trace[2]},
    }
    resumed = make()
    resumed.load_state_dict(legacy)
    for step in range(4, len(trace) + 1):
        if resumed.step(step):
            break
    assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason) and resumed.stop_step


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
        ({}, "dvar's default rule for an unnamed method .* pass max_train_steps"),
        ({"method": "custom_diffusion"}, "dvar's default rule for custom_diffusion .* pass max_train_steps"),
        ({"window": 10}, "Give DVAR both window and threshold"),
        ({"threshold": 0.1}, "Give DVAR both window and threshold"),
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

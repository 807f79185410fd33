"""Replayable trajectories: each frozen example's loss recorded during a run, and any rule replayed on the record
stops where the live callback stopped (benchmarks/personalization/replay.py, monitors.PerExampleRecorder)."""

import json

import pytest
import torch
from dvar_lab.tiny import ToyConceptDataset, tiny_sd

from benchmarks.personalization import replay
from benchmarks.personalization.monitors import LossWatch
from dvar import DVAREarlyStopping, FixedEvalBatch
from dvar.objectives import DiffusionObjective

BUDGET = 50


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits on a busy machine
    yield tiny_sd(seed=0)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("settings", [{}, {"snr_gamma": 5.0}])
def test_per_example_losses_are_the_objectives_own(tiny, settings):
    models = {"unet": tiny["unet"], "text_encoder": tiny["text_encoder"]}
    batch = FixedEvalBatch(ToyConceptDataset(), vae=tiny["vae"], noise_scheduler=tiny["noise_scheduler"],
                           batch_size=4).next()
    objective = DiffusionObjective(tiny["noise_scheduler"], tokenizer=tiny["tokenizer"], **settings)
    with torch.no_grad():
        out = objective.per_example_losses(models, batch)
        loss = objective(models, batch)
    assert out.losses.shape == (4,) and out.timesteps.tolist() == batch.timesteps.tolist()
    assert out.loss.item() == loss.item(), "the batch loss is the objective's, bit for bit: the stop cannot move"
    assert out.losses.mean().item() == pytest.approx(loss.item(), rel=1e-6)
    assert len(set(out.losses.tolist())) == 4, "one loss per example, not the batch loss repeated"


def _live_run(watches: dict, parts: dict, steps: int = BUDGET) -> None:
    """'Train' by shrinking the UNet's output layer 15% per step: the frozen-batch loss settles like a fast decay
    (to the noise's own power). The weights are put back afterwards."""
    conv = parts["unet"].conv_out.weight
    original = conv.detach().clone()
    try:
        for step in range(1, steps + 1):
            with torch.no_grad():
                conv.mul_(0.85)
            for watch in watches.values():
                if watch.stop_step is None or watch.recorder is not None:
                    watch(step, torch.tensor(0.1))
    finally:
        with torch.no_grad():
            conv.copy_(original)


@pytest.mark.parametrize("rule, settings", [
    ("dvar", {"window": 12, "threshold": 0.2, "eval_every": 1}),
    ("dvar", {"window": 30, "threshold": 0.05, "eval_every": 5}),
    ("auto", {"preset": "auto"}),  # its own default stride: the budget's
])
def test_a_rule_replayed_from_recorded_per_example_losses_stops_where_the_callback_did(tiny, rule, settings):
    common = dict(unet=tiny["unet"], vae=tiny["vae"], text_encoder=tiny["text_encoder"], tokenizer=tiny["tokenizer"],
                  noise_scheduler=tiny["noise_scheduler"], train_dataset=ToyConceptDataset(), max_train_steps=BUDGET,
                  verbose=False)
    watches = {
        # the benchmark's every-step watch, recording each example's loss (its own rule does not matter here)
        "dvar_every1": LossWatch(DVAREarlyStopping(window=BUDGET, threshold=1e-9, eval_every=1, **common),
                                 per_example=True),
        rule: LossWatch(DVAREarlyStopping(**settings, **common)),
    }
    _live_run(watches, tiny)
    live = watches[rule].stop_step
    assert live is not None and live % watches[rule].stopper.eval_every == 0, "the planted decay must settle"
    trace = json.loads(json.dumps({  # what run.py writes, through JSON
        "method": "textual_inversion", "concept": "toy", "max_train_steps": BUDGET, "train_loss": [0.1] * BUDGET,
        "dvar": watches[rule].to_json() if rule == "dvar" else None,
        "dvar_variants": {name: w.to_json() for name, w in watches.items() if name != "dvar"},
    }))
    losses, timesteps = replay.per_example_losses(trace)
    assert losses.shape == (BUDGET, 4) and timesteps.shape == (4,)
    fresh, every = replay.live_rule(trace["dvar"] if rule == "dvar" else trace["dvar_variants"][rule], BUDGET)
    assert replay.replay(fresh, replay.signal(trace, "per_example_mean"), every) == live
    rows = {r["rule"]: r for r in replay.check_live_stops(trace, "per_example_mean")}
    assert rows[rule]["match"] and rows[rule]["live"] == live


@pytest.mark.parametrize("settings, rule, every", [
    ({"preset": "textual_inversion"}, "DVARCriterion", 10),
    ({"preset": "dreambooth_lora"}, "DVARCriterion", 14),
    ({"preset": "custom_diffusion"}, "DVARCriterion", 6),
    ({"preset": "auto"}, "SettlingTimeCriterion", 5),  # 500 // 100
    ({"window": 100, "threshold": 0.1, "eval_every": 1}, "DVARCriterion", 1),
])
def test_rules_are_rebuilt_as_the_callback_builds_them(settings, rule, every):
    built, k = replay.rule_from_settings(settings, 500)
    assert (type(built).__name__, k) == (rule, every)


def _trace(stop, values, name="c"):
    return {"method": "dreambooth_lora", "concept": name, "max_train_steps": len(values), "train_loss": values,
            "dvar": {"steps": list(range(1, len(values) + 1)), "eval_loss": values, "eval_every": 1, "window": 4,
                     "threshold": 0.2, "stop_step": stop}}


PLATEAU = [5.0, 4.0, 3.0, 2.0, 1.5, 1.2, 1.1, 1.05, 1.02, 1.01, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("tamper, exit_code", [(lambda stop: stop, 0), (lambda stop: stop + 1, 1), (lambda stop: None, 1)])
def test_the_replay_command_checks_every_live_stop(tmp_path, capsys, tamper, exit_code):
    expected = replay.replay(replay.rule_from_settings({"window": 4, "threshold": 0.2, "eval_every": 1}, 16)[0], PLATEAU)
    assert expected == 7
    (tmp_path / "traces" / "dreambooth_lora").mkdir(parents=True)
    (tmp_path / "traces" / "dreambooth_lora" / "c.json").write_text(json.dumps(_trace(tamper(expected), PLATEAU)))
    assert replay.main([str(tmp_path)]) == exit_code
    out = capsys.readouterr().out
    assert f"dvar: replay gives the live stop on {1 - exit_code} of 1 trajectories" in out
    assert ("MISMATCH" in out) == bool(exit_code)


def test_the_replay_command_replays_other_rules_and_refuses_what_it_cannot(tmp_path, capsys):
    (tmp_path / "traces" / "dreambooth_lora").mkdir(parents=True)
    (tmp_path / "traces" / "dreambooth_lora" / "c.json").write_text(json.dumps(_trace(7, PLATEAU)))
    assert replay.main([str(tmp_path), "--rule", "window=4,threshold=0.2", "--csv", str(tmp_path / "s.csv")]) == 0
    assert "window=4,threshold=0.2: fired on 1 of 1 trajectories, median stop 7" in capsys.readouterr().out
    assert (tmp_path / "s.csv").read_text().splitlines()[1].startswith("dreambooth_lora,c,\"window=4,threshold=0.2\"")
    assert replay.main([str(tmp_path), "--rule", "windw=4"]) == 2
    assert replay.main([str(tmp_path), "--signal", "per_example_mean"]) == 2, "a format-1 trace has no per-example losses"
    assert replay.main([str(tmp_path / "empty")]) == 2
    assert "error:" in capsys.readouterr().err

"""A stop that announces itself: one line (logged at INFO, or printed by report()), the stop
row in the history CSV, and dvar_summary.json next to the history."""

import csv
import json
import logging

import pytest
import torch

from dvar import DVAREarlyStopping
from dvar.reporting import stop_message

LOSSES = [4.0, 3.0, 2.0, 1.9, 1.9, 1.9, 1.9, 1.9]  # window 3, threshold 0.05: stops at step 5


def scripted_stopper(toy_dataset, losses=LOSSES, **kwargs):
    losses = iter(losses)
    settings = dict(window=3, threshold=0.05, max_train_steps=20)
    settings.update(kwargs)
    return DVAREarlyStopping(objective=lambda models, batch: torch.tensor(next(losses)), train_dataset=toy_dataset, **settings)


def run_until_stop(stopper):
    for step in range(1, len(LOSSES) + 1):
        if stopper.step(step, train_loss=torch.tensor(0.5)):
            return step
    return None


@pytest.mark.parametrize(
    "stop_step, budget, reason, expected",
    [
        (346, 600, "plateau", "DVAR stopped training at step 346 of 600 (254 steps, 42% of the budget, saved): plateau"),
        (600, 600, "plateau", "DVAR stopped training at step 600 of 600 (0 steps, 0% of the budget, saved): plateau"),
        (12, None, "non-finite", "DVAR stopped training at step 12: non-finite"),
    ],
)
def test_stop_message(stop_step, budget, reason, expected):
    assert stop_message(stop_step, budget, reason) == expected


def test_the_stop_is_logged_once_at_info_with_step_budget_and_reason(toy_dataset, caplog):
    stopper = scripted_stopper(toy_dataset)
    with caplog.at_level(logging.INFO, logger="dvar"):
        assert run_until_stop(stopper) == 5
        stopper.step(6)  # after the stop: no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "dvar.callback"]
    assert lines == [stop_message(5, 20, stopper.reason)]
    assert lines[0].startswith("DVAR stopped training at step 5 of 20 (15 steps, 75% of the budget, saved): plateau")


def test_verbose_false_logs_nothing_and_report_prints_the_line(toy_dataset, caplog, capsys):
    stopper = scripted_stopper(toy_dataset, verbose=False)
    with caplog.at_level(logging.INFO, logger="dvar"):
        run_until_stop(stopper)
    assert not [r for r in caplog.records if r.name == "dvar.callback"]
    line = stopper.report()
    assert capsys.readouterr().out == line + "\n" and line == stop_message(5, 20, stopper.reason)


def test_report_without_a_stop_says_so(toy_dataset, capsys):
    stopper = scripted_stopper(toy_dataset, losses=[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0])  # no plateau
    assert run_until_stop(stopper) is None
    line = stopper.report()
    assert line.startswith("DVAR did not stop: 8 evaluations, last at step 8, var(last 3) / var(all) = ")
    assert line.endswith("(stops below 0.05)") and capsys.readouterr().out == line + "\n"


def test_save_history_records_the_stop_and_writes_the_summary(toy_dataset, tmp_path):
    stopper = scripted_stopper(toy_dataset)
    run_until_stop(stopper)
    paths = stopper.save_history(tmp_path)
    assert [p.name for p in paths] == ["dvar_history.csv", "dvar_history.png", "dvar_summary.json"]
    with open(tmp_path / "dvar_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stop_reason"] for r in rows] == [""] * 4 + [stopper.reason]
    summary = json.loads((tmp_path / "dvar_summary.json").read_text())
    expected = {"stopped_early": True, "stop_step": 5, "max_train_steps": 20, "steps_saved": 15, "window": 3,
                "num_evaluations": 5, "reason": stopper.reason, "message": stopper.status_line()}
    assert {k: summary[k] for k in expected} == expected


def test_save_history_without_summary(toy_dataset, tmp_path):
    stopper = scripted_stopper(toy_dataset)
    run_until_stop(stopper)
    assert [p.name for p in stopper.save_history(tmp_path, plot=False, summary=False)] == ["dvar_history.csv"]
    assert not (tmp_path / "dvar_summary.json").exists()

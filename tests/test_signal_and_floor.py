"""What the rule watches and when it may stop: ``signal="normalized"`` (the mean of each frozen example's loss
over its own first value), ``signal="bands"`` (that mean within timestep bands, a rule on each, stopping once
all have settled: :class:`dvar.rules.AllSettled`) and ``min_steps`` (a floor under any rule,
:class:`dvar.rules.NotBefore`)."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dvar import DVARConfig, DVAREarlyStopping
from dvar.rules import AllSettled, NotBefore, SettlingTimeCriterion
from dvar.stride import replay_stop_step
from dvar_lab import demo


def decay(tau, n, floor=1.0):
    return floor + np.exp(-np.arange(n) / tau)


def settling(**settings):
    return SettlingTimeCriterion(**{"multiple": 2.0, "level": 0.8, "min_evaluations": 10, **settings})


def feed(rule, values):
    for value in values:
        if rule.update(value):
            break
    return rule


# -- the floor ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, floor, stop, held",
    [
        (decay(10, 300), 0, 40, False),  # tau 10 alone stops at evaluation 40
        (decay(10, 300), 40, 40, False),  # a floor at the stop changes nothing
        (decay(10, 300), 60, 60, True),  # an earlier stop waits for the floor
        (decay(30, 300), 60, 96, False),  # a later stop (3.2 tau) is not moved
        (np.linspace(2.0, 1.0, 300), 60, None, False),  # a loss still falling never stops, floor or not
    ],
)
def test_a_floor_holds_an_early_stop_and_leaves_a_later_one(values, floor, stop, held):
    rule = feed(NotBefore(settling(), floor, f"evaluation {floor}"), values)
    assert rule.stop_step == stop
    if stop is not None:
        assert rule.reason.startswith("settled: the smoothed loss covered 80%") and rule.stop_kind.value == "settled"
        assert ("held until evaluation" in rule.reason) == held


def test_a_divergence_under_the_floor_stops_at_once():
    rule = feed(NotBefore(settling(), 60), [3.0, 2.0, math.nan, 1.0])
    assert (rule.stop_step, rule.diverged) == (3, True) and rule.reason.startswith("non-finite")


@pytest.mark.parametrize("cut", [1, 30, 45, 59, 61, 100])
def test_a_floor_resumes_to_the_same_stop_and_reason(cut):
    values = decay(10, 300)
    straight = feed(NotBefore(settling(), 60), values)
    first = feed(NotBefore(settling(), 60), values[:cut])
    resumed = NotBefore(settling(), 60)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed = feed(resumed, values[cut:]) if not resumed.stopped else resumed
    assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason) == (60, straight.reason)


def test_a_floor_from_other_settings_is_refused():
    saved = NotBefore(settling(), 60).state_dict()
    with pytest.raises(ValueError, match="not_before=60 .this run: 80."):
        NotBefore(settling(), 80).load_state_dict(saved)


@pytest.mark.parametrize("min_steps, every, evaluations", [(200, 5, 40), (201, 5, 41), (0, 5, None), (7, 1, 7)])
def test_min_steps_is_counted_in_evaluations_at_the_stride(min_steps, every, evaluations):
    rule = DVARConfig(preset="auto", max_train_steps=500, min_steps=min_steps).make_rule(every)
    assert (rule.min_evaluations if isinstance(rule, NotBefore) else None) == evaluations


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "auto", "max_train_steps": 100, "min_steps": 101}, r"min_steps \(101\) is past the step budget \(100\)"),
        ({"preset": "auto", "max_train_steps": 100, "min_steps": -1}, "min_steps must be an integer >= 0"),
        ({"preset": "auto", "max_train_steps": 100, "signal": "median"},
         "signal must be 'loss', 'normalized' or 'bands'"),
        ({"preset": "auto", "max_train_steps": 100, "signal": "normalized", "resample": ("noise",)},
         "examples must stay frozen"),
        ({"preset": "auto", "max_train_steps": 100, "signal": "bands", "resample": ("timesteps",)},
         "examples must stay frozen"),
        ({"method": "dreambooth_lora", "max_train_steps": 100, "resample": ("timesteps",)},  # the default's bands
         r"signal='bands' \(dvar's default rule for dreambooth_lora .*\) divides .* must stay frozen"),
        ({"preset": "auto", "max_train_steps": 100, "signal": "bands", "bands": 5},
         r"bands must be an integer from 1 to eval_batch_size \(4\)"),
        ({"preset": "auto", "max_train_steps": 100, "signal": "bands", "bands": 0}, "bands must be an integer"),
        ({"preset": "auto", "max_train_steps": 100, "signal": "bands"},  # no scheduler: no timesteps to band by
         "groups the frozen examples by their timesteps.*use signal='normalized'"),
        ({"preset": "auto", "max_train_steps": 100, "flat_bands": "skip"},
         r"flat_bands='skip' says what a flat timestep band does, but signal='loss' watches no bands"),
        ({"preset": "auto", "max_train_steps": 100, "signal": "bands", "flat_bands": "ignore"},
         "flat_bands must be 'hold' or 'skip'"),
        ({"preset": "auto", "max_train_steps": 100, "level": 1.2}, "settling-time level must be between 0 and 1"),
        ({"preset": "auto", "max_train_steps": 100, "level": 0.4},  # x2 at level 0.4 would stop a straight fall
         r"multiple \* level > 1"),
        ({"preset": "textual_inversion", "max_train_steps": 1000, "level": 0.9},
         "the textual_inversion rule has no level: leave it out"),
    ],
)
def test_impossible_signal_and_floor_settings(toy_dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DVAREarlyStopping(objective=PlantedExamples([decay(10, 10)]), train_dataset=toy_dataset, **kwargs)


def test_the_normalized_signal_needs_per_example_losses(toy_dataset):
    with pytest.raises(ValueError, match="has no per_example_losses"):
        DVAREarlyStopping(objective=lambda models, batch: torch.tensor(1.0), train_dataset=toy_dataset,
                          preset="auto", max_train_steps=100, signal="normalized")


# -- the normalized signal ----------------------------------------------------------------------------------


class PlantedExamples:
    """An objective whose frozen example i has the loss ``curves[i][step - 1]`` (the step set by the test)."""

    def __init__(self, curves):
        self.curves, self.step = [np.asarray(c, dtype=np.float64) for c in curves], 1

    def per_example_losses(self, models, batch):
        losses = torch.tensor([self.curves[i][self.step - 1] for i in range(len(batch))], dtype=torch.float64)
        return SimpleNamespace(losses=losses, loss=losses.mean())

    def __call__(self, models, batch):
        return self.per_example_losses(models, batch).loss


def planted_stopper(toy_dataset, curves, **settings):
    """The settling-time callback on ``PlantedExamples(curves)``, evaluating every step up to the curves' end."""
    settings = {"preset": "auto", "eval_every": 1, "max_train_steps": len(curves[0]), "eval_batch_size": len(curves),
                **settings}
    return DVAREarlyStopping(objective=PlantedExamples(curves), train_dataset=toy_dataset, **settings)


def run(stopper, first_step=1, last_step=None):
    """Step ``stopper`` from ``first_step`` until it stops or reaches ``last_step`` (default: the budget)."""
    for stopper.objective.step in range(first_step, (last_step or stopper.config.max_train_steps) + 1):
        if stopper.step(stopper.objective.step):
            break
    return stopper


# A low-noise example with a large loss that settles fast (tau 10), and three high-noise ones with small losses
# that settle slowly (tau 60): the batch mean follows the first, the normalized mean weighs all four alike.
CURVES = [10 * decay(10, 600), *(0.05 * decay(60, 600) for _ in range(3))]


@pytest.mark.parametrize("signal", ["loss", "normalized"])
def test_the_callback_feeds_its_rule_the_chosen_signal(toy_dataset, signal):
    stopper = run(planted_stopper(toy_dataset, CURVES, signal=signal))
    stack = np.stack(CURVES, axis=1)
    values = stack.mean(axis=1) if signal == "loss" else (stack / stack[0]).mean(axis=1)
    assert stopper.stop_step == replay_stop_step(settling(min_evaluations=20), list(values), 1) is not None
    assert [row.signal for row in stopper.history] == pytest.approx(values[:stopper.stop_step].tolist(), rel=1e-12)
    assert [row.eval_loss for row in stopper.history] == pytest.approx(stack.mean(axis=1)[:stopper.stop_step].tolist())
    assert ("normalized loss" in stopper.reason) == (signal == "normalized")


def test_the_normalized_signal_waits_for_the_slow_small_examples(toy_dataset):
    stops = {signal: run(planted_stopper(toy_dataset, CURVES, signal=signal)).stop_step
             for signal in ("loss", "normalized")}
    assert stops["loss"] < 50 and stops["normalized"] > 2 * 60  # past twice the slow examples' tau


@pytest.mark.parametrize("tau", [40, 150, 600])
def test_planted_decays_stop_at_a_similar_multiple_of_tau_whatever_each_examples_scale(toy_dataset, tau):
    # four examples decaying with the same tau, their losses 1000x apart: the normalized signal is the same decay
    curves = [scale * decay(tau, 8 * tau) for scale in (10.0, 1.0, 0.1, 0.01)]
    stopper = run(planted_stopper(toy_dataset, curves, signal="normalized"))
    assert stopper.stop_step is not None and 2.7 <= stopper.stop_step / tau <= 3.3


def test_a_steadily_falling_normalized_loss_never_stops(toy_dataset):
    curves = [scale * np.linspace(2.0, 1.0, 3000) for scale in (10.0, 0.01)]
    stopper = run(planted_stopper(toy_dataset, curves, signal="normalized"))
    assert stopper.stop_step is None and len(stopper.history) == 3000


@pytest.mark.parametrize("cut", [1, 25, 90])
def test_the_reference_losses_resume_with_the_run(toy_dataset, cut):
    def make():
        return planted_stopper(toy_dataset, CURVES, signal="normalized", min_steps=250)

    straight = run(make())
    first = run(make(), last_step=cut)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    resumed = run(resumed, first_step=cut + 1)
    assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason)
    assert straight.stop_step == 250 and "held until min_steps=250" in straight.reason


@pytest.mark.parametrize("signal", ["normalized", "bands"])
def test_two_processes_gather_the_per_example_signal(tmp_path, signal):
    flags = ["--early_stop", "--preset", "auto", "--signal", signal, "--max_train_steps", "80", "--eval_every", "2"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               demo.__file__, "--output_dir", str(tmp_path / "ddp"), *flags]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]
    # each process scores half the frozen examples and gathers the rest: both feed their rules the same values
    assert ranks[0]["signals"] == ranks[1]["signals"] and ranks[0]["stop_step"] == ranks[1]["stop_step"]
    assert ranks[0]["signals"][0] == 1.0 and len(set(ranks[0]["signals"])) == len(ranks[0]["signals"]) == 40


# -- timestep bands -----------------------------------------------------------------------------------------


def banded_stopper(toy_dataset, taus, steps=600, **settings):
    """The settling-time callback with ``signal="bands"`` on six planted examples, two per timestep band: the
    examples of band b decay with ``taus[b]`` (None: fall in a straight line; 0: stay flat, with a little noise),
    whatever their positions."""
    from diffusers import DDPMScheduler

    stopper = planted_stopper(toy_dataset, [decay(10, steps)] * 6, noise_scheduler=DDPMScheduler(),
                              **{"signal": "bands", **settings})
    for band, tau in zip(stopper._bands, taus):
        for position in band:
            stopper.objective.curves[position] = (
                decay(tau, steps) if tau else np.linspace(2.0, 1.0, steps) if tau is None
                else 1.0 + 0.001 * np.sin(2.1 * np.arange(steps)))
    return stopper


def test_bands_group_the_frozen_examples_by_timestep(toy_dataset):
    stopper = banded_stopper(toy_dataset, [10, 10, 10])
    timesteps = stopper.eval_batch.frozen.timesteps.tolist()
    ordered = [timesteps[i] for band in stopper._bands for i in band]
    assert ordered == sorted(timesteps) and [len(band) for band in stopper._bands] == [2, 2, 2]
    assert [label.split(" (")[0] for label in stopper.rule.labels] == ["low-noise band", "mid-noise band",
                                                                      "high-noise band"]


@pytest.mark.parametrize(
    "taus, stop, last",
    [
        ([10, 10, 10], 40, None),  # alike: where one tau-10 decay settles
        ([10, 30, 10], 96, "mid-noise band"),  # a slow band holds the stop until it has settled too
        ([30, 10, 10], 96, "low-noise band"),
        ([10, 10, 60], 180, "high-noise band"),
        ([10, 10, None], None, None),  # one band still falling: never
    ],
)
def test_bands_stop_once_every_band_has_settled(toy_dataset, taus, stop, last):
    stopper = run(banded_stopper(toy_dataset, taus))
    assert stopper.stop_step == stop
    if stop is not None:
        assert stopper.reason.startswith("settled: every timestep band has settled (low-noise band (t ")
        assert stopper.stop_kind.value == "settled" and "normalized loss" in stopper.reason
        if last is not None:
            assert f"last, the {last}" in stopper.reason


def test_a_band_that_never_fell_beyond_its_noise_holds_the_stop_and_the_report_says_so(toy_dataset):
    """A flat, noisy band has nothing to settle from: its n / T passes the multiple, but its drop is within 5x its
    evaluation noise, so the bands never all settle. The "did not stop" line says which band and why, instead of
    showing a statistic past the threshold without a reason."""
    stopper = banded_stopper(toy_dataset, [10, 10, 10])
    for position in stopper._bands[2]:
        stopper.objective.curves[position] = 1.0 + 0.05 * np.sin(2.1 * np.arange(600))
    line = run(stopper).status_line()
    assert stopper.stop_step is None and stopper.rule.statistic >= 2.0
    assert ", but not settled: high-noise band (t " in line and "is within 5x the evaluation noise" in line
    assert "not settled" not in run(banded_stopper(toy_dataset, [10, 10, None])).status_line()  # still falling


@pytest.mark.parametrize("tau", [40, 150, 600])
def test_planted_decays_stop_at_a_similar_multiple_of_tau_in_bands(toy_dataset, tau):
    stopper = run(banded_stopper(toy_dataset, [tau] * 3, steps=8 * tau))
    assert stopper.stop_step is not None and 2.7 <= stopper.stop_step / tau <= 3.3


def default_stopper(toy_dataset, method, curve):
    """dvar's default rule for ``method`` on six planted examples that all follow ``curve``."""
    from diffusers import DDPMScheduler

    return planted_stopper(toy_dataset, [curve] * 6, noise_scheduler=DDPMScheduler(), preset=None, method=method)


@pytest.mark.parametrize("method, low, high", [
    ("textual_inversion", 2.1, 2.6),  # Bf level=0.8 x1.75
    ("dreambooth_lora", 4.0, 4.0),  # B level=0.8 x2 fires near 3 tau: held to half the budget (8 tau)
    ("custom_diffusion", 4.3, 4.8),  # S level=0.9 x2 on the loss
])
@pytest.mark.parametrize("tau", [40, 150, 600])
def test_the_default_stops_planted_decays_at_one_multiple_of_tau_per_method(toy_dataset, method, low, high, tau):
    stopper = run(default_stopper(toy_dataset, method, decay(tau, 8 * tau)))
    assert stopper.stop_step is not None and low <= stopper.stop_step / tau <= high


@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth_lora", "custom_diffusion", None])
def test_the_default_never_stops_a_steadily_falling_loss(toy_dataset, method):
    stopper = run(default_stopper(toy_dataset, method, np.linspace(2.0, 1.0, 3000)))
    assert stopper.stop_step is None and len(stopper.history) == 3000


def test_a_nan_in_one_band_stops_the_run_as_diverged(toy_dataset):
    stopper = banded_stopper(toy_dataset, [10, 10, 60])
    stopper.objective.curves[stopper._bands[2][0]][30:] = math.nan
    stopper = run(stopper)
    assert (stopper.stop_step, stopper.diverged) == (31, True) and stopper.reason.startswith("non-finite")


@pytest.mark.parametrize("taus, settings, stop", [
    ([10, 10, 60], {}, 180),
    ([10, 30, 0], {"flat_bands": "skip"}, 96),  # the flat high-noise band does not hold the stop (Bf x2)
    ([10, 30, 0], {"preset": None, "signal": None, "method": "textual_inversion"}, 77),  # TI's default: Bf x1.75
])
@pytest.mark.parametrize("cut", [1, 39, 40, 41, 76, 100, 179])
def test_bands_resume_to_the_same_stop_and_reason(toy_dataset, cut, taus, settings, stop):
    straight = run(banded_stopper(toy_dataset, taus, **settings))
    first = run(banded_stopper(toy_dataset, taus, **settings), last_step=min(cut, stop - 1))
    resumed = banded_stopper(toy_dataset, taus, **settings)
    resumed.load_state_dict(first.state_dict())
    resumed = run(resumed, first_step=min(cut, stop - 1) + 1)
    assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason) == (stop, straight.reason)


@pytest.mark.parametrize("saved_with, resumed_with", [("hold", "skip"), ("skip", "hold")])
def test_a_checkpoint_with_the_other_flat_bands_setting_is_refused(toy_dataset, saved_with, resumed_with):
    saved = run(banded_stopper(toy_dataset, [10, 30, 0], flat_bands=saved_with), last_step=20).state_dict()
    with pytest.raises(ValueError, match="flat_holds"):
        banded_stopper(toy_dataset, [10, 30, 0], flat_bands=resumed_with).load_state_dict(saved)


def test_a_bands_checkpoint_from_before_flat_bands_resumes_as_hold(toy_dataset):
    saved = run(banded_stopper(toy_dataset, [10, 10, 60]), last_step=50).state_dict()
    assert saved["rule"]["settings"].pop("flat_holds") is True  # as dvar wrote it before the setting existed
    resumed = banded_stopper(toy_dataset, [10, 10, 60])
    resumed.load_state_dict(saved)
    assert run(resumed, first_step=51).stop_step == 180


def test_a_checkpoint_with_other_bands_is_refused(toy_dataset):
    saved = run(banded_stopper(toy_dataset, [10, 10, 60]), last_step=20).state_dict()
    with pytest.raises(ValueError, match="bands is 3 but this run uses 2"):
        banded_stopper(toy_dataset, [10, 60], bands=2).load_state_dict(saved)


def test_one_band_is_the_normalized_signal(toy_dataset):
    from diffusers import DDPMScheduler

    stops = {signal: run(planted_stopper(toy_dataset, CURVES, signal=signal, noise_scheduler=DDPMScheduler(),
                                         **({"bands": 1} if signal == "bands" else {}))).stop_step
             for signal in ("normalized", "bands")}
    assert stops["bands"] == stops["normalized"] is not None


def test_bands_under_a_floor(toy_dataset):
    stopper = run(banded_stopper(toy_dataset, [10, 10, 10], min_steps=100))
    assert stopper.stop_step == 100 and "held until min_steps=100" in stopper.reason


@pytest.mark.parametrize("rule, value, error", [
    (settling(), [1.0, 2.0], TypeError),  # a one-signal rule given several values
    (settling(), np.array([1.0]), TypeError),
    (AllSettled([settling(), settling()]), [1.0], ValueError),  # two signals, one value
    (AllSettled([settling(), settling()]), 1.0, TypeError),
])
def test_a_rule_refuses_the_wrong_number_of_values(rule, value, error):
    with pytest.raises(error, match="watches"):
        rule.update(value)


class ReportedTimesteps(PlantedExamples):
    """Planted losses from an objective that reports each example's timestep itself (as kohya's, which draws
    them inside its loss), beside a frozen batch that has none."""

    reports_timesteps = True

    def __init__(self, curves, timesteps):
        super().__init__(curves)
        self.timesteps = timesteps

    def per_example_losses(self, models, batch):
        result = super().per_example_losses(models, batch)
        result.timesteps = torch.tensor(self.timesteps[:len(batch)], dtype=torch.float64)
        return result


def reported_stopper(toy_dataset):
    # examples 0-5 at timesteps 900, 100, 500, 300, 700, 200: bands {1, 5}, {3, 2}, {4, 0}; the mid band is slow
    curves = [decay(tau, 600) for tau in (10, 10, 60, 60, 10, 10)]
    return DVAREarlyStopping(objective=ReportedTimesteps(curves, [900, 100, 500, 300, 700, 200]),
                             train_dataset=toy_dataset, preset="auto", eval_every=1, max_train_steps=600,
                             eval_batch_size=6, signal="bands")


@pytest.mark.parametrize("cut", [None, 1, 2, 100, 179])
def test_bands_from_timesteps_the_objective_reports_at_the_first_evaluation(toy_dataset, cut):
    straight = run(reported_stopper(toy_dataset))
    assert straight._bands == [[1, 5], [3, 2], [4, 0]] and straight.stop_step == 180
    assert straight.summary()["bands"] == ["low-noise band (t 100-200)", "mid-noise band (t 300-500)",
                                           "high-noise band (t 700-900)"]
    assert "last, the mid-noise band (t 300-500)" in straight.reason
    if cut is not None:  # the bands and their names resume with the run, whenever it stopped
        first = run(reported_stopper(toy_dataset), last_step=cut)
        resumed = reported_stopper(toy_dataset)
        resumed.load_state_dict(first.state_dict())
        resumed = run(resumed, first_step=cut + 1)
        assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason)


# -- dvar's default rule (no preset, window or threshold named) ---------------------------------------------


@pytest.mark.parametrize(
    "method, signal, threshold, level, flat_bands, min_steps, rule",
    [
        ("textual_inversion", "bands", 1.75, 0.8, "skip", None, "AllSettled"),  # Bf level=0.8 x1.75
        ("dreambooth_lora", "bands", 2.0, 0.8, "hold", 500, "NotBefore"),  # H B level=0.8 x2 from 50%
        ("custom_diffusion", "loss", 2.0, 0.9, None, None, "SettlingTimeCriterion"),  # S level=0.9 x2
        ("dreambooth", "bands", 2.0, 0.8, "hold", None, "AllSettled"),  # not benchmarked: the scale-free default
        (None, "bands", 2.0, 0.8, "hold", None, "AllSettled"),  # the callback, not told the method
    ],
)
def test_naming_no_rule_gives_the_methods_default(method, signal, threshold, level, flat_bands, min_steps, rule):
    config = DVARConfig(method=method, max_train_steps=1000)
    assert (config.preset, config.rule_preset, config.signal) == ("default", "auto", signal)
    assert (config.resolved_window_threshold()[1], config.auto_level) == (threshold, level)
    assert (config.flat_bands, config.min_steps) == (flat_bands, min_steps)
    made = config.make_rule(config.resolved_eval_every())
    assert type(made).__name__ == rule
    if flat_bands is not None:
        bands = made.inner if rule == "NotBefore" else made
        assert bands.flat_holds == (flat_bands == "hold")


@pytest.mark.parametrize(
    "settings, preset, signal",
    [
        ({"preset": "auto"}, "auto", "loss"),  # a named preset is the paper's signal unless told otherwise
        ({"preset": "dreambooth_lora"}, "dreambooth_lora", "loss"),
        ({"window": 100, "threshold": 0.2}, None, "loss"),
        ({"window": 300}, "dreambooth_lora", "loss"),  # alone, it overrides the method's paper preset
        ({"threshold": 0.3}, "dreambooth_lora", "loss"),
        ({"signal": "normalized"}, "auto", "normalized"),  # the default rule on another signal
        ({"preset": "default", "method": "textual_inversion"}, "auto", "bands"),
        ({"window": 300, "method": "textual_inversion"}, "textual_inversion", "loss"),
    ],
)
def test_what_is_named_overrides_the_default(settings, preset, signal):
    config = DVARConfig(**{"method": "dreambooth_lora", "max_train_steps": 1000, **settings})
    assert (config.rule_preset, config.signal) == (preset, signal)


@pytest.mark.parametrize("method, taus, stop, reason", [
    (None, [10, 30, 10], 96, "every timestep band has settled"),  # the scale-free default: B level=0.8 x2
    ("dreambooth_lora", [10, 30, 10], 300, "held until min_steps=300"),  # the same, not before 50% of the budget
    ("dreambooth_lora", [10, 200, 10], 568, "every timestep band has settled"),  # a band settling late decides
    ("textual_inversion", [10, 30, 10], 77, "every timestep band has settled"),  # x1.75
    ("textual_inversion", [10, 30, 0], 77, "the high-noise band (t "),  # a band that never fell does not hold it
    (None, [10, 30, 0], None, None),  # ... but it does under the scale-free default (flat_bands="hold")
])
def test_the_default_rule_stops_planted_bands_and_says_so(toy_dataset, method, taus, stop, reason):
    """The callback with nothing named stops as its method's default rule does, and its summary says it was the
    default."""
    stopper = banded_stopper(toy_dataset, taus, preset=None, signal=None, method=method)
    summary = run(stopper).summary()
    assert stopper.stop_step == stop and (reason is None or reason in stopper.reason)
    assert (summary["preset"], summary["default_rule"], summary["signal"]) == ("auto", True, "bands")


@pytest.mark.parametrize(
    "settings, bands",
    [
        ({"eval_batch_size": 4}, 3),
        ({"eval_batch_size": 3}, 3),
        ({"eval_batch_size": 2}, 2),  # the default watches one band per frozen example when there are fewer
        ({"eval_batch_size": 1}, 1),  # one band: the normalized signal
        ({"eval_batch_size": 1, "preset": "default"}, 1),
    ],
)
def test_the_default_fits_its_bands_to_the_frozen_examples(settings, bands):
    config = DVARConfig(**{"method": "dreambooth_lora", "max_train_steps": 100, **settings})
    assert config.bands == bands and type(config.make_rule(1).inner).__name__ == "AllSettled"  # inside the floor


@pytest.mark.parametrize("settings", [{"preset": "auto", "signal": "bands"}, {"signal": "bands", "bands": 3}])
def test_bands_named_with_too_few_frozen_examples_are_refused(settings):
    """Only the default adapts; a rule the user names keeps what was asked for, and says what to change."""
    settings = {"method": "dreambooth_lora", "max_train_steps": 100, "eval_batch_size": 2, **settings}
    if settings.get("preset") is None:  # the default's own signal and band count, named: it still adapts
        assert DVARConfig(**settings).bands == 2
        return
    with pytest.raises(ValueError, match=r"bands must be an integer from 1 to eval_batch_size \(2\).*Lower bands"):
        DVARConfig(**settings).make_rule(1)


@pytest.mark.parametrize("taus, stop, reason", [
    ([10], 40, "settled: the smoothed normalized loss covered 80% of its drop"),  # one band: the rule's own reason
    ([10, 30], 96, "settled: every timestep band has settled (low-noise band (t "),  # the slow band holds the stop
])
def test_the_default_runs_on_a_frozen_batch_of_one_or_two(toy_dataset, taus, stop, reason):
    """A DreamBooth run on one or two photos: the default watches one band per photo."""
    from diffusers import DDPMScheduler

    stopper = planted_stopper(toy_dataset, [decay(10, 600)] * len(taus), preset=None, method="dreambooth",
                              noise_scheduler=DDPMScheduler())
    assert len(stopper._bands) == stopper.config.bands == len(taus)
    for band, tau in zip(stopper._bands, taus):  # band 1 holds the lower timestep, whichever example that is
        stopper.objective.curves[band[0]] = decay(tau, 600)
    run(stopper)
    assert (stopper.stop_step, stopper.summary()["default_rule"]) == (stop, True)
    assert stopper.reason.startswith(reason) and ("(timestep band: one band (t " in stopper.reason) == (len(taus) == 1)


class FrozenInWholeBatches:
    """kohya's shape of frozen batch: four examples in ``units`` whole batches, each with one loss (and one
    timestep, which the objective reports at the first evaluation)."""

    def __init__(self, units):
        self.units = units

    def next(self):
        return self

    def __len__(self):
        return 4

    def shard(self, rank, world_size):
        return list(range(self.units)) if rank == 0 else []

    def shard_start(self, rank, world_size):
        return 0 if rank == 0 else self.units

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def reported_default_stopper(units):
    """The default rule on fewer frozen units than its three bands, known only at the first evaluation."""
    curves = [decay(tau, 600) for tau in (10, 30)[:units]]
    return DVAREarlyStopping(objective=ReportedTimesteps(curves, [900, 100][:units]),
                             eval_batch=FrozenInWholeBatches(units), method="dreambooth", eval_every=1,
                             max_train_steps=600)


@pytest.mark.parametrize("units, cut", [(1, None), (2, None), (1, 20), (2, 50)])
def test_the_default_fits_its_bands_to_reported_timesteps_and_resumes(units, cut):
    assert reported_default_stopper(units).config.bands == 3  # four examples: three bands, until it sees the units
    straight = run(reported_default_stopper(units))
    assert len(straight._bands) == straight.config.bands == units and straight.stop_step == (40 if units == 1 else 96)
    if cut is not None:
        first = run(reported_default_stopper(units), last_step=cut)
        resumed = reported_default_stopper(units)
        resumed.load_state_dict(first.state_dict())
        resumed = run(resumed, first_step=cut + 1)
        assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason)


def test_a_default_with_a_floor_and_a_multiple_resolves_to_them(monkeypatch):
    """A table row such as ``H B level=0.8 x1.5 from 40%``: the multiple becomes auto's threshold and the share of
    the budget its floor; both need the budget, and a named threshold or floor wins."""
    from dvar.rules import DefaultRule
    from dvar.rules import default as defaults

    monkeypatch.setitem(defaults.DEFAULT_RULES, "textual_inversion", DefaultRule("auto", "bands", 0.4, 1.5))
    config = DVARConfig(method="textual_inversion", max_train_steps=500)
    assert (config.rule_preset, config.signal, config.threshold, config.min_steps) == ("auto", "bands", 1.5, 200)
    assert type(config.make_rule(5)).__name__ == "NotBefore"
    assert "x1.5) on signal bands, not before 40% of the budget" in config.default_rule_text
    named = DVARConfig(method="textual_inversion", max_train_steps=500, preset="default", min_steps=0, threshold=3.0)
    assert (named.threshold, named.min_steps) == (3.0, 0)
    with pytest.raises(ValueError, match="sets its floor from the step budget: pass max_train_steps"):
        DVARConfig(method="textual_inversion", eval_every=5).make_rule(5)

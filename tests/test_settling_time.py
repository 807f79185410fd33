"""The settling-time rule (:class:`dvar.rules.SettlingTimeCriterion`): its window is a multiple of the time
the loss itself took to settle, so decays of any time constant stop at about the same multiple of it; a loss
that is still falling (or never fell) does not stop, and a resumed rule stops where the straight run did."""

import math

import numpy as np
import pytest
import torch

from dvar import DVAREarlyStopping
from dvar.rules import SettlingTimeCriterion
from dvar.stride import replay_stop_step


def settling_stop_step(trace, eval_every, **settings):
    return replay_stop_step(SettlingTimeCriterion(**settings), trace, eval_every)


def decay(tau, n, noise=0.0, seed=0, floor=1.0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return floor + np.exp(-t / tau) + noise * rng.standard_normal(n)


def first_stop(values, **settings):
    rule = SettlingTimeCriterion(**settings)
    for value in values:
        if rule.update(value):
            return rule.stop_step
    return None


@pytest.mark.parametrize(
    "tau, noise, seed, low, high",
    [
        # multiple 2, level 0.8: T -> tau ln 5 ~ 1.6 tau as the drop completes; the stop comes at ~2.8 tau
        (40, 0.0, 0, 2.7, 3.3),
        (150, 0.0, 0, 2.7, 3.3),
        (600, 0.0, 0, 2.7, 3.3),
        # noise of 1-3% of the drop: the same multiple, give or take
        (40, 0.01, 1, 2.5, 3.5),
        (150, 0.03, 2, 2.5, 3.5),
        (600, 0.03, 1, 2.5, 3.5),  # a noise dip early in this slow fall is not its drop (min_drop_snr)
        # fast decays: the 5-evaluation smoothing adds a lag of a few evaluations
        (5, 0.0, 0, 4.5, 6.0),
        (12, 0.01, 0, 3.5, 4.5),
    ],
)
def test_exponential_decays_stop_at_a_similar_multiple_of_their_time_constant(tau, noise, seed, low, high):
    stop = first_stop(decay(tau, 20 * tau + 100, noise, seed), multiple=2.0, level=0.8, min_evaluations=10)
    assert stop is not None and low <= stop / tau <= high


@pytest.mark.parametrize("multiple, level", [(1.5, 0.8), (2.0, 0.8), (3.0, 0.9)])
def test_a_larger_multiple_waits_longer(multiple, level):
    values = decay(50, 1500)
    earlier = first_stop(values, multiple=multiple, level=level)
    later = first_stop(values, multiple=multiple + 1, level=level)
    assert earlier is not None and later is not None and later > earlier


@pytest.mark.parametrize(
    "name, values",
    [
        ("linear descent", 5.0 - 0.001 * np.arange(3000)),
        ("linear descent with wiggle", 5.0 - 0.001 * np.arange(3000) + 0.01 * np.random.default_rng(1).standard_normal(3000)),
        ("slow decay, cut off while falling", decay(5000, 3000, noise=0.002, seed=3)),
        ("never fell: flat wiggle", 1.0 + 0.01 * np.random.default_rng(2).standard_normal(3000)),
        ("rising", 1.0 + 0.001 * np.arange(3000)),
        ("constant", np.full(3000, 0.7)),
    ],
)
def test_a_loss_still_falling_or_never_falling_never_stops(name, values):
    assert first_stop(values) is None, name


@pytest.mark.parametrize("cut", [3, 19, 20, 57, 140])
def test_a_resumed_rule_stops_at_the_same_step_with_the_same_reason(cut):
    values = decay(25, 400, noise=0.01, seed=4)
    straight = SettlingTimeCriterion()
    for value in values:
        straight.update(value)
    first = SettlingTimeCriterion()
    for value in values[:cut]:
        first.update(value)
    resumed = SettlingTimeCriterion()
    resumed.load_state_dict(first.state_dict())
    for value in values[cut:]:
        resumed.update(value)
    assert straight.stop_step is not None
    assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason)


def test_state_from_other_settings_is_refused():
    with pytest.raises(ValueError, match=r"other settling_time settings: multiple=2.0 \(this run: 3.0\)"):
        SettlingTimeCriterion(multiple=3).load_state_dict(SettlingTimeCriterion(multiple=2).state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"level": 0}, "level must be between 0 and 1"),
        ({"level": 1.0}, "level must be between 0 and 1"),
        ({"multiple": 1.2, "level": 0.8}, "multiple \\* level > 1"),
        ({"multiple": math.inf}, "must be finite with multiple"),
        ({"smooth": 0}, "smooth must be an integer >= 1"),
        ({"min_evaluations": 2}, "min_evaluations must be an integer >= 3"),
        ({"min_drop_snr": -1}, "min_drop_snr must be a finite number >= 0"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SettlingTimeCriterion(**kwargs)


def test_non_finite_value_stops_with_a_reason():
    rule = SettlingTimeCriterion()
    assert [rule.update(v) for v in [1.0, 0.9, math.nan]] == [False, False, True]
    assert rule.stop_step == 3 and rule.reason.startswith("non-finite")


def test_reason_names_the_settling_time_and_the_multiple():
    rule = SettlingTimeCriterion(multiple=2.0, level=0.8, min_evaluations=10)
    for value in decay(10, 200):
        if rule.update(value):
            break
    t = rule.settling_evaluations
    assert rule.stop_step == 2 * t == 40
    assert rule.reason.startswith(f"settled: the smoothed loss covered 80% of its drop") and f"by evaluation {t}" in rule.reason
    assert rule.statistic == pytest.approx(2.0) and rule.stop_kind.value == "settled"


@pytest.mark.parametrize("eval_every", [1, 2, 5])
def test_replay_on_an_every_step_trace_with_a_stride(eval_every):
    # tau = 100 steps: ~3 tau at any stride (plus the smoothing's lag of a few evaluations), on a multiple of it
    trace = list(decay(100, 2000)[1:])
    stop = settling_stop_step(trace, eval_every)
    assert stop % eval_every == 0 and 260 <= stop <= 360


@pytest.mark.parametrize("eval_every, budget", [(1, 300), (2, 600), ("auto", 300)])
def test_preset_auto_runs_this_rule_in_the_callback(toy_dataset, eval_every, budget):
    trace = list(decay(20, budget + 1)[1:])  # the loss after step s is trace[s - 1]
    step = {"now": 0}
    stopper = DVAREarlyStopping(objective=lambda models, batch: torch.tensor(trace[step["now"] - 1]),
                                train_dataset=toy_dataset, preset="auto", eval_every=eval_every,
                                max_train_steps=budget)
    assert isinstance(stopper.rule, SettlingTimeCriterion) and stopper.threshold == 2.0
    for step["now"] in range(1, budget + 1):
        if stopper.step(step["now"]):
            break
    k = stopper.eval_every
    assert stopper.stop_step == settling_stop_step(trace, k) is not None
    assert stopper.reason.startswith("settled: the smoothed loss covered 80% of its drop")

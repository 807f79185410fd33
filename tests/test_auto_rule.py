"""The slope rule (:class:`dvar.criterion.SettledCriterion`, a candidate for ``auto`` that ``benchmarks/rules.py``
replays): stops at the same multiple of a decay's time constant whatever that constant, never on a loss that is
still falling or never fell, and resumes bit for bit. And ``DVARConfig(preset="auto")``: its stride comes from the
budget and it runs :class:`dvar.criterion.SettlingTimeCriterion` (``tests/test_settling_time.py``)."""

import math

import numpy as np
import pytest

from dvar import DVARConfig
from dvar.criterion import SettledCriterion, settled_should_stop, settled_statistic, settled_stop_step


def decay(tau, n, noise=0.0, seed=0, floor=1.0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return floor + np.exp(-t / tau) + noise * rng.standard_normal(n)


def first_stop(values, **settings):
    rule = SettledCriterion(**settings)
    for value in values:
        if rule.update(value):
            return rule.stop_step
    return None


@pytest.mark.parametrize(
    "tau, noise, low, high",
    [
        # noise-free exp(-t / tau): ln(1 / 0.05) / 0.5 ~ 6 time constants, for any tau
        (5, 0.0, 5.5, 6.5),
        (12, 0.0, 5.5, 6.5),
        (40, 0.0, 5.5, 6.5),
        (150, 0.0, 5.5, 6.5),
        (600, 0.0, 5.5, 6.5),
        # wiggle of 1% of the drop: the same multiple, give or take
        (12, 0.01, 4.0, 8.0),
        (40, 0.01, 4.0, 8.0),
        (150, 0.01, 4.0, 8.0),
    ],
)
def test_exponential_decays_stop_at_the_same_multiple_of_their_time_constant(tau, noise, low, high):
    stop = first_stop(decay(tau, 20 * tau + 100, noise), tolerance=0.05, min_evaluations=10)
    assert stop is not None and low <= stop / tau <= high


@pytest.mark.parametrize(
    "name, values",
    [
        ("linear descent", 5.0 - 0.001 * np.arange(3000)),
        ("linear descent with wiggle", 5.0 - 0.001 * np.arange(3000) + 0.01 * np.random.default_rng(1).standard_normal(3000)),
        ("never fell: flat wiggle", 1.0 + 0.01 * np.random.default_rng(2).standard_normal(3000)),
        ("rising", 1.0 + 0.001 * np.arange(3000)),
        ("constant", np.full(3000, 0.7)),
    ],
)
def test_a_loss_still_falling_or_never_falling_never_stops(name, values):
    assert first_stop(values) is None, name


def test_streaming_rule_agrees_with_the_pure_function_at_every_value():
    values = decay(20, 300, noise=0.02, seed=3)
    rule = SettledCriterion(tolerance=0.05, min_evaluations=20)
    for n, value in enumerate(values, 1):
        assert rule.update(value) == any(settled_should_stop(values[:m], 0.05) for m in range(1, n + 1))
        if n >= 20:
            expected = settled_statistic(values[:n])
            assert rule.statistic.recent == expected.recent
            assert rule.statistic.recent_drop == pytest.approx(expected.recent_drop, rel=1e-9, abs=1e-12)
            assert rule.statistic.total_drop == pytest.approx(expected.total_drop, rel=1e-9)


@pytest.mark.parametrize("cut", [5, 19, 20, 57, 140])
def test_a_resumed_rule_stops_at_the_same_step_with_the_same_reason(cut):
    values = decay(25, 400, noise=0.01, seed=4)
    straight = SettledCriterion()
    for value in values:
        straight.update(value)
    first = SettledCriterion()
    for value in values[:cut]:
        first.update(value)
    resumed = SettledCriterion()
    resumed.load_state_dict(first.state_dict())
    for value in values[cut:]:
        resumed.update(value)
    assert straight.stop_step is not None
    assert (resumed.stop_step, resumed.reason) == (straight.stop_step, straight.reason)


def test_state_from_other_settings_is_refused():
    with pytest.raises(ValueError, match="other auto-rule settings"):
        SettledCriterion(tolerance=0.1).load_state_dict(SettledCriterion(tolerance=0.05).state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tolerance": 0}, "tolerance must be between 0 and 1"),
        ({"tolerance": 1.0}, "tolerance must be between 0 and 1"),
        ({"tolerance": math.nan}, "tolerance must be between 0 and 1"),
        ({"fraction": 0}, "fraction must be in"),
        ({"min_evaluations": 2}, "min_evaluations must be an integer >= 3"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SettledCriterion(**kwargs)


def test_non_finite_value_stops_with_a_reason():
    rule = SettledCriterion()
    assert [rule.update(v) for v in [1.0, 0.9, math.nan]] == [False, False, True]
    assert rule.stop_step == 3 and rule.reason.startswith("non-finite")


def test_reason_explains_the_stop():
    rule = SettledCriterion(tolerance=0.05, min_evaluations=10)
    for value in decay(10, 200):
        if rule.update(value):
            break
    assert rule.reason.startswith(f"settled: over its last {math.ceil(rule.stop_step / 2)} of {rule.stop_step} evaluations")
    assert "of its total drop" in rule.reason and "(< 5%)" in rule.reason


@pytest.mark.parametrize("eval_every", [1, 2, 5])
def test_replay_on_an_every_step_trace_with_a_stride(eval_every):
    # tau = 10 steps: about 6 tau at any stride, on a multiple of the stride
    trace = list(decay(10, 400)[1:])
    stop = settled_stop_step(trace, eval_every, min_evaluations=10)
    assert stop % eval_every == 0 and 55 <= stop <= 75


@pytest.mark.parametrize(
    "budget, eval_every, expected",
    [(1000, "auto", 10), (400, "auto", 4), (60, "auto", 1), (1000, 3, 3)],
)
def test_config_auto_stride_comes_from_the_budget(budget, eval_every, expected):
    config = DVARConfig(preset="auto", max_train_steps=budget, eval_every=eval_every)
    assert config.resolved_eval_every() == expected
    assert config.resolved_window_threshold() == (None, 2.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "auto"}, "pass max_train_steps"),
        ({"preset": "auto", "max_train_steps": 100, "window": 50}, "leave window out"),
        ({"preset": "auto", "max_train_steps": 100, "threshold": 1.0}, "multiple \\* level > 1"),
    ],
)
def test_config_auto_refuses_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DVARConfig(**kwargs).resolved_window_threshold()

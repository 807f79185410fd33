"""Rules the benchmark replays but the library does not ship. The slope rule
(:class:`benchmarks.candidates.SettledCriterion`, ``auto`` before issue 12, still a candidate in ``benchmarks/rules.py``):
stops at the same multiple of a decay's time constant whatever that constant, never on a loss that is still falling
or never fell, and resumes bit for bit. The paper's CLIP-s rule
(:class:`benchmarks.personalization.baselines.PatienceCriterion`). Moved here from tests/test_auto_rule.py and
tests/test_criterion.py with the rules themselves."""

import math

import numpy as np
import pytest

from benchmarks.candidates import SettledCriterion, settled_should_stop, settled_statistic, settled_stop_step
from benchmarks.personalization.baselines import PatienceCriterion


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
    "scores, eps, patience, expected_stop",
    [
        ([0.50, 0.60, 0.61, 0.605], 0.02, 2, 4),
        ([0.5, 0.6, 0.7, 0.8, 0.9], 0.02, 2, None),  # always improving
        ([0.5, 0.51, 0.515, 0.518], 0.02, 3, 4),  # creeping gains below eps do not count...
        ([0.5, 0.51, 0.515, 0.518], 0.02, 2, 3),
        ([0.5, 0.51, 0.53, 0.53], 0.02, 2, None),  # ...until they add up to more than eps
        ([0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], 0.02, 6, 7),  # paper's TI/CD setting
        ([0.7, 0.6, 0.5, 0.4], 0.04, 3, 4),  # paper's LoRA setting
    ],
)
def test_patience_table(scores, eps, patience, expected_stop):
    rule = PatienceCriterion(eps=eps, patience=patience)
    for score in scores:
        if rule.update(score):
            break
    assert rule.stop_step == expected_stop


def test_patience_shares_the_interface():
    rule = PatienceCriterion(eps=0.02, patience=2)
    for score in [0.5, 0.6]:
        rule.update(score)
    copy = PatienceCriterion(eps=0.02, patience=2)
    copy.load_state_dict(rule.state_dict())
    assert [copy.update(s) for s in [0.59, 0.61]] == [False, True]
    assert copy.stop_step == 4 and "no improvement above 0.02 for 2 checks" in copy.reason
    assert math.isnan(copy.normalized_variance)
    with pytest.raises(ValueError, match="patience must be"):
        PatienceCriterion(eps=0.02, patience=0)
    assert PatienceCriterion(0.0, 1, nonfinite="stop").update(math.nan) is True

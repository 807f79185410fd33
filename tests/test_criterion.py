"""The stop rules, as tables of traces and the step at which each must fire."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvar.rules import PRESETS, DVARCriterion, SettlingTimeCriterion, StopKind, StopRule, first_stop_step, normalized_variance

PLATEAU_AFTER_DROP = [10.0, 8.0, 6.0, 4.0, 2.0] + [1.0, 1.01] * 10


@pytest.mark.parametrize(
    "trace, window, threshold, expected_stop",
    [
        # never before `window` values exist, even for a flat trace
        ([1.0] * 10, 5, 0.5, 5),
        ([1.0, 1.0], 3, 0.5, None),
        # a steady decline: var(last N)/var(all) = ((N^2-1)/(n^2-1)) for a line
        ([float(-i) for i in range(100)], 10, 0.01, 100),
        ([float(-i) for i in range(100)], 10, 0.0101, 100),
        ([float(-i) for i in range(100)], 10, 0.05, 45),
        # a drop followed by a noisy plateau fires once the window sits on the plateau
        (PLATEAU_AFTER_DROP, 4, 0.01, 9),
        (PLATEAU_AFTER_DROP, 6, 0.01, 11),
        (PLATEAU_AFTER_DROP, 6, 1e-6, None),
        # pure noise never plateaus relative to itself at a strict threshold
        ([0.0, 1.0] * 50, 10, 0.5, None),
        # threshold above 1 fires as soon as the window is full
        ([3.0, 1.0, 2.0], 2, 1.5, 2),
    ],
)
def test_stop_step_table(trace, window, threshold, expected_stop):
    assert first_stop_step(trace, window, threshold) == expected_stop


@pytest.mark.parametrize(
    "trace, window, expected",
    [
        ([1.0, 2.0], 3, math.nan),
        ([5.0, 5.0, 5.0], 2, 0.0),  # never moved: a plateau by definition
        ([0.0, 2.0, 1.0, 1.0], 2, 0.0),
        ([0.0, 4.0, 0.0, 4.0], 4, 1.0),
        ([0.0, 0.0, 2.0, 4.0], 2, 1.0 / 2.75),
    ],
)
def test_normalized_variance_table(trace, window, expected):
    value = normalized_variance(trace, window)
    assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)


def test_fires_once_and_stays_stopped():
    rule = DVARCriterion(window=3, threshold=0.1)
    decisions = [rule.update(v) for v in [5.0, 4.0, 3.0, 3.1, 3.0, 9.0, -4.0]]
    assert decisions == [False, False, False, False, True, True, True]
    assert rule.stop_step == 5 and rule.stopped
    assert rule.reason.startswith("plateau: var(last 3) / var(all 5)")
    assert rule.num_values == 7


@settings(max_examples=60, deadline=None)
@given(
    trace=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=120),
    window=st.integers(2, 30),
    threshold=st.floats(0.01, 1.5),
)
def test_agrees_with_direct_numpy_formula(trace, window, threshold):
    rule = DVARCriterion(window, threshold)
    for n, value in enumerate(trace, start=1):
        rule.update(value)
        direct = normalized_variance(trace[:n], window)
        if n < window:
            assert math.isnan(rule.statistic)
        else:
            assert rule.statistic == pytest.approx(direct, rel=1e-6, abs=1e-9)
    expected = next(
        (n for n in range(window, len(trace) + 1) if normalized_variance(trace[:n], window) < threshold), None
    )
    # values within rounding of the threshold may tip either way; all others must agree
    near_threshold = expected is not None and abs(normalized_variance(trace[:expected], window) - threshold) < 1e-9
    if not near_threshold:
        assert rule.stop_step == expected


def test_long_trace_matches_numpy_to_1e9_relative():
    """100k values near 0.1 with 1e-6 fluctuations and a slow drift (float64 cancellation trap)."""
    rng = np.random.default_rng(0)
    n = 150_000
    trace = 0.1 + 1e-6 * rng.standard_normal(n) + np.linspace(2e-6, 0.0, n)
    rule = DVARCriterion(window=310, threshold=1e-12)
    checkpoints = {1_000, 50_000, 100_000, n}
    for i, value in enumerate(trace, start=1):
        rule.update(value)
        if i in checkpoints:
            direct = float(np.var(trace[i - 310 : i]) / np.var(trace[:i]))
            assert abs(rule.statistic - direct) / direct < 1e-9


def test_state_round_trip_mid_trace_gives_same_stop_step():
    rng = np.random.default_rng(1)
    trace = list(np.exp(-np.arange(400) / 60.0) + 0.01 * rng.standard_normal(400))
    uninterrupted = first_stop_step(trace, 100, 0.05)
    assert uninterrupted is not None and uninterrupted > 120

    first = DVARCriterion(100, 0.05)
    for value in trace[:120]:
        first.update(value)
    resumed = DVARCriterion(100, 0.05)
    resumed.load_state_dict(first.state_dict())
    for value in trace[120:]:
        if resumed.update(value):
            break
    assert resumed.stop_step == uninterrupted
    assert resumed.statistic == first_stop_nvar(trace, 100, 0.05)


def first_stop_nvar(trace, window, threshold):
    rule = DVARCriterion(window, threshold)
    for value in trace:
        if rule.update(value):
            return rule.statistic


def test_state_from_other_settings_is_refused():
    with pytest.raises(ValueError, match=r"window=10 \(this run: 20\)"):
        DVARCriterion(20, 0.2).load_state_dict(DVARCriterion(10, 0.2).state_dict())


@pytest.mark.parametrize(
    "window, threshold, message",
    [
        (1, 0.1, "window must be an integer >= 2"),
        (0, 0.1, "window must be an integer >= 2"),
        (2.5, 0.1, "window must be an integer >= 2"),
        (True, 0.1, "window must be an integer >= 2"),
        (10, 0.0, "threshold must be a finite number > 0"),
        (10, -0.1, "threshold must be a finite number > 0"),
        (10, math.nan, "threshold must be a finite number > 0"),
        (10, math.inf, "threshold must be a finite number > 0"),
    ],
)
def test_bad_arguments(window, threshold, message):
    with pytest.raises(ValueError, match=message):
        DVARCriterion(window, threshold)


@pytest.mark.parametrize(
    "policy, trace, expected_stop, expected_reason",
    [
        ("stop", [1.0, 2.0, math.nan, 1.0], 3, "non-finite: loss became nan at value 3"),
        ("stop", [1.0, math.inf], 2, "non-finite: loss became inf at value 2"),
        ("skip", [1.0, math.nan, 2.0, 3.0], None, None),
    ],
)
def test_non_finite_values(policy, trace, expected_stop, expected_reason):
    rule = DVARCriterion(window=5, threshold=0.1, nonfinite=policy)
    for value in trace:
        rule.update(value)
    assert rule.stop_step == expected_stop
    assert rule.reason == expected_reason
    if policy == "skip":
        assert rule.num_values == 3


def test_non_finite_can_raise():
    rule = DVARCriterion(window=5, threshold=0.1, nonfinite="raise")
    rule.update(1.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        rule.update(float("nan"))


@pytest.mark.parametrize(
    "name, window, threshold",
    [
        ("textual_inversion", 310, 0.15),
        ("custom_diffusion", 180, 0.15),
        ("dreambooth_lora", 440, 0.4),
        ("dreambooth", 440, 0.4),
        ("dreambooth-lora", 440, 0.4),
    ],
)
def test_presets(name, window, threshold):
    rule = DVARCriterion.from_preset(name)
    assert (rule.window, rule.threshold) == (window, threshold)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="textual_inversion"):
        DVARCriterion.from_preset("lora")
    assert set(PRESETS) >= {"textual_inversion", "custom_diffusion", "dreambooth_lora", "dreambooth"}


@pytest.mark.parametrize(
    "policy, trace, kind",
    [
        ("stop", [1.0, 2.0, 1.5, 1.4, 1.4, 1.4], StopKind.PLATEAU),
        ("stop", [1.0, 2.0, math.nan], StopKind.NON_FINITE),
        ("skip", [1.0, math.nan, 2.0], None),
    ],
)
def test_the_stop_kind_tells_a_plateau_from_a_divergence(policy, trace, kind):
    rule = DVARCriterion(window=3, threshold=0.2, nonfinite=policy)
    for value in trace:
        rule.update(value)
    assert rule.stop_kind is kind
    assert rule.diverged is (kind is StopKind.NON_FINITE)


@pytest.mark.parametrize("rule", [DVARCriterion(4, 0.2), SettlingTimeCriterion(min_evaluations=5)])
def test_every_rule_shares_one_interface(rule):
    assert isinstance(rule, StopRule)
    for value in [3.0, 2.0, 1.5, 1.2, 1.1, 1.05]:
        rule.update(value)
    state = rule.state_dict()
    assert set(state) == {"rule", "version", "settings", "state"} and state["rule"] == rule.name
    assert state["settings"] == rule.settings() and state["version"] >= 1
    assert rule.stops_when in ("below", "above") and rule.statistic_name
    copy = type(rule)(**rule.settings())
    copy.load_state_dict(state)
    assert (copy.num_values, copy.stop_step, copy.reason) == (rule.num_values, rule.stop_step, rule.reason)


def test_a_checkpoint_of_another_rule_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="'settling_time' rule's state, but this run uses 'dvar'"):
        DVARCriterion(4, 0.2).load_state_dict(SettlingTimeCriterion().state_dict())


def test_a_dvar_0_1_checkpoint_still_loads():
    """The layout dvar 0.1 wrote (flat, no rule tag): the same values must give the same stop after loading."""
    trace = [5.0, 4.0, 3.0, 3.1, 3.05, 3.0, 3.02]
    reference = DVARCriterion(window=3, threshold=0.1)
    for value in trace[:4]:
        reference.update(value)
    inner = reference.state_dict()["state"]
    legacy = {"window": 3, "threshold": 0.1, "shift": inner["shift"], "all": inner["all"], "recent": inner["recent"],
              "window_values": inner["window_values"], "slides_since_exact": inner["slides_since_exact"],
              "normalized_variance": inner["statistic"], "stopped": False, "stop_step": None, "reason": None,
              "last_value": trace[3]}
    loaded = DVARCriterion(window=3, threshold=0.1)
    loaded.load_state_dict(legacy)
    assert [loaded.update(v) for v in trace[4:]] == [reference.update(v) for v in trace[4:]]
    assert loaded.stop_step == reference.stop_step and loaded.stop_kind is StopKind.PLATEAU

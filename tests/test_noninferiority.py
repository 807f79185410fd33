"""Non-inferiority at a stated margin (benchmarks/personalization/noninferiority.py): the CI decision, the controls
that show what the test can decide, and wall-clock speedups that only come from the same trajectory."""

import numpy as np
import pytest

from benchmarks.personalization import noninferiority as ni
from benchmarks.personalization import stats, tables

CONCEPTS = 48


@pytest.mark.parametrize("ci, decision", [
    ((-0.015, 0.004), "yes"),        # loses less than the margin
    ((-0.019, -0.002), "yes"),       # a significant drop, but smaller than the margin: still non-inferior
    ((-0.032, -0.001), "undecided"),  # straddles -0.02 (LoRA's DVAR in the v2 run)
    ((-0.030, 0.010), "undecided"),
    ((-0.070, -0.034), "no"),        # loses more than the margin (CD's DVAR in the v2 run)
    ((-0.020, 0.0), "undecided"),    # exactly at -margin is not above it
    ((float("nan"), float("nan")), "undecided"),  # no data, no decision
])
def test_decision_at_the_margin(ci, decision):
    assert ni.decide(*ci, margin=0.02) == decision


def _records(deltas_by_variant: dict, retest: np.ndarray, steps: dict | None = None) -> list[dict]:
    """One baseline per concept (identity 0.7 + spread, retest = identity + retest[c]) and each variant's
    identity = the baseline's + its delta."""
    steps = steps or {}
    base = 0.7 + np.linspace(-0.2, 0.2, CONCEPTS)
    records = []
    for c in range(CONCEPTS):
        records.append({"method": "textual_inversion", "concept": f"c{c}", "variant": "baseline", "steps": 500,
                        "max_train_steps": 500, "identity": base[c], "identity_retest": base[c] + retest[c]})
        for variant, deltas in deltas_by_variant.items():
            records.append({"method": "textual_inversion", "concept": f"c{c}", "variant": variant,
                            "steps": steps.get(variant, 250), "max_train_steps": 500, "identity": base[c] + deltas[c]})
    return records


def test_the_controls_show_what_the_test_can_decide():
    rng = np.random.default_rng(0)
    noise = 0.018  # the test-retest SD of one 32-image identity score
    records = _records({
        "dvar": np.where(np.arange(CONCEPTS) < 10, 0.0, rng.normal(-0.003, 0.02, CONCEPTS)),  # 10 ties: never fired
        "early10": rng.normal(-0.15, 0.1, CONCEPTS),
        "step0": rng.normal(-0.33, 0.15, CONCEPTS),
        "lossy": rng.normal(-0.016, 0.05, CONCEPTS),
    }, retest=rng.normal(0, noise * np.sqrt(2), CONCEPTS), steps={"early10": 50, "step0": 0})
    rows = {r["rule"]: r for r in ni.noninferiority_table(records)}
    assert list(rows) == ["dvar", "retest", "early10", "step0"], "known rows in order; unknown variants left out"
    assert rows["retest"]["noninferior"] == "yes" and rows["retest"]["ci_half_width"] <= ni.RETEST_MAX_HALF_WIDTH
    assert rows["early10"]["noninferior"] == rows["step0"]["noninferior"] == "no"
    assert rows["dvar"]["noninferior"] == "yes" and rows["dvar"]["ties"] == 10 and rows["dvar"]["n"] == CONCEPTS
    assert rows["early10"]["step_speedup_median"] == 10 and rows["step0"]["step_speedup_median"] is None
    assert ni.control_checks(list(rows.values())) == [
        f"textual_inversion: the controls hold (retest non-inferior, CI half-width "
        f"{rows['retest']['ci_half_width']:.4f}; early10 and step0 not)."]
    lossy = ni.noninferiority_table(records, rows=("lossy",))[0]
    assert lossy["noninferior"] == "undecided" and lossy["ci_low"] < -0.02 < lossy["ci_high"]


@pytest.mark.parametrize("retest_sd, early10, problem", [
    (0.08, -0.15, "the positive control (retest) is"),  # too noisy a score: the test cannot pass a lossless rule
    (0.02, -0.001, "the negative control early10 comes out non-inferior"),  # the benchmark cannot see a bad stop
])
def test_control_checks_say_when_the_test_cannot_be_trusted(retest_sd, early10, problem):
    rng = np.random.default_rng(1)
    records = _records({"early10": early10 + rng.normal(0, 0.005, CONCEPTS)},
                       retest=rng.normal(0, retest_sd, CONCEPTS))
    [sentence] = ni.control_checks(ni.noninferiority_table(records))
    assert sentence.startswith("textual_inversion: the test cannot be trusted here") and problem in sentence


def test_the_bootstrap_ci_is_fixed_by_its_seed_and_narrows_with_more_concepts():
    rng = np.random.default_rng(2)
    deltas = rng.normal(-0.005, 0.03, 200)
    assert stats.bootstrap_mean_ci(deltas[:48]) == stats.bootstrap_mean_ci(list(deltas[:48])), "same data, same CI"
    low, high = stats.bootstrap_mean_ci(deltas[:48])
    assert low < deltas[:48].mean() < high
    assert high - low == pytest.approx(2 * 1.96 * deltas[:48].std(ddof=1) / np.sqrt(48), rel=0.1)  # ~ the normal CI
    wide, narrow = stats.bootstrap_mean_ci(deltas[:12]), stats.bootstrap_mean_ci(deltas)
    assert narrow[1] - narrow[0] < high - low < wide[1] - wide[0]
    assert all(np.isnan(stats.bootstrap_mean_ci([0.1])))


@pytest.mark.parametrize("record, wall, step", [
    ({"variant": "dvar", "steps": 250, "wall_time_s": 50.0}, 2.0, 2.0),
    # few iters from a separate run (benchmark format 1): timed under other conditions, no wall-clock speedup
    ({"variant": "few_iters", "steps": 464, "wall_time_s": 54.0, "max_abs_loss_diff_vs_trajectory": 0.0}, None, 1.293),
    ({"variant": "step0", "steps": 0, "wall_time_s": 0.4}, 250.0, None),
])
def test_wall_clock_speedups_only_from_the_same_trajectory(record, wall, step):
    base = {"variant": "baseline", "steps": 600, "wall_time_s": 100.0} if record["steps"] != 250 else \
        {"variant": "baseline", "steps": 500, "wall_time_s": 100.0}
    assert tables.wall_speedup(record, base) == (pytest.approx(wall) if wall else None)
    assert tables.step_speedup(record, base) == (pytest.approx(step, rel=1e-3) if step else None)


def test_a_wall_clock_speedup_far_above_its_step_speedup_is_flagged():
    rows = [{"method": "custom_diffusion", "variant": "few_iters", "speedup_median": 1.86, "step_speedup_median": 1.29},
            {"method": "custom_diffusion", "variant": "dvar", "speedup_median": 1.87, "step_speedup_median": 2.02},
            {"method": "custom_diffusion", "variant": "early10", "speedup_median": 10.9, "step_speedup_median": 10.0}]
    assert [r["variant"] for r in tables.speedup_violations(rows)] == ["few_iters"]

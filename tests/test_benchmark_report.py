"""benchmarks/personalization/report.py on a synthetic results folder with hand-computed answers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.personalization import config, power, render, report, saturation, stats, tables

METHODS = ("textual_inversion", "dreambooth_lora")
CONCEPTS = ("cat", "dog", "mug", "toy", "vase")
BUDGET = 1000
EVERY = 20
BASELINE_WALL_S = 120.0

# Per variant and concept index c: (steps, wall_time_s, identity change against the baseline).
VARIANTS = {
    "baseline": lambda c: (BUDGET, BASELINE_WALL_S, 0.0),
    "clip_s": lambda c: (400 + 50 * c, BASELINE_WALL_S / 2, -0.01),
    "few_iters": lambda c: (500, BASELINE_WALL_S / 2.5, -0.05 + 0.01 * c),
    "dvar": lambda c: (200 + 50 * c, BASELINE_WALL_S / (2 + c), (0.02, -0.01, 0.0, 0.01, -0.02)[c]),
    # the deliberately premature stops: clearly worse, the earlier the worse
    "early25": lambda c: (250, BASELINE_WALL_S / 4, -0.05 - 0.002 * c),
    "early10": lambda c: (100, BASELINE_WALL_S / 10, -0.15 - 0.002 * c),
    "step0": lambda c: (0, 1.0, -0.3 - 0.002 * c),
}
RETEST = (0.004, -0.004, 0.002, -0.002, 0.0)  # the budget's identity scored with another sampling seed, minus it


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def make_record(method: str, concept: str, variant: str) -> dict:
    c = CONCEPTS.index(concept)
    steps, wall, identity_change = VARIANTS[variant](c)
    return {
        "concept": concept, "method": method, "variant": variant, "steps": steps, "max_train_steps": BUDGET,
        "wall_time_s": wall, "train_s": 0.8 * wall, "monitor_s": 0.1 * wall, "setup_s": 0.1 * wall,
        "identity": 0.70 + 0.01 * c + identity_change, "alignment": 0.30 - 0.01 * (variant == "baseline"),
        "alignment_by_attribute": {"color": 0.9, "shape": 0.5}, "identity_embedding": 0.5, "identity_images": 32,
        "stop_reason": None if variant == "baseline" else f"{variant} rule",
        **({"identity_retest": 0.70 + 0.01 * c + RETEST[c]} if variant == "baseline" else {}),
    }


def make_trace(method: str, concept: str, seed: int, informative: bool = True, ablation: bool = False) -> dict:
    """Identity rises and saturates, the frozen-batch loss falls and flattens, the training loss is pure noise.
    Not ``informative``: the frozen-batch loss stops at the DVAR stop (no every-step loss to the budget)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, BUDGET + 1 if informative else 401)
    checks = np.arange(0, BUDGET + 1, EVERY)
    eval_loss = 0.2 + 0.3 * np.exp(-steps / 150)
    trace = {
        "concept": concept, "method": method, "max_train_steps": BUDGET,
        "train_loss": rng.normal(0.15, 0.05, BUDGET).tolist(),
        "dvar": {"steps": steps.tolist(), "eval_loss": eval_loss.tolist(), "stop_step": 400, "window": 100,
                 "threshold": 0.01},
        "identity_checks": {"every": EVERY, "steps": checks.tolist(), "images": 8,
                            "identity": (0.4 + 0.35 * (1 - np.exp(-checks / 150))).tolist(), "stop_step": 600},
        "informative": informative, "few_iters_step": 500,
    }
    if ablation:
        trace["ablation"] = {
            "none": {"steps": steps.tolist(), "eval_loss": eval_loss.tolist(), "stop_step": 400},
            "noise": {"steps": steps.tolist(), "eval_loss": rng.normal(0.3, 0.1, BUDGET).tolist(), "stop_step": None},
            "timesteps": {"steps": steps[:600].tolist(), "eval_loss": eval_loss[:600].tolist(), "stop_step": 600},
        }
    return trace


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """2 methods x 5 concepts x 4 variants of records, one trace per (method, concept)."""
    meta = {"preset": "synthetic", "command": "pytest", "machine": "test box", "model": "mini-sd",
            "methods": {method: {"max_train_steps": BUDGET} for method in METHODS}}
    _write(tmp_path / "benchmark.json", meta)
    for m, method in enumerate(METHODS):
        for c, concept in enumerate(CONCEPTS):
            for variant in VARIANTS:
                record = make_record(method, concept, variant)
                _write(tmp_path / "records" / method / concept / f"{variant}.json", record)
            trace = make_trace(method, concept, seed=10 * m + c, informative=(method, c) != ("dreambooth_lora", 4),
                               ablation=(method, c) == ("textual_inversion", 0))
            _write(tmp_path / "traces" / method / f"{concept}.json", trace)
    return tmp_path


@pytest.mark.parametrize("values, expected", [
    ([1, 2, 3, 4, 5], (3.0, 2.0)),
    ([1, None, math.nan, 3], (2.0, 1.0)),
    ([7], (7.0, 0.0)),
    ([10, 20, 30, 40], (25.0, 15.0)),
])
def test_median_iqr(values, expected):
    assert stats.median_iqr(values) == pytest.approx(expected)


def test_median_iqr_of_nothing_is_nan():
    assert all(math.isnan(v) for v in stats.median_iqr([None, math.nan]))


def test_loaders_find_every_file(results):
    assert len(report.load_records(results)) == len(METHODS) * len(CONCEPTS) * len(VARIANTS)
    assert len(report.load_traces(results)) == len(METHODS) * len(CONCEPTS)


def test_summary_rows_follow_method_then_variant_order(results):
    rows = tables.summary_table(report.load_records(results))
    assert [(r["method"], r["variant"]) for r in rows] == [(m, v) for m in METHODS for v in VARIANTS]
    assert all(r["n"] == len(CONCEPTS) for r in rows)


@pytest.mark.parametrize("variant, speedup, speedup_iqr, identity_change, steps", [
    # speedups over concepts       identity changes over concepts
    ("baseline", 1.0, 0.0, 0.0, BUDGET),     # 1, 1, 1, 1, 1            0, 0, 0, 0, 0
    ("clip_s", 2.0, 0.0, -0.01, 500),        # 2, 2, 2, 2, 2            -0.01 x 5
    ("few_iters", 2.5, 0.0, -0.03, 500),     # 2.5 x 5                  -0.05, -0.04, -0.03, -0.02, -0.01
    ("dvar", 4.0, 2.0, 0.0, 300),            # 2, 3, 4, 5, 6            0.02, -0.01, 0, 0.01, -0.02
])
@pytest.mark.parametrize("method", METHODS)
def test_summary_speedup_and_identity_change(results, method, variant, speedup, speedup_iqr, identity_change, steps):
    row = next(r for r in tables.summary_table(report.load_records(results))
               if (r["method"], r["variant"]) == (method, variant))
    assert row["speedup_median"] == pytest.approx(speedup)
    assert row["speedup_iqr"] == pytest.approx(speedup_iqr)
    assert row["identity_change"] == pytest.approx(identity_change, abs=1e-12)
    assert row["steps_median"] == steps


@pytest.mark.parametrize("variant, p_value", [
    ("baseline", None),   # all differences zero
    ("clip_s", 0.0625),   # 5 negative differences: smallest exact two-sided p with 5 pairs
    ("dvar", 1.0),        # symmetric differences
])
def test_summary_wilcoxon_against_baseline(results, variant, p_value):
    row = next(r for r in tables.summary_table(report.load_records(results))
               if (r["method"], r["variant"]) == ("textual_inversion", variant))
    assert row["identity_p"] == (None if p_value is None else pytest.approx(p_value))


def test_saving_share_is_the_speedup_over_the_step_saving(results):
    """dvar on concept c: (200 + 50c) steps of 1000 in 1/(2 + c) of the baseline's time -> (2 + c)(200 + 50c)/1000."""
    row = next(r for r in tables.summary_table(report.load_records(results))
               if (r["method"], r["variant"]) == ("textual_inversion", "dvar"))
    assert row["saving_share_median"] == pytest.approx(np.median([(2 + c) * (200 + 50 * c) / 1000 for c in range(5)]))


def test_summary_skips_speedup_without_baseline_and_p_under_five_pairs():
    records = [make_record("dreambooth", concept, "dvar") for concept in CONCEPTS[:3]]
    [row] = tables.summary_table(records)
    assert math.isnan(row["speedup_median"]) and row["identity_change"] is None and row["identity_p"] is None


def test_frozen_batch_loss_is_informative_and_training_loss_is_not(results):
    rows = tables.informativeness(report.load_traces(results))
    assert len(rows) == len(METHODS) * len(CONCEPTS) - 1, "the trace without an every-step loss is skipped"
    assert all(r["n_checks"] == BUDGET // EVERY for r in rows)
    assert all(r["rho_eval_loss"] < -0.9 for r in rows)
    for aggregate in tables.informativeness_by_method(rows):
        assert aggregate["rho_eval_loss"] < -0.9
        assert abs(aggregate["rho_train_loss"]) < 0.3
        assert abs(aggregate["rho_train_loss_smoothed"]) < 0.3


STEPS = list(range(0, 1050, 50))  # 21 checks, step 0 to the budget


def _plateau_at(step: int, low: float = 0.4, high: float = 0.7) -> list[float]:
    return [low + (high - low) * min(s, step) / step for s in STEPS]


@pytest.mark.parametrize("identity, noise_sd, smooth, expected", [
    # a planted plateau is found: a linear rise to 0.7 at the planted step, flat after
    (_plateau_at(400), 0.01, 1, (400, "saturated")),
    (_plateau_at(400), 0.01, 3, (400, "saturated")),
    (_plateau_at(200), 0.01, 1, (200, "saturated")),
    (_plateau_at(600), 0.01, 1, (600, "saturated")),
    # noisier checks: the last checks of the rise are not significantly below the plateau
    (_plateau_at(400), 0.05, 1, (300, "saturated")),
    # no plateau: identity still rises at the budget
    ([0.4 + 0.3 * s / 1000 for s in STEPS], 0.01, 3, (None, "still rising")),
    # nothing learned: step 0 is already on the plateau
    ([0.5] * len(STEPS), 0.01, 3, (0, "flat")),
    # one lucky check before the plateau does not end the rise early once neighbours are averaged
    ([v + (0.18 if s == 150 else 0.0) for s, v in zip(STEPS, _plateau_at(400))], 0.01, 3, (400, "saturated")),
    ([v + (0.18 if s == 150 else 0.0) for s, v in zip(STEPS, _plateau_at(400))], 0.01, 1, (150, "saturated")),
])
def test_oracle_saturation_on_planted_curves(identity, noise_sd, smooth, expected):
    found = saturation.oracle_saturation(STEPS, identity, noise_sd, smooth=smooth)
    assert (found.step, found.status) == expected


_WIGGLE = [0.0, 0.01, -0.01, 0.02, -0.02, 0.01, 0.0, -0.01, 0.01, 0.0, -0.01, 0.02, -0.02, 0.0, 0.01, -0.01, 0.0,
           0.01, -0.01, 0.0, 0.01]  # +-2 noise SDs at noise 0.01: no real change


@pytest.mark.parametrize("identity, noise_sd, status, step", [
    # learned fast, then declined (TI purple_checkered_diamond 0.44 -> 0.73 at step 100 -> 0.61): not flat,
    # saturated at the first check on the final plateau
    ([0.44, 0.64, 0.73] + [0.61] * 18, 0.035, "saturated", 50),
    # CD orange_checkered_square: 0.68 at step 150, back to 0.45 by the end
    ([0.41, 0.58, 0.64, 0.68] + [0.45] * 17, 0.04, "saturated", 50),
    # a small steady rise that no single check shows: the mean of the checks does
    ([0.53] + [0.58 + w for w in _WIGGLE[1:]], 0.02, "saturated", 50),
    # noise around step 0's level: nothing measurable learned
    ([0.5 + w for w in _WIGGLE], 0.01, "flat", 0),
    # a drop is not learning
    ([0.5] + [0.4] * 20, 0.01, "flat", 0),
])
def test_flat_means_no_check_is_significantly_above_step_0(identity, noise_sd, status, step):
    found = saturation.oracle_saturation(STEPS, identity, noise_sd)
    assert (found.status, found.step) == (status, step)
    assert saturation.learned_something(identity, noise_sd) == (status != "flat")


def _oracle_row(status: str, saturation_step: int | None, stop: int, budget: int = 1000) -> dict:
    found = saturation.Saturation(saturation_step, status, 0.7)
    judged = saturation.censored_saturation(found, budget)
    return {"method": "dreambooth_lora", "concept": f"c{stop}", "saturation_step": saturation_step,
            "saturation_status": status, "plateau": 0.7, "budget": budget, "judged_saturation": judged,
            "dvar_stop": stop, "dvar_ratio": stop / judged if judged else None,
            "dvar_saving_captured": saturation.saving_captured(stop, judged, budget), "dvar_regret": 0.0}


@pytest.mark.parametrize("rows, n, too_early, too_late, ratio, captured, at_budget", [
    # saturated at 200: stops at 300 and 500 are 1.5x and 2.5x saturation
    ([_oracle_row("saturated", 200, 300), _oracle_row("saturated", 200, 500)], 2, 0.0, 0.5, 2.0, 0.75, 0),
    # a still-rising concept counts, censored at the budget: a stop before the budget is too early, never too late
    ([_oracle_row("saturated", 200, 300), _oracle_row("still rising", None, 600)], 2, 0.5, 0.0, 1.05, 0.4375, 0),
    # stopping at the budget on a still-rising concept is right (ratio 1, a tie with the budget), saves nothing
    ([_oracle_row("still rising", None, 1000)], 1, 0.0, 0.0, 1.0, 0.0, 1),
    # flat concepts are left out of the ratios, but counted
    ([_oracle_row("saturated", 200, 300), _oracle_row("flat", 0, 100)], 1, 0.0, 0.0, 1.5, 0.875, 0),
])
def test_oracle_summary_censors_still_rising_concepts_at_the_budget(rows, n, too_early, too_late, ratio, captured,
                                                                     at_budget):
    [row] = [r for r in saturation.oracle_summary(rows) if r["rule"] == "dvar"]
    assert (row["n"], row["too_early"], row["too_late"], row["at_budget"]) == (n, too_early, too_late, at_budget)
    assert row["ratio_median"] == pytest.approx(ratio) and row["saving_captured_median"] == pytest.approx(captured)
    assert row["flat"] == sum(r["saturation_status"] == "flat" for r in rows)


@pytest.mark.parametrize("steps, identity, noise_sd", [
    ([0, 100, 200], [0.1, 0.2, 0.3], 0.01),  # too few checks
    (STEPS, _plateau_at(400), 0.0),  # no noise scale
])
def test_oracle_saturation_refuses_what_it_cannot_judge(steps, identity, noise_sd):
    with pytest.raises(ValueError):
        saturation.oracle_saturation(steps, identity, noise_sd)


def test_power_table_sees_the_planted_bad_stops(results):
    rows = {(r["method"], r["comparison"]): r for r in power.power_table(report.load_records(results))}
    assert set(rows) == {(m, c) for m in METHODS for c, _ in power.COMPARISONS}
    step0 = rows["textual_inversion", "budget_vs_step0"]
    assert step0["n"] == 5 and step0["median_delta"] == pytest.approx(0.304)
    assert step0["p_value"] == pytest.approx(0.0625), "5 pairs, all one sign: the smallest two-sided p"
    sd = np.std(RETEST, ddof=1) / math.sqrt(2)  # retest minus score = RETEST
    assert step0["delta_over_noise"] == pytest.approx(0.304 / sd)
    assert rows["textual_inversion", "budget_vs_early10"]["median_delta"] == pytest.approx(0.154)
    assert power.sampling_noise_sd([make_record("m", "cat", "dvar")]) is None, "no retest, no noise estimate"


def test_power_verdicts_name_what_falls_short():
    rows = [{"method": "m", "comparison": "budget_vs_step0", "n": 48, "median_delta": 0.2, "p_value": 1e-6,
             "delta_over_noise": 3.0},
            {"method": "m", "comparison": "budget_vs_early10", "n": 48, "median_delta": 0.05, "p_value": 0.2,
             "delta_over_noise": 0.8}]
    [sentence] = power.power_verdicts(rows)
    assert "gain = 3.0 test-retest SDs (bar >= 5)" in sentence and "budget vs early10 p = 0.2" in sentence
    rows[0]["delta_over_noise"], rows[1]["p_value"] = 9.0, 0.001
    assert "a bad stop is visible" in power.power_verdicts(rows)[0]


def _rule(variant: str, steps: float, decision: str | None = None) -> tuple[dict, list[dict]]:
    """A summary row and, unless ``decision`` is None, its non-inferiority row."""
    row = {"method": "dreambooth", "variant": variant, "steps_median": steps}
    ni = {"method": "dreambooth", "rule": variant, "mean_delta": -0.01, "ci_low": -0.03, "ci_high": 0.01,
          "noninferior": decision}
    return row, [] if decision is None else [ni]


def _budget_check(*rules):
    rows = [_rule("baseline", 1000), *rules]
    return saturation.budget_check([r for r, _ in rows], [n for _, ni in rows for n in ni])


@pytest.mark.parametrize("rules, variant, ratio", [
    ([_rule("clip_s", 200, "no"), _rule("dvar", 400, "yes")], "dvar", 2.5),
    ([_rule("clip_s", 200, "no"), _rule("dvar", 400, "undecided"), _rule("few_iters", 500, "yes")], "few_iters", 2.0),
    ([_rule("clip_s", 200, "no"), _rule("dvar", 400, "undecided")], None, None),  # undecided is not a pass
    ([_rule("dvar", 250, None)], None, None),  # no decision: no evidence either way
    ([_rule("early10", 100, "yes"), _rule("dvar", 400, "yes")], "dvar", 2.5),  # a control is not a rule
])
def test_budget_check_picks_the_earliest_non_inferior_rule(rules, variant, ratio):
    [row] = _budget_check(*rules)
    assert row["variant"] == variant
    assert row["budget_ratio"] == (pytest.approx(ratio) if ratio else None)


def test_ablation_table(results):
    rows = {r["setting"]: r for r in tables.ablation_table(report.load_traces(results))}
    assert list(rows) == ["none", "noise", "timesteps"]
    assert rows["none"] == {"setting": "none", "n": 1, "stopped_fraction": 1.0, "stop_step_median": 400.0,
                            "rho_median": pytest.approx(-1.0)}
    assert rows["noise"]["stopped_fraction"] == 0.0 and rows["noise"]["stop_step_median"] is None
    assert abs(rows["noise"]["rho_median"]) < 0.6
    assert rows["timesteps"]["rho_median"] == pytest.approx(-1.0), "only the checks its loss covers count"


def test_write_report_writes_tables_csvs_and_plots(results):
    path = report.write_report(results)
    folder = results / "report"
    assert path == folder / "report.md"
    expected = ["report.md", "runs.csv", "summary.csv", "informativeness.csv", "power.csv", "oracle.csv",
                "curves_textual_inversion.png",
                "curves_dreambooth_lora.png", "speedup_vs_quality.png", "informativeness.png", "ablation.png"]
    assert all((folder / name).stat().st_size > 0 for name in expected)

    text = path.read_text()
    assert "- preset: synthetic" in text and "- model: mini-sd" in text
    lines = text.splitlines()
    for method in METHODS:
        for variant in VARIANTS:
            assert any(line.startswith(f"| {method} | {variant} |") for line in lines)
    assert "| textual_inversion | dvar | 5 | 300 ± 100 | 3.33 ± 1.14 |" in text  # steps, then budget / stop
    assert "DVAR keeps quality everywhere here" in text
    assert "No wall-clock speedup exceeds 1.1x its step speedup" not in text, "the synthetic few_iters is too fast"
    assert "**Timing artefact:**" in text and "textual_inversion few_iters (2.50x for a step speedup of 2.00x)" in text
    assert "| textual_inversion | retest | 5 |" in text and "| textual_inversion | early10 | 5 |" in text
    assert "textual_inversion: the controls hold (retest non-inferior, CI half-width" in text
    assert "identity stops improving by step 300 (dvar), and the budget sits 3.3x past it" in text
    assert "| textual_inversion | budget_vs_step0 | 5 | 0.304 | 0.0625 |" in text
    assert "textual_inversion: the benchmark's power falls short: budget vs step 0 p = 0.062 (bar < 0.001)" in text
    assert "on the concepts no setting was tuned on" not in text and not (folder / "power_untuned.csv").exists(), \
        "no concept order in benchmark.json: no untuned table"

    with open(folder / "power.csv") as handle:
        assert next(csv.reader(handle)) == ["method", "comparison", "n", "median_delta", "p_value", "delta_over_noise"]
    with open(folder / "noninferiority.csv") as handle:
        ni = list(csv.DictReader(handle))
    assert list(ni[0])[:8] == ["method", "rule", "n", "mean_delta", "ci_low", "ci_high", "margin", "noninferior"]
    decisions = {(r["method"], r["rule"]): r["noninferior"] for r in ni}
    assert decisions["textual_inversion", "dvar"] == "yes" and decisions["textual_inversion", "retest"] == "yes"
    assert decisions["textual_inversion", "early10"] == decisions["textual_inversion", "step0"] == "no"
    with open(folder / "oracle.csv") as handle:
        oracle = list(csv.DictReader(handle))
    assert len(oracle) == len(METHODS) * len(CONCEPTS)
    assert {"method", "concept", "saturation_step", "budget", "dvar_stop", "clip_s_stop"} <= set(oracle[0])
    assert all(row["saturation_status"] == "saturated" and 200 <= int(row["saturation_step"]) <= 600 for row in oracle)

    with open(folder / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == len(METHODS) * len(CONCEPTS) * len(VARIANTS)
    assert {"alignment_color", "alignment_shape"} <= set(runs[0])
    with open(folder / "summary.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(METHODS) * len(VARIANTS)


def test_report_repeats_the_power_table_without_the_tuning_concepts(results):
    meta = json.loads((results / "benchmark.json").read_text())
    # 14 concepts before the 5 recorded ones: positions 14-18, of which 16-18 were not used for tuning
    order = [f"tuned_{i}" for i in range(config.TUNING_CONCEPTS - 2)] + list(CONCEPTS)
    _write(results / "benchmark.json", {**meta, "concepts": {method: order for method in METHODS}})
    text = report.write_report(results).read_text()
    with open(results / "report" / "power_untuned.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["n"] for row in rows} == {"3"} and len(rows) == len(METHODS) * len(power.COMPARISONS)
    assert "### The same, on the concepts no setting was tuned on" in text
    assert "| textual_inversion | budget_vs_step0 | 3 |" in text


def test_report_says_where_dvar_loses(results):
    for concept in CONCEPTS:
        record = make_record("dreambooth_lora", concept, "dvar")
        record.update(wall_time_s=2 * BASELINE_WALL_S, identity=record["identity"] - 0.1)
        _write(results / "records" / "dreambooth_lora" / concept / "dvar.json", record)
    (results / "traces").rename(results / "no-traces")
    text = report.write_report(results).read_text()
    assert "DVAR is slower than the full budget for dreambooth_lora: median wall-clock speedup 0.50x." in text
    assert "DVAR loses identity for dreambooth_lora: mean change -0.100 [-0.112, -0.088]" in text
    assert "for textual_inversion" not in text.split("## Speedup and quality")[1].split("##")[0]


def test_cli_prints_report_path_and_table(results, capsys):
    report.main([str(results)])
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0] == str(results / "report" / "report.md")
    assert "| dreambooth_lora | few_iters |" in stdout


def test_cli_exits_2_on_a_folder_without_records(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no run records" in capsys.readouterr().err


@pytest.mark.parametrize("trace, hours, untimed", [
    ({"method": "dreambooth", "job_s": 7200.0, "setup_s": 1.0, "train_step_s": [1.0]}, 2.0, 0),
    ({"method": "dreambooth", "setup_s": 600.0, "save_s": 600.0, "train_step_s": [600.0, 600.0],
      "dvar": {"eval_s": [600.0]}, "identity_checks": {"check_s": [600.0]}}, 1.0, 1),
])
def test_benchmark_cost_uses_job_time_else_the_measured_parts(trace, hours, untimed):
    [row] = tables.benchmark_cost([trace], [])
    assert row["trajectory_hours"] == pytest.approx(hours) and row["untimed_jobs"] == untimed


def test_budget_check_needs_an_early_rule():
    assert saturation.budget_check([_rule("baseline", 1000)[0]], []) == []
    text = render.budget_markdown(_budget_check(_rule("dvar", 300, "undecided")))
    assert "no early stop is shown to keep identity" in text

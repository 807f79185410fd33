"""Aggregate a personalization benchmark results folder into tables, CSVs and plots.

Reads ``OUT/benchmark.json``, ``OUT/records/<method>/<concept>/<variant>.json`` and
``OUT/traces/<method>/<concept>.json`` and writes ``OUT/report/``: ``report.md`` (the paper's
Table 1 as ``median ± IQR`` per method and stopping rule, DVAR versus the full budget, how
informative each loss is, identity saturation, the batch ablation), ``runs.csv``,
``summary.csv``, ``informativeness.csv`` and PNG plots.

    python -m benchmarks.personalization.report outputs/personalization
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

METHODS = ("textual_inversion", "dreambooth_lora", "custom_diffusion", "dreambooth")
VARIANTS = ("baseline", "clip_s", "few_iters", "dvar")
ABLATION_SETTINGS = ("none", "images", "latents", "noise", "captions", "timesteps")
MIN_WILCOXON_PAIRS = 5
SIGNIFICANCE = 0.05
MAX_CURVE_CONCEPTS = 6
SATURATION_SMOOTH = 5  # checks (250 steps at the default check interval)

RUN_COLUMNS = (
    "method", "concept", "variant", "steps", "max_train_steps", "wall_time_s", "train_s", "monitor_s", "setup_s",
    "identity", "alignment", "identity_attributes", "stop_reason",
)
SUMMARY_COLUMNS = (
    "method", "variant", "n", "steps_median", "steps_iqr", "minutes_median", "minutes_iqr",
    "speedup_median", "speedup_iqr", "identity_median", "identity_iqr", "alignment_median", "alignment_iqr",
    "identity_change", "alignment_change", "identity_p",
)
INFORMATIVENESS_COLUMNS = (
    "method", "concept", "n_checks", "rho_eval_loss", "rho_train_loss", "rho_train_loss_smoothed",
)
RHO_COLUMNS = INFORMATIVENESS_COLUMNS[3:]


# --------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_records(out: Path) -> list[dict]:
    """All run records under ``out/records``, in path order.

    >>> load_records(Path("outputs/personalization"))[0]["variant"]  # doctest: +SKIP
    'baseline'
    """
    return [_read_json(path) for path in sorted(Path(out).glob("records/*/*/*.json"))]


def load_traces(out: Path) -> list[dict]:
    """All trajectory traces under ``out/traces``, in path order.

    >>> load_traces(Path("outputs/personalization"))[0]["dvar"]["window"]  # doctest: +SKIP
    50
    """
    return [_read_json(path) for path in sorted(Path(out).glob("traces/*/*.json"))]


def load_meta(out: Path) -> dict:
    """``out/benchmark.json``, or ``{}`` when it is absent.

    >>> load_meta(Path("/nonexistent"))
    {}
    """
    path = Path(out) / "benchmark.json"
    return _read_json(path) if path.is_file() else {}


# ------------------------------------------------------------------------------------ statistics


def _finite(values: Iterable[Any]) -> np.ndarray:
    kept = np.asarray([v for v in values if v is not None], dtype=float)
    return kept[~np.isnan(kept)]


def _median(values: Iterable[Any]) -> float | None:
    kept = _finite(values)
    return float(np.median(kept)) if kept.size else None


def median_iqr(values: Iterable[float | None]) -> tuple[float, float]:
    """Median and interquartile range (q75 - q25), ignoring ``None`` and NaN; NaNs when nothing is left.

    >>> median_iqr([1, 2, 3, 4, 5, None])
    (3.0, 2.0)
    """
    kept = _finite(values)
    if not kept.size:
        return math.nan, math.nan
    q25, median, q75 = np.percentile(kept, [25, 50, 75])
    return float(median), float(q75 - q25)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho, or ``None`` when under 3 points or either side is constant.

    >>> spearman([1, 2, 3, 4], [8, 6, 4, 2])
    -1.0
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def wilcoxon_p(differences: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; ``None`` under 5 pairs or all zero.

    >>> wilcoxon_p([-0.01] * 5)
    0.0625
    """
    differences = _finite(differences)
    if differences.size < MIN_WILCOXON_PAIRS or not np.any(differences):
        return None
    return float(stats.wilcoxon(differences).pvalue)


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    present = set(names)
    return [name for name in order if name in present] + sorted(present - set(order))


# ----------------------------------------------------------------------------------- main table


def paired_changes(records: list[dict]) -> list[dict]:
    """Per non-baseline run: speedup over and identity/alignment change against its concept's baseline.

    >>> base = {"method": "m", "concept": "c", "variant": "baseline", "wall_time_s": 60, "identity": 0.7,
    ...         "alignment": 0.3}
    >>> run = dict(base, variant="dvar", wall_time_s=20, identity=0.69, alignment=0.3)
    >>> paired_changes([base, run])[0]["speedup"]
    3.0
    """
    baselines = {(r["method"], r["concept"]): r for r in records if r["variant"] == "baseline"}
    rows = []
    for record in records:
        base = baselines.get((record["method"], record["concept"]))
        if base is None or record["variant"] == "baseline":
            continue
        rows.append({
            "method": record["method"], "concept": record["concept"], "variant": record["variant"],
            "speedup": _ratio(base.get("wall_time_s"), record.get("wall_time_s")),
            "identity_change": _difference(record.get("identity"), base.get("identity")),
            "alignment_change": _difference(record.get("alignment"), base.get("alignment")),
        })
    return rows


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _difference(value: float | None, reference: float | None) -> float | None:
    return value - reference if value is not None and reference is not None else None


def summary_table(records: list[dict]) -> list[dict]:
    """One row per (method, variant): ``median ± IQR`` of steps, minutes, speedup, identity and alignment,
    median changes against the baseline and the Wilcoxon p-value of identity against the baseline.

    >>> rows = summary_table([{"method": "dreambooth", "concept": "dog", "variant": "baseline", "steps": 800,
    ...                        "wall_time_s": 120.0, "identity": 0.8, "alignment": 0.3}])
    >>> rows[0]["minutes_median"], rows[0]["speedup_median"], rows[0]["identity_p"]
    (2.0, 1.0, None)
    """
    baselines = {(r["method"], r["concept"]): r for r in records if r["variant"] == "baseline"}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[record["method"], record["variant"]].append(record)

    rows = []
    for method in _ordered((m for m, _ in groups), METHODS):
        for variant in _ordered((v for m, v in groups if m == method), VARIANTS):
            runs = groups[method, variant]
            pairs = [(run, baselines[method, run["concept"]]) for run in runs if (method, run["concept"]) in baselines]
            identity_changes = [_difference(run.get("identity"), base.get("identity")) for run, base in pairs]
            alignment_changes = [_difference(run.get("alignment"), base.get("alignment")) for run, base in pairs]
            row: dict[str, Any] = {"method": method, "variant": variant, "n": len(runs)}
            columns = {
                "steps": [run.get("steps") for run in runs],
                "minutes": [_ratio(run.get("wall_time_s"), 60.0) for run in runs],
                "speedup": [_ratio(base.get("wall_time_s"), run.get("wall_time_s")) for run, base in pairs],
                "identity": [run.get("identity") for run in runs],
                "alignment": [run.get("alignment") for run in runs],
            }
            for name, values in columns.items():
                row[f"{name}_median"], row[f"{name}_iqr"] = median_iqr(values)
            row["identity_change"] = _median(identity_changes)
            row["alignment_change"] = _median(alignment_changes)
            row["identity_p"] = wilcoxon_p([d for d in identity_changes if d is not None])
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ informativeness


def _trailing_mean(values: Sequence[float], step: int, window: int) -> float:
    return float(np.mean(values[max(0, step - window):step]))


def informativeness(traces: list[dict]) -> list[dict]:
    """Per informative trace: Spearman's rho of the identity checks against the frozen-batch (DVAR) loss,
    the raw training loss and the training loss averaged over the ``every`` steps before each check.

    Identity rises as a loss falls, so an informative loss has a strongly negative rho.

    >>> trace = {"method": "m", "concept": "c", "informative": True, "train_loss": [5, 1, 4, 2, 3, 6],
    ...          "dvar": {"steps": [1, 2, 3, 4, 5, 6], "eval_loss": [9, 8, 7, 6, 5, 4]},
    ...          "identity_checks": {"every": 2, "steps": [2, 4, 6], "identity": [0.1, 0.5, 0.7]}}
    >>> informativeness([trace])[0]["rho_eval_loss"]
    -1.0
    """
    rows = []
    for trace in traces:
        if not trace.get("informative"):
            continue
        checks = trace["identity_checks"]
        eval_loss = dict(zip(trace["dvar"]["steps"], trace["dvar"]["eval_loss"]))
        train_loss = trace["train_loss"]
        every = int(checks.get("every") or 1)
        points = [(s, i) for s, i in zip(checks["steps"], checks["identity"])
                  if s in eval_loss and 1 <= s <= len(train_loss) and i is not None]
        identity = [i for _, i in points]
        rows.append({
            "method": trace["method"], "concept": trace["concept"], "n_checks": len(points),
            "rho_eval_loss": spearman(identity, [eval_loss[s] for s, _ in points]),
            "rho_train_loss": spearman(identity, [train_loss[s - 1] for s, _ in points]),
            "rho_train_loss_smoothed": spearman(identity, [_trailing_mean(train_loss, s, every) for s, _ in points]),
        })
    return _sorted_by_method(rows)


def _sorted_by_method(rows: list[dict]) -> list[dict]:
    rank = {method: i for i, method in enumerate(METHODS)}
    return sorted(rows, key=lambda row: (rank.get(row["method"], len(rank)), row["method"], row["concept"]))


def informativeness_by_method(rows: list[dict]) -> list[dict]:
    """Median of each rho over a method's traces (``rows`` from :func:`informativeness`).

    >>> informativeness_by_method([{"method": "m", "concept": "c", "n_checks": 9, "rho_eval_loss": -0.9,
    ...                             "rho_train_loss": 0.1, "rho_train_loss_smoothed": -0.2}])[0]["rho_eval_loss"]
    -0.9
    """
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    return [
        {"method": method, "n_traces": len(by_method[method]),
         **{column: _median(row[column] for row in by_method[method]) for column in RHO_COLUMNS}}
        for method in _ordered(by_method, METHODS)
    ]


# ------------------------------------------------------------------------------------- ablation


def ablation_table(traces: list[dict]) -> list[dict]:
    """Per frozen-batch setting (which part was redrawn at every evaluation; ``none``: fully frozen):
    runs, fraction that stopped, median stop step and median rho of identity against that loss.

    >>> trace = {"identity_checks": {"steps": [1, 2, 3], "identity": [0.1, 0.4, 0.5]},
    ...          "ablation": {"none": {"steps": [1, 2, 3], "eval_loss": [3, 2, 1], "stop_step": 3}}}
    >>> ablation_table([trace])[0]
    {'setting': 'none', 'n': 1, 'stopped_fraction': 1.0, 'stop_step_median': 3.0, 'rho_median': -1.0}
    """
    runs: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for trace in traces:
        for setting, curve in (trace.get("ablation") or {}).items():
            runs[setting].append((trace, curve))

    rows = []
    for setting in _ordered(runs, ABLATION_SETTINGS):
        stops = [curve.get("stop_step") for _, curve in runs[setting]]
        rows.append({
            "setting": setting,
            "n": len(stops),
            "stopped_fraction": sum(stop is not None for stop in stops) / len(stops),
            "stop_step_median": _median(stops),
            "rho_median": _median(_identity_rho(trace["identity_checks"], curve) for trace, curve in runs[setting]),
        })
    return rows


def _identity_rho(checks: dict, curve: dict) -> float | None:
    loss = dict(zip(curve["steps"], curve["eval_loss"]))
    points = [(i, loss[s]) for s, i in zip(checks["steps"], checks["identity"]) if s in loss and i is not None]
    return spearman([i for i, _ in points], [l for _, l in points])


# ----------------------------------------------------------------------------------- saturation


def centered_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Running mean over ``window`` neighbouring values (fewer at the ends).

    >>> centered_mean([0.0, 3.0, 0.0, 3.0], 3).tolist()
    [1.5, 1.0, 2.0, 1.5]
    """
    values = np.asarray(values, dtype=float)
    half = window // 2
    return np.array([values[max(0, i - half):i + half + 1].mean() for i in range(len(values))])


def saturation_step(steps: Sequence[int], identity: Sequence[float], fraction: float = 0.95,
                    smooth: int = 1) -> int | None:
    """First check step where identity, averaged over ``smooth`` neighbouring checks, reaches
    ``min + fraction * (max - min)`` of that averaged curve.

    Averaging matters on noisy curves: on raw values the threshold is set by the single highest check,
    so the statistic marks the noise maximum instead of the plateau.

    >>> saturation_step([100, 200, 300, 400], [0.2, 0.6, 0.79, 0.8], fraction=0.9)
    300
    >>> plateau_with_a_lucky_check = [0.0, 0.3, 0.5, 0.5, 0.5, 0.5, 0.6, 0.5, 0.5, 0.5]
    >>> saturation_step(range(50, 550, 50), plateau_with_a_lucky_check, smooth=1)
    350
    >>> saturation_step(range(50, 550, 50), plateau_with_a_lucky_check, smooth=5)
    250
    """
    pairs = [(s, i) for s, i in zip(steps, identity) if i is not None and math.isfinite(i)]
    if not pairs:
        return None
    curve = centered_mean([i for _, i in pairs], smooth)
    target = curve.min() + fraction * (curve.max() - curve.min())
    return next(int(s) for (s, _), value in zip(pairs, curve) if value >= target - 1e-12)


def saturation_steps(traces: list[dict], fraction: float = 0.95, smooth: int = 1) -> list[dict]:
    """Per method, over informative traces: median identity saturation step (:func:`saturation_step`),
    median budget and how many times past saturation the budget sits (budget / saturation).

    >>> trace = {"method": "m", "informative": True, "max_train_steps": 1000,
    ...          "identity_checks": {"steps": [100, 200, 300], "identity": [0.1, 0.8, 0.8]}}
    >>> saturation_steps([trace])[0]["budget_ratio"]
    5.0
    """
    by_method: dict[str, list[tuple[int | None, int]]] = defaultdict(list)
    for trace in traces:
        if trace.get("informative"):
            checks = trace["identity_checks"]
            by_method[trace["method"]].append(
                (saturation_step(checks["steps"], checks["identity"], fraction, smooth), trace["max_train_steps"])
            )
    rows = []
    for method in _ordered(by_method, METHODS):
        saturation = _median(step for step, _ in by_method[method])
        budget = _median(budget for _, budget in by_method[method])
        rows.append({
            "method": method, "n": len(by_method[method]), "fraction": fraction, "smooth": smooth,
            "saturation_step_median": saturation, "budget_median": budget,
            "budget_ratio": _ratio(budget, saturation),
        })
    return rows


def budget_check(summary: list[dict]) -> list[dict]:
    """Per method, over all concepts: the earliest-stopping rule whose identity is not significantly below
    the full budget's (paired Wilcoxon p >= 0.05, or a median change >= 0), and how many times its median
    stop the budget is. Identity that no longer improves after that step is the population-level
    evidence that the budget sits past saturation; ``None`` as the rule means no early stop is shown to keep it.

    >>> budget_check([{"method": "m", "variant": "baseline", "steps_median": 1000},
    ...               {"method": "m", "variant": "dvar", "steps_median": 400, "identity_change": -0.001,
    ...                "identity_p": 0.4}])[0]["budget_ratio"]
    2.5
    """
    rows = []
    for method in _ordered({row["method"] for row in summary}, METHODS):
        rules = {row["variant"]: row for row in summary if row["method"] == method}
        if "baseline" not in rules or len(rules) == 1:
            continue
        budget = rules["baseline"]["steps_median"]
        keeps_identity = [
            row for name, row in rules.items()
            if name != "baseline" and not _is_missing(row["steps_median"])
            and ((row.get("identity_p") is not None and row["identity_p"] >= SIGNIFICANCE)
                 or (row.get("identity_change") is not None and row["identity_change"] >= 0))
        ]
        earliest = min(keeps_identity, key=lambda row: row["steps_median"], default={})
        rows.append({
            "method": method, "budget": budget,
            **{key: earliest.get(key) for key in ("variant", "steps_median", "identity_change", "identity_p")},
            "budget_ratio": _ratio(budget, earliest.get("steps_median")),
        })
    return rows


# ------------------------------------------------------------------------------------- markdown


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: float | None, digits: int) -> str:
    return "n/a" if _is_missing(value) else f"{round(value, digits) + 0.0:.{digits}f}"


def _spread(row: dict, name: str, digits: int) -> str:
    median, iqr = row[f"{name}_median"], row[f"{name}_iqr"]
    return "n/a" if _is_missing(median) else f"{_number(median, digits)} ± {_number(iqr, digits)}"


def _p_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table.

    >>> print(markdown_table(["a", "b"], [[1, 2]]))
    | a | b |
    |---|---|
    | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(summary: list[dict]) -> str:
    """The paper's Table 1: one row per method and stopping rule, ``median ± IQR`` over concepts."""
    header = ["method", "variant", "n", "steps", "minutes", "speedup", "identity", "alignment",
              "Δ identity", "Δ alignment", "p (identity)"]
    return markdown_table(header, (
        [row["method"], row["variant"], row["n"], _spread(row, "steps", 0), _spread(row, "minutes", 2),
         _spread(row, "speedup", 2), _spread(row, "identity", 3), _spread(row, "alignment", 3),
         _number(row["identity_change"], 3), _number(row["alignment_change"], 3), _p_value(row["identity_p"])]
        for row in summary
    ))


def dvar_table(summary: list[dict]) -> str:
    """DVAR (and its ``dvar_every<k>`` settings) against the full budget, one row per method and setting."""
    baseline = {row["method"]: row for row in summary if row["variant"] == "baseline"}
    header = ["method", "variant", "DVAR steps", "budget steps", "speedup", "Δ identity", "Δ alignment", "p (identity)"]
    return markdown_table(header, (
        [row["method"], row["variant"], _spread(row, "steps", 0),
         _spread(baseline[row["method"]], "steps", 0) if row["method"] in baseline else "n/a",
         _spread(row, "speedup", 2), _number(row["identity_change"], 3), _number(row["alignment_change"], 3),
         _p_value(row["identity_p"])]
        for row in summary if row["variant"].startswith("dvar")
    ))


def dvar_verdict(summary: list[dict]) -> str:
    """One sentence per method where DVAR loses (median speedup < 1, or identity significantly lower), else one
    sentence saying no method does.

    >>> dvar_verdict([{"method": "dreambooth", "variant": "dvar", "speedup_median": 0.8, "identity_change": 0.0,
    ...                "identity_p": None}])
    'DVAR is slower than the full budget for dreambooth: median speedup 0.80x.'
    """
    sentences = []
    for row in summary:
        if not row["variant"].startswith("dvar"):
            continue
        name = "DVAR" if row["variant"] == "dvar" else f"DVAR ({row['variant']})"
        if not _is_missing(row["speedup_median"]) and row["speedup_median"] < 1:
            sentences.append(f"{name} is slower than the full budget for {row['method']}: "
                             f"median speedup {row['speedup_median']:.2f}x.")
        p, change = row["identity_p"], row["identity_change"]
        if p is not None and p < SIGNIFICANCE and change is not None and change < 0:
            sentences.append(f"{name} loses identity for {row['method']}: median change {change:+.3f} against the "
                             f"full budget (Wilcoxon p = {p:.3g}).")
    if sentences:
        return " ".join(sentences)
    return (f"DVAR loses nowhere here: no method has a median speedup below 1 or a significant "
            f"(p < {SIGNIFICANCE}) identity drop against the full budget.")


def informativeness_tables(rows: list[dict]) -> str:
    """Per-method medians, then one row per trace."""
    header = ["rho(identity, DVAR loss)", "rho(identity, train loss)", "rho(identity, smoothed train loss)"]
    per_method = markdown_table(["method", "traces", *header], (
        [row["method"], row["n_traces"], *(_number(row[c], 2) for c in RHO_COLUMNS)]
        for row in informativeness_by_method(rows)
    ))
    per_trace = markdown_table(["method", "concept", "checks", *header], (
        [row["method"], row["concept"], row["n_checks"], *(_number(row[c], 2) for c in RHO_COLUMNS)]
        for row in rows
    ))
    return per_method + "\n\n" + per_trace


def saturation_markdown(rows: list[dict]) -> str:
    """The saturation table of the traced concepts."""
    return markdown_table(["method", "traces", "saturation step (median)", "budget (median)", "budget / saturation"], (
        [row["method"], row["n"], _number(row["saturation_step_median"], 0), _number(row["budget_median"], 0),
         _number(row["budget_ratio"], 1)]
        for row in rows
    ))


def budget_markdown(rows: list[dict]) -> str:
    """The population-level budget check and one sentence per method."""
    table = markdown_table(["method", "budget", "earliest rule keeping identity", "its steps (median)",
                            "Δ identity", "p (identity)", "budget / its steps"], (
        [row["method"], _number(row["budget"], 0), row["variant"] or "none", _number(row["steps_median"], 0),
         _number(row["identity_change"], 3), _p_value(row["identity_p"]), _number(row["budget_ratio"], 1)]
        for row in rows
    ))
    sentences = []
    for row in rows:
        if row["variant"] is None:
            sentences.append(f"For {row['method']} no early stop keeps identity (each is significantly lower than "
                             f"the full budget's, or there are too few concepts to tell), so the budget is not shown "
                             f"to sit past saturation.")
        else:
            sentences.append(f"For {row['method']} identity stops improving by step {row['steps_median']:.0f} "
                             f"({row['variant']}), and the budget sits {row['budget_ratio']:.1f}x past it.")
    return "\n\n".join([table, " ".join(sentences)]) if sentences else table


def ablation_markdown(rows: list[dict]) -> str:
    """The frozen-batch ablation table."""
    return markdown_table(["redrawn at every evaluation", "runs", "stopped", "stop step (median)", "rho (median)"], (
        [row["setting"], row["n"], f"{row['stopped_fraction']:.0%}", _number(row["stop_step_median"], 0),
         _number(row["rho_median"], 2)]
        for row in rows
    ))


def _measured_parts_s(trace: dict) -> float:
    """A trajectory's setup, training steps, DVAR evaluations, identity checks and save, as recorded per step."""
    return (trace.get("setup_s", 0.0) + trace.get("save_s", 0.0) + sum(trace.get("train_step_s", ()))
            + sum(trace.get("dvar", {}).get("eval_s", ())) + sum(trace.get("identity_checks", {}).get("check_s", ())))


def benchmark_cost(traces: list[dict], records: list[dict]) -> list[dict]:
    """Hours each method's jobs took (trajectories with their scoring, and the few-iters runs), from the
    ``job_s`` the runner records. Jobs run before it recorded ``job_s`` are counted as untimed: trajectories
    then count their measured parts (:func:`_measured_parts_s`: everything but the final scoring), few-iters
    runs their ``wall_time_s``.

    >>> benchmark_cost([{"method": "dreambooth", "job_s": 3600}], [{"method": "dreambooth", "variant": "few_iters",
    ...                  "job_s": 1800}])
    [{'method': 'dreambooth', 'trajectories': 1, 'trajectory_hours': 1.0, 'few_iters_hours': 0.5, 'untimed_jobs': 0}]
    """
    rows = []
    for method in _ordered({t["method"] for t in traces}, METHODS):
        jobs = [t for t in traces if t["method"] == method]
        few = [r for r in records if r["method"] == method and r["variant"] == "few_iters"]
        rows.append({
            "method": method,
            "trajectories": len(jobs),
            "trajectory_hours": sum(t["job_s"] if "job_s" in t else _measured_parts_s(t) for t in jobs) / 3600,
            "few_iters_hours": sum(r.get("job_s") or r.get("wall_time_s") or 0.0 for r in few) / 3600,
            "untimed_jobs": sum("job_s" not in item for item in (*jobs, *few)),
        })
    return rows


def cost_markdown(rows: list[dict]) -> str:
    table = markdown_table(["method", "trajectories", "trajectory hours", "few-iters hours", "untimed jobs"], (
        [row["method"], row["trajectories"], _number(row["trajectory_hours"], 2), _number(row["few_iters_hours"], 2),
         row["untimed_jobs"]] for row in rows
    ))
    total = sum(row["trajectory_hours"] + row["few_iters_hours"] for row in rows)
    note = ""
    if any(row["untimed_jobs"] for row in rows):
        note = (" Untimed jobs ran before the runner recorded each job's total time: they count their measured "
                "training, rule and save time, without the final scoring.")
    return (f"{table}\n\nTotal: {total:.2f} hours of job time (each job is one process; see the machine line for "
            f"its threads).{note}")


def render_markdown(meta: dict, summary: list[dict], info: list[dict], saturation: list[dict],
                    ablation: list[dict], cost: Sequence[dict] = ()) -> str:
    """The whole ``report.md``."""
    header = [f"- {key}: {_meta_value(meta[key])}" for key in ("preset", "command", "machine", "model") if key in meta]
    sections = [
        "# Personalization benchmark: DVAR against the full budget, CLIP-s and few iterations",
        "\n".join(header),
        "## Table 1 (median ± IQR over concepts)\n\nSpeedup is the baseline wall time over the run's; Δ columns are "
        "medians over concepts of the change against the baseline; p is a paired Wilcoxon signed-rank test of "
        "identity against the baseline.\n\n" + main_table(summary),
        "## Speedup and quality change of DVAR vs baseline per method\n\n" + dvar_table(summary)
        + "\n\n" + dvar_verdict(summary),
    ]
    if info:
        sections.append("## How informative is each loss\n\nSpearman's rho between the identity score at the CLIP-s "
                        "checks and each loss at those steps; identity rises as the loss falls, so an informative "
                        "loss has a strongly negative rho.\n\n" + informativeness_tables(info))
    budget = budget_check(summary)
    if budget or saturation:
        text = ["## Is the budget past identity saturation?"]
        if budget:
            text.append("Over all concepts: the earliest-stopping rule whose identity is not significantly below "
                        f"the full budget's (paired Wilcoxon p >= {SIGNIFICANCE}, or a median change >= 0).\n\n"
                        + budget_markdown(budget))
        if saturation:
            first = saturation[0]
            text.append(f"On the traced concepts (identity at every CLIP-s check up to the budget): first check where "
                        f"identity, averaged over {first['smooth']} neighbouring checks, reaches min + "
                        f"{first['fraction']:g} × (max - min) of that averaged curve.\n\n" + saturation_markdown(saturation))
        sections.append("\n\n".join(text))
    if ablation:
        sections.append("## Frozen-batch ablation\n\n" + ablation_markdown(ablation))
    if cost:
        sections.append("## Cost of this benchmark\n\n" + cost_markdown(list(cost)))
    return "\n\n".join(section for section in sections if section) + "\n"


def _meta_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ------------------------------------------------------------------------------------------ csv


def flatten_record(record: dict) -> dict:
    """A record as one flat CSV row: ``alignment_by_attribute`` becomes ``alignment_<attr>`` columns,
    other dicts ``<key>_<subkey>``, lists JSON.

    >>> flatten_record({"variant": "dvar", "alignment_by_attribute": {"red": 0.9}})
    {'variant': 'dvar', 'alignment_red': 0.9}
    """
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            prefix = "alignment" if key == "alignment_by_attribute" else key
            flat.update({f"{prefix}_{name}": inner for name, inner in value.items()})
        elif isinstance(value, list):
            flat[key] = json.dumps(value)
        else:
            flat[key] = value
    return flat


def write_csv(path: Path, rows: list[dict], columns: Sequence[str] = ()) -> None:
    """Write ``rows`` with ``columns`` first, then any other keys in first-seen order."""
    fieldnames = list(columns)
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)


# ---------------------------------------------------------------------------------------- plots


VARIANT_COLORS = {"baseline": "tab:gray", "clip_s": "tab:orange", "few_iters": "tab:green", "dvar": "tab:blue",
                  "dvar_every5": "tab:purple"}
METHOD_MARKERS = {"textual_inversion": "o", "dreambooth_lora": "s", "custom_diffusion": "^", "dreambooth": "D"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _trailing_means(values: Sequence[float], window: int) -> np.ndarray:
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def _normalised(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    span = np.nanmax(values) - np.nanmin(values)
    return (values - np.nanmin(values)) / span if span > 0 else np.zeros_like(values)


def plot_curves(path: Path, traces: list[dict], stops: dict[tuple[str, str], dict[str, int]]) -> None:
    """Per concept: DVAR loss and identity (top), smoothed training loss (bottom), each variant's stop step."""
    plt = _pyplot()
    traces = traces[:MAX_CURVE_CONCEPTS]
    columns = min(3, len(traces))
    rows = math.ceil(len(traces) / columns)
    figure = plt.figure(figsize=(5 * columns, 5 * rows), constrained_layout=True)
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=[2, 1] * rows)
    for index, trace in enumerate(traces):
        row, column = divmod(index, columns)
        top = figure.add_subplot(grid[2 * row, column])
        bottom = figure.add_subplot(grid[2 * row + 1, column], sharex=top)
        dvar, checks = trace.get("dvar") or {}, trace.get("identity_checks") or {}
        if dvar.get("steps"):
            top.plot(dvar["steps"], dvar["eval_loss"], color="tab:blue", label="DVAR loss (frozen batch)")
        top.set_ylabel("DVAR loss")
        top.set_title(trace["concept"])
        if checks.get("steps"):
            identity_axis = top.twinx()
            identity_axis.plot(checks["steps"], checks["identity"], "o-", color="tab:red", markersize=3,
                               label="identity")
            identity_axis.set_ylabel("identity")
        if trace.get("train_loss"):
            window = int(checks.get("every") or max(1, len(trace["train_loss"]) // 50))
            steps = np.arange(1, len(trace["train_loss"]) + 1)
            bottom.plot(steps, _trailing_means(trace["train_loss"], window), color="tab:purple")
        bottom.set_ylabel("train loss (smoothed)")
        bottom.set_xlabel("step")
        for variant, step in stops.get((trace["method"], trace["concept"]), {}).items():
            for axis in (top, bottom):
                axis.axvline(step, color=VARIANT_COLORS.get(variant, "black"), linestyle="--", linewidth=1,
                             label=f"{variant} stop" if axis is top else None)
        if index == 0:
            handles, labels = top.get_legend_handles_labels()
            if checks.get("steps"):
                extra_handles, extra_labels = identity_axis.get_legend_handles_labels()
                handles, labels = handles + extra_handles, labels + extra_labels
            top.legend(handles, labels, fontsize="small", loc="center right")
    figure.suptitle(traces[0]["method"])
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_speedup_vs_quality(path: Path, changes: list[dict]) -> None:
    """Identity change against speedup over the baseline, coloured by variant, marker by method."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 5), constrained_layout=True)
    points = [c for c in changes if c["speedup"] is not None and c["identity_change"] is not None]
    for change in points:
        axis.scatter(change["speedup"], change["identity_change"], color=VARIANT_COLORS.get(change["variant"], "black"),
                     marker=METHOD_MARKERS.get(change["method"], "x"), alpha=0.8)
    axis.axvline(1, color="gray", linewidth=0.8)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xlabel("speedup over the full budget (x)")
    axis.set_ylabel("identity change vs the full budget")
    variants = _ordered({c["variant"] for c in points}, VARIANTS)
    methods = _ordered({c["method"] for c in points}, METHODS)
    colour_legend = axis.legend(
        [plt.Line2D([], [], color=VARIANT_COLORS.get(v, "black"), marker="o", linestyle="") for v in variants],
        variants, title="variant", loc="upper left", fontsize="small")
    axis.add_artist(colour_legend)
    axis.legend([plt.Line2D([], [], color="black", marker=METHOD_MARKERS.get(m, "x"), linestyle="") for m in methods],
                methods, title="method", loc="lower left", fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_informativeness(path: Path, rows: list[dict]) -> None:
    """Box and strip plot of rho per method for the DVAR loss, the training loss and its smoothed version."""
    plt = _pyplot()
    methods = _ordered({row["method"] for row in rows}, METHODS)
    losses = {"rho_eval_loss": ("DVAR loss", "tab:blue"), "rho_train_loss": ("train loss", "tab:gray"),
              "rho_train_loss_smoothed": ("smoothed train loss", "tab:purple")}
    figure, axis = plt.subplots(figsize=(2.5 + 2 * len(methods), 4.5), constrained_layout=True)
    width = 0.25
    for offset, (column, (label, colour)) in zip((-width, 0, width), losses.items()):
        for position, method in enumerate(methods):
            values = _finite(row[column] for row in rows if row["method"] == method)
            if not values.size:
                continue
            x = position + offset
            box = axis.boxplot(values, positions=[x], widths=width * 0.8, patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(colour)
                patch.set_alpha(0.35)
            axis.scatter(np.full(values.size, x), values, color=colour, s=12, zorder=3,
                         label=label if position == 0 else None)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xticks(range(len(methods)), methods)
    axis.set_ylim(-1.05, 1.05)
    axis.set_ylabel("Spearman rho with identity")
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_ablation(path: Path, trace: dict) -> None:
    """One concept's eval-loss curve per frozen-batch setting, normalised to [0, 1], identity overlaid."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ablation = trace["ablation"]
    for setting in _ordered(ablation, ABLATION_SETTINGS):
        curve = ablation[setting]
        if not curve.get("steps"):
            continue
        label = "fully frozen" if setting == "none" else f"{setting} redrawn"
        (line,) = axis.plot(curve["steps"], _normalised(curve["eval_loss"]), linewidth=1, label=label)
        if curve.get("stop_step") is not None:
            axis.axvline(curve["stop_step"], color=line.get_color(), linestyle=":", linewidth=1)
    checks = trace.get("identity_checks") or {}
    if checks.get("steps"):
        axis.plot(checks["steps"], _normalised(checks["identity"]), "k--o", markersize=3, label="identity")
    axis.set_xlabel("step")
    axis.set_ylabel("normalised to [0, 1]")
    axis.set_title(f"{trace['method']} / {trace['concept']}: frozen-batch ablation")
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_plots(folder: Path, records: list[dict], traces: list[dict], info: list[dict]) -> list[Path]:
    """Write every plot the data allow and return their paths."""
    stops: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for record in records:
        if record.get("steps") is not None:
            stops[record["method"], record["concept"]][record["variant"]] = record["steps"]
    for key in stops:
        stops[key] = {v: stops[key][v] for v in _ordered(stops[key], VARIANTS)}

    written = []
    for method in _ordered({t["method"] for t in traces}, METHODS):
        path = folder / f"curves_{method}.png"
        # Traced concepts first: their identity is checked up to the budget, not only up to the CLIP-s stop.
        ordered = sorted((t for t in traces if t["method"] == method), key=lambda t: not t.get("informative"))
        plot_curves(path, ordered, stops)
        written.append(path)
    changes = paired_changes(records)
    if any(c["speedup"] is not None and c["identity_change"] is not None for c in changes):
        written.append(folder / "speedup_vs_quality.png")
        plot_speedup_vs_quality(written[-1], changes)
    if info:
        written.append(folder / "informativeness.png")
        plot_informativeness(written[-1], info)
    with_ablation = [t for t in traces if t.get("ablation")]
    if with_ablation:
        written.append(folder / "ablation.png")
        plot_ablation(written[-1], max(with_ablation, key=lambda t: bool(t.get("informative"))))
    return written


# ---------------------------------------------------------------------------------------- entry


def write_report(out: Path) -> Path:
    """Write ``out/report/``: report.md, runs.csv, summary.csv, informativeness.csv and the plots.

    >>> write_report(Path("outputs/personalization"))  # doctest: +SKIP
    PosixPath('outputs/personalization/report/report.md')
    """
    out = Path(out)
    records = load_records(out)
    if not records:
        raise FileNotFoundError(f"no run records under {out / 'records'} (expected <method>/<concept>/<variant>.json)")
    traces = load_traces(out)
    summary = summary_table(records)
    info = informativeness(traces)
    saturation = saturation_steps(traces, smooth=SATURATION_SMOOTH)
    ablation = ablation_table(traces)

    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "runs.csv", [flatten_record(r) for r in records], RUN_COLUMNS)
    write_csv(folder / "summary.csv", summary, SUMMARY_COLUMNS)
    write_csv(folder / "informativeness.csv", info, INFORMATIVENESS_COLUMNS)
    write_plots(folder, records, traces, info)
    report = folder / "report.md"
    report.write_text(render_markdown(load_meta(out), summary, info, saturation, ablation,
                                      benchmark_cost(traces, records)))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="benchmark results folder (holds records/ and traces/)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.out)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    print(report)
    print(main_table(summary_table(load_records(args.out))))


if __name__ == "__main__":
    main()

"""The report's tables as rows: Table 1 (median ± IQR per method and rule), how informative each loss is,
the frozen-batch ablation and the benchmark's own cost.

Example:
    >>> summary_table([{"method": "m", "concept": "c", "variant": "baseline", "steps": 800,
    ...                 "wall_time_s": 120.0, "identity": 0.8, "alignment": 0.3}])[0]["minutes_median"]
    2.0
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from .config import METHOD_ORDER, VARIANTS
from .stats import difference, is_missing, median, median_iqr, ordered, ratio, spearman, wilcoxon_p

ABLATION_SETTINGS = ("none", "images", "latents", "noise", "captions", "timesteps")
INFORMATIVENESS_COLUMNS = (
    "method", "concept", "n_checks", "rho_eval_loss", "rho_train_loss", "rho_train_loss_smoothed",
)
RHO_COLUMNS = INFORMATIVENESS_COLUMNS[3:]


def from_trajectory(record: dict) -> bool:
    """Whether a record's wall time comes from its concept's trajectory (the same run as the budget's). A
    separate run (few iters before benchmark format 2, flagged by its loss comparison) is timed under other
    conditions (other load on the machine), so its wall-clock saving is not comparable and is not reported.

    >>> from_trajectory({"variant": "dvar"}), from_trajectory({"variant": "few_iters", "max_abs_loss_diff_vs_trajectory": 0.0})
    (True, False)
    """
    return "max_abs_loss_diff_vs_trajectory" not in record


def wall_speedup(run: dict, base: dict) -> float | None:
    """Budget wall time over the run's, only when both come from the same trajectory (:func:`from_trajectory`)."""
    if not from_trajectory(run):
        return None
    return ratio(base.get("wall_time_s"), run.get("wall_time_s"))


def step_speedup(run: dict, base: dict) -> float | None:
    """Budget steps over the run's stop steps: the speedup the stop itself gives (None for step 0)."""
    return ratio(base.get("steps"), run.get("steps"))


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
            "speedup": wall_speedup(record, base), "step_speedup": step_speedup(record, base),
            "identity_change": difference(record.get("identity"), base.get("identity")),
            "alignment_change": difference(record.get("alignment"), base.get("alignment")),
        })
    return rows


#: A wall-clock speedup may exceed its step speedup only by timing noise: at most this factor (issue 22).
WALL_OVER_STEP_LIMIT = 1.1


def _saving_share(run: dict, base: dict) -> float | None:
    speedup = wall_speedup(run, base)
    return ratio(speedup, step_speedup(run, base)) if speedup is not None else None


def summary_table(records: list[dict]) -> list[dict]:
    """One row per (method, variant): ``median ± IQR`` of steps, step speedup (budget / stop), minutes, wall-clock
    speedup (only from the same trajectory as the budget), identity and alignment, median changes against the
    baseline and the Wilcoxon p-value of identity against the baseline.

    >>> rows = summary_table([{"method": "dreambooth", "concept": "dog", "variant": "baseline", "steps": 800,
    ...                        "wall_time_s": 120.0, "identity": 0.8, "alignment": 0.3}])
    >>> rows[0]["minutes_median"], rows[0]["step_speedup_median"], rows[0]["speedup_median"], rows[0]["identity_p"]
    (2.0, 1.0, 1.0, None)
    """
    baselines = {(r["method"], r["concept"]): r for r in records if r["variant"] == "baseline"}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[record["method"], record["variant"]].append(record)

    rows = []
    for method in ordered((m for m, _ in groups), METHOD_ORDER):
        for variant in ordered((v for m, v in groups if m == method), VARIANTS):
            runs = groups[method, variant]
            pairs = [(run, baselines[method, run["concept"]]) for run in runs if (method, run["concept"]) in baselines]
            identity_changes = [difference(run.get("identity"), base.get("identity")) for run, base in pairs]
            alignment_changes = [difference(run.get("alignment"), base.get("alignment")) for run, base in pairs]
            row: dict[str, Any] = {"method": method, "variant": variant, "n": len(runs)}
            columns = {
                "steps": [run.get("steps") for run in runs],
                "step_speedup": [step_speedup(run, base) for run, base in pairs],
                "minutes": [ratio(run.get("wall_time_s"), 60.0) for run in runs],
                "speedup": [wall_speedup(run, base) for run, base in pairs],
                # the share of the step saving that reaches the wall clock: speedup / (budget / stop)
                "saving_share": [_saving_share(run, base) for run, base in pairs],
                "identity": [run.get("identity") for run in runs],
                "alignment": [run.get("alignment") for run in runs],
            }
            for name, values in columns.items():
                row[f"{name}_median"], row[f"{name}_iqr"] = median_iqr(values)
            row["identity_change"] = median(identity_changes)
            row["alignment_change"] = median(alignment_changes)
            row["identity_p"] = wilcoxon_p([d for d in identity_changes if d is not None])
            row["identity_ties"] = sum(d == 0 for d in identity_changes if d is not None)
            rows.append(row)
    return rows


def speedup_violations(summary: list[dict], limit: float = WALL_OVER_STEP_LIMIT) -> list[dict]:
    """Rows whose median wall-clock speedup exceeds ``limit`` times their median step speedup: a timing artefact
    (the acceptance of issue 22: none).

    >>> speedup_violations([{"method": "m", "variant": "few_iters", "speedup_median": 1.86, "step_speedup_median": 1.29}])[0]["variant"]
    'few_iters'
    """
    return [row for row in summary
            if not any(is_missing(row.get(k)) for k in ("speedup_median", "step_speedup_median"))
            and row["speedup_median"] > limit * row["step_speedup_median"]]


# ------------------------------------------------------------------------------ informativeness


def _trailing_mean(values: Sequence[float], step: int, window: int) -> float:
    return float(np.mean(values[max(0, step - window):step]))


def informativeness(traces: list[dict]) -> list[dict]:
    """Per trace with an every-step loss up to the budget (:func:`every_step_loss`): Spearman's rho of the
    identity checks against the frozen-batch (DVAR) loss, the raw training loss and the training loss averaged
    over the ``every`` steps before each check.

    Identity rises as a loss falls, so an informative loss has a strongly negative rho.

    >>> trace = {"method": "m", "concept": "c", "max_train_steps": 6, "train_loss": [5, 1, 4, 2, 3, 6],
    ...          "dvar": {"steps": [1, 2, 3, 4, 5, 6], "eval_loss": [9, 8, 7, 6, 5, 4]},
    ...          "identity_checks": {"every": 2, "steps": [2, 4, 6], "identity": [0.1, 0.5, 0.7]}}
    >>> informativeness([trace])[0]["rho_eval_loss"]
    -1.0
    """
    rows = []
    for trace in traces:
        curve = every_step_loss(trace)
        if curve is None:
            continue
        checks = trace["identity_checks"]
        eval_loss = dict(zip(curve["steps"], curve["eval_loss"]))
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


def every_step_loss(trace: dict) -> dict | None:
    """The trace's frozen-batch loss at every step up to the budget (the ``dvar`` watch or ``dvar_every1``),
    or None when no watch evaluated every step to the end.

    >>> every_step_loss({"max_train_steps": 2, "dvar": {"steps": [2], "eval_loss": [1.0]},
    ...                  "dvar_variants": {"dvar_every1": {"steps": [1, 2], "eval_loss": [2.0, 1.0]}}})["steps"]
    [1, 2]
    """
    budget = trace["max_train_steps"]
    for curve in (trace.get("dvar"), *(trace.get("dvar_variants") or {}).values()):
        if curve and curve.get("steps") == list(range(1, budget + 1)):
            return curve
    return None


def _sorted_by_method(rows: list[dict]) -> list[dict]:
    rank = {method: i for i, method in enumerate(METHOD_ORDER)}
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
         **{column: median(row[column] for row in by_method[method]) for column in RHO_COLUMNS}}
        for method in ordered(by_method, METHOD_ORDER)
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
    for setting in ordered(runs, ABLATION_SETTINGS):
        stops = [curve.get("stop_step") for _, curve in runs[setting]]
        rows.append({
            "setting": setting,
            "n": len(stops),
            "stopped_fraction": sum(stop is not None for stop in stops) / len(stops),
            "stop_step_median": median(stops),
            "rho_median": median(_identity_rho(trace["identity_checks"], curve) for trace, curve in runs[setting]),
        })
    return rows


def _identity_rho(checks: dict, curve: dict) -> float | None:
    loss = dict(zip(curve["steps"], curve["eval_loss"]))
    points = [(i, loss[s]) for s, i in zip(checks["steps"], checks["identity"]) if s in loss and i is not None]
    return spearman([i for i, _ in points], [l for _, l in points])



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
    for method in ordered({t["method"] for t in traces}, METHOD_ORDER):
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

"""``report.md``: the report's tables and sentences as GitHub markdown.

Example:
    >>> print(markdown_table(["a", "b"], [[1, 2]]))
    | a | b |
    |---|---|
    | 1 | 2 |
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

from .config import TUNING_CONCEPTS
from .saturation import budget_check
from .stats import SIGNIFICANCE, is_missing
from .tables import RHO_COLUMNS, informativeness_by_method


def _number(value: float | None, digits: int) -> str:
    return "n/a" if is_missing(value) else f"{round(value, digits) + 0.0:.{digits}f}"


def _spread(row: dict, name: str, digits: int) -> str:
    median, iqr = row[f"{name}_median"], row[f"{name}_iqr"]
    return "n/a" if is_missing(median) else f"{_number(median, digits)} ± {_number(iqr, digits)}"


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
    """DVAR (and its ``dvar_every<k>`` settings) against the full budget, one row per method and setting; the
    speedup over the step saving is the share of the saved steps that reaches the wall clock (1: free watching)."""
    baseline = {row["method"]: row for row in summary if row["variant"] == "baseline"}
    header = ["method", "variant", "DVAR steps", "budget steps", "speedup", "speedup / (budget / stop)", "Δ identity",
              "Δ alignment", "p (identity)"]
    return markdown_table(header, (
        [row["method"], row["variant"], _spread(row, "steps", 0),
         _spread(baseline[row["method"]], "steps", 0) if row["method"] in baseline else "n/a",
         _spread(row, "speedup", 2), _number(row.get("saving_share_median"), 2), _number(row["identity_change"], 3),
         _number(row["alignment_change"], 3), _p_value(row["identity_p"])]
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
        if not is_missing(row["speedup_median"]) and row["speedup_median"] < 1:
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


def power_markdown(rows: list[dict]) -> str:
    """The "can this benchmark see a bad stop" table and one sentence per method."""
    from .power import power_verdicts

    table = markdown_table(["method", "comparison", "n", "median Δ identity", "p (Wilcoxon)", "Δ / test-retest SD"], (
        [row["method"], row["comparison"], row["n"], _number(row["median_delta"], 3), _p_value(row["p_value"]),
         _number(row["delta_over_noise"], 1)]
        for row in rows
    ))
    return table + "\n\n" + " ".join(power_verdicts(rows))


def oracle_markdown(rows: list[dict]) -> str:
    """Each rule's stop against each concept's own saturation step, per method."""
    return markdown_table(["method", "rule", "concepts", "saturation (median)", "stop (median)",
                           "stop / saturation", "regret (median)", "too early", "too late (> 2x)",
                           "flat / still rising"], (
        [row["method"], row["rule"], row["n"], _number(row["saturation_median"], 0), _number(row["stop_median"], 0),
         f"{_number(row['ratio_median'], 2)} ± {_number(row['ratio_iqr'], 2)}", _number(row["regret_median"], 3),
         f"{row['too_early']:.0%}", f"{row['too_late']:.0%}", f"{row['flat']} / {row['still_rising']}"]
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


def render_markdown(meta: dict, summary: list[dict], info: list[dict], ablation: list[dict],
                    cost: Sequence[dict] = (), power: Sequence[dict] = (), oracle: Sequence[dict] = (),
                    power_untuned: Sequence[dict] = ()) -> str:
    """The whole ``report.md``."""
    header = [f"- {key}: {_meta_value(meta[key])}" for key in ("preset", "command", "machine", "model") if key in meta]
    sections = [
        "# Personalization benchmark: DVAR against the full budget, CLIP-s and few iterations",
        "\n".join(header),
        "## Table 1 (median ± IQR over concepts)\n\nSpeedup is the baseline wall time over the run's; Δ columns are "
        "medians over concepts of the change against the baseline; p is a paired Wilcoxon signed-rank test of "
        "identity against the baseline. `step0`, `early10` and `early25` are deliberately premature stops (step 0, "
        "10% and 25% of the budget) from the same trajectory: the controls.\n\n" + main_table(summary),
    ]
    if power:
        sections.append("## Can this benchmark see a bad stop?\n\nThe budget's identity against the same concept's "
                        "identity at step 0 and at premature stops (Δ = budget minus the premature stop, median over "
                        "concepts), in units of the identity score's test-retest SD (the budget's weights scored "
                        "with two sampling seeds). A \"no significant drop\" claim below is worth only as much as "
                        "this table's power.\n\n" + power_markdown(list(power)))
        if power_untuned:
            sections.append(f"### The same, on the concepts no setting was tuned on\n\nThe presets' learning rates "
                            f"and budgets were revised while looking at each method's first {TUNING_CONCEPTS} "
                            f"concepts; these rows leave them out.\n\n" + power_markdown(list(power_untuned)))
    sections.append("## Speedup and quality change of DVAR vs baseline per method\n\n" + dvar_table(summary)
                    + "\n\n" + dvar_verdict(summary))
    if oracle:
        sections.append("## Stops against each concept's own saturation step\n\nSaturation step: the first identity "
                        "check (every `check_every` steps from step 0 to the budget) whose identity, averaged with "
                        "the next 2 checks, is not significantly below the final plateau (the mean of the "
                        "last third of the checks; one-sided z-test at 5% with the checks' test-retest SD); no "
                        "plateau when the last third still rises significantly (\"still rising\"), step 0 when "
                        "nothing measurable was learned (\"flat\"). Ratios and shares are over the concepts "
                        "that saturate after step 0; regret = plateau minus the identity at the stop.\n\n"
                        + oracle_markdown(list(oracle)))
    if info:
        sections.append("## How informative is each loss\n\nSpearman's rho between the identity score at the "
                        "checks and each loss at those steps; identity rises as the loss falls, so an informative "
                        "loss has a strongly negative rho.\n\n" + informativeness_tables(info))
    budget = budget_check(summary)
    if budget:
        sections.append("## Is the budget past identity saturation?\n\nOver all concepts: the earliest-stopping "
                        "rule (the premature controls included) whose identity is not significantly below the full "
                        f"budget's (paired Wilcoxon p >= {SIGNIFICANCE}, or a median change >= 0).\n\n"
                        + budget_markdown(budget))
    if ablation:
        sections.append("## Frozen-batch ablation\n\n" + ablation_markdown(ablation))
    if cost:
        sections.append("## Cost of this benchmark\n\n" + cost_markdown(list(cost)))
    return "\n\n".join(section for section in sections if section) + "\n"


def _meta_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)

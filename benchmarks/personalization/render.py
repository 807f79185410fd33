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
from .noninferiority import CONFIDENCE, MARGIN, control_checks
from .saturation import CENSORING_RULE, budget_check
from .stats import is_missing
from .tables import RHO_COLUMNS, WALL_OVER_STEP_LIMIT, informativeness_by_method, speedup_violations


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
    header = ["method", "variant", "n", "steps", "step speedup", "minutes", "wall-clock speedup", "identity",
              "alignment", "Δ identity", "Δ alignment", "p (identity)", "ties"]
    return markdown_table(header, (
        [row["method"], row["variant"], row["n"], _spread(row, "steps", 0), _spread(row, "step_speedup", 2),
         _spread(row, "minutes", 2), _spread(row, "speedup", 2), _spread(row, "identity", 3),
         _spread(row, "alignment", 3), _number(row["identity_change"], 3), _number(row["alignment_change"], 3),
         _p_value(row["identity_p"]), row.get("identity_ties", "n/a")]
        for row in summary
    ))


def dvar_table(summary: list[dict], noninferiority: Sequence[dict] = ()) -> str:
    """DVAR (its ``dvar_every<k>`` settings and ``auto``) against the full budget, one row per method and setting:
    the step speedup first, then the wall-clock speedup from the same trajectory and its share of the step saving
    (1: free watching), and the non-inferiority decision."""
    baseline = {row["method"]: row for row in summary if row["variant"] == "baseline"}
    decisions = {(row["method"], row["rule"]): row for row in noninferiority}
    header = ["method", "variant", "stop steps", "budget steps", "step speedup", "wall-clock speedup",
              "wall / step speedup", "mean Δ identity [95% CI]", "non-inferior", "Δ alignment"]
    return markdown_table(header, (
        [row["method"], row["variant"], _spread(row, "steps", 0),
         _spread(baseline[row["method"]], "steps", 0) if row["method"] in baseline else "n/a",
         _spread(row, "step_speedup", 2), _spread(row, "speedup", 2), _number(row.get("saving_share_median"), 2),
         _ci(decisions.get((row["method"], row["variant"]))),
         decisions.get((row["method"], row["variant"]), {}).get("noninferior", "n/a"),
         _number(row["alignment_change"], 3)]
        for row in summary if row["variant"].startswith("dvar") or row["variant"] == "auto"
    ))


def _ci(row: dict | None) -> str:
    if not row or is_missing(row.get("mean_delta")):
        return "n/a"
    return f"{row['mean_delta']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def dvar_verdict(summary: list[dict], noninferiority: Sequence[dict] = ()) -> str:
    """One sentence per DVAR setting and method where DVAR is not shown to keep quality (not non-inferior at the
    margin) or is slower than the budget, else one sentence saying it keeps quality everywhere.

    >>> dvar_verdict([{"method": "dreambooth", "variant": "dvar", "speedup_median": 0.8}],
    ...              [{"method": "dreambooth", "rule": "dvar", "noninferior": "yes", "mean_delta": -0.001,
    ...                "ci_low": -0.01, "ci_high": 0.008, "margin": 0.02}])
    'DVAR is slower than the full budget for dreambooth: median wall-clock speedup 0.80x.'
    """
    decisions = {(row["method"], row["rule"]): row for row in noninferiority}
    sentences = []
    for row in summary:
        if not (row["variant"].startswith("dvar") or row["variant"] == "auto"):
            continue
        name = {"dvar": "DVAR", "auto": "auto"}.get(row["variant"], f"DVAR ({row['variant']})")
        if not is_missing(row.get("speedup_median")) and row["speedup_median"] < 1:
            sentences.append(f"{name} is slower than the full budget for {row['method']}: "
                             f"median wall-clock speedup {row['speedup_median']:.2f}x.")
        decision = decisions.get((row["method"], row["variant"]))
        if decision is None:
            continue
        if decision["noninferior"] == "no":
            sentences.append(f"{name} loses identity for {row['method']}: mean change {_ci(decision)}, worse than "
                             f"the margin -{decision['margin']:g}.")
        elif decision["noninferior"] == "undecided":
            sentences.append(f"{name} is not shown to keep identity for {row['method']}: mean change {_ci(decision)} "
                             f"straddles the margin -{decision['margin']:g} (undecided).")
    if sentences:
        return " ".join(sentences)
    return (f"DVAR keeps quality everywhere here: every setting is non-inferior to the full budget at the margin "
            f"{MARGIN:g} and none is slower than it.")


def noninferiority_markdown(rows: list[dict]) -> str:
    """The non-inferiority table and what its controls say."""
    table = markdown_table(["method", "rule", "n", "mean Δ identity", f"{CONFIDENCE:.0%} CI", "half-width",
                            "non-inferior", "median Δ", "p (Wilcoxon)", "ties", "step speedup"], (
        [row["method"], row["rule"], row["n"], _number(row["mean_delta"], 4),
         f"[{_number(row['ci_low'], 4)}, {_number(row['ci_high'], 4)}]", _number(row["ci_half_width"], 4),
         row["noninferior"], _number(row["median_delta"], 4), _p_value(row["wilcoxon_p"]), row["ties"],
         _number(row["step_speedup_median"], 2)]
        for row in rows
    ))
    return table + "\n\n" + " ".join(control_checks(rows))


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
                           "stop / saturation", "saving captured", "regret (median)", "too early", "too late (> 2x)",
                           "at the budget", "flat (left out) / still rising (censored)"], (
        [row["method"], row["rule"], row["n"], _number(row["saturation_median"], 0), _number(row["stop_median"], 0),
         f"{_number(row['ratio_median'], 2)} ± {_number(row['ratio_iqr'], 2)}",
         _number(row.get("saving_captured_median"), 2), _number(row["regret_median"], 3),
         f"{row['too_early']:.0%}", f"{row['too_late']:.0%}", row.get("at_budget", "n/a"),
         f"{row['flat']} / {row['still_rising']}"]
        for row in rows
    ))


def budget_markdown(rows: list[dict]) -> str:
    """The population-level budget check and one sentence per method."""
    table = markdown_table(["method", "budget", "earliest non-inferior rule", "its steps (median)",
                            "mean Δ identity [95% CI]", "budget / its steps"], (
        [row["method"], _number(row["budget"], 0), row["variant"] or "none", _number(row["steps_median"], 0),
         _ci(row) if row["variant"] else "n/a", _number(row["budget_ratio"], 1)]
        for row in rows
    ))
    sentences = []
    for row in rows:
        if row["variant"] is None:
            sentences.append(f"For {row['method']} no early stop is shown to keep identity (none is non-inferior "
                             f"to the full budget at the margin), so the budget is not shown to sit past saturation.")
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
                    power_untuned: Sequence[dict] = (), noninferiority: Sequence[dict] = ()) -> str:
    """The whole ``report.md``."""
    header = [f"- {key}: {_meta_value(meta[key])}" for key in ("preset", "command", "machine", "model") if key in meta]
    sections = [
        "# Personalization benchmark: DVAR against the full budget, CLIP-s and few iterations",
        "\n".join(header),
        "## Table 1 (median ± IQR over concepts)\n\nStep speedup is the budget's steps over the stop's; wall-clock "
        "speedup is the budget's wall time over the run's, both timed on the same trajectory (a variant's time: setup, "
        "its training steps, its own rule, the save); Δ columns are medians over concepts of the change against the "
        "baseline; p is a paired Wilcoxon signed-rank test of identity against the baseline, ties the concepts whose "
        "identity equals the budget's (a rule that never fired). `step0`, `early10` and `early25` are deliberately "
        "premature stops (step 0, 10% and 25% of the budget) from the same trajectory: the controls.\n\n"
        + main_table(summary) + speedup_sentence(summary),
    ]
    if noninferiority:
        sections.append(f"## Does a rule keep quality? Non-inferiority at margin {MARGIN:g}\n\nPer method and rule: "
                        f"the mean paired identity change against the budget with a {CONFIDENCE:.0%} paired bootstrap "
                        "CI over concepts (10,000 resamples, seed 0). `yes`: the CI lies above -margin (the rule loses "
                        "less than the margin); `no`: it lies below (it loses more); `undecided`: it straddles -margin. "
                        f"The margin {MARGIN:g} is one test-retest SD of a variant's identity score (the budget's weights "
                        "scored with two sampling seeds). Controls: `retest` (the budget's weights with the next "
                        "sampling seed: a rule that loses nothing) must be `yes` with a CI half-width <= 0.01; "
                        "`early10` and `step0` must not be `yes`.\n\n" + noninferiority_markdown(list(noninferiority)))
    if power:
        sections.append("## Can this benchmark see a bad stop?\n\nThe budget's identity against the same concept's "
                        "identity at step 0 and at premature stops (Δ = budget minus the premature stop, median over "
                        "concepts), in units of the identity score's test-retest SD (the budget's weights scored "
                        "with two sampling seeds).\n\n" + power_markdown(list(power)))
        if power_untuned:
            sections.append(f"### The same, on the concepts no setting was tuned on\n\nThe presets' learning rates "
                            f"and budgets were revised while looking at each method's first {TUNING_CONCEPTS} "
                            f"concepts; these rows leave them out.\n\n" + power_markdown(list(power_untuned)))
    sections.append("## Speedup and quality change of DVAR vs baseline per method\n\n"
                    + dvar_table(summary, noninferiority) + "\n\n" + dvar_verdict(summary, noninferiority))
    if oracle:
        sections.append("## Stops against each concept's own saturation step\n\nSaturation step: the first identity "
                        "check after step 0 (every `check_every` steps from step 0 to the budget) whose identity, "
                        "averaged with the next 2 checks, is not significantly below the final plateau (the mean of "
                        "the last third of the checks; one-sided z-test at 5% with the checks' test-retest SD); no "
                        "plateau when the last third still rises significantly (\"still rising\"); \"flat\" "
                        "(nothing measurable learned) only when no check is significantly above step 0 "
                        "(Bonferroni-corrected one-sided z-tests). Saving captured = (budget - stop) / (budget - "
                        "saturation): 1 at saturation, 0 at the budget. Regret = plateau minus the identity at the "
                        f"stop. The rule for concepts without a saturation step: {CENSORING_RULE}.\n\n"
                        + oracle_markdown(list(oracle)))
    if info:
        sections.append("## How informative is each loss\n\nSpearman's rho between the identity score at the "
                        "checks and each loss at those steps; identity rises as the loss falls, so an informative "
                        "loss has a strongly negative rho.\n\n" + informativeness_tables(info))
    budget = budget_check(summary, list(noninferiority))
    if budget:
        sections.append("## Is the budget past identity saturation?\n\nOver all concepts: the earliest-stopping "
                        "rule (the premature controls left out) that is non-inferior to the full budget at the margin."
                        "\n\n" + budget_markdown(budget))
    if ablation:
        sections.append("## Frozen-batch ablation\n\n" + ablation_markdown(ablation))
    if cost:
        sections.append("## Cost of this benchmark\n\n" + cost_markdown(list(cost)))
    return "\n\n".join(section for section in sections if section) + "\n"


def speedup_sentence(summary: list[dict]) -> str:
    """One sentence on wall-clock against step speedups: none may exceed its step speedup by more than 10%."""
    over = speedup_violations(summary)
    if not over:
        return (f"\n\nNo wall-clock speedup exceeds {WALL_OVER_STEP_LIMIT:g}x its step speedup (medians), as it "
                "should when both come from the same trajectory.")
    listed = ", ".join(f"{r['method']} {r['variant']} ({r['speedup_median']:.2f}x for a step speedup of "
                       f"{r['step_speedup_median']:.2f}x)" for r in over)
    return (f"\n\n**Timing artefact:** these wall-clock speedups exceed {WALL_OVER_STEP_LIMIT:g}x their step speedup: "
            f"{listed}; read the step speedup.")


def _meta_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)

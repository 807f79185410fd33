"""Can this benchmark see a bad stop? Power of the identity score, measured on the benchmark's own runs.

A quality comparison ("DVAR's identity is not significantly below the budget's") is worth only as
much as the score's ability to tell a trained concept from an untrained or half-trained one. From
the same trajectory as the other variants the runner scores the weights at step 0 (``step0``) and at
two deliberately premature stops, 10% and 25% of the budget (``early10``, ``early25``), and it scores
the budget's weights twice, with two sampling seeds (``identity`` and ``identity_retest``), which gives
the score's test-retest noise.

Example:
    >>> records = [{"method": "m", "concept": f"c{i}", "variant": v, "identity": s, "identity_retest": r}
    ...            for i in range(6) for v, s, r in (("baseline", 0.8 + i / 100, 0.79 + i / 100),
    ...                                                ("step0", 0.4, None), ("early10", 0.6, None))]
    >>> row = power_table(records)[0]
    >>> row["comparison"], row["n"], round(row["median_delta"], 3), round(row["p_value"], 4)
    ('budget_vs_step0', 6, 0.425, 0.0312)
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from .config import METHOD_ORDER, TUNING_CONCEPTS
from .stats import finite, median, ordered, wilcoxon_p

#: (comparison name, the premature variant compared with the budget)
COMPARISONS = (("budget_vs_step0", "step0"), ("budget_vs_early10", "early10"), ("budget_vs_early25", "early25"))
POWER_COLUMNS = ("method", "comparison", "n", "median_delta", "p_value", "delta_over_noise")


def sampling_noise_sd(records: list[dict], score: str = "identity") -> float | None:
    """SD of one score's sampling noise: the same weights scored with two sampling seeds.

    With paired scores (a, b) per concept, var(a - b) = 2 var(noise), so SD = std(a - b) / sqrt(2).

    >>> sampling_noise_sd([{"variant": "baseline", "identity": 0.5 + d, "identity_retest": 0.5 - d}
    ...                 for d in (0.01, -0.01, 0.02, -0.02)])
    0.0258...
    """
    differences = finite(
        r[score] - r[f"{score}_retest"] for r in records
        if r["variant"] == "baseline" and r.get(score) is not None and r.get(f"{score}_retest") is not None
    )
    if differences.size < 2:
        return None
    return float(np.std(differences, ddof=1) / math.sqrt(2))


def power_table(records: list[dict], score: str = "identity") -> list[dict]:
    """Per method and comparison: n, median paired change (budget minus the premature variant), two-sided
    paired Wilcoxon p, and that change in units of the method's test-retest SD."""
    by_key = {(r["method"], r["concept"], r["variant"]): r for r in records}
    methods = ordered({r["method"] for r in records}, METHOD_ORDER)
    rows = []
    for method in methods:
        noise = sampling_noise_sd([r for r in records if r["method"] == method], score)
        budgets = [r for r in records if r["method"] == method and r["variant"] == "baseline"]
        for comparison, variant in COMPARISONS:
            deltas = [
                budget[score] - early[score] for budget in budgets
                if (early := by_key.get((method, budget["concept"], variant))) is not None
                and budget.get(score) is not None and early.get(score) is not None
            ]
            if not deltas:
                continue
            middle = median(deltas)
            rows.append({
                "method": method, "comparison": comparison, "n": len(deltas), "median_delta": middle,
                "p_value": wilcoxon_p(deltas),
                "delta_over_noise": middle / noise if noise and middle is not None else None,
            })
    return rows


def untuned_records(records: list[dict], concept_order: dict[str, list[str]],
                    tuned: int = TUNING_CONCEPTS) -> list[dict]:
    """The records of concepts past the first ``tuned`` of their method's list: those no setting was chosen on.

    >>> order = {"m": ["a", "b", "c"]}
    >>> [r["concept"] for r in untuned_records([{"method": "m", "concept": c} for c in "abc"], order, tuned=2)]
    ['c']
    """
    untuned = {method: set(names[tuned:]) for method, names in concept_order.items()}
    return [r for r in records if r["concept"] in untuned.get(r["method"], ())]


def power_verdicts(rows: list[dict], step0_p: float = 1e-3, step0_gain: float = 5.0, early10_p: float = 1e-2) -> list[str]:
    """One sentence per method: does the benchmark see a bad stop, by the project's bar (budget vs step 0:
    p < ``step0_p`` and a median gain >= ``step0_gain`` test-retest SDs; budget vs early10: p < ``early10_p``)?"""
    by_method: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_method[row["method"]][row["comparison"]] = row
    sentences = []
    for method, comparisons in by_method.items():
        step0, early10 = comparisons.get("budget_vs_step0"), comparisons.get("budget_vs_early10")
        misses = []
        if step0 is None or not _below(step0["p_value"], step0_p):
            misses.append(f"budget vs step 0 p = {_fmt(step0 and step0['p_value'])} (bar < {step0_p:g})")
        if step0 is None or (step0["delta_over_noise"] or 0) < step0_gain:
            misses.append(f"budget vs step 0 gain = {_fmt(step0 and step0['delta_over_noise'], 1)} test-retest SDs "
                          f"(bar >= {step0_gain:g})")
        if early10 is None or not _below(early10["p_value"], early10_p):
            misses.append(f"budget vs early10 p = {_fmt(early10 and early10['p_value'])} (bar < {early10_p:g})")
        if misses:
            sentences.append(f"{method}: the benchmark's power falls short: {'; '.join(misses)}.")
        else:
            sentences.append(f"{method}: a bad stop is visible (budget vs step 0 p = {step0['p_value']:.2g}, "
                             f"gain {step0['delta_over_noise']:.1f} test-retest SDs; budget vs early10 "
                             f"p = {early10['p_value']:.2g}).")
    return sentences


def _below(value: Any, bar: float) -> bool:
    return value is not None and value < bar


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if digits == 2 else f"{value:.{digits}f}"

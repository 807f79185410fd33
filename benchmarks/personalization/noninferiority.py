"""Does a stopping rule keep quality? Non-inferiority to the full budget at a stated margin.

Per method and rule: the paired identity change against the budget (the rule's weights minus the budget's, each
concept's images drawn with the same seeds), its mean with a 95% paired bootstrap CI over concepts (10,000
resamples, seed 0), and the decision at the margin:

* ``yes`` (non-inferior): the CI's lower end is above ``-margin``, so the rule loses less than the margin;
* ``no`` (inferior): the CI's upper end is below ``-margin``, so it loses more than the margin;
* ``undecided``: the CI straddles ``-margin``; the data cannot tell, and the table says so rather than
  calling it a pass or a loss.

The median change, the Wilcoxon p and the number of exact ties (a rule that never fired is the budget itself,
change 0) are kept as secondary columns.

**The margin, 0.02 identity,** is one test-retest SD of a variant's identity score: the budget's own weights
scored with a second sampling seed differ from the first scoring by SD 0.024-0.028 over concepts in the v2 full run,
i.e. 0.017-0.020 per score (``power.sampling_noise_sd``). A stop that loses less than that loses less than what
re-rolling the images of one concept moves its score by. The controls show what the test can decide: ``retest``
(the budget's weights with the next sampling seed against the budget: a rule that loses nothing) must come out
``yes`` with a CI half-width <= 0.01; ``early10`` and ``step0`` (stops at 10% of the budget and the untrained start)
must not.

Example:
    >>> row = noninferiority_row("textual_inversion", "dvar", [0.01, -0.005, 0.0, 0.002, -0.01, 0.004])
    >>> row["noninferior"], round(row["mean_delta"], 4), row["ties"]
    ('yes', 0.0002, 1)
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .config import METHOD_ORDER
from .stats import bootstrap_mean_ci, finite, is_missing, median, ordered, wilcoxon_p

MARGIN = 0.02
CONFIDENCE = 0.95
#: The most a positive control's CI may spread either side of its mean for the benchmark to show a rule that loses
#: nothing as non-inferior (issue 22).
RETEST_MAX_HALF_WIDTH = 0.01
#: Rows of noninferiority.csv, in order: the rules, then the controls.
RULE_ROWS = ("dvar", "dvar_every1", "auto", "clip_s", "few_iters")
CONTROL_ROWS = ("retest", "early25", "early10", "step0")
DECISIONS = ("yes", "undecided", "no")
NONINFERIORITY_COLUMNS = ("method", "rule", "n", "mean_delta", "ci_low", "ci_high", "margin", "noninferior",
                          "ci_half_width", "median_delta", "wilcoxon_p", "ties", "step_speedup_median")


def decide(ci_low: float, ci_high: float, margin: float = MARGIN) -> str:
    """``yes`` when the CI lies above ``-margin``, ``no`` when it lies below it, else ``undecided``.

    >>> decide(-0.015, 0.004), decide(-0.05, -0.025), decide(-0.03, -0.001)
    ('yes', 'no', 'undecided')
    """
    if is_missing(ci_low) or is_missing(ci_high):
        return "undecided"
    if ci_low > -margin:
        return "yes"
    if ci_high < -margin:
        return "no"
    return "undecided"


def noninferiority_row(method: str, rule: str, deltas: Sequence[float], margin: float = MARGIN,
                       step_ratios: Sequence[float] = ()) -> Dict[str, Any]:
    """One row of the table from the paired changes (rule minus budget, one per concept)."""
    kept = finite(deltas)
    low, high = bootstrap_mean_ci(kept, CONFIDENCE)
    return {
        "method": method, "rule": rule, "n": int(kept.size),
        "mean_delta": float(kept.mean()) if kept.size else None,
        "ci_low": low, "ci_high": high, "margin": margin, "noninferior": decide(low, high, margin),
        "ci_half_width": (high - low) / 2, "median_delta": median(kept), "wilcoxon_p": wilcoxon_p(kept),
        "ties": int((kept == 0).sum()), "step_speedup_median": median(step_ratios),
    }


def paired_deltas(records: List[dict], method: str, rule: str) -> tuple[list[float], list[float]]:
    """(identity changes against the budget, budget / stop step ratios) of one method and rule, one per concept
    with both records; ``retest`` is the budget's second scoring against its first."""
    baselines = {r["concept"]: r for r in records if r["method"] == method and r["variant"] == "baseline"}
    if rule == "retest":
        pairs = [(b.get("identity_retest"), b.get("identity"), None) for b in baselines.values()]
    else:
        pairs = [(r.get("identity"), baselines[r["concept"]].get("identity"),
                  r["max_train_steps"] / r["steps"] if r.get("steps") else None)
                 for r in records if r["method"] == method and r["variant"] == rule and r["concept"] in baselines]
    deltas = [a - b for a, b, _ in pairs if a is not None and b is not None]
    return deltas, [s for a, b, s in pairs if s is not None and a is not None and b is not None]


def noninferiority_table(records: List[dict], margin: float = MARGIN,
                         rows: Sequence[str] = RULE_ROWS + CONTROL_ROWS) -> List[Dict[str, Any]]:
    """One row per method and rule (then control) present in ``records``."""
    out = []
    for method in ordered({r["method"] for r in records}, METHOD_ORDER):
        for rule in rows:
            deltas, ratios = paired_deltas(records, method, rule)
            if deltas:
                out.append(noninferiority_row(method, rule, deltas, margin, ratios))
    return out


def control_checks(rows: List[Dict[str, Any]]) -> List[str]:
    """What the controls say about the test, one sentence per method: the positive control (``retest``) must be
    non-inferior with a CI half-width <= 0.01, the negative ones (``early10``, ``step0``) must not be."""
    sentences = []
    for method in ordered({r["method"] for r in rows}, METHOD_ORDER):
        by_rule = {r["rule"]: r for r in rows if r["method"] == method}
        problems = []
        retest = by_rule.get("retest")
        if retest is None:
            problems.append("no retest (positive control)")
        elif retest["noninferior"] != "yes" or not retest["ci_half_width"] <= RETEST_MAX_HALF_WIDTH:
            problems.append(f"the positive control (retest) is {retest['noninferior']} with CI half-width "
                            f"{retest['ci_half_width']:.4f} (needs yes and <= {RETEST_MAX_HALF_WIDTH})")
        for control in ("early10", "step0"):
            row = by_rule.get(control)
            if row is not None and row["noninferior"] == "yes":
                problems.append(f"the negative control {control} comes out non-inferior")
        if problems:
            sentences.append(f"{method}: the test cannot be trusted here: {'; '.join(problems)}.")
        else:
            sentences.append(f"{method}: the controls hold (retest non-inferior, CI half-width "
                             f"{retest['ci_half_width']:.4f}; early10 and step0 not).")
    return sentences

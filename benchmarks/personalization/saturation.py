"""When does identity stop improving? Per concept (the oracle a stopping rule is judged by) and per method.

:func:`oracle_saturation` finds one concept's saturation step on its identity curve (scored at every
check up to the budget); :func:`oracle_rows` and :func:`oracle_summary` compare each rule's stop with
it. :func:`budget_check` asks whether the budget sits past saturation over all concepts.

Example:
    >>> oracle_saturation([0, 100, 200, 300, 400, 500], [0.4, 0.6, 0.7, 0.7, 0.7, 0.7], 0.01, smooth=1).step
    200
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import METHOD_ORDER, PREMATURE_STOPS
from .stats import is_missing, median, ordered, ratio


def budget_check(summary: list[dict], noninferiority: list[dict]) -> list[dict]:
    """Per method, over all concepts: the earliest-stopping rule that is non-inferior to the full budget
    (:mod:`.noninferiority`: the CI of its mean identity change lies above -margin), and how many times its
    median stop the budget is. Identity that no longer improves after that step is the population-level evidence
    that the budget sits past saturation; ``None`` as the rule means no early stop is shown to keep it.

    >>> budget_check([{"method": "m", "variant": "baseline", "steps_median": 1000},
    ...               {"method": "m", "variant": "dvar", "steps_median": 400}],
    ...              [{"method": "m", "rule": "dvar", "mean_delta": -0.001, "ci_low": -0.01, "ci_high": 0.008,
    ...                "noninferior": "yes"}])[0]["budget_ratio"]
    2.5
    """
    decisions = {(row["method"], row["rule"]): row for row in noninferiority}
    rows = []
    for method in ordered({row["method"] for row in summary}, METHOD_ORDER):
        # the premature controls are not rules: whether the benchmark sees them is the power table's question
        rules = {row["variant"]: row for row in summary if row["method"] == method
                 and row["variant"] not in PREMATURE_STOPS}
        if "baseline" not in rules or len(rules) == 1:
            continue
        budget = rules["baseline"]["steps_median"]
        keeps_identity = [
            {**row, **{k: decisions[method, name][k] for k in ("mean_delta", "ci_low", "ci_high")}}
            for name, row in rules.items()
            if name != "baseline" and not is_missing(row["steps_median"])
            and decisions.get((method, name), {}).get("noninferior") == "yes"
        ]
        earliest = min(keeps_identity, key=lambda row: row["steps_median"], default={})
        rows.append({
            "method": method, "budget": budget,
            **{key: earliest.get(key) for key in ("variant", "steps_median", "mean_delta", "ci_low", "ci_high")},
            "budget_ratio": ratio(budget, earliest.get("steps_median")),
        })
    return rows


# ------------------------------------------------------------------------ each concept's own saturation step


@dataclass(frozen=True)
class Saturation:
    """Where one identity curve saturates (:func:`oracle_saturation`).

    ``step`` is None when the curve has no plateau inside the budget; ``status`` says why:
    ``"saturated"``, ``"flat"`` (no check is significantly above step 0: nothing measurable was learned)
    or ``"still rising"`` (the last third of the budget still rises significantly).
    """

    step: int | None
    status: str
    plateau: float | None


def oracle_saturation(steps: Sequence[int], identity: Sequence[float], noise_sd: float, smooth: int = 3,
                      plateau_share: float = 1 / 3, z: float = 1.645) -> Saturation:
    """A concept's saturation step: the first check whose identity is not significantly below the final plateau.

    The rule, with ``noise_sd`` the test-retest SD of one identity check (same weights, another sampling seed):

    1. plateau = mean of the checks in the last ``plateau_share`` of the budget (at least 3);
    2. no plateau if identity still rises there: the least-squares slope over those checks is significantly
       positive (one-sided z-test, SE = noise_sd / sqrt(sum (step - mean step)^2)), status ``"still rising"``;
    3. each check's identity is averaged with the next ``smooth - 1`` checks (forward, so a step-shaped
       plateau is found at its first check, and one lucky check before it does not end the rise);
    4. "flat" (nothing measurable learned) only when the checks are not significantly above step 0: neither their
       mean nor any single one (:func:`learned_something`, family-wise 5%), so that a concept that learned fast
       and then declined is not called flat;
    5. saturation = the first check whose averaged identity >= plateau - z * SE, SE combining both means'
       noise (noise_sd / sqrt(checks averaged)); a concept that learned is saturated at a check after step 0
       (the first one on the plateau), even when its averaged step-0 value already reaches the plateau.

    >>> steps = list(range(0, 1050, 50))
    >>> rising_then_flat = [min(s, 400) / 400 * 0.3 + 0.4 for s in steps]
    >>> oracle_saturation(steps, rising_then_flat, noise_sd=0.005)
    Saturation(step=400, status='saturated', plateau=0.7)
    >>> oracle_saturation(steps, [0.4 + s / 1000 * 0.3 for s in steps], noise_sd=0.02).status
    'still rising'
    >>> oracle_saturation(steps, [0.5] * len(steps), noise_sd=0.02)
    Saturation(step=0, status='flat', plateau=0.5)
    >>> learned_then_declined = [0.44, 0.73] + [0.61] * (len(steps) - 2)
    >>> oracle_saturation(steps, learned_then_declined, noise_sd=0.035)
    Saturation(step=50, status='saturated', plateau=0.61)
    """
    pairs = [(int(s), float(v)) for s, v in zip(steps, identity) if v is not None and math.isfinite(v)]
    if len(pairs) < 4 or not noise_sd > 0:
        raise ValueError(f"need >= 4 finite checks and noise_sd > 0 (got {len(pairs)} checks, noise_sd={noise_sd})")
    xs = np.array([s for s, _ in pairs], dtype=float)
    ys = np.array([v for _, v in pairs])
    tail = max(3, math.ceil(len(pairs) * plateau_share))
    tail_x, tail_y = xs[-tail:], ys[-tail:]
    plateau = float(tail_y.mean())
    spread = float(((tail_x - tail_x.mean()) ** 2).sum())
    slope = float(((tail_x - tail_x.mean()) * (tail_y - plateau)).sum() / spread)
    if slope > z * noise_sd / math.sqrt(spread):
        return Saturation(None, "still rising", round(plateau, 6))
    if not learned_something(ys, noise_sd):
        return Saturation(pairs[0][0], "flat", round(plateau, 6))
    plateau_se2 = noise_sd ** 2 / tail
    for index in range(1, len(pairs)):
        window = ys[index:index + smooth]
        if window.mean() >= plateau - z * math.sqrt(noise_sd ** 2 / window.size + plateau_se2):
            return Saturation(pairs[index][0], "saturated", round(plateau, 6))
    return Saturation(pairs[-1][0], "saturated", round(plateau, 6))  # only the last check reaches the plateau


def learned_something(identity: Sequence[float], noise_sd: float, alpha: float = 0.05) -> bool:
    """True when the checks after the first (step 0) are significantly above it, by either of two one-sided
    z-tests that share the family-wise ``alpha``: the mean of all later checks (SE = noise_sd * sqrt(1 + 1/m):
    a steady rise), or any single later check (SE = noise_sd * sqrt 2, Bonferroni over the m checks: a concept that
    learned fast and then declined).

    >>> learned_something([0.40, 0.45, 0.42, 0.41], noise_sd=0.035), learned_something([0.40, 0.62, 0.5], 0.035)
    (False, True)
    >>> learned_something([0.53, 0.61, 0.59, 0.6, 0.59, 0.6, 0.61, 0.64, 0.65, 0.65, 0.66, 0.66, 0.65], noise_sd=0.04)
    True
    """
    from scipy.stats import norm

    ys = np.asarray(identity, dtype=float)
    m = ys.size - 1
    if m < 1:
        return False
    share = alpha / 2
    steady = ys[1:].mean() - ys[0] > float(norm.ppf(1 - share)) * noise_sd * math.sqrt(1 + 1 / m)
    spike = np.any(ys[1:] - ys[0] > float(norm.ppf(1 - share / m)) * noise_sd * math.sqrt(2))
    return bool(steady or spike)


#: The stopping rules judged against each concept's saturation step.
ORACLE_RULES = ("dvar", "dvar_every1", "auto", "clip_s", "few_iters")
#: How concepts without a saturation step inside the budget enter the ratios and shares (stated in the report).
CENSORING_RULE = ("still-rising concepts enter with their saturation step censored at the budget (it is at or after "
                  "the budget): their stop / saturation is stop / budget, an upper bound; a stop before the budget "
                  "counts as too early, none as too late, and their saving captured is 0 whatever the stop. Flat "
                  "concepts (no check significantly above step 0) have no saturation step and are left out, counted")


def check_noise_sd(records: list[dict], traces: list[dict]) -> dict[str, float]:
    """Per method: the test-retest SD of one identity check, from the budget's two scorings (same weights, two
    sampling seeds), scaled from the variants' image count to the checks' (noise falls as 1/sqrt(images))."""
    from .power import sampling_noise_sd

    noise = {}
    for method in {t["method"] for t in traces}:
        mine = [r for r in records if r["method"] == method]
        sd = sampling_noise_sd(mine)
        scored = median(r.get("identity_images") for r in mine if r["variant"] == "baseline")
        checked = median(t["identity_checks"].get("images") for t in traces if t["method"] == method)
        if sd and scored and checked:
            noise[method] = sd * math.sqrt(scored / checked)
    return noise


def oracle_rows(records: list[dict], traces: list[dict]) -> list[dict]:
    """Per (method, concept) with identity checks up to the budget: its saturation (:func:`oracle_saturation`)
    and, per rule, the stop, stop / saturation and the identity regret at the stop (plateau minus identity)."""
    noise = check_noise_sd(records, traces)
    by_key = {(r["method"], r["concept"], r["variant"]): r for r in records}
    rows = []
    for trace in traces:
        checks, method = trace["identity_checks"], trace["method"]
        steps = checks.get("steps") or []
        if method not in noise or not steps or steps[0] != 0 or steps[-1] < trace["max_train_steps"]:
            continue  # no saturation curve: checks did not cover step 0 to the budget
        found = oracle_saturation(steps, checks["identity"], noise[method])
        budget = trace["max_train_steps"]
        judged_at = censored_saturation(found, budget)
        row = {"method": method, "concept": trace["concept"], "saturation_step": found.step,
               "saturation_status": found.status, "plateau": found.plateau, "budget": budget,
               "check_noise_sd": round(noise[method], 6), "judged_saturation": judged_at}
        for rule in ORACLE_RULES:
            record = by_key.get((method, trace["concept"], rule))
            stop = record["steps"] if record else None
            row[f"{rule}_stop"] = stop
            row[f"{rule}_ratio"] = ratio(stop, judged_at) if stop is not None and judged_at else None
            row[f"{rule}_saving_captured"] = saving_captured(stop, judged_at, budget)
            row[f"{rule}_regret"] = (round(found.plateau - record["identity"], 6)
                                     if record and record.get("identity") is not None and found.plateau is not None
                                     else None)
        rows.append(row)
    return rows


def censored_saturation(found: Saturation, budget: int) -> int | None:
    """The saturation step a stop is judged by: the step itself when saturated, the budget when still rising
    (censored: saturation is at or after it), None when flat (:data:`CENSORING_RULE`).

    >>> censored_saturation(Saturation(None, "still rising", 0.7), 1000), censored_saturation(Saturation(0, "flat", 0.4), 1000)
    (1000, None)
    """
    if found.status == "still rising":
        return budget
    return found.step if found.status == "saturated" and found.step else None


def saving_captured(stop: int | None, saturation: int | None, budget: int) -> float | None:
    """The share of the oracle's saving a stop captures: (budget - stop) / (budget - saturation); 1 at the
    saturation step, 0 at the budget, above 1 before saturation (too early). None without a saturation step;
    0 when saturation is the budget itself (a still-rising concept: nothing can be saved).

    >>> saving_captured(300, 200, 1000), saving_captured(1000, 200, 1000), saving_captured(600, 1000, 1000)
    (0.875, 0.0, 0.0)
    """
    if stop is None or saturation is None:
        return None
    if saturation >= budget:
        return 0.0
    return (budget - stop) / (budget - saturation)


def oracle_summary(rows: list[dict]) -> list[dict]:
    """Per method and rule: median / IQR of stop / saturation, median saving captured, median regret, the shares
    stopped before saturation (too early) and after twice it (too late), and the stops at the budget (ties with
    it), over the concepts with a saturation step, still-rising ones censored at the budget (:data:`CENSORING_RULE`)."""
    from .stats import median_iqr

    out = []
    for method in ordered({r["method"] for r in rows}, METHOD_ORDER):
        mine = [r for r in rows if r["method"] == method]
        judged = [r for r in mine if r.get("judged_saturation")]
        for rule in ORACLE_RULES:
            pairs = [r for r in judged if r.get(f"{rule}_stop") is not None]
            if not pairs:
                continue
            ratios = [r[f"{rule}_ratio"] for r in pairs]
            ratio_median, ratio_iqr = median_iqr(ratios)
            out.append({
                "method": method, "rule": rule, "n": len(pairs),
                "flat": sum(r["saturation_status"] == "flat" for r in mine),
                "still_rising": sum(r["saturation_status"] == "still rising" for r in pairs),
                "saturation_median": median(r["saturation_step"] for r in judged if r["saturation_status"] == "saturated"),
                "stop_median": median(r[f"{rule}_stop"] for r in pairs),
                "ratio_median": ratio_median, "ratio_iqr": ratio_iqr,
                "saving_captured_median": median(r[f"{rule}_saving_captured"] for r in pairs),
                "regret_median": median(r[f"{rule}_regret"] for r in pairs),
                "too_early": sum(r[f"{rule}_stop"] < r["judged_saturation"] for r in pairs) / len(pairs),
                "too_late": sum(x > 2 for x in ratios) / len(ratios),
                "at_budget": sum(r[f"{rule}_stop"] >= r["budget"] for r in pairs),
            })
    return out

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
from .stats import SIGNIFICANCE, is_missing, median, ordered, ratio


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
    for method in ordered({row["method"] for row in summary}, METHOD_ORDER):
        # the premature controls are not rules: whether the benchmark sees them is the power table's question
        rules = {row["variant"]: row for row in summary if row["method"] == method
                 and row["variant"] not in PREMATURE_STOPS}
        if "baseline" not in rules or len(rules) == 1:
            continue
        budget = rules["baseline"]["steps_median"]
        keeps_identity = [
            row for name, row in rules.items()
            if name != "baseline" and not is_missing(row["steps_median"])
            and ((row.get("identity_p") is not None and row["identity_p"] >= SIGNIFICANCE)
                 or (row.get("identity_change") is not None and row["identity_change"] >= 0))
        ]
        earliest = min(keeps_identity, key=lambda row: row["steps_median"], default={})
        rows.append({
            "method": method, "budget": budget,
            **{key: earliest.get(key) for key in ("variant", "steps_median", "identity_change", "identity_p")},
            "budget_ratio": ratio(budget, earliest.get("steps_median")),
        })
    return rows


# ------------------------------------------------------------------------ each concept's own saturation step


@dataclass(frozen=True)
class Saturation:
    """Where one identity curve saturates (:func:`oracle_saturation`).

    ``step`` is None when the curve has no plateau inside the budget; ``status`` says why:
    ``"saturated"``, ``"flat"`` (step 0 is already on the plateau: nothing measurable was learned)
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
    4. saturation = the first check whose averaged identity >= plateau - z * SE, SE combining both means'
       noise (noise_sd / sqrt(checks averaged)); status ``"flat"`` when that is the first check (step 0).

    >>> steps = list(range(0, 1050, 50))
    >>> rising_then_flat = [min(s, 400) / 400 * 0.3 + 0.4 for s in steps]
    >>> oracle_saturation(steps, rising_then_flat, noise_sd=0.005)
    Saturation(step=400, status='saturated', plateau=0.7)
    >>> oracle_saturation(steps, [0.4 + s / 1000 * 0.3 for s in steps], noise_sd=0.02).status
    'still rising'
    >>> oracle_saturation(steps, [0.5] * len(steps), noise_sd=0.02)
    Saturation(step=0, status='flat', plateau=0.5)
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
    plateau_se2 = noise_sd ** 2 / tail
    for index in range(len(pairs)):
        window = ys[index:index + smooth]
        if window.mean() >= plateau - z * math.sqrt(noise_sd ** 2 / window.size + plateau_se2):
            return Saturation(pairs[index][0], "flat" if index == 0 else "saturated", round(plateau, 6))
    return Saturation(pairs[-1][0], "saturated", round(plateau, 6))  # only the last check reaches the plateau


#: The stopping rules judged against each concept's saturation step.
ORACLE_RULES = ("dvar", "dvar_every1", "clip_s", "few_iters")


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
        row = {"method": method, "concept": trace["concept"], "saturation_step": found.step,
               "saturation_status": found.status, "plateau": found.plateau, "budget": trace["max_train_steps"],
               "check_noise_sd": round(noise[method], 6)}
        for rule in ORACLE_RULES:
            record = by_key.get((method, trace["concept"], rule))
            stop = record["steps"] if record else None
            row[f"{rule}_stop"] = stop
            row[f"{rule}_ratio"] = ratio(stop, found.step) if stop is not None and found.step else None
            row[f"{rule}_regret"] = (round(found.plateau - record["identity"], 6)
                                     if record and record.get("identity") is not None and found.plateau is not None
                                     else None)
        rows.append(row)
    return rows


def oracle_summary(rows: list[dict]) -> list[dict]:
    """Per method and rule: median / IQR of stop / saturation, median regret, the shares stopped before
    saturation (too early) and after twice it (too late), over concepts with a saturation step after step 0."""
    from .stats import median_iqr

    out = []
    for method in ordered({r["method"] for r in rows}, METHOD_ORDER):
        mine = [r for r in rows if r["method"] == method]
        judged = [r for r in mine if r["saturation_status"] == "saturated"]
        for rule in ORACLE_RULES:
            pairs = [r for r in judged if r.get(f"{rule}_stop") is not None]
            if not pairs:
                continue
            ratios = [r[f"{rule}_ratio"] for r in pairs]
            ratio_median, ratio_iqr = median_iqr(ratios)
            out.append({
                "method": method, "rule": rule, "n": len(pairs),
                "flat": sum(r["saturation_status"] == "flat" for r in mine),
                "still_rising": sum(r["saturation_status"] == "still rising" for r in mine),
                "saturation_median": median(r["saturation_step"] for r in judged),
                "stop_median": median(r[f"{rule}_stop"] for r in pairs),
                "ratio_median": ratio_median, "ratio_iqr": ratio_iqr,
                "regret_median": median(r[f"{rule}_regret"] for r in pairs),
                "too_early": sum(x < 1 for x in ratios) / len(ratios),
                "too_late": sum(x > 2 for x in ratios) / len(ratios),
            })
    return out

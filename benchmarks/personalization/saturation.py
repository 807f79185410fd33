"""When does identity stop improving? Per concept (the oracle a stopping rule is judged by) and per method.

:func:`oracle_saturation` finds one concept's saturation step on its identity curve (scored at every
check up to the budget); :func:`oracle_table` compares each rule's stop with it. :func:`saturation_step`
and :func:`budget_check` ask whether the budget sits past saturation at all.

Example:
    >>> oracle_saturation([0, 100, 200, 300, 400, 500], [0.4, 0.6, 0.7, 0.7, 0.7, 0.7], 0.01, smooth=1).step
    200
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import METHOD_ORDER
from .stats import SIGNIFICANCE, is_missing, median, ordered, ratio


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
    for method in ordered(by_method, METHOD_ORDER):
        saturation = median(step for step, _ in by_method[method])
        budget = median(budget for _, budget in by_method[method])
        rows.append({
            "method": method, "n": len(by_method[method]), "fraction": fraction, "smooth": smooth,
            "saturation_step_median": saturation, "budget_median": budget,
            "budget_ratio": ratio(budget, saturation),
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
    for method in ordered({row["method"] for row in summary}, METHOD_ORDER):
        rules = {row["variant"]: row for row in summary if row["method"] == method}
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
    3. each check's identity is averaged with its neighbours (``smooth`` checks, centred);
    4. saturation = the first check whose averaged identity >= plateau - z * SE, SE combining both means'
       noise (noise_sd / sqrt(checks averaged)); status ``"flat"`` when that is the first check (step 0).

    >>> steps = list(range(0, 1050, 50))
    >>> rising_then_flat = [min(s, 400) / 400 * 0.3 + 0.4 for s in steps]
    >>> oracle_saturation(steps, rising_then_flat, noise_sd=0.02)
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
    half = smooth // 2
    plateau_se2 = noise_sd ** 2 / tail
    for index in range(len(pairs)):
        window = ys[max(0, index - half):index + half + 1]
        if window.mean() >= plateau - z * math.sqrt(noise_sd ** 2 / window.size + plateau_se2):
            return Saturation(pairs[index][0], "flat" if index == 0 else "saturated", round(plateau, 6))
    raise AssertionError("unreachable: the plateau's own checks are never significantly below it")

"""The settling-time rule (``preset="auto"``): a window from the loss's own settling time."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from .base import NonFinitePolicy, StopKind, StopRule, stop_kind_of_reason

#: ``preset="auto"``: the default multiple of the settling time (its threshold) and the share of the drop
#: that defines the settling time; chosen by ``benchmarks/rules.py`` on half the concepts.
AUTO_MULTIPLE = 2.0
AUTO_LEVEL = 0.8


class SettlingTimeCriterion(StopRule):
    """Stop once the run is ``multiple`` times as long as its smoothed loss took to cover ``level`` of its
    drop so far.

    At evaluation n the smoothed loss S (mean of the last ``smooth`` evaluations) has fallen D = S[0] - min S;
    T is the first evaluation whose S is at or below S[0] - level * D (counted at its smoothing window's end).
    While the loss keeps falling T keeps up with n (a straight fall has T ~ level * n, and ``multiple * level
    > 1`` never stops it); once the loss settles T stays put and n grows past ``multiple * T``. On
    exp(-t / tau), T tends to tau * ln(1 / (1 - level)), so the stop is a fixed multiple of tau. D must
    exceed ``min_drop_snr`` times the evaluation noise (the SD of successive differences over sqrt 2), so
    that a dip of noise early in a slow fall is not taken for its drop. D only grows, so T only moves
    forward: O(1) amortised per evaluation (memory O(n), for T's search).

    Its statistic is n / T, and it stops when that reaches ``multiple`` (its threshold).

    Example:
        >>> rule = SettlingTimeCriterion(multiple=2.0, level=0.8, min_evaluations=10)
        >>> stops = [rule.update(math.exp(-t / 10)) for t in range(100)]
        >>> rule.stop_step, rule.stop_kind.value, rule.statistic_name
        (40, 'settled', 'evaluations / settling time')
    """

    name = "settling_time"
    version = 1
    fires_with = StopKind.SETTLED
    stops_when = "above"
    statistic_name = "evaluations / settling time"  # type: ignore[assignment]  # a constant for this rule
    #: what the values are, for the stop reason (``"normalized loss"`` with ``DVARConfig(signal="normalized")``)
    value_name = "loss"

    def __init__(self, multiple: float = AUTO_MULTIPLE, level: float = AUTO_LEVEL, smooth: int = 5,
                 min_evaluations: int = 20, min_drop_snr: float = 5.0, nonfinite: NonFinitePolicy = "stop") -> None:
        if not math.isfinite(level) or not 0 < level < 1:
            raise ValueError(f"settling-time level must be between 0 and 1 (got {level!r}); e.g. 0.8: the time the "
                             "smoothed loss takes to cover 80% of its drop.")
        if not math.isfinite(multiple) or multiple * level <= 1:
            raise ValueError(f"settling-time multiple (the threshold of preset 'auto') must be finite with multiple * "
                             f"level > 1 (got {multiple!r} at level "
                             f"{level}); otherwise a loss still falling in a straight line would stop.")
        for name, value, low in (("smooth", smooth, 1), ("min_evaluations", min_evaluations, 3)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"settling-time {name} must be an integer >= {low} (got {value!r}).")
        if not math.isfinite(min_drop_snr) or min_drop_snr < 0:
            raise ValueError(f"settling-time min_drop_snr must be a finite number >= 0 (got {min_drop_snr!r}).")
        super().__init__(multiple, nonfinite)
        self.multiple, self.level = float(multiple), float(level)
        self.smooth, self.min_evaluations = int(smooth), int(min_evaluations)
        self.min_drop_snr = float(min_drop_snr)
        self._reset_values()

    def _reset_values(self) -> None:
        self._values: List[float] = []
        self._sum_sq_diff = 0.0
        self._smoothed: List[float] = []
        self._lowest, self._crossing = math.inf, 0

    @property
    def num_values(self) -> int:
        return len(self._values)

    @property
    def settling_evaluations(self) -> Optional[int]:
        """T: the evaluation by which the smoothed loss had covered ``level`` of its drop (None before it fell)."""
        if not self._smoothed or not self._lowest < self._smoothed[0]:
            return None
        return self._crossing + self.smooth

    @property
    def statistic(self) -> float:
        """Evaluations so far / T (the rule stops once it reaches ``multiple``); nan before the loss fell."""
        t = self.settling_evaluations
        return self.num_values / t if t else math.nan

    @property
    def waiting_for(self) -> Optional[str]:
        """Set while n has reached ``multiple`` x T but the drop is still within ``min_drop_snr`` x the noise.

        >>> rule = SettlingTimeCriterion(multiple=2.0, level=0.8, min_evaluations=10)
        >>> for i in range(60):  # flat noise: n / T passes the multiple, but there was no drop to settle from
        ...     _ = rule.update(1.0 + 0.1 * math.sin(2.1 * i))
        >>> rule.stopped, round(rule.statistic, 2), rule.waiting_for
        (False, 8.57, 'its drop 0.0342 is within 5x the evaluation noise 0.0869')
        """
        if self.stopped or not self._past_multiple() or not self._drop_within_noise():
            return None
        return f"its drop {self._drop:.3g} is within {self.min_drop_snr:g}x the evaluation noise {self.noise:.3g}"

    @property
    def _drop(self) -> float:
        """D: how far the smoothed loss has fallen from its first value."""
        return self._smoothed[0] - self._lowest

    def _past_multiple(self) -> bool:
        """n has reached ``multiple`` x T (and ``min_evaluations``): the time condition of a stop."""
        t = self.settling_evaluations
        return t is not None and self.num_values >= self.min_evaluations and self.num_values >= self.multiple * t

    def _drop_within_noise(self) -> bool:
        """D is no more than ``min_drop_snr`` x the evaluation noise: no real drop to have settled from yet."""
        return self._drop <= self.min_drop_snr * self.noise

    @property
    def noise(self) -> float:
        """The evaluation noise: RMS of successive differences / sqrt(2) (0 before two values)."""
        n = self.num_values
        return math.sqrt(self._sum_sq_diff / (2 * (n - 1))) if n > 1 else 0.0

    def settings(self) -> Dict[str, Any]:
        return {"multiple": self.multiple, "level": self.level, "smooth": self.smooth,
                "min_evaluations": self.min_evaluations, "min_drop_snr": self.min_drop_snr}

    def _add(self, x: float) -> None:
        if self._values:
            self._sum_sq_diff += (x - self._values[-1]) ** 2
        self._values.append(x)
        if len(self._values) < self.smooth:
            return
        smoothed = float(np.mean(self._values[-self.smooth:]))
        self._smoothed.append(smoothed)
        self._lowest = min(self._lowest, smoothed)
        target = self._smoothed[0] - self.level * (self._smoothed[0] - self._lowest)
        while self._smoothed[self._crossing] > target:  # the target only falls: the pointer only moves on
            self._crossing += 1

    def _observe(self, value: float) -> Optional[str]:
        self._add(value)
        if not self._past_multiple() or self._drop_within_noise():
            return None
        return (f"settled: the smoothed {self.value_name} covered {self.level:.0%} of its drop {self._drop:.3g} by "
                f"evaluation {self.settling_evaluations}, and {self.num_values} evaluations are {self.multiple:g}x that")

    def _state(self) -> Dict[str, Any]:
        """The values seen; the smoothed curve and T are rebuilt on load, bit for bit."""
        return {"values": list(self._values)}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._reset_values()
        for x in state["values"]:
            self._add(x)

    def _upgrade(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """dvar 0.1 wrote this rule's state flat (tagged, without a version)."""
        if "settings" in state or state.get("rule") != self.name:
            return state
        settings = {key: state[key] for key in ("multiple", "level", "smooth", "min_evaluations", "min_drop_snr")}
        kind = stop_kind_of_reason(state["reason"])
        outcome = {"stop_step": state["stop_step"], "stop_kind": None if kind is None else kind.value,
                   "reason": state["reason"], "last_value": state["last_value"]}
        return {"rule": self.name, "version": 0, "settings": settings,
                "state": {"values": state["values"], "outcome": outcome}}

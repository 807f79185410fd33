"""Candidate stopping rules that the benchmark replays but the library does not ship.

:class:`SettledCriterion` (the slope rule, ``preset="auto"`` before issue 12 chose the settling-time rule) stays
here so that ``benchmarks/rules.py`` can keep comparing it: it stops once a line fitted to the last ``fraction``
of the evaluations falls by less than ``tolerance`` of the loss's total drop. :func:`replay_stop_step` feeds any
rule with ``update(value) -> bool`` the values of an every-step trace at a stride.

Example:
    >>> rule = SettledCriterion(tolerance=0.05, min_evaluations=10)
    >>> stops = [rule.update(math.exp(-t / 10)) for t in range(100)]
    >>> rule.stop_step, rule.reason.split(":")[0]
    (60, 'settled')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

NONFINITE_POLICIES = ("stop", "skip", "raise")


def replay_stop_step(rule: Any, trace: Sequence[float], eval_every: int = 1) -> Optional[int]:
    """Feed ``rule`` the values of an every-step trace (``trace[i]``: the loss after step ``i + 1``) at steps
    k, 2k, ...; its stop in optimizer steps, or None when it never fires.

    >>> replay_stop_step(SettledCriterion(min_evaluations=10), [math.exp(-t / 10) for t in range(1, 400)], 2)
    64
    """
    for count, value in enumerate(list(trace)[eval_every - 1 :: eval_every], 1):
        if rule.update(value):
            return count * eval_every
    return None


@dataclass(frozen=True)
class SettledStatistic:
    """What the slope rule reads off a trace (:func:`settled_statistic`)."""

    recent: int  #: evaluations in the recent part (the last ``fraction`` of the trace)
    recent_drop: float  #: how much the line fitted to the recent part falls across it
    total_drop: float  #: first value minus the fitted line's last value
    noise: float  #: residual SD around the fitted line

    @property
    def recent_drop_se(self) -> float:
        """Standard error of ``recent_drop`` (the fitted slope's, times the span)."""
        h = self.recent
        return self.noise * (h - 1) * math.sqrt(12.0 / (h * (h * h - 1)))

    def settled(self, tolerance: float, z: float, min_drop_snr: float) -> bool:
        """The loss fell by more than ``min_drop_snr`` residual SDs, and the recent drop is below ``tolerance``
        of that total drop by ``z`` standard errors."""
        return (self.total_drop > min_drop_snr * self.noise
                and self.recent_drop + z * self.recent_drop_se < tolerance * self.total_drop)

    @property
    def ratio(self) -> float:
        """``recent_drop / total_drop`` (nan while the loss has not fallen)."""
        return self.recent_drop / self.total_drop if self.total_drop > 0 else math.nan


def _line_fit(h: int, sum_y: float, sum_jy: float, sum_yy: float) -> Tuple[float, float, float]:
    """(slope, fitted last value, residual SD) of y_j = a + b j, j = 0..h-1, from the sums."""
    sxx = h * (h * h - 1) / 12.0
    sxy = sum_jy - (h - 1) / 2.0 * sum_y
    slope = sxy / sxx
    mean = sum_y / h
    rss = max(sum_yy - sum_y * sum_y / h - slope * sxy, 0.0)
    return slope, mean + slope * (h - 1) / 2.0, math.sqrt(rss / (h - 2)) if h > 2 else 0.0


def _recent_length(n: int, fraction: float) -> int:
    """How many of ``n`` values the slope rule fits its line to: the last ``fraction``, at least 3."""
    return min(n, max(3, math.ceil(fraction * n)))


def settled_statistic(values: Sequence[float], fraction: float = 0.5) -> SettledStatistic:
    """The slope rule's reading of a trace: fit a line to its last ``fraction`` (at least 3 values) and compare
    how much that line falls across them with how much the loss fell in all.

    >>> stat = settled_statistic([4.0, 2.0, 1.5, 1.25, 1.2, 1.19], fraction=0.5)
    >>> stat.recent, round(stat.recent_drop, 3), round(stat.total_drop, 3)
    (3, 0.06, 2.817)
    """
    y = np.asarray(values, dtype=np.float64)
    h = _recent_length(y.size, fraction)
    recent = y[y.size - h:] - y[0]
    j = np.arange(h, dtype=np.float64)
    slope, last, noise = _line_fit(h, float(recent.sum()), float((j * recent).sum()), float((recent * recent).sum()))
    return SettledStatistic(h, -slope * (h - 1), -last, noise)


def settled_should_stop(values: Sequence[float], tolerance: float, fraction: float = 0.5,
                        min_evaluations: int = 20, z: float = 2.0, min_drop_snr: float = 5.0) -> bool:
    """True when the recent part of the run (its last ``fraction``) fell by less than ``tolerance`` of the
    loss's total drop, by ``z`` standard errors of that recent drop, and the total drop is more than
    ``min_drop_snr`` times the wiggle around the recent line. On ``exp(-t / tau)`` it fires near
    ``t = ln(1 / tolerance) / fraction * tau`` for any tau.

    >>> decay = [math.exp(-t / 10) for t in range(200)]
    >>> settled_should_stop(decay[:40], 0.05), settled_should_stop(decay[:70], 0.05)
    (False, True)
    """
    if len(values) < min_evaluations:
        return False
    return settled_statistic(values, fraction).settled(tolerance, z, min_drop_snr)


class SettledCriterion:
    """Streaming slope rule: stop once the loss has settled relative to its own drop.

    The recent part is the last ``fraction`` of the evaluations so far (no window in steps). It stops when a
    line fitted to the recent part falls across it by less than ``tolerance`` of the loss's total drop, with
    ``z`` standard errors to spare, once the loss has fallen by more than ``min_drop_snr`` residual SDs and at
    least ``min_evaluations`` values exist. Exact running sums: O(1) per update (memory O(n)).

    Example:
        >>> rule = SettledCriterion(tolerance=0.05, min_evaluations=10)
        >>> [rule.update(v) for v in (1.0, 0.9, math.nan)]
        [False, False, True]
        >>> rule.stop_step, rule.reason.split(":")[0]
        (3, 'non-finite')
    """

    def __init__(self, tolerance: float = 0.05, fraction: float = 0.5, min_evaluations: int = 20,
                 z: float = 2.0, min_drop_snr: float = 5.0, nonfinite: str = "stop") -> None:
        if not math.isfinite(tolerance) or not 0 < tolerance < 1:
            raise ValueError(f"auto rule tolerance must be between 0 and 1 (got {tolerance!r}); e.g. 0.05: the recent "
                             "part may still fall by 5% of the total drop.")
        if not 0 < fraction <= 1:
            raise ValueError(f"auto rule fraction must be in (0, 1] (got {fraction!r}).")
        if isinstance(min_evaluations, bool) or not isinstance(min_evaluations, (int, np.integer)) or min_evaluations < 3:
            raise ValueError(f"auto rule min_evaluations must be an integer >= 3 (got {min_evaluations!r}).")
        for name, value in (("z", z), ("min_drop_snr", min_drop_snr)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"auto rule {name} must be a finite number >= 0 (got {value!r}).")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be 'stop', 'skip' or 'raise' (got {nonfinite!r}).")
        self.tolerance, self.fraction, self.min_evaluations = float(tolerance), float(fraction), int(min_evaluations)
        self.z, self.min_drop_snr, self.nonfinite = float(z), float(min_drop_snr), nonfinite
        self.threshold = self.tolerance
        self._shift: Optional[float] = None
        self._values: List[float] = []
        self._sums: List[Tuple[float, float, float]] = [(0.0, 0.0, 0.0)]  # prefix sums of y, i*y, y*y
        self.statistic: Optional[SettledStatistic] = None
        self.stopped, self.stop_step, self.reason = False, None, None
        self.last_value = math.nan

    @property
    def num_values(self) -> int:
        return len(self._values)

    @property
    def normalized_variance(self) -> float:
        """The rule's statistic, recent drop / total drop."""
        return self.statistic.ratio if self.statistic is not None else math.nan

    def _add(self, x: float) -> None:
        i = len(self._values)
        s_y, s_iy, s_yy = self._sums[-1]
        self._values.append(x)
        self._sums.append((s_y + x, s_iy + i * x, s_yy + x * x))

    def _statistic(self) -> SettledStatistic:
        n = len(self._values)
        h = _recent_length(n, self.fraction)
        a = n - h
        sum_y = self._sums[n][0] - self._sums[a][0]
        sum_jy = self._sums[n][1] - self._sums[a][1] - a * sum_y
        sum_yy = self._sums[n][2] - self._sums[a][2]
        slope, last, noise = _line_fit(h, sum_y, sum_jy, sum_yy)
        return SettledStatistic(h, -slope * (h - 1), -last, noise)

    def update(self, value: float) -> bool:
        """Feed one value; True on the value at which the rule fires and on every value after."""
        value = float(value)
        self.last_value = value
        if not math.isfinite(value):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"got a non-finite loss ({value}) after {self.num_values} values.")
            if self.nonfinite == "stop" and not self.stopped:
                self.stopped, self.stop_step = True, self.num_values + 1
                self.reason = f"non-finite: loss became {value} at value {self.num_values + 1}"
            return self.stopped
        if self._shift is None:
            self._shift = value
        self._add(value - self._shift)  # shifted by the first value: sums stay small, precision stays
        if self.num_values < max(3, self.min_evaluations):
            return self.stopped
        stat = self.statistic = self._statistic()
        if not self.stopped and stat.settled(self.tolerance, self.z, self.min_drop_snr):
            self.stopped, self.stop_step = True, self.num_values
            self.reason = (
                f"settled: over its last {stat.recent} of {self.num_values} evaluations the loss fell "
                f"{stat.recent_drop:.3g}, {stat.ratio:.1%} of its total drop {stat.total_drop:.3g} "
                f"(< {self.tolerance:.0%})"
            )
        return self.stopped

    def state_dict(self) -> Dict[str, Any]:
        """The values seen (shifted) and the outcome; the sums are rebuilt on load, bit for bit."""
        return {
            "rule": "auto", "tolerance": self.tolerance, "fraction": self.fraction,
            "min_evaluations": self.min_evaluations, "z": self.z, "min_drop_snr": self.min_drop_snr,
            "shift": self._shift, "values": list(self._values), "stopped": self.stopped, "stop_step": self.stop_step,
            "reason": self.reason, "last_value": self.last_value,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        settings = ("tolerance", "fraction", "min_evaluations", "z", "min_drop_snr")
        if state.get("rule") != "auto" or any(state[key] != getattr(self, key) for key in settings):
            raise ValueError("Checkpoint was written with other auto-rule settings (or another rule); resume with the "
                             "same early-stopping settings.")
        self._shift, self._values, self._sums = state["shift"], [], [(0.0, 0.0, 0.0)]
        for x in state["values"]:
            self._add(x)
        self.statistic = self._statistic() if self.num_values >= max(3, self.min_evaluations) else None
        self.stopped, self.stop_step, self.reason = state["stopped"], state["stop_step"], state["reason"]
        self.last_value = state["last_value"]

    def __repr__(self) -> str:
        return (f"SettledCriterion(tolerance={self.tolerance}, fraction={self.fraction}, num_values={self.num_values}, "
                f"stopped={self.stopped})")


def settled_stop_step(trace: Sequence[float], eval_every: int, **settings: Any) -> Optional[int]:
    """The slope rule's stop (optimizer steps) evaluating every ``eval_every`` steps, replayed on an every-step
    trace; None if it never fires."""
    return replay_stop_step(SettledCriterion(**settings), trace, eval_every)


class PflugCriterion:
    """Pflug's stationarity diagnostic on the optimizer's updates (Chee and Toulis 2018): from a burn-in step on,
    sum u_t . u_(t-1), the inner product of successive updates; while the weights still travel, successive updates
    agree (positive sum); around a stationary point the noise makes them disagree. Stop at the first step at least
    ``min_steps`` after the burn-in whose running sum is negative. Reads only the trained weights: no forward pass.

    ``update(dot)`` takes u_t . u_(t-1) of one optimizer step (None at the first step, which has no previous update).

    Example:
        >>> rule = PflugCriterion(burn_in=2, min_steps=2)
        >>> [rule.update(d) for d in (None, 1.0, 0.5, -1.0, -1.0, 2.0)]
        [False, False, False, False, True, True]
        >>> rule.stop_step, rule.reason
        (5, 'stationary: the running sum of successive-update inner products since step 2 is -0.5 at step 5')
    """

    def __init__(self, burn_in: int, min_steps: int) -> None:
        if burn_in < 1 or min_steps < 1:
            raise ValueError(f"burn_in and min_steps must be >= 1 (got {burn_in}, {min_steps}).")
        self.burn_in, self.min_steps = int(burn_in), int(min_steps)
        self.steps, self.running_sum = 0, 0.0
        self.stopped, self.stop_step, self.reason = False, None, None

    def update(self, dot: Optional[float]) -> bool:
        self.steps += 1
        if self.stopped:
            return True
        if self.steps >= self.burn_in and dot is not None:
            self.running_sum += float(dot)
        if self.steps >= self.burn_in + self.min_steps and self.running_sum < 0:
            self.stopped, self.stop_step = True, self.steps
            self.reason = (f"stationary: the running sum of successive-update inner products since step {self.burn_in} "
                           f"is {self.running_sum:.3g} at step {self.steps}")
        return self.stopped


"""Stop rules: the DVAR plateau test, window-free rules (``auto``) and the paper's patience baseline.

Each decision is a pure function that tests and notebooks can call on a whole trace
(:func:`normalized_variance` / :func:`dvar_should_stop`; :func:`settled_statistic` /
:func:`settled_should_stop`); :class:`DVARCriterion`, :class:`SettledCriterion` and
:class:`SettlingTimeCriterion` are the streaming versions used during training: O(1) work per value (amortised), exact to
numerical precision, and checkpointable through ``state_dict()``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

NonFinitePolicy = Literal["stop", "skip", "raise"]
EvalEvery = Union[int, str]

#: M, the evaluations per window that ``eval_every="auto"`` aims at: k = max(1, window // M).
#: Chosen from the stride study (``benchmarks/stride.py``, table in ``benchmarks/results/stride.md``).
AUTO_EVALS_PER_WINDOW = 30


@dataclass(frozen=True)
class DVARPreset:
    """Published DVAR settings for one personalization method."""

    window: int
    threshold: float
    source: str


PRESETS: Dict[str, DVARPreset] = {
    "textual_inversion": DVARPreset(310, 0.15, "Voronov et al. 2023, Textual Inversion"),
    "custom_diffusion": DVARPreset(180, 0.15, "Voronov et al. 2023, Custom Diffusion"),
    "dreambooth_lora": DVARPreset(440, 0.4, "Voronov et al. 2023, DreamBooth-LoRA"),
    # Full DreamBooth was not tuned in the paper. It trains the same UNet on the same
    # instance images (often with the same prior-preservation loss) as DreamBooth-LoRA,
    # with budgets of the same order (~1000 steps), so its loss curve has the LoRA shape
    # rather than Textual Inversion's long 6100-step tail: reuse the LoRA setting.
    "dreambooth": DVARPreset(440, 0.4, "DreamBooth-LoRA setting, reused (see docs)"),
    "textual_inversion_v1": DVARPreset(282, 0.39, "Voronov et al. 2023, first (TI-only) version"),
}


def resolve_preset(name: str) -> DVARPreset:
    """Look a preset up by name, with an error that lists the valid ones."""
    key = name.replace("-", "_").lower()
    if key not in PRESETS:
        raise ValueError(f"Unknown DVAR preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[key]


def normalized_variance(values: Sequence[float], window: int) -> float:
    """``var(values[-window:]) / var(values)`` (population variances), the DVAR statistic.

    Returns ``nan`` while fewer than ``window`` values exist, and ``0.0`` for a trace
    that never moved (both variances zero: it is as flat as a plateau gets).

    >>> normalized_variance([3.0, 2.0, 1.0, 1.0, 1.0], window=3)
    0.0
    """
    history = np.asarray(values, dtype=np.float64)
    if history.size < window:
        return math.nan
    total = float(np.var(history))
    if total == 0.0:
        return 0.0
    return float(np.var(history[-window:])) / total


def dvar_should_stop(values: Sequence[float], window: int, threshold: float) -> bool:
    """True when the last ``window`` values vary less than ``threshold`` times the whole trace.

    >>> dvar_should_stop([5.0, 4.0, 3.0, 3.0, 3.0], window=3, threshold=0.1)
    True
    """
    return normalized_variance(values, window) < threshold


def first_stop_step(values: Iterable[float], window: int, threshold: float) -> Optional[int]:
    """The 1-based count of values at which the rule first fires on a whole trace, or None."""
    criterion = DVARCriterion(window, threshold)
    for value in values:
        if criterion.update(value):
            return criterion.stop_step
    return None


def resolve_eval_every(eval_every: EvalEvery, window: int, evals_per_window: int = AUTO_EVALS_PER_WINDOW) -> int:
    """The evaluation stride k in optimizer steps: ``"auto"`` gives ``max(1, window // evals_per_window)``.

    Derived from the window only (never from timings), so the same settings give the same
    stride, and the same stop, on every machine. ``eval_every=1`` is the paper's setting.

    >>> resolve_eval_every("auto", 310), resolve_eval_every("auto", 440), resolve_eval_every("auto", 180)
    (10, 14, 6)
    >>> resolve_eval_every(1, 310)
    1
    """
    if eval_every == "auto":
        return max(1, int(window) // evals_per_window)
    if overhead_target(eval_every) is not None:
        raise ValueError(f"eval_every={eval_every!r} is chosen from timings at the start of training, not from the "
                         "window (DVAREarlyStopping does it).")
    if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every < 1:
        raise ValueError(
            f"eval_every must be >= 1 (an integer), 'auto' or a target overhead such as '5%' (got {eval_every!r}); "
            "1 is the paper's every-step setting."
        )
    return int(eval_every)


def overhead_target(eval_every: EvalEvery) -> Optional[float]:
    """The fraction of training time a percent setting (``eval_every="5%"``) allows evaluations; None otherwise.

    >>> overhead_target("5%"), overhead_target("auto"), overhead_target(10)
    (0.05, None, None)
    """
    if not (isinstance(eval_every, str) and eval_every.endswith("%")):
        return None
    try:
        target = float(eval_every[:-1]) / 100
    except ValueError:
        target = math.nan
    if not 0 < target <= 1:
        raise ValueError(f"eval_every={eval_every!r}: a target overhead must be a percentage in (0, 100], e.g. '5%'.")
    return target


def stride_for_overhead(eval_seconds: float, step_seconds: float, target: float) -> int:
    """The smallest stride k at which one evaluation every k steps costs at most ``target`` of the
    training time: ``ceil(eval_seconds / (target * step_seconds))``, at least 1.

    >>> stride_for_overhead(0.040, 0.100, 0.05)  # an evaluation costs 40% of a step: every 8 steps is 5%
    8
    >>> stride_for_overhead(0.004, 0.100, 0.05)
    1
    """
    if not (eval_seconds >= 0 and step_seconds > 0 and 0 < target <= 1):
        raise ValueError(f"need eval_seconds >= 0, step_seconds > 0 and 0 < target <= 1 (got {eval_seconds}, "
                         f"{step_seconds}, {target})")
    return max(1, math.ceil(round(eval_seconds / (target * step_seconds), 9)))  # round: 8.000000000000002 is 8


def evaluations_in_window(window: int, eval_every: int) -> int:
    """The window of ``window`` optimizer steps counted in evaluations made every ``eval_every``
    steps: the nearest whole number (halves up), at least 2, so that it spans as close to
    ``window`` steps as the stride allows.

    >>> evaluations_in_window(310, 1), evaluations_in_window(310, 10), evaluations_in_window(440, 14)
    (310, 31, 31)
    """
    return max(2, (2 * window + eval_every) // (2 * eval_every))


def strided_stop_step(trace: Sequence[float], window: int, threshold: float, eval_every: int) -> Optional[int]:
    """The stop step (in optimizer steps) of the rule evaluating every ``eval_every`` steps,
    replayed on an every-step trace (``trace[i]`` is the loss after step ``i + 1``).

    This is exactly what :class:`~dvar.DVAREarlyStopping` decides with that ``eval_every``:
    it evaluates at steps k, 2k, ... and counts its window in evaluations
    (:func:`evaluations_in_window`), so it can only stop on a multiple of k.

    >>> strided_stop_step([5.0, 4.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0], window=4, threshold=0.2, eval_every=2)
    6
    """
    sub = list(trace)[eval_every - 1 :: eval_every]
    count = first_stop_step(sub, evaluations_in_window(window, eval_every), threshold)
    return None if count is None else count * eval_every


def _check_nonfinite_policy(nonfinite: str) -> None:
    if nonfinite not in ("stop", "skip", "raise"):
        raise ValueError(f"nonfinite must be 'stop', 'skip' or 'raise' (got {nonfinite!r}).")


def _on_nonfinite_loss(rule: Any, value: float) -> bool:
    """A loss rule's ``nonfinite`` policy for a NaN/inf ``value``: raise, stop (with a reason) or skip it.
    Returns ``rule.stopped``."""
    if rule.nonfinite == "raise":
        raise FloatingPointError(f"DVAR got a non-finite loss ({value}) after {rule.num_values} values.")
    if rule.nonfinite == "stop" and not rule.stopped:
        rule.stopped, rule.stop_step = True, rule.num_values + 1
        rule.reason = f"non-finite: loss became {value} after {rule.num_values} values"
    return rule.stopped


def _replay_stop_step(rule: Any, trace: Sequence[float], eval_every: int) -> Optional[int]:
    """Feed ``rule`` the values of an every-step trace at steps k, 2k, ...; its stop in optimizer steps, or None."""
    for count, value in enumerate(list(trace)[eval_every - 1 :: eval_every], 1):
        if rule.update(value):
            return count * eval_every
    return None


class _RunningMoments:
    """Count, mean and sum of squared deviations (Welford), on values shifted by ``shift``.

    Shifting by a value from the trace keeps the accumulators near zero, so losses of
    ~0.1 that wiggle by 1e-6 keep full relative precision over 100k+ values.
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0) -> None:
        self.count, self.mean, self.m2 = count, mean, m2

    def add(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def replace(self, old: float, new: float) -> None:
        """Slide a fixed-size window: drop ``old``, add ``new``."""
        new_mean = self.mean + (new - old) / self.count
        self.m2 += (new - old) * (new - new_mean + old - self.mean)
        self.mean = new_mean

    def reset(self, values: Iterable[float]) -> None:
        data = np.fromiter(values, dtype=np.float64)
        self.count = int(data.size)
        self.mean = float(data.mean()) if data.size else 0.0
        self.m2 = float(((data - self.mean) ** 2).sum()) if data.size else 0.0

    @property
    def variance(self) -> float:
        return max(self.m2, 0.0) / self.count if self.count else math.nan


class DVARCriterion:
    """Streaming DVAR rule: stop once ``var(last window) / var(all) < threshold``.

    Args:
        window: number of most recent values in the numerator variance (``N``); >= 2.
        threshold: the ratio below which the loss counts as a plateau (``alpha``); > 0.
        nonfinite: what a NaN/inf value does: ``"stop"`` (default, reason ``"non-finite"``),
            ``"skip"`` (ignore the value) or ``"raise"`` (``FloatingPointError``).

    Example:
        >>> rule = DVARCriterion(window=3, threshold=0.1)
        >>> [rule.update(v) for v in [5.0, 4.0, 3.0, 3.1, 3.0]]
        [False, False, False, False, True]
        >>> rule.stop_step, rule.reason
        (5, 'plateau: var(last 3) / var(all 5) = 0.003598 < 0.1')
    """

    def __init__(self, window: int, threshold: float, nonfinite: NonFinitePolicy = "stop") -> None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
            raise ValueError(f"DVAR window must be an integer >= 2 (got {window!r}); the paper uses 180-440.")
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"DVAR threshold must be a finite number > 0 (got {threshold!r}); the paper uses 0.15-0.4.")
        _check_nonfinite_policy(nonfinite)
        self.window = int(window)
        self.threshold = float(threshold)
        self.nonfinite = nonfinite
        self._reset()

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "DVARCriterion":
        """``DVARCriterion.from_preset("textual_inversion")`` -> window 310, threshold 0.15."""
        preset = resolve_preset(name)
        return cls(preset.window, preset.threshold, **kwargs)

    def _reset(self) -> None:
        self._shift: Optional[float] = None
        self._all = _RunningMoments()
        self._recent = _RunningMoments()
        self._window_values: Deque[float] = deque(maxlen=self.window)
        self._slides_since_exact = 0
        self.normalized_variance: float = math.nan
        self.stopped = False
        self.stop_step: Optional[int] = None
        self.reason: Optional[str] = None
        self.last_value: float = math.nan

    @property
    def num_values(self) -> int:
        """How many (finite) values the rule has seen."""
        return self._all.count

    def update(self, value: float) -> bool:
        """Feed one value; True on the value at which the rule fires and on every value after."""
        value = float(value)
        self.last_value = value
        if not math.isfinite(value):
            return _on_nonfinite_loss(self, value)

        if self._shift is None:
            self._shift = value
        x = value - self._shift
        self._all.add(x)
        if len(self._window_values) < self.window:
            self._recent.add(x)
        else:
            self._recent.replace(self._window_values[0], x)
            self._slides_since_exact += 1
        self._window_values.append(x)
        if self._slides_since_exact >= self.window:
            # Sliding updates drift by rounding; an exact pass every `window` slides
            # bounds the drift and costs O(1) amortised.
            self._recent.reset(self._window_values)
            self._slides_since_exact = 0

        if self.num_values < self.window:
            return self.stopped
        total = self._all.variance
        self.normalized_variance = 0.0 if total == 0.0 else self._recent.variance / total
        if not self.stopped and self.normalized_variance < self.threshold:
            self._fire(
                f"plateau: var(last {self.window}) / var(all {self.num_values}) = "
                f"{self.normalized_variance:.4g} < {self.threshold:g}",
                self.num_values,
            )
        return self.stopped

    def _fire(self, reason: str, step: int) -> None:
        self.stopped, self.stop_step, self.reason = True, step, reason

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit-for-bit (plain Python types, safe to ``torch.save``)."""
        return {
            "window": self.window,
            "threshold": self.threshold,
            "shift": self._shift,
            "all": [self._all.count, self._all.mean, self._all.m2],
            "recent": [self._recent.count, self._recent.mean, self._recent.m2],
            "window_values": list(self._window_values),
            "slides_since_exact": self._slides_since_exact,
            "normalized_variance": self.normalized_variance,
            "stopped": self.stopped,
            "stop_step": self.stop_step,
            "reason": self.reason,
            "last_value": self.last_value,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if (state["window"], state["threshold"]) != (self.window, self.threshold):
            raise ValueError(
                f"Checkpoint was written with window={state['window']}, threshold={state['threshold']}, "
                f"but this criterion has window={self.window}, threshold={self.threshold}; "
                "resume with the same settings."
            )
        self._shift = state["shift"]
        self._all = _RunningMoments(*state["all"])
        self._recent = _RunningMoments(*state["recent"])
        self._window_values = deque(state["window_values"], maxlen=self.window)
        self._slides_since_exact = state["slides_since_exact"]
        self.normalized_variance = state["normalized_variance"]
        self.stopped = state["stopped"]
        self.stop_step = state["stop_step"]
        self.reason = state["reason"]
        self.last_value = state["last_value"]

    def __repr__(self) -> str:
        return f"DVARCriterion(window={self.window}, threshold={self.threshold}, num_values={self.num_values}, stopped={self.stopped})"


#: ``preset="auto"``: the stride is ``max(1, max_train_steps // AUTO_EVALS_PER_BUDGET)`` (its window is not
#: known in advance, so the stride comes from the budget: about 100 evaluations over a full run).
AUTO_EVALS_PER_BUDGET = 100
#: :class:`SettledCriterion`'s default tolerance.
AUTO_TOLERANCE = 0.05
#: ``preset="auto"`` (:class:`SettlingTimeCriterion`): the default multiple of the settling time (its threshold)
#: and the share of the drop that defines the settling time; chosen by ``benchmarks/rules.py`` on half the concepts.
AUTO_MULTIPLE = 2.0
AUTO_LEVEL = 0.8


def budget_stride(max_train_steps: int) -> int:
    """``preset="auto"``'s default stride: about ``AUTO_EVALS_PER_BUDGET`` evaluations over the budget.

    >>> budget_stride(1000), budget_stride(50)
    (10, 1)
    """
    return max(1, int(max_train_steps) // AUTO_EVALS_PER_BUDGET)


@dataclass(frozen=True)
class SettledStatistic:
    """What the ``auto`` rule reads off a trace (:func:`settled_statistic`)."""

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
    """How many of ``n`` values the ``auto`` rule fits its line to: the last ``fraction``, at least 3."""
    return min(n, max(3, math.ceil(fraction * n)))


def settled_statistic(values: Sequence[float], fraction: float = 0.5) -> SettledStatistic:
    """The ``auto`` rule's reading of a trace: fit a line to its last ``fraction`` (at least 3 values)
    and compare how much that line falls across them with how much the loss fell in all.

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
    loss's total drop, by ``z`` standard errors of that recent drop (a noisy trace must show it), and
    the total drop is more than ``min_drop_snr`` times the wiggle around the recent line (it really fell).

    Scale-free: on ``exp(-t / tau)`` it fires near ``t = ln(1 / tolerance) / fraction * tau`` for any tau.

    >>> decay = [math.exp(-t / 10) for t in range(200)]
    >>> settled_should_stop(decay[:40], 0.05), settled_should_stop(decay[:70], 0.05)
    (False, True)
    """
    if len(values) < min_evaluations:
        return False
    return settled_statistic(values, fraction).settled(tolerance, z, min_drop_snr)


class SettledCriterion:
    """Streaming ``auto`` rule (``preset="auto"``): stop once the loss has settled relative to its own drop.

    The recent part is the last ``fraction`` of the evaluations so far, so the rule has no window in
    steps: it stretches with a slow run and shrinks with a fast one. It stops when a line fitted to the
    recent part falls across it by less than ``tolerance`` of the loss's total drop (first value minus
    the line's end), with ``z`` standard errors of the fitted drop to spare (a wiggle that hides the
    slope does not stop it), once the loss has fallen by more than ``min_drop_snr`` residual SDs (a
    trace that never fell does not stop) and at least ``min_evaluations`` values exist.
    Exact running sums make each update O(1) (memory O(n)).

    Example:
        >>> rule = SettledCriterion(tolerance=0.05, min_evaluations=10)
        >>> stops = [rule.update(math.exp(-t / 10)) for t in range(100)]
        >>> rule.stop_step, rule.reason.split(":")[0]
        (60, 'settled')
    """

    def __init__(self, tolerance: float = AUTO_TOLERANCE, fraction: float = 0.5, min_evaluations: int = 20,
                 z: float = 2.0, min_drop_snr: float = 5.0, nonfinite: NonFinitePolicy = "stop") -> None:
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
        _check_nonfinite_policy(nonfinite)
        self.tolerance, self.fraction, self.min_evaluations = float(tolerance), float(fraction), int(min_evaluations)
        self.z, self.min_drop_snr, self.nonfinite = float(z), float(min_drop_snr), nonfinite
        self.threshold = self.tolerance  # what reports compare the statistic with
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
        """The rule's statistic, recent drop / total drop (shown where DVAR shows its normalized variance)."""
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
            return _on_nonfinite_loss(self, value)
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
    """The stop step (optimizer steps) of the ``auto`` rule evaluating every ``eval_every`` steps, replayed
    on an every-step trace (``trace[i]``: the loss after step ``i + 1``); None if it never fires."""
    return _replay_stop_step(SettledCriterion(**settings), trace, eval_every)


class SettlingTimeCriterion:
    """A window from the loss's own settling time: stop once the run is ``multiple`` times as long as its
    smoothed loss took to cover ``level`` of its drop so far.

    At evaluation n the smoothed loss S (mean of the last ``smooth`` evaluations) has fallen D = S[0] - min S;
    T is the first evaluation whose S is at or below S[0] - level * D (counted at its smoothing window's end).
    While the loss keeps falling T keeps up with n (a straight fall has T ~ level * n, and ``multiple * level
    > 1`` never stops it); once the loss settles T stays put and n grows past ``multiple * T``. On
    exp(-t / tau), T tends to tau * ln(1 / (1 - level)), so the stop is a fixed multiple of tau. D must
    exceed ``min_drop_snr`` times the evaluation noise (the SD of successive differences over sqrt 2), so
    that a dip of noise early in a slow fall is not taken for its drop. D only grows, so T only moves
    forward: O(1) amortised per evaluation (memory O(n), for T's search).

    Example:
        >>> rule = SettlingTimeCriterion(multiple=2.0, level=0.8, min_evaluations=10)
        >>> stops = [rule.update(math.exp(-t / 10)) for t in range(100)]
        >>> rule.stop_step, rule.reason.split(":")[0]
        (40, 'settled')
    """

    def __init__(self, multiple: float = 2.0, level: float = 0.8, smooth: int = 5, min_evaluations: int = 20,
                 min_drop_snr: float = 5.0, nonfinite: NonFinitePolicy = "stop") -> None:
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
        _check_nonfinite_policy(nonfinite)
        self.multiple, self.level = float(multiple), float(level)
        self.smooth, self.min_evaluations, self.nonfinite = int(smooth), int(min_evaluations), nonfinite
        self.min_drop_snr = float(min_drop_snr)
        self.threshold = self.multiple  # what reports compare the statistic with
        self._values: List[float] = []
        self._sum_sq_diff = 0.0
        self._smoothed: List[float] = []
        self._lowest, self._crossing = math.inf, 0
        self.stopped, self.stop_step, self.reason = False, None, None
        self.last_value = math.nan

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
    def normalized_variance(self) -> float:
        """The rule's statistic, evaluations so far / T (it stops at ``multiple``)."""
        t = self.settling_evaluations
        return self.num_values / t if t else math.nan

    @property
    def noise(self) -> float:
        """The evaluation noise: RMS of successive differences / sqrt(2) (0 before two values)."""
        n = self.num_values
        return math.sqrt(self._sum_sq_diff / (2 * (n - 1))) if n > 1 else 0.0

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

    def update(self, value: float) -> bool:
        """Feed one value; True on the value at which the rule fires and on every value after."""
        value = float(value)
        self.last_value = value
        if not math.isfinite(value):
            return _on_nonfinite_loss(self, value)
        self._add(value)
        n, t = self.num_values, self.settling_evaluations
        if (not self.stopped and t is not None and n >= self.min_evaluations and n >= self.multiple * t
                and self._smoothed[0] - self._lowest > self.min_drop_snr * self.noise):
            self.stopped, self.stop_step = True, n
            drop = self._smoothed[0] - self._lowest
            self.reason = (f"settled: the smoothed loss covered {self.level:.0%} of its drop {drop:.3g} by evaluation "
                           f"{t}, and {n} evaluations are {self.multiple:g}x that")
        return self.stopped

    def state_dict(self) -> Dict[str, Any]:
        """The values seen and the outcome; the smoothed curve and T are rebuilt on load, bit for bit."""
        return {
            "rule": "settling_time", "multiple": self.multiple, "level": self.level, "smooth": self.smooth,
            "min_evaluations": self.min_evaluations, "min_drop_snr": self.min_drop_snr,
            "values": list(self._values), "stopped": self.stopped,
            "stop_step": self.stop_step, "reason": self.reason, "last_value": self.last_value,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        settings = ("multiple", "level", "smooth", "min_evaluations", "min_drop_snr")
        if state.get("rule") != "settling_time" or any(state[key] != getattr(self, key) for key in settings):
            raise ValueError("Checkpoint was written with other settling-time settings (or another rule); resume with "
                             "the same early-stopping settings.")
        self._values, self._smoothed, self._lowest, self._crossing, self._sum_sq_diff = [], [], math.inf, 0, 0.0
        for x in state["values"]:
            self._add(x)
        self.stopped, self.stop_step, self.reason = state["stopped"], state["stop_step"], state["reason"]
        self.last_value = state["last_value"]

    def __repr__(self) -> str:
        return (f"SettlingTimeCriterion(multiple={self.multiple}, level={self.level}, num_values={self.num_values}, "
                f"stopped={self.stopped})")


def settling_stop_step(trace: Sequence[float], eval_every: int, **settings: Any) -> Optional[int]:
    """The stop step (optimizer steps) of :class:`SettlingTimeCriterion` evaluating every ``eval_every`` steps,
    replayed on an every-step trace (``trace[i]``: the loss after step ``i + 1``); None if it never fires."""
    return _replay_stop_step(SettlingTimeCriterion(**settings), trace, eval_every)


class PatienceCriterion:
    """The paper's CLIP-s baseline rule on a score where higher is better.

    Stops when the score has not improved on its best by more than ``eps`` for
    ``patience`` consecutive checks (TI / Custom Diffusion: eps 0.02, patience 6;
    DreamBooth-LoRA: eps 0.04, patience 3).

    Example:
        >>> rule = PatienceCriterion(eps=0.02, patience=2)
        >>> [rule.update(s) for s in [0.50, 0.60, 0.61, 0.605]]
        [False, False, False, True]
    """

    def __init__(self, eps: float, patience: int, nonfinite: NonFinitePolicy = "stop") -> None:
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0 (got {eps!r}).")
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1 (got {patience!r}).")
        _check_nonfinite_policy(nonfinite)
        self.eps = float(eps)
        self.patience = int(patience)
        self.nonfinite = nonfinite
        self.best: float = -math.inf
        self.best_step: Optional[int] = None
        self.checks_without_improvement = 0
        self.num_values = 0
        self.stopped = False
        self.stop_step: Optional[int] = None
        self.reason: Optional[str] = None

    def update(self, value: float) -> bool:
        value = float(value)
        if not math.isfinite(value):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"Got a non-finite score ({value}) after {self.num_values} values.")
            if self.nonfinite == "stop" and not self.stopped:
                self.stopped, self.stop_step = True, self.num_values + 1
                self.reason = f"non-finite: score became {value} after {self.num_values} values"
            return self.stopped
        self.num_values += 1
        if value > self.best + self.eps or self.best_step is None:
            self.best, self.best_step, self.checks_without_improvement = value, self.num_values, 0
        else:  # as in Lightning, small gains do not move the reference point
            self.checks_without_improvement += 1
        if not self.stopped and self.checks_without_improvement >= self.patience:
            self.stopped, self.stop_step = True, self.num_values
            self.reason = (
                f"no improvement above {self.eps:g} for {self.patience} checks "
                f"(best {self.best:.4g} at check {self.best_step})"
            )
        return self.stopped

    @property
    def normalized_variance(self) -> float:
        return math.nan

    def state_dict(self) -> Dict[str, Any]:
        keys = ("eps", "patience", "best", "best_step", "checks_without_improvement", "num_values", "stopped", "stop_step", "reason")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if (state["eps"], state["patience"]) != (self.eps, self.patience):
            raise ValueError("Checkpoint was written with other eps/patience settings; resume with the same settings.")
        for key, value in state.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"PatienceCriterion(eps={self.eps}, patience={self.patience}, num_values={self.num_values}, stopped={self.stopped})"

"""The DVAR rule (Voronov et al. 2023): stop once ``var(last N) / var(all) < threshold``.

:func:`normalized_variance` and :func:`dvar_should_stop` are the decision on a whole trace, for tests
and notebooks; :class:`DVARCriterion` is the streaming rule used during training: O(1) work per
value (amortised), exact to numerical precision, and checkpointable.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, Optional, Sequence

import numpy as np

from .base import NonFinitePolicy, StopKind, StopRule, stop_kind_of_reason


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
    """Look a preset up by name, with an error that lists the valid ones.

    >>> resolve_preset("custom-diffusion")
    DVARPreset(window=180, threshold=0.15, source='Voronov et al. 2023, Custom Diffusion')
    """
    key = name.replace("-", "_").lower()
    if key not in PRESETS:
        raise ValueError(f"Unknown DVAR preset {name!r}; choose one of {sorted(PRESETS)} or 'auto'.")
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
    rule = DVARCriterion(window, threshold)
    for value in values:
        if rule.update(value):
            return rule.stop_step
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


class DVARCriterion(StopRule):
    """Streaming DVAR rule: stop once ``var(last window) / var(all) < threshold``.

    Args:
        window: number of most recent values in the numerator variance (``N``); >= 2.
        threshold: the ratio below which the loss counts as a plateau (``alpha``); > 0.
        nonfinite: what a NaN/inf value does: ``"stop"`` (default, kind ``non_finite``),
            ``"skip"`` (ignore the value) or ``"raise"`` (``FloatingPointError``).

    Example:
        >>> rule = DVARCriterion(window=3, threshold=0.1)
        >>> [rule.update(v) for v in [5.0, 4.0, 3.0, 3.1, 3.0]]
        [False, False, False, False, True]
        >>> rule.stop_step, rule.stop_kind.value, rule.reason
        (5, 'plateau', 'plateau: var(last 3) / var(all 5) = 0.003598 < 0.1')
    """

    name = "dvar"
    version = 1
    fires_with = StopKind.PLATEAU
    stops_when = "below"

    def __init__(self, window: int, threshold: float, nonfinite: NonFinitePolicy = "stop") -> None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
            raise ValueError(f"DVAR window must be an integer >= 2 (got {window!r}); the paper uses 180-440.")
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"DVAR threshold must be a finite number > 0 (got {threshold!r}); the paper uses 0.15-0.4.")
        super().__init__(threshold, nonfinite)
        self.window = int(window)
        self._shift: Optional[float] = None
        self._all = _RunningMoments()
        self._recent = _RunningMoments()
        self._window_values: Deque[float] = deque(maxlen=self.window)
        self._slides_since_exact = 0
        self._statistic = math.nan

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "DVARCriterion":
        """``DVARCriterion.from_preset("textual_inversion")`` -> window 310, threshold 0.15."""
        preset = resolve_preset(name)
        return cls(preset.window, preset.threshold, **kwargs)

    @property
    def num_values(self) -> int:
        return self._all.count

    @property
    def statistic(self) -> float:
        """The normalized variance ``var(last window) / var(all)`` (nan before ``window`` values)."""
        return self._statistic

    @property
    def statistic_name(self) -> str:
        return f"var(last {self.window}) / var(all)"

    def settings(self) -> Dict[str, Any]:
        return {"window": self.window, "threshold": self.threshold}

    def _observe(self, value: float) -> Optional[str]:
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
            return None
        total = self._all.variance
        self._statistic = 0.0 if total == 0.0 else self._recent.variance / total
        if self._statistic < self.threshold:
            return (f"plateau: var(last {self.window}) / var(all {self.num_values}) = "
                    f"{self._statistic:.4g} < {self.threshold:g}")
        return None

    def _state(self) -> Dict[str, Any]:
        return {
            "shift": self._shift,
            "all": [self._all.count, self._all.mean, self._all.m2],
            "recent": [self._recent.count, self._recent.mean, self._recent.m2],
            "window_values": list(self._window_values),
            "slides_since_exact": self._slides_since_exact,
            "statistic": self._statistic,
        }

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._shift = state["shift"]
        self._all = _RunningMoments(*state["all"])
        self._recent = _RunningMoments(*state["recent"])
        self._window_values = deque(state["window_values"], maxlen=self.window)
        self._slides_since_exact = state["slides_since_exact"]
        self._statistic = state["statistic"]

    def _upgrade(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """dvar 0.1 wrote the DVAR rule's state flat, without a rule tag or version."""
        if "rule" in state or "window_values" not in state:
            return state
        outcome = {"stop_step": state["stop_step"], "stop_kind": None, "reason": state["reason"],
                   "last_value": state["last_value"]}
        kind = stop_kind_of_reason(state["reason"])
        outcome["stop_kind"] = None if kind is None else kind.value
        inner = {key: state[key] for key in ("shift", "all", "recent", "window_values", "slides_since_exact")}
        inner["statistic"] = state["normalized_variance"]
        return {"rule": self.name, "version": 0, "settings": {"window": state["window"], "threshold": state["threshold"]},
                "state": {**inner, "outcome": outcome}}

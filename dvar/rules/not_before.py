"""A floor under any rule: its stop, but never before a given evaluation."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .base import StopKind, StopRule


class NotBefore(StopRule):
    """``rule``'s stop, held until at least ``min_evaluations`` values: a rule that fires earlier keeps the run
    going to that evaluation and then stops, with its own reason. A non-finite value stops at once, floor or not
    (a diverged run must not train on).

    A rule that tracks the run's own time scale can fire very early on a run that drops fast and then keeps
    learning slowly; the floor (a share of the step budget, :attr:`dvar.DVARConfig.min_steps`) bounds that loss
    and costs nothing on runs that stop later.

    Example:
        >>> from dvar.rules import SettlingTimeCriterion
        >>> import math
        >>> rule = NotBefore(SettlingTimeCriterion(multiple=2.0, level=0.8, min_evaluations=10), 60, "step 60")
        >>> stops = [rule.update(math.exp(-t / 10)) for t in range(100)]
        >>> rule.stop_step, rule.inner.stop_step
        (60, 40)
        >>> rule.reason.endswith("(fired at evaluation 40, held until step 60)")
        True
    """

    name = "not_before"
    version = 1

    def __init__(self, rule: StopRule, min_evaluations: int, label: Optional[str] = None) -> None:
        if isinstance(min_evaluations, bool) or not isinstance(min_evaluations, int) or min_evaluations < 0:
            raise ValueError(f"NotBefore needs min_evaluations as an integer >= 0 (got {min_evaluations!r}).")
        super().__init__(rule.threshold, rule.nonfinite)
        rule.nonfinite = "skip"  # non-finite values are this wrapper's to handle (the base class stops on them)
        self.inner, self.min_evaluations = rule, min_evaluations
        self.label = label or f"evaluation {min_evaluations}"
        self.fires_with: StopKind = rule.fires_with  # type: ignore[misc]  # the inner rule's kind, per instance
        self.stops_when = rule.stops_when  # type: ignore[misc]
        self.multi_signal, self.num_signals = rule.multi_signal, rule.num_signals

    @property
    def num_values(self) -> int:
        return self.inner.num_values

    @property
    def statistic(self) -> float:
        return self.inner.statistic

    @property
    def waiting_for(self) -> Optional[str]:
        return self.inner.waiting_for

    @property
    def statistic_name(self) -> str:  # type: ignore[override]
        return self.inner.statistic_name

    def settings(self) -> Dict[str, Any]:
        return {"not_before": self.min_evaluations, "rule": self.inner.name, **self.inner.settings()}

    def _observe(self, value: Any) -> Optional[str]:
        self.inner.update(value)
        if not self.inner.stopped or self.num_values < self.min_evaluations:
            return None
        if self.inner.stop_step == self.num_values:
            return self.inner.reason
        return f"{self.inner.reason} (fired at evaluation {self.inner.stop_step}, held until {self.label})"

    def _state(self) -> Dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])

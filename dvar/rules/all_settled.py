"""Several signals, one rule each: stop once every one has fired (``DVARConfig(signal="bands")``)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from .base import StopRule


def timestep_bands(timesteps: Sequence[float], bands: int) -> List[List[int]]:
    """The positions of the examples sorted by timestep (stably) and split into ``bands`` groups, lowest first;
    sizes differ by at most one, the larger first, as ``numpy.array_split`` (``DVARConfig(signal="bands")``).

    >>> timestep_bands([674.0, 474.0, 810.0, 289.0], 3)
    [[3, 1], [0], [2]]
    """
    order = sorted(range(len(timesteps)), key=lambda i: timesteps[i])
    size, extra = divmod(len(order), bands)
    starts = [b * size + min(b, extra) for b in range(bands + 1)]
    return [order[starts[b]:starts[b + 1]] for b in range(bands)]


class AllSettled(StopRule):
    """One rule per signal (the frozen examples' timestep bands): each takes its own value at every evaluation,
    and the run stops once every one has fired (a rule that fired stays fired). ``update(values)`` feeds
    ``values[i]`` to rule ``i``; a non-finite value in any of them is handled as one (default: stop as
    diverged).

    The statistic is the least advanced band's: its rule's statistic, the one furthest from the threshold
    among the rules that have not fired.

    Example:
        >>> from dvar.rules import SettlingTimeCriterion
        >>> import math
        >>> rule = AllSettled([SettlingTimeCriterion(min_evaluations=10) for _ in range(2)], ["fast", "slow"])
        >>> stops = [rule.update([math.exp(-t / 10), math.exp(-t / 20)]) for t in range(200)]
        >>> rule.fired, rule.stop_step
        ([40, 70], 70)
        >>> rule.reason.split(";")[0]
        'settled: every signal has settled (fast at evaluation 40, slow at evaluation 70)'
    """

    name = "all_settled"
    version = 1

    def __init__(self, rules: Sequence[StopRule], labels: Optional[Sequence[str]] = None, noun: str = "signal") -> None:
        rules = list(rules)
        if not rules:
            raise ValueError("AllSettled needs at least one rule.")
        kinds = {(type(rule), rule.fires_with, rule.stops_when, rule.threshold) for rule in rules}
        if len(kinds) > 1:
            raise ValueError("AllSettled's rules must be of one kind with one threshold (one rule per signal).")
        labels = list(labels) if labels is not None else [f"{noun} {i + 1}" for i in range(len(rules))]
        if len(labels) != len(rules):
            raise ValueError(f"AllSettled got {len(rules)} rules but {len(labels)} labels.")
        super().__init__(rules[0].threshold, rules[0].nonfinite)
        for rule in rules:
            rule.nonfinite = "skip"  # non-finite values are this rule's to handle, for all signals at once
        self.rules, self.labels, self.noun = rules, labels, noun
        self.multi_signal, self.num_signals = True, len(rules)
        self.fires_with = rules[0].fires_with  # type: ignore[misc]  # the inner rules' kind, per instance
        self.stops_when = rules[0].stops_when  # type: ignore[misc]
        self.fired: List[Optional[int]] = [None] * len(rules)
        self._count = 0

    @property
    def num_values(self) -> int:
        return self._count

    @property
    def statistic(self) -> float:
        waiting = [rule.statistic for rule, fired in zip(self.rules, self.fired) if fired is None]
        if not waiting:
            return self.rules[-1].statistic
        if any(math.isnan(value) for value in waiting):
            return math.nan
        return min(waiting) if self.stops_when == "above" else max(waiting)

    @property
    def waiting_for(self) -> Optional[str]:
        """Each unsettled signal that its own rule holds back (:attr:`StopRule.waiting_for`), named; None if none."""
        held = [f"{label}: {rule.waiting_for}" for rule, label, fired in zip(self.rules, self.labels, self.fired)
                if fired is None and rule.waiting_for]
        return "; ".join(held) or None

    @property
    def statistic_name(self) -> str:  # type: ignore[override]
        return f"{self.rules[0].statistic_name} (the least settled of {self.num_signals} {self.noun}s)"

    def settings(self) -> Dict[str, Any]:
        return {"signals": self.num_signals, "rule": self.rules[0].name, **self.rules[0].settings()}

    def _observe(self, values: Sequence[float]) -> Optional[str]:
        self._count += 1
        for i, (rule, value) in enumerate(zip(self.rules, values)):
            if rule.update(value) and self.fired[i] is None:
                self.fired[i] = self._count
        if any(step is None for step in self.fired):
            return None
        last = max(range(self.num_signals), key=lambda i: (self.fired[i], i))
        if self.num_signals == 1:  # (a default rule on one or two photos, or kohya's one frozen batch)
            return f"{self.rules[0].reason} ({self.noun}: {self.labels[0]})"
        where = ", ".join(f"{label} at evaluation {step}" for label, step in zip(self.labels, self.fired))
        return (f"{self.rules[last].fires_with.value}: every {self.noun} has settled ({where}); last, the "
                f"{self.labels[last]}: {self.rules[last].reason.split(': ', 1)[-1]}")

    def _state(self) -> Dict[str, Any]:
        return {"rules": [rule.state_dict() for rule in self.rules], "fired": list(self.fired), "count": self._count}

    def _load_state(self, state: Dict[str, Any]) -> None:
        if len(state["rules"]) != self.num_signals:
            raise ValueError(f"The checkpoint watched {len(state['rules'])} signals, this run {self.num_signals}; "
                             "resume with the same early-stopping settings.")
        for rule, saved in zip(self.rules, state["rules"]):
            rule.load_state_dict(saved)
        self.fired, self._count = list(state["fired"]), state["count"]

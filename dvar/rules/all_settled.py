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

    With ``flat_holds=False`` (``DVARConfig(flat_bands="skip")``) a signal that has not fallen does not hold the
    stop: once another signal's rule has fired, a signal whose own rule is held back only for lack of a drop
    (:attr:`StopRule.waiting_for`: its time has come, but its drop is within its noise) counts as settled for as
    long as that lasts. A band with nothing to learn (one frozen example at a high timestep, say) cannot say when
    learning is done.

    Example:
        >>> from dvar.rules import SettlingTimeCriterion
        >>> import math
        >>> rule = AllSettled([SettlingTimeCriterion(min_evaluations=10) for _ in range(2)], ["fast", "slow"])
        >>> stops = [rule.update([math.exp(-t / 10), math.exp(-t / 20)]) for t in range(200)]
        >>> rule.fired, rule.stop_step
        ([40, 70], 70)
        >>> rule.reason.split(";")[0]
        'settled: every signal has settled (fast at evaluation 40, slow at evaluation 70)'

        A flat signal holds the stop unless ``flat_holds=False``:

        >>> flat = [1.0 + 0.01 * math.sin(2.1 * t) for t in range(200)]
        >>> hold = AllSettled([SettlingTimeCriterion(min_evaluations=10) for _ in range(2)], ["falls", "flat"])
        >>> skip = AllSettled([SettlingTimeCriterion(min_evaluations=10) for _ in range(2)], ["falls", "flat"],
        ...                   flat_holds=False)
        >>> for t, f in enumerate(flat):
        ...     _ = hold.update([math.exp(-t / 10), f]), skip.update([math.exp(-t / 10), f])
        >>> hold.stopped, skip.stop_step
        (False, 40)
        >>> skip.reason.split("; ")[-1]
        'the flat (not fallen beyond its noise) did not hold the stop'
    """

    name = "all_settled"
    version = 1

    def __init__(self, rules: Sequence[StopRule], labels: Optional[Sequence[str]] = None, noun: str = "signal",
                 flat_holds: bool = True) -> None:
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
        self.rules, self.labels, self.noun, self.flat_holds = rules, labels, noun, bool(flat_holds)
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
        return {"signals": self.num_signals, "rule": self.rules[0].name, **self.rules[0].settings(),
                "flat_holds": self.flat_holds}

    def _upgrade(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """A state saved before ``flat_holds`` existed was written by a rule in which every signal held the stop."""
        settings = state.get("settings")
        if settings is None or "flat_holds" in settings:
            return state
        return {**state, "settings": {**settings, "flat_holds": True}}

    def _flat(self) -> List[int]:
        """The signals that have not fired and are held back only for lack of a drop, when they do not hold the
        stop (``flat_holds=False``) and another signal has fired; else none."""
        if self.flat_holds or all(step is None for step in self.fired):
            return []
        return [i for i, (rule, step) in enumerate(zip(self.rules, self.fired)) if step is None and rule.waiting_for]

    def _observe(self, values: Sequence[float]) -> Optional[str]:
        self._count += 1
        for i, (rule, value) in enumerate(zip(self.rules, values)):
            if rule.update(value) and self.fired[i] is None:
                self.fired[i] = self._count
        flat = self._flat()
        if any(step is None for i, step in enumerate(self.fired) if i not in flat):
            return None
        settled = [i for i in range(self.num_signals) if i not in flat]
        last = max(settled, key=lambda i: (self.fired[i], i))
        if self.num_signals == 1:  # (a default rule on one or two photos, or kohya's one frozen batch)
            return f"{self.rules[0].reason} ({self.noun}: {self.labels[0]})"
        where = ", ".join(f"{self.labels[i]} at evaluation {self.fired[i]}" for i in settled)
        every = f"every {self.noun} that fell has settled" if flat else f"every {self.noun} has settled"
        skipped = "".join(f"; the {self.labels[i]} (not fallen beyond its noise) did not hold the stop" for i in flat)
        return (f"{self.rules[last].fires_with.value}: {every} ({where}); last, the "
                f"{self.labels[last]}: {self.rules[last].reason.split(': ', 1)[-1]}{skipped}")

    def _state(self) -> Dict[str, Any]:
        return {"rules": [rule.state_dict() for rule in self.rules], "fired": list(self.fired), "count": self._count}

    def _load_state(self, state: Dict[str, Any]) -> None:
        if len(state["rules"]) != self.num_signals:
            raise ValueError(f"The checkpoint watched {len(state['rules'])} signals, this run {self.num_signals}; "
                             "resume with the same early-stopping settings.")
        for rule, saved in zip(self.rules, state["rules"]):
            rule.load_state_dict(saved)
        self.fired, self._count = list(state["fired"]), state["count"]

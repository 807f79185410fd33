"""What every stopping rule is: :class:`StopRule`, fed one loss value at a time.

A rule reads one statistic off the values it has seen and fires once that statistic crosses its
threshold (below it for DVAR's normalized variance, above it for the settling-time ratio). The
base class owns what all rules share: the non-finite policy, the outcome (step, reason and its
kind) and a versioned ``state_dict()`` of ``{rule, version, settings, state}``.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Dict, Literal, Optional, Sequence, Tuple, Union

NonFinitePolicy = Literal["stop", "skip", "raise"]
#: What a rule takes per evaluation: one loss value, or one per signal for a rule that watches several
#: (:class:`~dvar.rules.AllSettled`, ``DVARConfig(signal="bands")``).
Value = Union[float, Sequence[float]]


class StopKind(str, enum.Enum):
    """Why a rule stopped: the loss plateaued or settled (success), or it stopped being finite (failure)."""

    PLATEAU = "plateau"
    SETTLED = "settled"
    NON_FINITE = "non_finite"

    def __str__(self) -> str:
        return self.value


class StopRule(ABC):
    """A stopping rule: ``update(value) -> bool`` once per evaluation, True from the value at which it fires.

    Subclasses set the class attributes, implement :meth:`_observe` (take one finite value, return a
    message when the rule's condition holds now), :attr:`statistic`, :meth:`settings` and the state pair
    :meth:`_state` / :meth:`_load_state`. A non-finite value is handled here, the same way for every rule:
    ``nonfinite="stop"`` (default) stops with kind :attr:`StopKind.NON_FINITE`, ``"skip"`` ignores the
    value, ``"raise"`` raises ``FloatingPointError``.

    Example:
        >>> from dvar.rules import DVARCriterion
        >>> rule = DVARCriterion(window=3, threshold=0.1)
        >>> [rule.update(v) for v in [5.0, float("nan"), 3.0]]
        [False, True, True]
        >>> rule.stop_kind, rule.stop_step, rule.diverged
        (<StopKind.NON_FINITE: 'non_finite'>, 2, True)
    """

    #: the rule's tag in checkpoints and summaries
    name: ClassVar[str]
    #: bumped when the layout of :meth:`_state` changes
    version: ClassVar[int] = 1
    #: the kind of a normal stop
    fires_with: ClassVar[StopKind]
    #: "below": it stops once the statistic falls below the threshold; "above": once it rises to it
    stops_when: ClassVar[Literal["below", "above"]]
    #: whether the rule takes a sequence of values per evaluation, one per signal, and how many (set per instance)
    multi_signal: bool = False
    num_signals: int = 1

    def __init__(self, threshold: float, nonfinite: NonFinitePolicy = "stop") -> None:
        if nonfinite not in ("stop", "skip", "raise"):
            raise ValueError(f"nonfinite must be 'stop', 'skip' or 'raise' (got {nonfinite!r}).")
        self.threshold = float(threshold)
        self.nonfinite: NonFinitePolicy = nonfinite
        self.stop_step: Optional[int] = None
        self.stop_kind: Optional[StopKind] = None
        self.reason: Optional[str] = None
        self.last_value = math.nan

    # -- what a rule is --------------------------------------------------------------------

    @property
    @abstractmethod
    def num_values(self) -> int:
        """How many finite values the rule has taken."""

    @property
    @abstractmethod
    def statistic(self) -> float:
        """The statistic compared with :attr:`threshold` (nan while it is not defined yet)."""

    @property
    @abstractmethod
    def statistic_name(self) -> str:
        """What :attr:`statistic` is, for logs and plots, e.g. ``"var(last 31) / var(all)"``."""

    @abstractmethod
    def settings(self) -> Dict[str, Any]:
        """The constructor settings a checkpoint must agree on."""

    @abstractmethod
    def _observe(self, value: Any) -> Optional[str]:
        """Take one finite value (a tuple of them for a :attr:`multi_signal` rule); return the stop message if the
        rule's condition holds now."""

    @abstractmethod
    def _state(self) -> Dict[str, Any]:
        """What :meth:`_load_state` needs to continue bit for bit (plain Python types)."""

    @abstractmethod
    def _load_state(self, state: Dict[str, Any]) -> None:
        """Inverse of :meth:`_state`."""

    # -- shared behaviour ------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self.stop_step is not None

    @property
    def diverged(self) -> bool:
        """True when the rule stopped because the loss stopped being finite."""
        return self.stop_kind is StopKind.NON_FINITE

    @property
    def waiting_for(self) -> Optional[str]:
        """Why the rule has not fired though its statistic says it could, for the "did not stop" line; None when the
        statistic tells the whole story."""
        return None

    @property
    def threshold_text(self) -> str:
        """``"stops below 0.15"`` / ``"stops at 2"``."""
        return f"stops {'below' if self.stops_when == 'below' else 'at'} {self.threshold:g}"

    def update(self, value: Value) -> bool:
        """Feed one value (a sequence, one per signal, for a :attr:`multi_signal` rule); True on the value at
        which the rule fires and on every value after. Any non-finite value among them is handled as one."""
        observed, value = self._checked(value)
        self.last_value = value
        if not math.isfinite(value):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"DVAR got a non-finite loss ({value}) after {self.num_values} values.")
            if self.nonfinite == "stop" and not self.stopped:
                self._fire(StopKind.NON_FINITE, f"non-finite: loss became {value} at value {self.num_values + 1}",
                           self.num_values + 1)
            return self.stopped
        message = self._observe(observed)
        if message is not None and not self.stopped:
            self._fire(self.fires_with, message, self.num_values)
        return self.stopped

    def _checked(self, value: Value) -> Tuple[Any, float]:
        """(what :meth:`_observe` takes, the one number logged as :attr:`last_value`: the value, or the mean of
        several, non-finite if any is)."""
        if not self.multi_signal:
            if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0:
                raise TypeError(f"The {self.name} rule watches one value per evaluation (got {value!r}).")
            return float(value), float(value)
        if isinstance(value, (int, float)) or getattr(value, "ndim", 1) == 0:
            raise TypeError(f"The {self.name} rule watches {self.num_signals} values per evaluation (got one: {value!r}).")
        values = tuple(float(v) for v in value)  # type: ignore[union-attr]
        if len(values) != self.num_signals:
            raise ValueError(f"The {self.name} rule watches {self.num_signals} values per evaluation (got "
                             f"{len(values)}).")
        return values, sum(values) / len(values)

    def _fire(self, kind: StopKind, reason: str, step: int) -> None:
        self.stop_kind, self.reason, self.stop_step = kind, reason, step

    def state_dict(self) -> Dict[str, Any]:
        """``{"rule", "version", "settings", "state"}``: plain Python types, safe to ``torch.save``."""
        outcome = {"stop_step": self.stop_step, "stop_kind": None if self.stop_kind is None else self.stop_kind.value,
                   "reason": self.reason, "last_value": self.last_value}
        return {"rule": self.name, "version": self.version, "settings": self.settings(),
                "state": {**self._state(), "outcome": outcome}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` written with the same rule and settings (else a ``ValueError`` that
        names the difference and the fix)."""
        state = self._upgrade(state)
        if state.get("rule") != self.name:
            raise ValueError(f"The checkpoint holds the {state.get('rule')!r} rule's state, but this run uses "
                             f"{self.name!r}; resume with the same early-stopping preset.")
        if state.get("version", 0) > self.version:
            raise ValueError(f"The checkpoint's {self.name!r} rule state has version {state['version']}, newer than "
                             f"this dvar's ({self.version}); upgrade dvar to resume it.")
        differences = {key: (value, state["settings"].get(key)) for key, value in self.settings().items()
                       if state["settings"].get(key) != value}
        if differences:
            listed = ", ".join(f"{key}={saved!r} (this run: {now!r})" for key, (now, saved) in differences.items())
            raise ValueError(f"The checkpoint was written with other {self.name} settings: {listed}; resume with the "
                             "same early-stopping settings.")
        self._load_state(state["state"])
        outcome = state["state"]["outcome"]
        self.stop_step, self.reason, self.last_value = outcome["stop_step"], outcome["reason"], outcome["last_value"]
        self.stop_kind = None if outcome["stop_kind"] is None else StopKind(outcome["stop_kind"])

    def _upgrade(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """Turn an older checkpoint layout into the current one (subclasses that had one override this)."""
        return state

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.settings().items())
        return f"{type(self).__name__}({settings}, num_values={self.num_values}, stopped={self.stopped})"


def stop_kind_of_reason(reason: Optional[str]) -> Optional[StopKind]:
    """The kind a pre-0.2 checkpoint's reason text stands for (its prefix before the colon).

    >>> stop_kind_of_reason("plateau: var(last 3) / var(all 5) = 0.0036 < 0.1")
    <StopKind.PLATEAU: 'plateau'>
    """
    if reason is None:
        return None
    prefix = reason.split(":", 1)[0].strip().replace("-", "_")
    return StopKind(prefix) if prefix in StopKind._value2member_map_ else None

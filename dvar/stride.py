"""How often the frozen batch is evaluated: the stride k in optimizer steps.

``eval_every="auto"`` derives k from the window (``max(1, window // 30)``) or, for the window-free
``preset="auto"``, from the budget (``max(1, budget // 100)``): the same settings give the same stop
on every machine. ``eval_every="5%"`` instead times the first steps (see the callback). A window
meant in optimizer steps is counted in evaluations (:func:`evaluations_in_window`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .rules import DVARCriterion, StopRule

EvalEvery = Union[int, str]

#: M, the evaluations per window that ``eval_every="auto"`` aims at: k = max(1, window // M).
#: Chosen from the stride study (``benchmarks/stride.py``, table in ``benchmarks/results/stride.md``).
AUTO_EVALS_PER_WINDOW = 30
#: ``preset="auto"``: the stride is ``max(1, max_train_steps // AUTO_EVALS_PER_BUDGET)`` (its window is not
#: known in advance, so the stride comes from the budget: about 100 evaluations over a full run).
AUTO_EVALS_PER_BUDGET = 100
#: eval_every="5%": training steps timed (after the first) before the stride is chosen
STRIDE_PROBE_STEPS = 10


def budget_stride(max_train_steps: int) -> int:
    """``preset="auto"``'s default stride: about ``AUTO_EVALS_PER_BUDGET`` evaluations over the budget.

    >>> budget_stride(1000), budget_stride(50)
    (10, 1)
    """
    return max(1, int(max_train_steps) // AUTO_EVALS_PER_BUDGET)


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
    return replay_stop_step(DVARCriterion(evaluations_in_window(window, eval_every), threshold), trace, eval_every)


def replay_stop_step(rule: StopRule, trace: Sequence[float], eval_every: int = 1) -> Optional[int]:
    """Feed ``rule`` the values of an every-step trace at steps k, 2k, ... (``trace[i]`` is the loss after
    step ``i + 1``); its stop in optimizer steps, or None. What the callback decides with that stride.

    >>> from dvar.rules import SettlingTimeCriterion
    >>> decay = [math.exp(-t / 40) for t in range(1, 1001)]
    >>> replay_stop_step(SettlingTimeCriterion(min_evaluations=10), decay, eval_every=4)
    160
    """
    for count, value in enumerate(list(trace)[eval_every - 1 :: eval_every], 1):
        if rule.update(value):
            return count * eval_every
    return None


class StrideProbe:
    """``eval_every="5%"``: the clock of the first training steps, then the stride for that target overhead.

    The caller ticks it with the clock once per optimizer step (after waiting for the device) until :attr:`ready`, then
    times an evaluation and calls :meth:`choose` (with timings averaged over ranks, so all choose alike).

    Example:
        >>> probe = StrideProbe(target=0.05, probe_steps=2)
        >>> probe.choose(eval_seconds=0.04, step_seconds=0.1)
        (8, {'target': 0.05, 'eval_seconds': 0.04, 'step_seconds': 0.1, 'probe_steps': 2})
    """

    def __init__(self, target: float, probe_steps: int = STRIDE_PROBE_STEPS) -> None:
        self.target, self.probe_steps = target, probe_steps
        self._clock: List[float] = []

    def tick(self, now: float) -> None:
        self._clock.append(now)

    @property
    def ready(self) -> bool:
        return len(self._clock) > self.probe_steps

    @property
    def step_seconds(self) -> float:
        """The median time between ticks."""
        return float(np.median(np.diff(self._clock)))

    def choose(self, eval_seconds: float, step_seconds: float) -> "tuple[int, Dict[str, float]]":
        """(stride, the timings it was chosen from, as the summary records them)."""
        timing = {"target": self.target, "eval_seconds": round(eval_seconds, 6),
                  "step_seconds": round(step_seconds, 6), "probe_steps": self.probe_steps}
        return stride_for_overhead(eval_seconds, step_seconds, self.target), timing

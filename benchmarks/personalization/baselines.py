"""The paper's baseline stopping rule, CLIP-s: patience on a score checked every few steps.

Example:
    >>> rule = PatienceCriterion(eps=0.02, patience=2)
    >>> [rule.update(s) for s in [0.50, 0.60, 0.61, 0.605]]
    [False, False, False, True]
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import numpy as np


class PatienceCriterion:
    """Stop when a score (higher is better) has not improved on its best by more than ``eps`` for ``patience``
    consecutive checks (the DVAR paper's CLIP-s: TI / Custom Diffusion eps 0.02, patience 6; DreamBooth-LoRA
    0.04 / 3). Same interface as the library's rules: ``update``, ``stopped``, ``stop_step`` (1-based count of
    values), ``reason``, ``state_dict``.

    Example:
        >>> rule = PatienceCriterion(eps=0.04, patience=3)
        >>> [rule.update(s) for s in [0.7, 0.6, 0.5, 0.4]][-1], rule.stop_step
        (True, 4)
    """

    def __init__(self, eps: float, patience: int, nonfinite: str = "stop") -> None:
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0 (got {eps!r}).")
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1 (got {patience!r}).")
        if nonfinite not in ("stop", "skip", "raise"):
            raise ValueError(f"nonfinite must be 'stop', 'skip' or 'raise' (got {nonfinite!r}).")
        self.eps, self.patience, self.nonfinite = float(eps), int(patience), nonfinite
        self.best: float = -math.inf
        self.best_step: Optional[int] = None
        self.checks_without_improvement = 0
        self.num_values = 0
        self.stopped = False
        self.stop_step: Optional[int] = None
        self.reason: Optional[str] = None

    def update(self, value: float) -> bool:
        """Feed one score; True on the check at which the rule fires and on every check after."""
        value = float(value)
        if not math.isfinite(value):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"Got a non-finite score ({value}) after {self.num_values} values.")
            if self.nonfinite == "stop" and not self.stopped:
                self.stopped, self.stop_step = True, self.num_values + 1
                self.reason = f"non-finite: score became {value} at value {self.num_values + 1}"
            return self.stopped
        self.num_values += 1
        if value > self.best + self.eps or self.best_step is None:
            self.best, self.best_step, self.checks_without_improvement = value, self.num_values, 0
        else:  # as in Lightning, small gains do not move the reference point
            self.checks_without_improvement += 1
        if not self.stopped and self.checks_without_improvement >= self.patience:
            self.stopped, self.stop_step = True, self.num_values
            self.reason = (f"no improvement above {self.eps:g} for {self.patience} checks "
                           f"(best {self.best:.4g} at check {self.best_step})")
        return self.stopped

    @property
    def normalized_variance(self) -> float:
        return math.nan

    def state_dict(self) -> Dict[str, Any]:
        keys = ("eps", "patience", "best", "best_step", "checks_without_improvement", "num_values", "stopped",
                "stop_step", "reason")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if (state["eps"], state["patience"]) != (self.eps, self.patience):
            raise ValueError("Checkpoint was written with other eps/patience settings; resume with the same settings.")
        for key, value in state.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (f"PatienceCriterion(eps={self.eps}, patience={self.patience}, num_values={self.num_values}, "
                f"stopped={self.stopped})")

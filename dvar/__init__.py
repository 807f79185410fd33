"""dvar: stop text-to-image personalization when it is done (DVAR, Voronov et al., NeurIPS 2023).

Example:
    >>> from dvar import DVARCriterion
    >>> rule = DVARCriterion(window=3, threshold=0.1)
    >>> [rule.update(v) for v in [5.0, 4.0, 3.0, 3.1, 3.0]]
    [False, False, False, False, True]
"""

from .batch import FixedEvalBatch
from .callback import DVAREarlyStopping
from .config import DVARConfig
from .objectives import LossConfig
from .rules import PRESETS, DVARCriterion, SettlingTimeCriterion, StopKind, StopRule, dvar_should_stop, normalized_variance

__version__ = "0.2.0"

__all__ = [
    "PRESETS",
    "DVARConfig",
    "DVARCriterion",
    "DVAREarlyStopping",
    "FixedEvalBatch",
    "LossConfig",
    "SettlingTimeCriterion",
    "StopKind",
    "StopRule",
    "dvar_should_stop",
    "normalized_variance",
]

"""Stopping rules. Each is a :class:`StopRule`: ``update(value) -> bool``, a statistic with a threshold,
a reason and its kind, and a versioned ``state_dict()``.

- :class:`DVARCriterion`: the paper's rule, ``var(last N) / var(all) < threshold`` (the presets);
- :class:`SettlingTimeCriterion`: ``preset="auto"``, a window from the loss's own settling time;
- :class:`NotBefore`: any rule's stop, held until a floor (``DVARConfig.min_steps``);
- :class:`AllSettled`: one rule per signal, stopping once all have fired (``DVARConfig(signal="bands")``);
- :func:`default_rule`: which of them dvar uses when none is named, per method.
"""

from .all_settled import AllSettled, timestep_bands
from .default import DEFAULT_PRESET, DEFAULT_RULES, SCALE_FREE_DEFAULT, DefaultRule, default_rule
from .base import NonFinitePolicy, StopKind, StopRule, Value
from .plateau import PRESETS, DVARCriterion, DVARPreset, dvar_should_stop, first_stop_step, normalized_variance, resolve_preset
from .not_before import NotBefore
from .settling_time import AUTO_LEVEL, AUTO_MULTIPLE, SettlingTimeCriterion

__all__ = [
    "AllSettled",
    "AUTO_LEVEL",
    "AUTO_MULTIPLE",
    "DEFAULT_PRESET",
    "DEFAULT_RULES",
    "DefaultRule",
    "SCALE_FREE_DEFAULT",
    "PRESETS",
    "DVARCriterion",
    "DVARPreset",
    "NonFinitePolicy",
    "NotBefore",
    "SettlingTimeCriterion",
    "StopKind",
    "StopRule",
    "Value",
    "default_rule",
    "dvar_should_stop",
    "first_stop_step",
    "normalized_variance",
    "resolve_preset",
    "timestep_bands",
]

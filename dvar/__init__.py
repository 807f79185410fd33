"""dvar: stop text-to-image personalization when it is done (DVAR, Voronov et al., NeurIPS 2023)."""

from .batch import PARTS, EvalBatch, FixedEvalBatch, isolated_global_rng
from .callback import DVARConfig, DVAREarlyStopping, stop_message
from .criterion import (
    PRESETS,
    DVARCriterion,
    DVARPreset,
    PatienceCriterion,
    SettledCriterion,
    SettlingTimeCriterion,
    dvar_should_stop,
    first_stop_step,
    normalized_variance,
    settled_should_stop,
)
from .objectives import (
    CLIPPromptEncoder,
    DiffusionObjective,
    FluxPromptEncoder,
    PromptEmbeddings,
    SDXLPromptEncoder,
    deterministic_loss,
)

__version__ = "0.1.0"

__all__ = [
    "PARTS",
    "PRESETS",
    "CLIPPromptEncoder",
    "DVARConfig",
    "DVARCriterion",
    "DVAREarlyStopping",
    "DVARPreset",
    "DiffusionObjective",
    "EvalBatch",
    "FixedEvalBatch",
    "FluxPromptEncoder",
    "PatienceCriterion",
    "PromptEmbeddings",
    "SDXLPromptEncoder",
    "SettledCriterion",
    "SettlingTimeCriterion",
    "deterministic_loss",
    "dvar_should_stop",
    "first_stop_step",
    "isolated_global_rng",
    "normalized_variance",
    "settled_should_stop",
    "stop_message",
]

"""DVAR early stopping for kohya-ss/sd-scripts (LoRA and other networks: SD 1.x/2.x, SDXL, SD3, Flux).

No fork of kohya: a mixin in front of its ``NetworkTrainer`` classes, and launchers that mirror
its scripts::

    cd sd-scripts
    python -m dvar.integrations.kohya train_network --early_stop [kohya's usual flags]

Importing this package does not import kohya; :func:`~.launch.main` does, from the checkout.
"""

from .frozen import KohyaFrozenBatch
from .launch import HOOK_CALLS, SCRIPTS, VERIFIED_COMMIT, add_early_stop_arguments, check_trainer, main
from .plugin import DVARTrainerMixin, KohyaPluginError, KohyaTrainingDiverged, make_trainer_class

__all__ = [
    "DVARTrainerMixin",
    "HOOK_CALLS",
    "KohyaFrozenBatch",
    "KohyaPluginError",
    "KohyaTrainingDiverged",
    "SCRIPTS",
    "VERIFIED_COMMIT",
    "add_early_stop_arguments",
    "check_trainer",
    "main",
    "make_trainer_class",
]

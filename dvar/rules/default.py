"""The rule dvar uses when none is named: per method, the one chosen on the benchmark (issue 23).

It is method-aware: for each method, the candidate that kept identity in every selection cell of that method (three
learning rates) and saved the most, among those that also stop the README's main job; the scale-free rule on the
timestep bands for any method the benchmark did not measure (and for the callback when it is not told the method).
``benchmarks/results/rules/`` holds the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

#: ``preset`` value that names this table explicitly (``None`` with no window or threshold means the same)
DEFAULT_PRESET = "default"


@dataclass(frozen=True)
class DefaultRule:
    """One method's default: a preset name (a paper preset or ``"auto"``), the signal it watches, and a floor.

    Example:
        >>> default_rule("custom_diffusion")
        DefaultRule(preset='auto', signal='loss', min_steps_share=0.0, multiple=3.0)
        >>> default_rule("textual_inversion").preset
        'textual_inversion'
    """

    preset: str
    signal: str = "loss"
    min_steps_share: float = 0.0  # never stop before this share of the step budget
    multiple: Optional[float] = None  # preset "auto": the multiple of the settling time (None: AUTO_MULTIPLE)

    def describe(self) -> str:
        """The rule in the benchmark's words.

        >>> default_rule().describe()
        'auto (settling time, level 0.8, x2) on signal bands'
        >>> DefaultRule("auto", "bands", min_steps_share=0.4, multiple=1.5).describe()
        'auto (settling time, level 0.8, x1.5) on signal bands, not before 40% of the budget'
        """
        from .settling_time import AUTO_LEVEL, AUTO_MULTIPLE

        multiple = AUTO_MULTIPLE if self.multiple is None else self.multiple
        rule = (f"auto (settling time, level {AUTO_LEVEL:g}, x{multiple:g})" if self.preset == "auto"
                else f"the {self.preset} preset")
        floor = f", not before {self.min_steps_share:.0%} of the budget" if self.min_steps_share else ""
        return f"{rule} on signal {self.signal}{floor}"


#: Scale-free: no window, so it follows the run's own time scale (learning rate, model, budget).
SCALE_FREE_DEFAULT = DefaultRule(preset="auto", signal="bands")

#: Chosen on the selection half of the mini-SD benchmark at 0.5x, 1x and 2x the learning rate
#: (benchmarks/results/rules/default-candidates.md, "M"): ``M textual_inversion: paper; dreambooth_lora: B level=0.8
#: x2; custom_diffusion: S level=0.8 x3``. For Textual Inversion, ``B x1.5 from 40%`` saved more on the benchmark
#: but did not stop the main job (``benchmarks/main_job_check.sh``), so the paper preset is next.
DEFAULT_RULES: Dict[str, DefaultRule] = {
    "textual_inversion": DefaultRule(preset="textual_inversion"),
    "dreambooth_lora": SCALE_FREE_DEFAULT,
    "custom_diffusion": DefaultRule(preset="auto", signal="loss", multiple=3.0),
}


def default_rule(method: Optional[str] = None) -> DefaultRule:
    """The default for ``method`` (``textual_inversion``, ``dreambooth_lora``, ``custom_diffusion``, ...);
    :data:`SCALE_FREE_DEFAULT` for any other method or ``None``.

    Example:
        >>> default_rule("dreambooth") == default_rule(None) == SCALE_FREE_DEFAULT
        True
    """
    return DEFAULT_RULES.get((method or "").lower(), SCALE_FREE_DEFAULT)

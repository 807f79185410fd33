"""The rule dvar uses when none is named: per method, the one chosen on the benchmark (issue 23).

It is method-aware: for each method, the candidate that kept identity in every cell of that method (three learning
rates) on the benchmark's 48 concepts and saved the most, among those that also stop the README's main job; the
scale-free rule on the timestep bands for any method the benchmark did not measure (and for the callback when it is not told the method).
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
        DefaultRule(preset='auto', signal='loss', min_steps_share=0.0, multiple=2.0, flat_bands='hold', level=0.9)
        >>> default_rule("textual_inversion").describe()
        'auto (settling time, level 0.8, x1.75) on signal bands, bands that did not fall skipped'
    """

    preset: str
    signal: str = "loss"
    min_steps_share: float = 0.0  # never stop before this share of the step budget
    multiple: Optional[float] = None  # preset "auto": the multiple of the settling time (None: AUTO_MULTIPLE)
    flat_bands: str = "hold"  # signal "bands": "skip" a band that has not fallen beyond its noise (AllSettled)
    level: Optional[float] = None  # preset "auto": the share of the drop that defines the settling time (None: AUTO_LEVEL)

    def describe(self) -> str:
        """The rule in the benchmark's words.

        >>> default_rule().describe()
        'auto (settling time, level 0.8, x2) on signal bands'
        >>> DefaultRule("auto", "bands", min_steps_share=0.4, multiple=1.5).describe()
        'auto (settling time, level 0.8, x1.5) on signal bands, not before 40% of the budget'
        """
        from .settling_time import AUTO_LEVEL, AUTO_MULTIPLE

        multiple = AUTO_MULTIPLE if self.multiple is None else self.multiple
        level = AUTO_LEVEL if self.level is None else self.level
        rule = (f"auto (settling time, level {level:g}, x{multiple:g})" if self.preset == "auto"
                else f"the {self.preset} preset")
        floor = f", not before {self.min_steps_share:.0%} of the budget" if self.min_steps_share else ""
        flat = ", bands that did not fall skipped" if self.signal == "bands" and self.flat_bands == "skip" else ""
        return f"{rule} on signal {self.signal}{flat}{floor}"


#: Scale-free: no window, so it follows the run's own time scale (learning rate, model, budget).
SCALE_FREE_DEFAULT = DefaultRule(preset="auto", signal="bands")

#: Chosen on all 48 concepts of the mini-SD benchmark at 0.5x, 1x and 2x the learning rate (the design set,
#: benchmarks/results/rules/default-candidates.md, ninth session; confirmed on a fresh set of concepts, fresh.csv):
#: ``M textual_inversion: Bf level=0.8 x1.75; dreambooth_lora: H B level=0.8 x2 from 50%; custom_diffusion: S
#: level=0.9 x2``. Textual Inversion's part stops the README's main job (``benchmarks/main_job_check.sh``) because a
#: band that never fell does not hold the stop.
DEFAULT_RULES: Dict[str, DefaultRule] = {
    "textual_inversion": DefaultRule(preset="auto", signal="bands", multiple=1.75, flat_bands="skip"),
    "dreambooth_lora": DefaultRule(preset="auto", signal="bands", min_steps_share=0.5),
    "custom_diffusion": DefaultRule(preset="auto", signal="loss", multiple=2.0, level=0.9),
}


def default_rule(method: Optional[str] = None) -> DefaultRule:
    """The default for ``method`` (``textual_inversion``, ``dreambooth_lora``, ``custom_diffusion``, ...);
    :data:`SCALE_FREE_DEFAULT` for any other method or ``None``.

    Example:
        >>> default_rule("dreambooth") == default_rule(None) == SCALE_FREE_DEFAULT
        True
    """
    return DEFAULT_RULES.get((method or "").lower(), SCALE_FREE_DEFAULT)

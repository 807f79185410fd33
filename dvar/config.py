"""``DVARConfig``: which rule stops the run, and how often it looks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence, Tuple

from .batch import PARTS
from .rules import (
    AUTO_LEVEL,
    AUTO_MULTIPLE,
    DEFAULT_PRESET,
    AllSettled,
    DVARCriterion,
    NonFinitePolicy,
    NotBefore,
    PRESETS,
    SettlingTimeCriterion,
    StopRule,
    default_rule,
    resolve_preset,
)
from .stride import (
    AUTO_EVALS_PER_WINDOW,
    STRIDE_PROBE_STEPS,
    EvalEvery,
    budget_stride,
    evaluations_in_window,
    overhead_target,
    resolve_eval_every,
)


@dataclass
class DVARConfig:
    """Settings of :class:`~dvar.DVAREarlyStopping` (the training script's loss options are a
    :class:`~dvar.LossConfig` beside it).

    Example:
        >>> DVARConfig(preset="textual_inversion").resolved_window_threshold()
        (310, 0.15)
        >>> DVARConfig(preset="auto", max_train_steps=1000).make_rule(eval_every=10)
        SettlingTimeCriterion(multiple=2.0, level=0.8, smooth=5, min_evaluations=20, min_drop_snr=5.0, num_values=0, stopped=False)
        >>> config = DVARConfig(method="dreambooth_lora", max_train_steps=1000)  # no rule named: dvar's default
        >>> config.preset, config.rule_preset, config.signal
        ('default', 'auto', 'bands')
    """

    preset: Optional[str] = field(
        default=None,
        metadata={"help": "Published setting: textual_inversion, custom_diffusion, dreambooth_lora or dreambooth; "
                          "'auto': no window, stop once the run is threshold (default "
                          f"{AUTO_MULTIPLE:g}) times as long as the smoothed loss took to cover {AUTO_LEVEL:.0%} of its "
                          "drop (needs max_train_steps for its stride); or 'default' (also what naming no preset, "
                          "window or threshold means): dvar's default rule for `method` (dvar.rules.default_rule)."},
    )
    method: Optional[str] = field(
        default=None,
        metadata={"help": "What is trained (textual_inversion, dreambooth_lora, custom_diffusion, dreambooth): "
                          "picks the default rule (any other method, or none, gets the scale-free default), and the "
                          "paper preset that a window or threshold given alone overrides."},
    )
    window: Optional[int] = field(
        default=None, metadata={"help": "N: optimizer steps in the recent-variance window (overrides the preset)."}
    )
    threshold: Optional[float] = field(
        default=None, metadata={"help": "alpha: stop when var(last N) / var(all) falls below it (overrides the preset); "
                                        "for 'auto', the multiple of the settling time."}
    )
    level: Optional[float] = field(
        default=None,
        metadata={"help": f"preset='auto': the share of its drop by which the smoothed loss counts as settled (default "
                          f"{AUTO_LEVEL:g}, or the default rule's); the run stops at threshold x that time."},
    )
    eval_every: EvalEvery = field(
        default="auto",
        metadata={
            "help": f"Evaluate the frozen batch every this many optimizer steps (window stays in steps); 'auto': "
            f"window // {AUTO_EVALS_PER_WINDOW} (at least 1), deterministic; 1 is the paper's setting; a percentage "
            f"such as '5%': the stride at which evaluating costs about that share of the training time, timed on the "
            f"first {STRIDE_PROBE_STEPS + 1} steps and then fixed (recorded, kept on resume; not machine-independent)."
        },
    )
    eval_batch_size: int = field(default=4, metadata={"help": "K: frozen examples (first K of the dataset)."})
    seed: int = field(default=0, metadata={"help": "Seed of the private generators that freeze the batch."})
    resample: Tuple[str, ...] = field(
        default=(), metadata={"help": f"Parts redrawn at every evaluation (ablation), from {PARTS}."}
    )
    nonfinite: NonFinitePolicy = field(
        default="stop", metadata={"help": "On a NaN/inf loss: stop as diverged (default), skip it, or raise."}
    )
    signal: Optional[Literal["loss", "normalized", "bands"]] = field(
        default=None,
        metadata={"help": "What the rule watches (default: the default rule's when it is used, else 'loss'): "
                          "'loss', the frozen batch's mean loss (the paper); 'normalized', the "
                          "mean over frozen examples of each one's loss divided by its own first value, so that the "
                          "high-noise examples, whose losses are small and move little, weigh as much as the "
                          "low-noise ones; 'bands', the normalized losses in timestep bands (the frozen examples "
                          "sorted by timestep, split into `bands` groups), a rule on each, stopping once every band "
                          "has (needs a frozen batch with timesteps and an objective with per_example_losses)."},
    )
    bands: int = field(
        default=3, metadata={"help": "signal='bands': how many timestep bands (at most eval_batch_size; under the "
                                    "default rule, fewer when there are fewer frozen examples)."}
    )
    flat_bands: Optional[Literal["hold", "skip"]] = field(
        default=None,
        metadata={"help": "signal='bands': what a band whose normalized loss has not fallen beyond 5x its evaluation "
                          "noise does once another band has settled: 'hold' the stop until it falls and settles, or "
                          "'skip' it (a band with nothing to learn cannot say when learning is done). Default: the "
                          "default rule's when it is used, else 'hold'."},
    )
    min_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Never stop before this optimizer step: a rule that fires earlier keeps the run going to "
                          "the first evaluation at or after it (a divergence still stops at once)."},
    )
    max_train_steps: Optional[int] = field(
        default=None, metadata={"help": "The step budget, to reject a window the run can never fill."}
    )
    verbose: bool = field(
        default=True, metadata={"help": "Log the stop (one line, INFO, logger 'dvar.callback', main process)."}
    )

    def __post_init__(self) -> None:
        # Resolved here, not where used, so that dataclasses.replace() and the summary see the same settings.
        if self.preset is None and (self.window is None) != (self.threshold is None) and self.method in PRESETS:
            self.preset = self.method  # a window or threshold alone overrides the method's paper preset
        if self.preset == DEFAULT_PRESET or (self.preset is None and self.window is None and self.threshold is None):
            self.preset = DEFAULT_PRESET
            default = default_rule(self.method)
            if self.signal is None:
                self.signal = default.signal  # type: ignore[assignment]
            if self.min_steps is None and default.min_steps_share and self.max_train_steps is not None:
                self.min_steps = math.ceil(default.min_steps_share * self.max_train_steps)
            if self.threshold is None and default.multiple is not None:
                self.threshold = default.multiple
            if self.flat_bands is None and self.signal == "bands":
                self.flat_bands = default.flat_bands  # type: ignore[assignment]
            if self.level is None and default.level is not None:
                self.level = default.level
            if isinstance(self.eval_batch_size, int) and not isinstance(self.eval_batch_size, bool):
                self.bands = self.default_bands(self.eval_batch_size)
        elif self.signal is None:
            self.signal = "loss"
        if self.flat_bands is None and self.signal == "bands":
            self.flat_bands = "hold"

    def default_bands(self, frozen_examples: int) -> int:
        """How many timestep bands to watch with ``frozen_examples`` examples: under dvar's default rule at most
        one per example (a small frozen batch, or kohya's few frozen batches, watches fewer bands rather than
        failing); otherwise :attr:`bands` as given, which the checks hold to the examples there are.

        Example:
            >>> DVARConfig(method="dreambooth_lora").default_bands(2)
            2
            >>> DVARConfig(preset="auto", signal="bands").default_bands(2)
            3
        """
        if self.uses_default and self.signal == "bands" and 1 <= frozen_examples < self.bands:
            return frozen_examples
        return self.bands

    @property
    def uses_default(self) -> bool:
        """No rule was named: dvar's default for :attr:`method` (:func:`dvar.rules.default_rule`)."""
        return self.preset == DEFAULT_PRESET

    @property
    def default_rule_text(self) -> str:
        """The default rule as messages name it.

        >>> DVARConfig(method="dreambooth_lora").default_rule_text.split(" (", 1)[1]
        'auto (settling time, level 0.8, x2) on signal bands, not before 50% of the budget)'
        >>> DVARConfig(method="custom_diffusion").default_rule_text
        "dvar's default rule for custom_diffusion (auto (settling time, level 0.9, x2) on signal loss)"
        """
        return f"dvar's default rule for {self.method or 'an unnamed method'} ({default_rule(self.method).describe()})"

    @property
    def rule_preset(self) -> Optional[str]:
        """The preset the rule comes from (``"default"`` resolved for :attr:`method`); None for window + threshold."""
        return default_rule(self.method).preset if self.uses_default else self.preset

    @property
    def auto_level(self) -> float:
        """``preset="auto"``'s level: :attr:`level`, else ``AUTO_LEVEL``."""
        return AUTO_LEVEL if self.level is None else self.level

    @property
    def is_auto(self) -> bool:
        """``preset="auto"``: the run-relative rule (:class:`~dvar.rules.SettlingTimeCriterion`), no window."""
        return (self.rule_preset or "").lower() == "auto"

    def resolved_window_threshold(self) -> Tuple[Optional[int], float]:
        """(window in steps, threshold), validated with the stride; the window is None for ``preset="auto"``."""
        window, threshold = self._rule_settings()
        if self.is_auto:
            self.resolved_eval_every()
        elif overhead_target(self.eval_every) is None:  # validates a percentage
            resolve_eval_every(self.eval_every, window)  # validates it
        return window, threshold

    @property
    def per_example(self) -> bool:
        """Whether the rule watches each frozen example's loss (``signal`` ``"normalized"`` or ``"bands"``)."""
        return self.signal in ("normalized", "bands")

    def _check_signal_and_floor(self) -> None:
        if self.signal not in ("loss", "normalized", "bands"):
            raise ValueError(f"signal must be 'loss', 'normalized' or 'bands' (got {self.signal!r}).")
        if self.per_example and self.resample:
            which = f" ({self.default_rule_text})" if self.uses_default else ""
            raise ValueError(f"signal={self.signal!r}{which} divides each frozen example's loss by its first value, so "
                             f"the examples must stay frozen; drop resample={tuple(self.resample)} or use signal='loss'.")
        if self.signal == "bands" and (isinstance(self.bands, bool) or not isinstance(self.bands, int)
                                       or not 1 <= self.bands <= self.eval_batch_size):
            raise ValueError(f"bands must be an integer from 1 to eval_batch_size ({self.eval_batch_size}): each band "
                             f"needs a frozen example (got {self.bands!r}). Lower bands or raise eval_batch_size.")
        if self.flat_bands is not None and self.flat_bands not in ("hold", "skip"):
            raise ValueError(f"flat_bands must be 'hold' or 'skip' (got {self.flat_bands!r}).")
        if self.flat_bands == "skip" and self.signal != "bands":
            raise ValueError(f"flat_bands='skip' says what a flat timestep band does, but signal={self.signal!r} "
                             "watches no bands; use signal='bands' or leave flat_bands out.")
        if self.min_steps is None:
            return
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0 (got {self.min_steps!r}).")
        if self.max_train_steps is not None and self.min_steps > self.max_train_steps:
            raise ValueError(f"min_steps ({self.min_steps}) is past the step budget ({self.max_train_steps}): the run "
                             "could never stop early. Lower min_steps or raise max_train_steps.")

    def _rule_settings(self) -> Tuple[Optional[int], float]:
        self._check_signal_and_floor()
        if self.is_auto:
            if self.window is not None:
                raise ValueError("preset='auto' sets its window from the run itself: leave window out (or pick a "
                                 "fixed-window preset).")
            threshold = AUTO_MULTIPLE if self.threshold is None else self.threshold
            SettlingTimeCriterion(threshold, self.auto_level)  # validates both
            return None, threshold
        if self.level is not None:
            raise ValueError(f"level={self.level!r} is the settling-time rule's (preset='auto'); the "
                             f"{self.rule_preset or 'window'} rule has no level: leave it out.")
        preset = resolve_preset(self.rule_preset) if self.rule_preset else None
        window = self.window if self.window is not None else (preset.window if preset else None)
        threshold = self.threshold if self.threshold is not None else (preset.threshold if preset else None)
        if window is None or threshold is None:
            raise ValueError("Give DVAR both window and threshold, or a preset (e.g. preset='textual_inversion' or "
                             "'auto'), or none of the three for dvar's default rule.")
        DVARCriterion(window, threshold)  # validates both, with the rule's own messages
        if self.max_train_steps is not None and window > self.max_train_steps:
            raise ValueError(
                f"DVAR window ({window} steps) is larger than the step budget ({self.max_train_steps}): "
                "it could never fire. Lower the window or raise max_train_steps."
            )
        return window, threshold

    def resolved_eval_every(self) -> Optional[int]:
        """The stride k in optimizer steps (``"auto"``: ``max(1, window // M)``, M = ``AUTO_EVALS_PER_WINDOW``;
        with ``preset="auto"``, which has no window: ``max(1, max_train_steps // 100)``); None for a target
        overhead (``"5%"``), whose k the callback chooses from the first steps' timings.

        Example:
            >>> DVARConfig(preset="textual_inversion").resolved_eval_every()
            10
            >>> DVARConfig(preset="auto", max_train_steps=1000).resolved_eval_every()
            10
        """
        if overhead_target(self.eval_every) is not None:
            return None
        if not self.is_auto:
            return resolve_eval_every(self.eval_every, self.resolved_window_threshold()[0])
        if self.eval_every == "auto":
            if self.max_train_steps is None:
                which = self.default_rule_text if self.uses_default else "preset='auto'"
                raise ValueError(f"{which} derives its evaluation stride from the step budget: pass "
                                 "max_train_steps (or an explicit eval_every).")
            return budget_stride(self.max_train_steps)
        return resolve_eval_every(self.eval_every, 1)

    def make_rule(self, eval_every: int, band_labels: Optional[Sequence[str]] = None) -> StopRule:
        """The rule these settings name, counting in evaluations made every ``eval_every`` steps (with
        ``signal="bands"``, one per band, named by ``band_labels``).

        Example:
            >>> rule = DVARConfig(preset="auto", max_train_steps=500, signal="bands").make_rule(eval_every=5)
            >>> type(rule).__name__, rule.labels
            ('AllSettled', ['low-noise band', 'mid-noise band', 'high-noise band'])
        """
        window, threshold = self._rule_settings()
        if self.uses_default and default_rule(self.method).min_steps_share and self.max_train_steps is None:
            # (checked here, not with the other settings: kohya's --max_train_epochs gives the budget later)
            raise ValueError(f"{self.default_rule_text} sets its floor from the step budget: pass max_train_steps.")

        def one_rule() -> StopRule:
            if window is None:
                settling = SettlingTimeCriterion(threshold, self.auto_level, nonfinite=self.nonfinite)
                if self.per_example:
                    settling.value_name = "normalized loss"
                return settling
            return DVARCriterion(evaluations_in_window(window, eval_every), threshold, nonfinite=self.nonfinite)

        rule = one_rule()
        if self.signal == "bands":
            rule = AllSettled([rule] + [one_rule() for _ in range(self.bands - 1)],
                              list(band_labels) if band_labels is not None else default_band_labels(self.bands),
                              noun="timestep band", flat_holds=self.flat_bands != "skip")
        if self.min_steps:
            rule = NotBefore(rule, math.ceil(self.min_steps / eval_every), f"min_steps={self.min_steps}")
        return rule


def default_band_labels(bands: int) -> List[str]:
    """Names of the timestep bands, lowest timesteps (least noise) first.

    >>> default_band_labels(3), default_band_labels(2), default_band_labels(1)
    (['low-noise band', 'mid-noise band', 'high-noise band'], ['low-noise band', 'high-noise band'], ['one band'])
    >>> default_band_labels(4)[0]
    'band 1 of 4, lowest timesteps'
    """
    named = {1: ["one band"], 2: ["low-noise band", "high-noise band"],
             3: ["low-noise band", "mid-noise band", "high-noise band"]}
    if bands in named:
        return named[bands]
    return [f"band {i + 1} of {bands}" + (", lowest timesteps" if i == 0 else "") for i in range(bands)]

"""Benchmark settings as dataclasses: per-method budgets and stopping rules, and the presets.

Example:
    >>> cfg = preset("quick")
    >>> [m.method for m in cfg.methods], cfg.concepts_per_method
    (['textual_inversion', 'dreambooth_lora', 'custom_diffusion'], 2)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

METHOD_ORDER = ("textual_inversion", "dreambooth_lora", "custom_diffusion", "dreambooth")
VARIANTS = ("baseline", "clip_s", "few_iters", "dvar", "dvar_every1", "auto", "early25", "early10", "step0")
#: The variants that are stopping rules (the rest are the budget and the premature controls).
RULES = ("dvar", "dvar_every1", "auto", "clip_s", "few_iters")
#: Deliberately premature stops scored from the same trajectory (fraction of the budget): the controls that
#: show whether the benchmark can see a bad stop at all.
PREMATURE_STOPS = {"step0": 0.0, "early10": 0.10, "early25": 0.25}
#: The presets' learning rates and budgets were revised while looking at the first 16 concepts of each
#: method's list (positions 0-15); the report repeats the power table without them.
TUNING_CONCEPTS = 16
#: The group of bundled concepts each method trains on in the quick preset (the paper's 9 / 9 / 30 split).
GROUP_OF_METHOD = {
    "textual_inversion": "textual_inversion",
    "custom_diffusion": "custom_diffusion",
    "dreambooth_lora": "dreambooth",
    "dreambooth": "dreambooth",
}


@dataclass
class MethodSettings:
    """One method's budget and stopping rules."""

    method: str = field(metadata={"help": "textual_inversion, dreambooth_lora, custom_diffusion or dreambooth."})
    max_train_steps: int = field(metadata={"help": "The baseline's fixed step budget."})
    learning_rate: float = field(metadata={"help": "As the trainer's --learning_rate."})
    clip_s_eps: float = field(default=0.02, metadata={"help": "CLIP-s: an improvement must exceed this (paper: TI/CD 0.02, LoRA 0.04)."})
    clip_s_patience: int = field(default=6, metadata={"help": "CLIP-s: checks without improvement before stopping (paper: 6 / 3)."})
    check_every: int = field(
        default=50, metadata={"help": "Identity checks (each concept's saturation curve and its saved weights) every "
                                      "this many steps; a divisor of clip_s_every."}
    )
    clip_s_every: Optional[int] = field(
        default=None, metadata={"help": "CLIP-s: sample and score every this many steps (paper: 50); a multiple of "
                                        "check_every (default: check_every)."}
    )
    dvar_window: Optional[int] = field(default=None, metadata={"help": "DVAR window (default: the method's preset)."})
    dvar_threshold: Optional[float] = field(default=None, metadata={"help": "DVAR threshold (default: the preset's)."})
    dvar_eval_every: Optional[int] = field(
        default=None, metadata={"help": "DVAR evaluates every this many steps (None: the trainer's default stride)."}
    )
    dvar_extra_eval_every: Tuple[int, ...] = field(
        default=(1,), metadata={"help": "Also score DVAR evaluating every k steps, as variant 'dvar_every<k>' (same "
                                        "run; 1 is the paper's setting)."}
    )
    extra_args: Tuple[str, ...] = field(default=(), metadata={"help": "More trainer flags, e.g. ('--rank', '8')."})

    @property
    def clip_s_period(self) -> int:
        """The steps between CLIP-s's checks (``clip_s_every``, else every identity check)."""
        return self.clip_s_every or self.check_every

    def trainer_args(self, max_train_steps: Optional[int] = None) -> List[str]:
        """The trainer flags for these settings (``max_train_steps``: another budget, e.g. few iters)."""
        steps = self.max_train_steps if max_train_steps is None else max_train_steps
        # the "dvar" control is the paper's rule: named, so that it is not the trainers' default rule
        args = ["--max_train_steps", str(steps), "--learning_rate", repr(self.learning_rate),
                "--early-stop-preset", self.method]
        if self.dvar_window is not None:
            args += ["--early-stop-window", str(self.dvar_window)]
        if self.dvar_threshold is not None:
            args += ["--early-stop-threshold", repr(self.dvar_threshold)]
        if self.dvar_eval_every is not None:
            args += ["--early-stop-eval-every", str(self.dvar_eval_every)]
        return args + list(self.extra_args)


@dataclass
class SamplingSettings:
    """How images are generated for scoring (identical seeds for every variant: paired comparisons)."""

    num_inference_steps: int = field(
        default=10, metadata={"help": "DPM-Solver++ steps (paper: 50 with PNDM; on mini-SD 10 read the same as 25)."}
    )
    guidance_scale: float = field(default=7.0, metadata={"help": "Classifier-free guidance (mini-SD's evaluated best: 7)."})
    images_per_prompt: int = field(default=2, metadata={"help": "Images per new-context prompt (alignment), as the paper."})
    identity_images_per_prompt: int = field(
        default=16, metadata={"help": "Images per training-style prompt for a variant's identity score."}
    )
    check_images_per_prompt: int = field(
        default=8, metadata={"help": "Images per training-style prompt at each identity check (the saturation curve): "
                                     "CLIP-s's images and more from seed + 2."}
    )
    clip_s_images_per_prompt: Optional[int] = field(
        default=None, metadata={"help": "Images per training-style prompt CLIP-s watches at its checks (the first set "
                                        "of each check's images, the sampling seed); at most check_images_per_prompt "
                                        "(default: 4, or all the check's images if fewer)."}
    )
    seed: int = field(default=1234, metadata={"help": "Sampling seed (the retest of the budget's weights uses seed + 1)."})

    @property
    def clip_s_images(self) -> int:
        """Images per prompt CLIP-s reads at a check."""
        return self.clip_s_images_per_prompt or min(4, self.check_images_per_prompt)


@dataclass
class BenchmarkConfig:
    """What one benchmark run covers."""

    name: str
    methods: List[MethodSettings]
    concepts_per_method: Optional[int] = field(default=None, metadata={"help": "First N concepts per method (None: all)."})
    concept_source: str = field(default="group", metadata={"help": "'group': a method trains its own group's concepts (9/9/30); 'all': every method trains every concept."})
    traced_per_method: int = field(default=1, metadata={"help": "Concepts per method whose monitors run through the whole budget (the 'is this loss informative' study)."})
    ablation_methods: Tuple[str, ...] = field(default=(), metadata={"help": "Methods whose traced runs also track the ablation (one part of the frozen batch redrawn per evaluation)."})
    ablation_parts: Tuple[str, ...] = field(default=("images", "latents", "noise", "captions", "timesteps"))
    concept_objects: str = field(
        default="seen", metadata={"help": "Synthetic concepts' objects: 'seen' (combinations mini-SD can draw, so "
                                          "learning them shows; written to OUT/concepts) or 'held_out' (the bundled, "
                                          "never-seen objects)."}
    )
    premature_stops: bool = field(
        default=True, metadata={"help": "Also score step 0 and stops at 10% / 25% of the budget (the power controls)."}
    )
    checks_to_budget: bool = field(
        default=True, metadata={"help": "Score identity at every check up to the budget for every concept (each "
                                        "concept's saturation step), not only for the traced ones."}
    )
    loss_to_budget: bool = field(
        default=True, metadata={"help": "Record the every-step frozen-batch loss up to the budget for every concept "
                                        "(replays of other strides and rules)."}
    )
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int = 0

    def method(self, name: str) -> MethodSettings:
        for settings in self.methods:
            if settings.method == name:
                return settings
        raise KeyError(f"method {name!r} is not in this benchmark ({[m.method for m in self.methods]})")

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Refuse settings the runner cannot honour, naming the fix (``ValueError``)."""
        for m in self.methods:
            if m.check_every < 1 or m.clip_s_period < 1 or m.clip_s_period % m.check_every:
                raise ValueError(f"{m.method}: clip_s_every ({m.clip_s_every}) must be a positive multiple of "
                                 f"check_every ({m.check_every}): CLIP-s reads its images at identity checks")
        s = self.sampling
        if not 1 <= s.clip_s_images <= s.check_images_per_prompt:
            raise ValueError(f"clip_s_images_per_prompt ({s.clip_s_images_per_prompt}) must be between 1 and "
                             f"check_images_per_prompt ({s.check_images_per_prompt}): CLIP-s reads the first of them")

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "BenchmarkConfig":
        data = dict(data)
        methods = [
            MethodSettings(**{**m, **{key: tuple(m[key]) for key in ("extra_args", "dvar_extra_eval_every") if key in m}})
            for m in data.pop("methods")
        ]
        sampling = SamplingSettings(**data.pop("sampling", {}))
        for key in ("ablation_methods", "ablation_parts"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(methods=methods, sampling=sampling, **data)


def mini_sd_methods() -> List[MethodSettings]:
    """The mini-SD settings (learning rate, batch, budget) under which each method visibly learns a seen
    concept and then levels off inside the budget (measured: ``benchmarks/personalization/README.md``), and the
    paper's CLIP-s settings."""
    return [
        MethodSettings("textual_inversion", 500, 1e-3, clip_s_eps=0.02, clip_s_patience=6, check_every=25,
                       clip_s_every=50, extra_args=("--train_batch_size", "4")),
        MethodSettings("dreambooth_lora", 1000, 5e-4, clip_s_eps=0.04, clip_s_patience=3),
        MethodSettings("custom_diffusion", 600, 1e-4, clip_s_eps=0.02, clip_s_patience=6),
    ]


#: DreamBooth-LoRA on the embedded mini-flow (issue 24): the budget and learning rate under which a seen concept
#: is learned and levels off inside the budget, and its sampler (flow-matching Euler steps, true classifier-free
#: guidance). How they were chosen: benchmarks/results/full-flow/README.md (a 3-concept pilot at 3e-4, 1e-3, 2e-3).
MINI_FLOW_LORA = dict(max_train_steps=1000, learning_rate=2e-3)
MINI_FLOW_SAMPLING = dict(num_inference_steps=20, guidance_scale=5.0)


def for_flow_model(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """``cfg`` on a Flux model: DreamBooth-LoRA only (the trainer that trains Flux), no ablation (it is Textual
    Inversion's); ``quick`` and ``full`` take mini-flow's budget, learning rate and sampler, ``ci`` keeps its own.

    >>> cfg = for_flow_model(preset("full"))
    >>> cfg.name, [m.method for m in cfg.methods], cfg.sampling.guidance_scale
    ('full-flow', ['dreambooth_lora'], 5.0)
    """
    lora = [m for m in cfg.methods if m.method == "dreambooth_lora"]
    if not lora:
        raise ValueError("a Flux model trains only DreamBooth-LoRA: include dreambooth_lora in --methods")
    if cfg.name in ("quick", "full"):
        lora = [dataclasses.replace(lora[0], **MINI_FLOW_LORA)]
        cfg.sampling = dataclasses.replace(cfg.sampling, **MINI_FLOW_SAMPLING)
    cfg.methods, cfg.ablation_methods, cfg.name = lora, (), f"{cfg.name}-flow"
    return cfg


def preset(name: str) -> BenchmarkConfig:
    """``ci`` (minutes, a smoke test), ``quick`` (2 concepts per method, <= 30 min) or ``full``
    (all 48 concepts x 3 methods on mini-SD)."""
    if name == "full":
        return BenchmarkConfig(
            "full", mini_sd_methods(), concept_source="all", traced_per_method=2, ablation_methods=("textual_inversion",)
        )
    if name == "quick":
        return BenchmarkConfig("quick", mini_sd_methods(), concepts_per_method=2, traced_per_method=1,
                               ablation_methods=("textual_inversion",))
    if name == "ci":
        tiny = dict(check_every=10, clip_s_patience=2, dvar_window=12, dvar_threshold=0.5, dvar_eval_every=4)
        return BenchmarkConfig(
            "ci",
            [
                MethodSettings("textual_inversion", 40, 5e-3, **tiny),
                MethodSettings("dreambooth_lora", 40, 1e-3, **tiny),
                MethodSettings("custom_diffusion", 40, 1e-4, **tiny),
            ],
            concepts_per_method=1,
            traced_per_method=1,
            ablation_methods=("textual_inversion",),
            ablation_parts=("timesteps",),
            sampling=SamplingSettings(num_inference_steps=4, images_per_prompt=1, identity_images_per_prompt=1,
                                      check_images_per_prompt=2, clip_s_images_per_prompt=1),
        )
    raise ValueError(f"unknown preset {name!r}: choose ci, quick or full (or pass --config FILE)")


def load_config(path: Path) -> BenchmarkConfig:
    """A benchmark config from a JSON file (e.g. ``benchmarks/personalization/paper48.json``)."""
    data = json.loads(Path(path).read_text())
    return BenchmarkConfig.from_json(data["benchmark"] if "benchmark" in data else data)

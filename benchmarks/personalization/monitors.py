"""What watches a benchmark trajectory: DVAR, ``auto``, the CLIP-s identity checks, timings and the weights.

One training run per (concept, method) goes to the full budget; :class:`TrajectoryMonitor`
applies the stopping rules to it as it goes, without changing it (DVAR's batch and the
samplers use private generators; attaching the stopper leaves the weights bitwise the same,
as tests/test_callback.py checks). It records when each rule fires, keeps a copy of the
learned weights at that step and at every identity check (written as safetensors, so that
any step can be scored again later: :mod:`.rescore`), each frozen example's loss at every step
and the size and direction of every update of the learned weights (:class:`UpdateStatistics`; so that any
rule can be replayed: :mod:`.replay`), and times every part, so each variant's cost
is the training time up to its stop plus the time its own rule spent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from dvar.batch import isolated_global_rng
from dvar.callback import eval_mode
from dvar.integrations.trainer import Trainer, TrainingObserver

from .baselines import PatienceCriterion
from .config import MethodSettings, SamplingSettings
from .scoring import ConceptSpec

#: The second set of check images is drawn with this offset from the sampling seed (seed + 1 is the retest's).
CHECK_EXTRA_SEED_OFFSET = 2


class Sampler:
    """Generates images from the weights being trained, with fixed seeds, outside the training RNG."""

    def __init__(self, trainer: Trainer, sampling: SamplingSettings) -> None:
        self.trainer, self.sampling = trainer, sampling
        self.pipe = trainer.method.pipeline(trainer.parts, trainer.accelerator, trainer.weight_dtype)
        self.pipe.to(trainer.accelerator.device)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], per_prompt: int, seed: Optional[int] = None) -> List[Any]:
        if per_prompt <= 0:
            return []
        parts, accelerator = self.trainer.parts, self.trainer.accelerator
        generator = torch.Generator(device="cpu").manual_seed(self.sampling.seed if seed is None else seed)
        guidance: Dict[str, Any] = {"guidance_scale": self.sampling.guidance_scale}
        if getattr(parts, "family", "sd") == "flux":
            from dvar.integrations.flux import sampling_kwargs

            guidance = sampling_kwargs(self.trainer.args, accelerator.unwrap_model(parts.unet), len(prompts))
            if "true_cfg_scale" in guidance:  # no guidance embedding: the benchmark's guidance is true CFG
                guidance["true_cfg_scale"] = self.sampling.guidance_scale
        with isolated_global_rng(), eval_mode([parts.unet, parts.text_encoder]), accelerator.autocast():
            return self.pipe(
                list(prompts), num_images_per_prompt=per_prompt, generator=generator,
                num_inference_steps=self.sampling.num_inference_steps, **guidance,
                height=self.trainer.args.resolution, width=self.trainer.args.resolution,
            ).images


class UpdateStatistics:
    """Per optimizer step, from the learned weights alone (no extra forward pass), what optimisation diagnostics read:
    ``sq`` = |u_t|^2 for the step's update u_t = w_t - w_(t-1); ``dot_previous`` = u_t . u_(t-1), whose running sum is
    Pflug's stationarity statistic (Chee and Toulis 2018; None at the first step); ``displacement_sq`` = |w_t - w_0|^2.
    Sums in float64 over every learned tensor (the new token rows, the LoRA or Custom Diffusion weights).

    >>> stats = UpdateStatistics({"w": torch.tensor([0.0, 0.0])})
    >>> for w in ([1.0, 0.0], [2.0, 1.0]):
    ...     stats.update({"w": torch.tensor(w)})
    >>> stats.to_json()
    {'sq': [1.0, 2.0], 'dot_previous': [None, 1.0], 'displacement_sq': [1.0, 5.0]}
    """

    def __init__(self, start: Dict[str, torch.Tensor]) -> None:
        self.start = self.previous = self._flat(start)
        self.previous_update: Optional[torch.Tensor] = None
        self.sq: List[float] = []
        self.dot_previous: List[Optional[float]] = []
        self.displacement_sq: List[float] = []

    @staticmethod
    def _flat(state: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[name].detach().reshape(-1).to("cpu", torch.float64) for name in sorted(state)])

    def update(self, state: Dict[str, torch.Tensor]) -> None:
        """Record the step that led to ``state`` (the learned weights after it)."""
        current = self._flat(state)
        step = current - self.previous
        self.sq.append(float(step @ step))
        self.dot_previous.append(None if self.previous_update is None else float(step @ self.previous_update))
        displacement = current - self.start
        self.displacement_sq.append(float(displacement @ displacement))
        self.previous, self.previous_update = current, step

    def to_json(self) -> Dict[str, list]:
        return {"sq": self.sq, "dot_previous": self.dot_previous, "displacement_sq": self.displacement_sq}


#: Above this many learned parameters the update statistics are not kept: they hold three float64 copies of the
#: learned weights on the CPU (start, previous, previous update), 1.2 GB at this size, 20 GB for a full SD 1.5 UNet.
UPDATE_STATISTICS_MAX_PARAMETERS = 50_000_000


def update_statistics(start: Dict[str, torch.Tensor], enabled: bool = True,
                      max_parameters: int = UPDATE_STATISTICS_MAX_PARAMETERS) -> Optional[UpdateStatistics]:
    """:class:`UpdateStatistics` from ``start``, or None when disabled or the learned weights are too large to copy.

    >>> update_statistics({"w": torch.zeros(3)}, max_parameters=2) is None
    True
    """
    size = sum(tensor.numel() for tensor in start.values())
    return UpdateStatistics(start) if enabled and size <= max_parameters else None


def score_current_weights(sampler: Sampler, scorer: Any, concept: ConceptSpec, phrase: str,
                          alignment: bool = True, retest: bool = False, per_prompt: Optional[int] = None,
                          seed: Optional[int] = None) -> Dict[str, Any]:
    """Identity and embedding identity (training-style prompts), alignment (new-context prompts) of the current
    weights; ``retest``: identity again with the next sampling seed (the score's test-retest noise).
    ``per_prompt`` and ``seed`` override the identity images per prompt and the sampling seed (rescoring)."""
    s = sampler.sampling
    seed = s.seed if seed is None else seed
    started = time.perf_counter()
    identity_prompts = [p.format(phrase) for p in concept.identity_prompts]
    identity_images = sampler(identity_prompts, per_prompt or s.identity_images_per_prompt, seed=seed)
    scores: Dict[str, Any] = {
        "identity": scorer.identity(identity_images, concept),
        "identity_embedding": scorer.embedding_identity(identity_images, concept),
        "identity_images": len(identity_images),
        "alignment": None, "alignment_by_attribute": {}, "images_scored": len(identity_images),
    }
    if alignment:
        eval_images = sampler([p.template.format(phrase) for p in concept.eval_prompts], s.images_per_prompt, seed=seed)
        expanded = [p for p in concept.eval_prompts for _ in range(s.images_per_prompt)]
        scores["alignment"], scores["alignment_by_attribute"] = scorer.alignment(eval_images, expanded)
        scores["images_scored"] += len(eval_images)
    if retest:
        retest_images = sampler(identity_prompts, per_prompt or s.identity_images_per_prompt, seed=seed + 1)
        scores["identity_retest"] = scorer.identity(retest_images, concept)
        scores["identity_embedding_retest"] = scorer.embedding_identity(retest_images, concept)
        scores["images_scored"] += len(retest_images)
    scores["scoring_s"] = round(time.perf_counter() - started, 3)
    return scores


class PerExampleRecorder:
    """Wraps a stopper's objective: returns the same batch loss, and keeps each frozen example's loss and timestep.

    The batch loss comes from :meth:`dvar.objectives.DiffusionObjective.per_example_losses`, computed exactly as
    the objective itself computes it (same forward pass), so the stopper decides as it would without the
    recorder; ``losses[i]`` are the example losses of the i-th evaluation."""

    def __init__(self, objective: Any) -> None:
        if not hasattr(objective, "per_example_losses"):
            raise TypeError(f"{type(objective).__name__} has no per_example_losses(): cannot record per-example losses")
        self.objective = objective
        self.losses: List[List[float]] = []
        self.timesteps: Optional[List[float]] = None

    def __call__(self, models: Any, batch: Any) -> torch.Tensor:
        return self.per_example_losses(models, batch).loss

    def per_example_losses(self, models: Any, batch: Any) -> Any:
        """The objective's own result (a stopper with ``signal="normalized"`` calls this), recorded."""
        result = self.objective.per_example_losses(models, batch)
        self.losses.append([float(x) for x in result.losses.detach().cpu()])
        timesteps = [float(t) for t in result.timesteps.detach().cpu()]
        if self.timesteps is None:
            self.timesteps = timesteps
        elif timesteps != self.timesteps:
            raise RuntimeError("the frozen batch's timesteps changed between evaluations: it is not frozen")
        return result

    def to_json(self) -> Dict[str, Any]:
        return {"timesteps": self.timesteps or [], "losses": self.losses}


class LossWatch:
    """One DVAR stopper watching a run: its frozen-batch losses, their cost, and where it fired.

    After it fires it can keep evaluating (a traced run), without changing its stop."""

    def __init__(self, stopper: Any, per_example: bool = False) -> None:
        self.stopper = stopper
        self.recorder: Optional[PerExampleRecorder] = None
        if per_example:
            self.recorder = stopper.objective = PerExampleRecorder(stopper.objective)
        self.steps: List[int] = []
        self.eval_loss: List[float] = []
        self.eval_s: List[float] = []
        self.stop_step: Optional[int] = None
        self.reason: Optional[str] = None

    def __call__(self, step: int, loss: torch.Tensor) -> bool:
        """Evaluate if this is an evaluation step; True when the rule fires at this step."""
        if step % self.stopper.config.eval_every:
            return False
        started = time.perf_counter()
        fired = False
        if self.stopper.should_stop:
            value = self.stopper.evaluate()
        else:
            fired = self.stopper.step(step, loss)
            value = self.stopper.history[-1].eval_loss
            if fired:
                self.stop_step, self.reason = step, self.stopper.reason
        self.steps.append(step)
        self.eval_loss.append(value)
        self.eval_s.append(time.perf_counter() - started)
        return fired

    def seconds_until(self, step: int) -> float:
        """The evaluations up to ``step``, each timed at the watch's median evaluation (robust to load changing
        during the run)."""
        count = sum(at <= step for at in self.steps)
        return count * float(np.median(self.eval_s)) if count else 0.0

    def to_json(self) -> Dict[str, Any]:
        data = {
            "steps": self.steps, "eval_loss": self.eval_loss, "eval_s": [round(s, 5) for s in self.eval_s],
            "stop_step": self.stop_step, "reason": self.reason, "eval_every": self.stopper.config.eval_every,
            "window": self.stopper.window, "threshold": self.stopper.threshold,
            "preset": self.stopper.config.preset, "rule": type(self.stopper.rule).__name__,
        }
        if self.recorder is not None:
            data["per_example"] = self.recorder.to_json()
        return data


def weights_file(folder: Path, step: int) -> Path:
    """Where a trajectory's learned weights at ``step`` are kept: ``folder/step_00050.safetensors``."""
    return Path(folder) / f"step_{step:05d}.safetensors"


def save_weights(state: Dict[str, torch.Tensor], path: Path) -> int:
    """Write a learned state as safetensors, atomically (a resumed run never reads half a file); its bytes."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size


class TrajectoryMonitor(TrainingObserver):
    """Applies DVAR, ``auto`` and CLIP-s to one run, keeps its weights and per-example losses, and times everything.

    Args:
        settings: the method's budget and rule settings.
        sampling: how scoring images are made.
        scorer: a :class:`~benchmarks.personalization.scoring.WorldScorer` or ``ClipScorer``.
        concept: the concept being trained.
        phrase: how prompts name the concept for this method (e.g. ``"<concept>"``, ``"sks star"``).
        trace_full: keep evaluating every DVAR watch and identity to the end of the budget.
        ablation_parts: also track one DVAR batch per part redrawn at every evaluation.
        job_started: ``time.perf_counter()`` when the job began (setup time is measured from it).
        rules: False for a plain fixed-budget run: timings, losses and a sampler only.
        checks_to_budget: score identity at every check from step 0 to the budget (the concept's saturation
            curve); the checks after the CLIP-s stop are not charged to CLIP-s.
        loss_to_budget: keep the every-step DVAR watch evaluating to the budget (replays of other rules), with each
            frozen example's loss.
        premature_steps: ``{variant: step}``: keep a copy of the learned weights at these steps (e.g. step 0 and
            10% of the budget), to score deliberately premature stops.
        weights_dir: write the learned weights at every check, every rule's stop and the premature steps here.
        update_statistics: record every step's :class:`UpdateStatistics` (skipped anyway above
            ``UPDATE_STATISTICS_MAX_PARAMETERS`` learned parameters, e.g. a full DreamBooth UNet).
    """

    def __init__(
        self, settings: MethodSettings, sampling: SamplingSettings, scorer: Any, concept: ConceptSpec, phrase: str,
        trace_full: bool = False, ablation_parts: Sequence[str] = (), job_started: Optional[float] = None,
        rules: bool = True, checks_to_budget: bool = False, loss_to_budget: bool = False,
        premature_steps: Optional[Dict[str, int]] = None, weights_dir: Optional[Path] = None,
        update_statistics: bool = True,
    ) -> None:
        self.settings, self.sampling, self.scorer, self.concept, self.phrase = settings, sampling, scorer, concept, phrase
        self.trace_full, self.ablation_parts, self.rules = trace_full, tuple(ablation_parts), rules
        self.checks_to_budget, self.loss_to_budget = checks_to_budget or trace_full, loss_to_budget or trace_full
        self.premature_steps = dict(premature_steps or {})
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self.job_started = time.perf_counter() if job_started is None else job_started
        self.train_step_s: List[float] = []
        self.train_loss: List[float] = []
        self.identity_trace: Dict[str, list] = {"steps": [], "identity": [], "identity_embedding": [], "check_s": []}
        self.clip_s_trace: Dict[str, list] = {"steps": [], "score": []}
        self.dvar_watches: Dict[str, LossWatch] = {}  # "dvar", "dvar_every<k>" and "auto"
        self.ablation_watches: Dict[str, LossWatch] = {}
        self.snapshots: Dict[str, Dict[str, torch.Tensor]] = {}
        self.saved_weights: Dict[int, int] = {}  # step -> bytes written
        self.weights_s = 0.0
        self.clip_s_stop: Optional[int] = None
        self.clip_s_reason: Optional[str] = None
        self.record_updates = update_statistics
        self.updates: Optional[UpdateStatistics] = None

    # -- TrainingObserver -------------------------------------------------------------------

    def on_train_begin(self, trainer: Trainer) -> None:
        began = time.perf_counter()
        self.trainer = trainer
        self.setup_s = began - self.job_started
        if not self.rules:
            self.sampler = Sampler(trainer, self.sampling)  # for scoring afterwards, not part of the run's time
            self.last = time.perf_counter()
            return
        every1 = self.loss_to_budget and 1 in self.settings.dvar_extra_eval_every
        self.dvar_watches["dvar"] = LossWatch(trainer.make_stopper())
        for every in self.settings.dvar_extra_eval_every:
            self.dvar_watches[f"dvar_every{every}"] = LossWatch(trainer.make_stopper(eval_every=every),
                                                                per_example=every1 and every == 1)
        # the library's window-free rule at its own default stride (the budget's)
        self.dvar_watches["auto"] = LossWatch(trainer.make_stopper(preset="auto", window=None, threshold=None,
                                                                   eval_every="auto"))
        self.ablation_watches = {part: LossWatch(trainer.make_stopper(resample=(part,))) for part in self.ablation_parts}
        clip_started = time.perf_counter()
        self.sampler = Sampler(trainer, self.sampling)
        self.scorer.references(self.concept)
        self.clip_rule = PatienceCriterion(self.settings.clip_s_eps, self.settings.clip_s_patience)
        self.clip_setup_s = time.perf_counter() - clip_started
        self.updates = update_statistics(trainer.method.learned_state(trainer.parts, trainer.accelerator),
                                         enabled=self.record_updates)
        self._keep_premature(0)
        if self.checks_to_budget:  # where the curve starts: the untrained token / adapters (not part of any rule)
            self._identity_check(0, feed_rule=False)
        self.last = time.perf_counter()

    def on_step_end(self, trainer: Trainer, global_step: int, loss: torch.Tensor) -> None:
        entered = time.perf_counter()
        self.train_step_s.append(entered - self.last)
        self.train_loss.append(float(loss.detach().item()))
        if not self.rules:
            self.last = time.perf_counter()
            return
        for name, watch in self.dvar_watches.items():
            to_budget = self.trace_full or (self.loss_to_budget and watch.stopper.config.eval_every == 1
                                            and name != "auto")
            if (watch.stop_step is None or to_budget) and watch(global_step, loss):
                self._snapshot(name, global_step)
        for watch in self.ablation_watches.values():
            watch(global_step, loss)
        if self.updates is not None:
            self.updates.update(self.trainer.method.learned_state(self.trainer.parts, self.trainer.accelerator))
        self._keep_premature(global_step)
        every = self.settings.check_every
        if global_step % every == 0 and (self.checks_to_budget or self._clip_s_wants(global_step)):
            self._identity_check(global_step)
        self.last = time.perf_counter()

    # -- the rules --------------------------------------------------------------------------

    def _clip_s_wants(self, step: int) -> bool:
        return self.clip_s_stop is None and step % self.settings.clip_s_period == 0

    def _snapshot(self, variant: str, step: int) -> None:
        """Keep the learned weights of ``variant`` (in memory, for scoring) and write them as the step's file."""
        self.snapshots[variant] = self.trainer.method.learned_state(self.trainer.parts, self.trainer.accelerator)
        self.save_step(step, self.snapshots[variant])

    def save_step(self, step: int, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write the learned weights at ``step`` (the current ones unless ``state``) once: ``weights_dir/step_NNNNN``."""
        if self.weights_dir is None or step in self.saved_weights:
            return
        started = time.perf_counter()
        if state is None:
            state = self.trainer.method.learned_state(self.trainer.parts, self.trainer.accelerator)
        self.saved_weights[step] = save_weights(state, weights_file(self.weights_dir, step))
        self.weights_s += time.perf_counter() - started

    def _keep_premature(self, step: int) -> None:
        for variant, at in self.premature_steps.items():
            if at == step:
                self._snapshot(variant, step)

    def _identity_check(self, step: int, feed_rule: bool = True) -> None:
        """Sample the check images; CLIP-s watches the embedding identity (the paper's CLIP-I) of its own first
        set (``clip_s_images_per_prompt``, the sampling seed) at its own cadence, and is charged only that set's
        time; the saturation curve reads the identity of both sets (the second from seed + 2)."""
        s = self.sampling
        prompts = [p.format(self.phrase) for p in self.concept.identity_prompts]
        charged = feed_rule and self._clip_s_wants(step)
        started = time.perf_counter()
        images = self.sampler(prompts, s.clip_s_images)
        if charged:
            score = self.scorer.embedding_identity(images, self.concept)
            self.clip_s_trace["steps"].append(step)
            self.clip_s_trace["score"].append(score)
            if self.clip_rule.update(score):
                self.clip_s_stop, self.clip_s_reason = step, self.clip_rule.reason
                self.snapshots["clip_s"] = self.trainer.method.learned_state(self.trainer.parts, self.trainer.accelerator)
        check_s = time.perf_counter() - started
        extra = s.check_images_per_prompt - s.clip_s_images
        images = images + self.sampler(prompts, extra, seed=s.seed + CHECK_EXTRA_SEED_OFFSET)
        self.identity_trace["steps"].append(step)
        self.identity_trace["identity_embedding"].append(self.scorer.embedding_identity(images, self.concept))
        self.identity_trace["identity"].append(self.scorer.identity(images, self.concept))
        self.identity_trace["check_s"].append(check_s if charged else 0.0)
        self.save_step(step, self.snapshots.get("clip_s") if self.clip_s_stop == step else None)

    # -- results ------------------------------------------------------------------------------

    @property
    def stops(self) -> Dict[str, Optional[int]]:
        """Where each rule fired (None: it did not, within the budget)."""
        return {"clip_s": self.clip_s_stop, **{name: w.stop_step for name, w in self.dvar_watches.items()}}

    @property
    def reasons(self) -> Dict[str, Optional[str]]:
        return {"clip_s": self.clip_s_reason, **{name: w.reason for name, w in self.dvar_watches.items()}}

    def ablation_json(self) -> Dict[str, Any]:
        """Per redrawn part (and "none", DVAR's own frozen batch): losses and where each would stop."""
        if not self.ablation_watches:
            return {}
        return {"none": self.dvar_watches["dvar"].to_json(), **{p: w.to_json() for p, w in self.ablation_watches.items()}}

    def monitor_seconds(self, variant: str, until: int) -> float:
        """Time a variant's own rule spent up to its stop step."""
        if variant in self.dvar_watches:
            return self.dvar_watches[variant].seconds_until(until)
        if variant == "clip_s":
            charged = [s for s in self.identity_trace["check_s"] if s > 0]
            steps = [step for step, s in zip(self.identity_trace["steps"], self.identity_trace["check_s"]) if s > 0]
            count = sum(step <= until for step in steps)
            return self.clip_setup_s + (count * float(np.median(charged)) if count else 0.0)
        return 0.0

    def variant_timing(self, variant: str, stop_step: int, save_s: float) -> Dict[str, float]:
        return variant_timing(self.setup_s, self.train_step_s, stop_step, self.monitor_seconds(variant, stop_step),
                              save_s)


def variant_timing(setup_s: float, train_step_s: Sequence[float], stop_step: int, monitor_s: float,
                   save_s: float) -> Dict[str, float]:
    """A variant's wall time from the parts of its trajectory: setup, its training steps (each at the trajectory's
    median step time, so that load changing during the run cannot make an early stop look faster than its share
    of the steps), its own rule's time and the save.

    >>> variant_timing(1.0, [0.5] * 9 + [5.0], 4, 0.25, 0.1)["wall_time_s"]
    3.35
    """
    train_s = stop_step * float(np.median(train_step_s)) if stop_step else 0.0
    return {
        "wall_time_s": round(setup_s + train_s + monitor_s + save_s, 3),
        "setup_s": round(setup_s, 3),
        "train_s": round(train_s, 3),
        "monitor_s": round(monitor_s, 3),
        "save_s": round(save_s, 3),
    }

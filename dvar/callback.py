"""``DVAREarlyStopping``: the drop-in callback for diffusers/accelerate training loops."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from .batch import FixedEvalBatch
from .config import DVARConfig, default_band_labels
from .objectives import DiffusionObjective, LossConfig, Objective
from .reporting import (
    SUMMARY_FILE,
    HistoryRow,
    format_statistic,
    history_csv,
    plot_or_explain,
    stop_message,
    summary_json,
    write_atomically,
)
from .rules import StopKind, StopRule, timestep_bands
from .stride import EvalEvery, StrideProbe, overhead_target, resolve_eval_every

#: the layout of :meth:`DVAREarlyStopping.state_dict` (1: dvar 0.1, without this key)
STATE_VERSION = 2

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Put modules in eval mode (no dropout), then restore every submodule's own mode.

    The same flags as ``module.eval()`` / ``module.train(mode)``, set directly: those walk the
    tree through ``Module.__setattr__``, ~15 us per submodule (about 15 ms per evaluation on a
    LoRA UNet with 900 submodules, most of an evaluation's Python cost). A module whose class
    overrides ``train()`` (e.g. transformers' ``PreTrainedModel``) still gets its own method.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    >>> net[1].eval()  # a submodule the user keeps in eval mode stays so
    Dropout(p=0.5, inplace=False)
    >>> with eval_mode([net]):
    ...     [m.training for m in net.modules()]
    [False, False, False]
    >>> [m.training for m in net.modules()]
    [True, True, False]
    """
    saved: Dict[int, Tuple[torch.nn.Module, bool]] = {}
    for root in modules:
        for module in root.modules():
            saved.setdefault(id(module), (module, module.training))
    custom = [m for m, _ in saved.values() if type(m).train is not torch.nn.Module.train]

    def set_modes(eval_now: bool) -> None:
        for module in custom:
            module.train(False if eval_now else saved[id(module)][1])
        for module, training in saved.values():
            object.__setattr__(module, "training", False if eval_now else training)  # what Module.train sets

    set_modes(True)
    try:
        yield
    finally:
        set_modes(False)


class DVAREarlyStopping:
    """Stop training when the loss on a frozen batch stops improving (DVAR, Voronov et al. 2023).

    Call :meth:`step` once per optimizer step; every ``eval_every`` steps it evaluates the training
    objective on a batch whose images, latents, noise, captions and timesteps were frozen at the start,
    feeds the loss to the rule (:mod:`dvar.rules`), and returns True, on every process at the same step,
    once the rule fires. After a True, :attr:`diverged` tells a divergence (a NaN/inf frozen-batch or
    training loss: the weights are broken, the run failed) from a plateau (the concept is learned).

    ``eval_every="auto"`` (the default) evaluates every ``max(1, window // 30)`` steps (10 / 14 / 6 for
    the TI / LoRA / CD presets): deterministic, so every machine stops at the same step; ``eval_every=1``
    is the paper's setting; ``eval_every="5%"`` times the first steps and then fixes the smallest stride
    at which evaluating costs at most 5% of the training time (:class:`~dvar.stride.StrideProbe`).

    Args:
        unet, transformer: the denoiser (diffusers class).
        vae: encodes the frozen images once.
        text_encoder, tokenizer, text_encoder_2, tokenizer_2: text side (SD: one; SDXL/Flux: two).
        noise_scheduler: the training noise scheduler.
        train_dataset: the training dataset or DataLoader (first K examples in order); each item a dict
            with ``pixel_values`` (C,H,W in [-1, 1]) and ``input_ids`` or a caption (see :mod:`dvar.batch`).
        accelerator: an ``accelerate.Accelerator``: device, autocast, trackers, multi-process.
        loss: the script's loss options (:class:`~dvar.LossConfig`, e.g. ``LossConfig.from_args(args)``).
        config: a :class:`~dvar.DVARConfig`; or give its fields as keywords (``preset=...``, ...).
        objective, models, prompt_encoder, eval_batch: for custom losses and batches (e.g. kohya's, in
            ``dvar.integrations.kohya``): ``objective(models, batch) -> loss``; ``eval_batch`` has
            ``next()``, ``shard(rank, world)``, ``len()``, ``state_dict()``/``load_state_dict()``.

    Example (inside a diffusers training script)::

        stopper = DVAREarlyStopping(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    noise_scheduler=noise_scheduler, train_dataset=train_dataset,
                                    preset="textual_inversion", accelerator=accelerator)
        accelerator.register_for_checkpointing(stopper)
        ...
        if stopper.step(global_step, loss): break   # after each optimizer step, on every process
    """

    def __init__(
        self,
        *,
        unet: Optional[torch.nn.Module] = None,
        transformer: Optional[torch.nn.Module] = None,
        vae: Optional[torch.nn.Module] = None,
        text_encoder: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        text_encoder_2: Optional[torch.nn.Module] = None,
        tokenizer_2: Any = None,
        noise_scheduler: Any = None,
        train_dataset: Any = None,
        accelerator: Any = None,
        loss: Optional[LossConfig] = None,
        objective: Optional[Objective] = None,
        models: Optional[Mapping[str, torch.nn.Module]] = None,
        prompt_encoder: Any = None,
        eval_batch: Any = None,
        config: Optional[DVARConfig] = None,
        **config_kwargs: Any,
    ) -> None:
        if config is not None and config_kwargs:
            raise TypeError("Pass either config=DVARConfig(...) or its fields as keywords, not both.")
        config = config or DVARConfig(**config_kwargs)
        self.window, self.threshold = config.resolved_window_threshold()
        self.eval_every_setting: EvalEvery = config.eval_every
        self.config = replace(config, eval_every=config.resolved_eval_every())  # None: chosen from timings
        target = overhead_target(config.eval_every)
        self._probe = StrideProbe(target) if target is not None else None
        self.stride_timing: Optional[Dict[str, float]] = None
        if train_dataset is None and eval_batch is None:
            raise ValueError("DVAREarlyStopping needs the training dataset (train_dataset=...) to freeze its batch.")
        self.accelerator = accelerator
        self.loss = loss or LossConfig()

        named = {"unet": unet, "transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        self.models: Dict[str, torch.nn.Module] = {k: v for k, v in named.items() if v is not None}
        self.models.update(models or {})
        if objective is None:
            if unet is None and transformer is None:
                raise ValueError("Pass the denoiser (unet= or transformer=), or a custom objective=.")
            if noise_scheduler is None:
                raise ValueError("The diffusion objective needs noise_scheduler=.")
            objective = DiffusionObjective(
                noise_scheduler, prompt_encoder, tokenizer, tokenizer_2, weighting_scheme=self.loss.weighting_scheme,
                snr_gamma=self.loss.snr_gamma, guidance_scale=self.loss.guidance_scale,
                max_sequence_length=self.loss.max_sequence_length,
            )
        because = f" ({config.default_rule_text})" if config.uses_default else ""
        if self.config.per_example and not hasattr(objective, "per_example_losses"):
            raise ValueError(f"signal={self.config.signal!r}{because} needs each frozen example's loss, but the "
                             f"objective {type(objective).__name__} has no per_example_losses(models, batch); add it, "
                             "or use signal='loss'.")
        self.objective = objective
        self._reference: Optional[List[float]] = None
        self.eval_batch = eval_batch if eval_batch is not None else FixedEvalBatch(
            train_dataset,
            vae=_unwrap(vae, accelerator) if vae is not None else None,
            noise_scheduler=noise_scheduler,
            batch_size=self.config.eval_batch_size,
            seed=self.config.seed,
            resample=self.config.resample,
            timestep_density=self.loss.timestep_density(),
        )
        self._bands: Optional[List[List[int]]] = None
        self._band_labels: Optional[List[str]] = None
        if self.config.signal == "bands":
            timesteps = getattr(getattr(self.eval_batch, "frozen", None), "timesteps", None)
            if timesteps is not None:
                self._set_bands([float(t) for t in timesteps])
            elif not getattr(objective, "reports_timesteps", False):
                raise ValueError(
                    f"signal='bands'{because} groups the frozen examples by their timesteps, but this evaluation batch "
                    f"({type(self.eval_batch).__name__}) does not say what they are, nor does the objective "
                    f"({type(objective).__name__}) report them; use signal='normalized'.")
            # else: banded at the first evaluation, by the timesteps the objective reports there (kohya's)
        # Before a timed stride is chosen nothing is evaluated: the rule is remade by _set_stride.
        self.rule: StopRule = self.config.make_rule(self.eval_every or 1, self._band_labels)
        self.history: List[HistoryRow] = []
        self.stop_step: Optional[int] = None
        self.stop_kind: Optional[StopKind] = None
        self.reason: Optional[str] = None
        self.last_finite_step: Optional[int] = None
        self.eval_seconds = 0.0
        self._plain_models: Optional[Dict[str, torch.nn.Module]] = None
        self._cache_prompt_embeddings()

    # -- the decision ----------------------------------------------------------------------

    def step(self, global_step: int, train_loss: Any = None) -> bool:
        """Call once per optimizer step (after ``optimizer.step()``), on every process; True means stop now.

        The evaluation is split across processes and the decision agreed, so all return the same value at
        the same step. A NaN/inf frozen-batch loss, or training loss given here, stops the run as diverged.
        """
        if self.should_stop:
            return True
        if self.eval_every is None:  # eval_every="5%": these first steps are timed, then the stride is fixed
            self._probe_stride()
            return False
        if global_step % self.eval_every != 0 or (self.history and global_step <= self.history[-1].step):
            return False  # not an evaluation step, or already evaluated (e.g. called twice)
        eval_loss, per_example = self._evaluate()
        signal, watched = self._signal(eval_loss, per_example)
        train_value = _to_float(train_loss)
        rule_fired = self.rule.update(watched)
        train_diverged = self._train_loss_diverged(train_loss, train_value)
        votes = self._all_reduce_sum([float(rule_fired), float(train_diverged)], self._device())
        finite = math.isfinite(signal) and votes[1] == 0
        self._record(HistoryRow(global_step, eval_loss, self.rule.statistic, train_value, signal), finite)
        if votes[1] > 0:
            where = "" if train_diverged else " on another process"
            self._stop(global_step, StopKind.NON_FINITE,
                       f"non-finite: the training loss became {train_value if train_diverged else 'nan'}{where}")
        elif votes[0] > 0:
            reason = self.rule.reason or "stopped by another process"
            if self.eval_every > 1 and not self.rule.diverged:
                reason += f" (evaluated every {self.eval_every} steps)"
            self._stop(global_step, self.rule.stop_kind or self.rule.fires_with, reason)
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.stop_step is not None

    @property
    def diverged(self) -> bool:
        """True when the run stopped because a loss stopped being finite: a failure, not a learned concept."""
        return self.stop_kind is StopKind.NON_FINITE

    @property
    def eval_every(self) -> Optional[int]:
        """The stride k in optimizer steps (resolved from ``"auto"``; None while a timed stride is not chosen)."""
        return self.config.eval_every

    def _train_loss_diverged(self, train_loss: Any, value: float) -> bool:
        """A given training loss that is NaN/inf, under the ``nonfinite`` policy (the rule's, for its own loss)."""
        if train_loss is None or math.isfinite(value) or self.config.nonfinite == "skip":
            return False
        if self.config.nonfinite == "raise":
            raise FloatingPointError(f"DVAR got a non-finite training loss ({value}).")
        return True

    def _record(self, row: HistoryRow, finite: bool) -> None:
        self.history.append(row)
        if finite:
            self.last_finite_step = row.step
        if self.accelerator is not None:
            self.accelerator.log({"dvar/eval_loss": row.eval_loss, "dvar/statistic": row.statistic}, step=row.step)

    def _stop(self, global_step: int, kind: StopKind, reason: str) -> None:
        self.stop_step, self.stop_kind, self.reason = global_step, kind, reason
        if self.config.verbose and self.rank_and_world[0] == 0:
            (logger.error if self.diverged else logger.info)(self.status_line())

    # -- evaluating --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """The objective on the frozen batch, split across processes and averaged over all examples."""
        return self._evaluate()[0]

    @torch.no_grad()
    def _evaluate(self) -> Tuple[float, Optional[List[float]]]:
        """(the batch loss, with ``signal="normalized"`` each frozen example's loss, gathered from all processes)."""
        started = time.perf_counter()
        rank, world = self.rank_and_world
        batch = self.eval_batch.next()
        shard = batch.shard(rank, world)
        if self._plain_models is None:  # unwrapping walks the model (compiled regions): once, not per evaluation
            self._plain_models = {name: _unwrap(module, self.accelerator) for name, module in self.models.items()}
        per_example = self.config.per_example
        # the units whose losses the normalized signal follows: examples (kohya: its batches), placed by shard_start
        units = batch.shard_start(world, world) if per_example else 1
        banding = self.config.signal == "bands" and self._bands is None  # the timesteps come with this evaluation
        local = [0.0] * (2 * units if banding else units)
        weighted = 0.0
        if len(shard):
            with eval_mode(self._plain_models.values()), self._autocast():
                if per_example:  # each process fills its own positions; the sum gathers them
                    first = batch.shard_start(rank, world)
                    result = self.objective.per_example_losses(self._plain_models, shard)
                    losses = [float(x) for x in result.losses.detach().double().cpu()]
                    local[first:first + len(losses)] = losses
                    if banding:
                        timesteps = [float(t) for t in result.timesteps.detach().double().cpu()]
                        local[units + first:units + first + len(timesteps)] = timesteps
                    weighted = float(result.loss) * len(shard)
                else:
                    weighted = float(self.objective(self._plain_models, shard)) * len(shard)
        totals = self._all_reduce_sum(local + [weighted, float(len(shard))], self._device())
        self.eval_seconds += time.perf_counter() - started
        if banding:
            self._set_bands(totals[units:2 * units])
        return totals[-2] / totals[-1], (totals[:units] if per_example else None)

    def _signal(self, loss: float, per_example: Optional[List[float]]) -> Tuple[float, Any]:
        """(the signal, for the history and the plot; what the rule takes). The signal is the loss, or the mean of
        each example's loss over its first value (the first evaluation's losses are the reference, kept in the
        checkpoint); with ``signal="bands"`` the rule takes that mean within each timestep band."""
        if per_example is None:
            return loss, loss
        if self._reference is None:
            self._reference = list(per_example)
        # an example whose first loss was 0 cannot be normalised: it counts as 1 (or NaN, if its loss stops being finite)
        ratios = [x / r if r > 0 else x * 0.0 + 1.0 for x, r in zip(per_example, self._reference)]
        signal = sum(ratios) / len(ratios)
        if self._bands is None:
            return signal, signal
        return signal, [sum(ratios[i] for i in band) / len(band) for band in self._bands]

    def _set_bands(self, timesteps: List[float]) -> None:
        """``signal="bands"``: the frozen examples' timestep bands (:func:`~dvar.rules.timestep_bands`) and the
        rule's band names."""
        self._fit_bands(len(timesteps))
        if len(timesteps) < self.config.bands or not all(math.isfinite(t) for t in timesteps):
            raise ValueError(f"signal='bands' needs a finite timestep for each of at least {self.config.bands} frozen "
                             f"examples (got {timesteps}); use signal='normalized'.")
        bands = timestep_bands(timesteps, self.config.bands)
        names = default_band_labels(self.config.bands)
        labels = [f"{name} (t {timesteps[band[0]]:g}" + (f"-{timesteps[band[-1]]:g})" if len(band) > 1 else ")")
                  for name, band in zip(names, bands)]
        self._use_bands(bands, labels)

    def _fit_bands(self, frozen_examples: int) -> None:
        """Under the default rule, watch at most one band per frozen example (kohya's count is known only at the
        first evaluation or from a checkpoint: the rule, which has seen nothing yet, is remade)."""
        bands = self.config.default_bands(frozen_examples)
        if bands == self.config.bands:
            return
        self.config = replace(self.config, bands=bands)
        if hasattr(self, "rule"):
            self.rule = self.config.make_rule(self.eval_every or 1)

    def _use_bands(self, bands: List[List[int]], labels: List[str]) -> None:
        self._bands, self._band_labels = bands, labels
        rule = getattr(self, "rule", None)  # (not made yet in __init__: make_rule takes the labels)
        while rule is not None and not hasattr(rule, "labels"):  # the AllSettled inside a NotBefore
            rule = getattr(rule, "inner", None)
        if rule is not None:
            rule.labels = list(labels)

    def _probe_stride(self) -> None:
        """``eval_every="5%"``: tick the step clock; once enough steps are timed, time an evaluation and fix
        the stride (timings averaged over ranks, so all choose the same k)."""
        self._synchronize()  # CUDA runs ahead of Python: a step's clock is its kernels' end, not their launch
        self._probe.tick(time.perf_counter())
        if not self._probe.ready:
            return
        eval_seconds = min(self._timed_evaluation() for _ in range(2))  # the first also pays one-time setup
        _, world = self.rank_and_world
        totals = self._all_reduce_sum([eval_seconds, self._probe.step_seconds], self._device())
        stride, self.stride_timing = self._probe.choose(*(total / world for total in totals))
        self._set_stride(stride)

    def _timed_evaluation(self) -> float:
        self._synchronize()  # the training step's queued kernels are not the evaluation's cost
        started = time.perf_counter()
        self.evaluate()  # ends in float(loss): synchronized
        return time.perf_counter() - started

    def _set_stride(self, eval_every: Optional[int]) -> None:
        self.config = replace(self.config, eval_every=eval_every)
        self.rule = self.config.make_rule(eval_every or 1, self._band_labels)
        if eval_every is None and self._probe is not None:
            self._probe = StrideProbe(self._probe.target)

    def _synchronize(self) -> None:
        device = self._device()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _cache_prompt_embeddings(self) -> None:
        """Encode the frozen prompts now when the text side is frozen, and let go of the text
        encoders: a script may free them right after (the Flux script deletes its T5)."""
        frozen = getattr(self.eval_batch, "frozen", None)
        if not isinstance(self.objective, DiffusionObjective) or frozen is None:
            return
        rank, world = self.rank_and_world
        shard = frozen.shard(rank, world)
        if not len(shard):
            return
        models = {name: _unwrap(module, self.accelerator) for name, module in self.models.items()}
        with torch.no_grad(), eval_mode(models.values()), self._autocast():
            cached = self.objective.cache_prompt_embeddings(models, shard)
        if cached:
            for key in self.objective.text_encoder_keys(models):
                self.models.pop(key, None)

    def _autocast(self) -> Any:
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    @property
    def rank_and_world(self) -> Tuple[int, int]:
        if self.accelerator is not None:
            return self.accelerator.process_index, self.accelerator.num_processes
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _all_reduce_sum(self, values: List[float], device: torch.device) -> List[float]:
        _, world = self.rank_and_world
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            if self.accelerator is not None:
                tensor = self.accelerator.reduce(tensor, reduction="sum")
            else:
                torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def _device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cpu")
        module = next(iter(self.models.values()), None)
        return next(module.parameters()).device if module is not None else torch.device("cpu")

    # -- reporting ---------------------------------------------------------------------------

    def progress_postfix(self) -> Dict[str, str]:
        """Short fields for a tqdm progress bar: the frozen-batch loss and the statistic vs its threshold."""
        if not self.history:
            return {}
        row = self.history[-1]
        return {"dvar_loss": f"{row.eval_loss:.4f}", "dvar": f"{format_statistic(row.statistic)}/{self.threshold:g}"}

    def status_line(self) -> str:
        """One line: where and why it stopped (with the budget when it is known), or that it did not."""
        if self.should_stop:
            return stop_message(self.stop_step, self.config.max_train_steps, self.reason, self.diverged)
        last = self.history[-1] if self.history else None
        value = format_statistic(last.statistic if last else math.nan)
        held = self.rule.waiting_for
        return (f"DVAR did not stop: {len(self.history)} evaluations, last at step {last.step if last else '-'}, "
                f"{self.rule.statistic_name} = {value} ({self.rule.threshold_text})"
                + (f", but not settled: {held}" if held else ""))

    def report(self) -> str:
        """Print :meth:`status_line` on the main process (every process returns it).

        Example:
            >>> stopper.report()  # doctest: +SKIP
            DVAR stopped training at step 346 of 600 (254 steps, 42% of the budget, saved): plateau: ...
        """
        line = self.status_line()
        if self.rank_and_world[0] == 0:
            print(line, flush=True)
        return line

    def summary(self, max_train_steps: Optional[int] = None) -> Dict[str, Any]:
        """The outcome as a dict (what ``dvar_summary.json`` holds); the budget defaults to the config's."""
        max_train_steps = max_train_steps if max_train_steps is not None else self.config.max_train_steps
        out: Dict[str, Any] = {
            "stopped_early": self.should_stop and not self.diverged,
            "diverged": self.diverged,
            "stop_step": self.stop_step,
            "stop_kind": None if self.stop_kind is None else self.stop_kind.value,
            "reason": self.reason,
            "last_finite_step": self.last_finite_step,
            "rule": self.rule.name,
            "preset": self.config.rule_preset,
            "default_rule": self.config.uses_default,
            "rule_settings": self.rule.settings(),
            "statistic": self.rule.statistic_name,
            "window": self.window,
            "threshold": self.threshold,
            "eval_every": self.eval_every,
            "eval_every_setting": self.eval_every_setting,
            **({"eval_every_timing": self.stride_timing} if self.stride_timing is not None else {}),
            "eval_batch_size": len(self.eval_batch) if hasattr(self.eval_batch, "__len__") else None,
            **({"signal": self.config.signal} if self.config.signal != "loss" else {}),
            **({"bands": self._band_labels} if self._band_labels is not None else {}),
            "num_evaluations": len(self.history),
            "eval_seconds": round(self.eval_seconds, 3),
            "message": self.status_line(),
        }
        if max_train_steps is not None:
            out["max_train_steps"] = max_train_steps
            out["steps_saved"] = max_train_steps - self.stop_step if self.should_stop and not self.diverged else 0
        return out

    def save_history(
        self, output_dir: str, plot: bool = True, prefix: str = "dvar_history", summary: bool = True
    ) -> List[Path]:
        """Write the history to ``<prefix>.csv`` (the stop row carries its ``stop_reason``), the plot
        ``<prefix>.png`` (with matplotlib) and, with ``summary``, :meth:`summary` to ``dvar_summary.json``;
        each file is written whole or not at all. Returns the paths written."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [write_atomically(out / f"{prefix}.csv",
                                  history_csv(self.history, self.eval_every, self.stop_step, self.reason))]
        if plot:
            figure = plot_or_explain(self.history, self.rule, self.stop_step, out / f"{prefix}.png")
            paths += [figure] if figure is not None else []
        if summary:
            paths.append(write_atomically(out / SUMMARY_FILE, summary_json(self.summary())))
        return paths

    # -- checkpointing -----------------------------------------------------------------------

    def _settings(self) -> Dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this callback."""
        config = self.config
        return {
            "window": self.window,
            "threshold": self.threshold,
            "eval_every": self.eval_every,
            "eval_batch_size": config.eval_batch_size,
            "seed": config.seed,
            "resample": sorted(config.resample),
            "signal": config.signal,
            **({"bands": config.bands} if config.signal == "bands" else {}),
        }

    def state_dict(self) -> Dict[str, Any]:
        """State for ``accelerator.register_for_checkpointing`` (plain Python types and tensors)."""
        return {
            "version": STATE_VERSION,
            "settings": self._settings(),
            "rule": self.rule.state_dict(),
            "eval_batch": self.eval_batch.state_dict(),
            "history": [asdict(row) for row in self.history],
            "stop_step": self.stop_step,
            "stop_kind": None if self.stop_kind is None else self.stop_kind.value,
            "reason": self.reason,
            "last_finite_step": self.last_finite_step,
            "eval_seconds": self.eval_seconds,
            "stride_timing": self.stride_timing,
            "reference": self._reference,
            "bands": self._bands,
            "band_labels": self._band_labels,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also one written by dvar 0.1). With ``eval_every="auto"`` or a target
        overhead the checkpoint's stride is kept (a run resumes with the k it started with, even if the
        library's ``auto`` changed or this machine is faster)."""
        state = _upgrade_state(state)
        if state["version"] > STATE_VERSION:
            raise ValueError(f"The checkpoint's DVAR state has version {state['version']}, newer than this dvar's "
                             f"({STATE_VERSION}); upgrade dvar to resume it.")
        saved_every = state["settings"]["eval_every"]
        chosen_by_library = self.eval_every_setting == "auto" or self._probe is not None
        if chosen_by_library and saved_every != self.eval_every:
            self._set_stride(None if saved_every is None else resolve_eval_every(saved_every, self.window or 1))
        if state.get("bands") is not None:
            self._fit_bands(len(state["bands"]))
        for key, value in self._settings().items():
            saved = state["settings"].get(key, "loss" if key == "signal" else None)  # no signal before dvar 0.3
            if saved != value:
                raise ValueError(
                    f"The checkpoint's DVAR {key} is {saved!r} but this run uses {value!r}; "
                    "resume with the same early-stopping settings."
                )
        self.rule.load_state_dict(state["rule"])
        self.eval_batch.load_state_dict(state["eval_batch"])
        self.history = [HistoryRow(**row) for row in state["history"]]
        self.stop_step, self.reason = state["stop_step"], state["reason"]
        self.stop_kind = None if state["stop_kind"] is None else StopKind(state["stop_kind"])
        self.last_finite_step = state["last_finite_step"]
        self.eval_seconds = state["eval_seconds"]
        self.stride_timing = state.get("stride_timing")
        self._reference = state.get("reference")
        if state.get("bands") is not None:  # (kohya's are known only from the first evaluation)
            self._use_bands([list(band) for band in state["bands"]], list(state["band_labels"]))

    def __repr__(self) -> str:
        return (
            f"DVAREarlyStopping(rule={self.rule!r}, eval_every={self.eval_every}, "
            f"evaluations={len(self.history)}, stop_step={self.stop_step})"
        )


def _upgrade_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A dvar 0.1 checkpoint (no version; ``criterion``; history rows with ``normalized_variance``) in the
    current layout."""
    if "version" in state:
        return state
    from .rules.base import stop_kind_of_reason

    history = [{"step": row["step"], "eval_loss": row["eval_loss"], "statistic": row["normalized_variance"],
                "train_loss": row["train_loss"]} for row in state["history"]]
    kind = stop_kind_of_reason(state["reason"]) if state["stop_step"] is not None else None
    finite = [row["step"] for row in history if math.isfinite(row["eval_loss"])]
    return {**{key: value for key, value in state.items() if key != "criterion"}, "version": 1,
            "rule": state["criterion"], "history": history, "stop_kind": None if kind is None else kind.value,
            "last_finite_step": finite[-1] if finite else None}


def _unwrap(module: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """The plain module behind DDP/compile wrappers: evaluation must not run DDP collectives."""
    if accelerator is not None:
        return accelerator.unwrap_model(module)
    return getattr(module, "module", module)


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)

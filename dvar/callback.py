"""``DVAREarlyStopping``: the drop-in callback for diffusers/accelerate training loops."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .batch import PARTS, FixedEvalBatch
from .criterion import (
    AUTO_EVALS_PER_WINDOW,
    AUTO_LEVEL,
    AUTO_MULTIPLE,
    DVARCriterion,
    EvalEvery,
    NonFinitePolicy,
    SettlingTimeCriterion,
    budget_stride,
    evaluations_in_window,
    overhead_target,
    resolve_eval_every,
    resolve_preset,
    stride_for_overhead,
)
from .objectives import DiffusionObjective, Objective

HISTORY_COLUMNS = ("step", "eval_loss", "normalized_variance", "train_loss")
#: eval_every="5%": training steps timed (after the first) before the stride is chosen
STRIDE_PROBE_STEPS = 10
SUMMARY_FILE = "dvar_summary.json"

logger = logging.getLogger(__name__)


def stop_message(stop_step: int, max_train_steps: Optional[int], reason: Optional[str]) -> str:
    """The one line that announces a DVAR stop (the callback's and the trainers').

    Example:
        >>> stop_message(346, 600, "plateau: var(last 310) / var(all 346) = 0.1497 < 0.15")
        'DVAR stopped training at step 346 of 600 (254 steps, 42% of the budget, saved): plateau: var(last 310) / var(all 346) = 0.1497 < 0.15'
    """
    if not max_train_steps:
        return f"DVAR stopped training at step {stop_step}: {reason}"
    saved = max_train_steps - stop_step
    return (
        f"DVAR stopped training at step {stop_step} of {max_train_steps} "
        f"({saved} steps, {saved / max_train_steps:.0%} of the budget, saved): {reason}"
    )


@dataclass
class DVARConfig:
    """Settings of :class:`DVAREarlyStopping`.

    Example:
        >>> DVARConfig(preset="textual_inversion").resolved_window_threshold()
        (310, 0.15)
    """

    preset: Optional[str] = field(
        default=None,
        metadata={"help": "Published setting: textual_inversion, custom_diffusion, dreambooth_lora or dreambooth; or "
                          "'auto': no window, stop once the run is threshold (default "
                          f"{AUTO_MULTIPLE:g}) times as long as the smoothed loss took to cover {AUTO_LEVEL:.0%} of its "
                          "drop (needs max_train_steps for its stride)."},
    )
    window: Optional[int] = field(
        default=None, metadata={"help": "N: optimizer steps in the recent-variance window (overrides the preset)."}
    )
    threshold: Optional[float] = field(
        default=None, metadata={"help": "alpha: stop when var(last N) / var(all) falls below it (overrides the preset)."}
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
        default="stop", metadata={"help": "On a NaN/inf eval loss: stop (default), skip it, or raise."}
    )
    max_train_steps: Optional[int] = field(
        default=None, metadata={"help": "The step budget, to reject a window the run can never fill."}
    )
    verbose: bool = field(
        default=True, metadata={"help": "Log the stop (one line, INFO, logger 'dvar.callback', main process)."}
    )
    # The training script's loss options, so that the frozen batch's loss is the one it trains on.
    weighting_scheme: str = field(
        default="none", metadata={"help": "SD3/Flux scripts' --weighting_scheme (loss weights or timestep density)."}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "--logit_mean (weighting_scheme='logit_normal')."})
    logit_std: float = field(default=1.0, metadata={"help": "--logit_std (weighting_scheme='logit_normal')."})
    mode_scale: float = field(default=1.29, metadata={"help": "--mode_scale (weighting_scheme='mode')."})
    snr_gamma: Optional[float] = field(default=None, metadata={"help": "DDPM scripts' --snr_gamma (min-SNR weighting)."})
    guidance_scale: Optional[float] = field(
        default=None, metadata={"help": "Flux scripts' --guidance_scale (the guidance embedding of the transformer)."}
    )
    max_sequence_length: Optional[int] = field(
        default=None, metadata={"help": "Flux scripts' --max_sequence_length (T5 tokens; default 512)."}
    )

    @property
    def is_auto(self) -> bool:
        """``preset="auto"``: the run-relative rule (:class:`~dvar.criterion.SettlingTimeCriterion`), no window."""
        return (self.preset or "").lower() == "auto"

    def resolved_window_threshold(self) -> Tuple[Optional[int], float]:
        """(window in steps, threshold); the window is None for ``preset="auto"``."""
        if self.is_auto:
            if self.window is not None:
                raise ValueError("preset='auto' sets its window from the run itself: leave window out (or pick a "
                                 "fixed-window preset).")
            threshold = AUTO_MULTIPLE if self.threshold is None else self.threshold
            SettlingTimeCriterion(threshold, AUTO_LEVEL)  # validates it
            self.resolved_eval_every()
            return None, threshold
        preset = resolve_preset(self.preset) if self.preset else None
        window = self.window if self.window is not None else (preset.window if preset else None)
        threshold = self.threshold if self.threshold is not None else (preset.threshold if preset else None)
        if window is None or threshold is None:
            raise ValueError("Give DVAR a preset (e.g. preset='textual_inversion' or 'auto') or both window and threshold.")
        DVARCriterion(window, threshold)  # validates both, with the criterion's own messages
        if overhead_target(self.eval_every) is None:  # validates a percentage
            resolve_eval_every(self.eval_every, window)  # validates it
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
                raise ValueError("preset='auto' derives its evaluation stride from the step budget: pass "
                                 "max_train_steps (or an explicit eval_every).")
            return budget_stride(self.max_train_steps)
        return resolve_eval_every(self.eval_every, 1)


@dataclass
class HistoryRow:
    step: int
    eval_loss: float
    normalized_variance: float
    train_loss: float


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
    """Stop training when the loss on a frozen batch plateaus (DVAR, Voronov et al. 2023).

    Call :meth:`step` once per optimizer step; it evaluates the training objective on
    the frozen batch (every ``eval_every`` steps) and returns True, on every process at
    the same step, once ``var(last window) / var(all) < threshold``.

    ``eval_every="auto"`` (the default) evaluates every ``max(1, window // 30)`` steps
    (10 / 14 / 6 for the TI / LoRA / CD presets): a deterministic stride (the same stop on any
    machine) that moves the stop by a few steps at a fraction of the every-step cost
    (``benchmarks/stride.py``); ``eval_every=1`` is the paper's setting. After construction
    ``config.eval_every`` holds the resolved stride k (``eval_every_setting`` what was asked).
    ``eval_every="5%"`` instead times the first steps and one evaluation, then fixes the smallest k
    at which evaluating costs at most 5% of the training time (:func:`~dvar.criterion.stride_for_overhead`;
    ``summary()["eval_every_timing"]`` records what was measured). The evaluations start after that
    probe and the stop then depends on the machine's timings: use it when wall time matters more than
    a stop that every machine reproduces.

    Args:
        unet, transformer: the denoiser (diffusers class).
        vae: encodes the frozen images once.
        text_encoder, tokenizer, text_encoder_2, tokenizer_2: text side (SD: one; SDXL: two).
        noise_scheduler: the training noise scheduler.
        train_dataset: the training dataset or DataLoader (first K examples in order).
        eval_batch: instead of ``train_dataset``, a frozen batch built by the caller (anything with
            ``next()`` returning a batch with ``shard(rank, world)`` and ``len()``, plus
            ``state_dict()``/``load_state_dict()``), e.g. kohya's own batches in
            ``dvar.integrations.kohya``; pair it with a custom ``objective``.
        accelerator: an ``accelerate.Accelerator``: device, autocast, trackers, multi-process.
        objective: a custom ``(models, batch) -> loss``; default: the diffusion loss.
        models: extra named modules for a custom objective (put in eval mode while evaluating).
        config: a :class:`DVARConfig`; or give its fields as keyword arguments (the preset or
            window/threshold, the budget, and the training script's loss options:
            ``snr_gamma``, ``weighting_scheme``, ``guidance_scale``, ``max_sequence_length``...).

    At the stop it logs one line (INFO, main process; :meth:`report` prints it) and
    :meth:`save_history` writes the history, its plot and ``dvar_summary.json``.

    Example (inside a diffusers training script)::

        stopper = DVAREarlyStopping(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    noise_scheduler=noise_scheduler, train_dataset=train_dataset,
                                    preset="textual_inversion", accelerator=accelerator)
        accelerator.register_for_checkpointing(stopper)
        ...
        if stopper.step(global_step, loss): break   # after each optimizer step
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
        self.overhead_target = overhead_target(config.eval_every)
        self.stride_timing: Optional[Dict[str, float]] = None
        self._step_clock: List[float] = []
        if train_dataset is None and eval_batch is None:
            raise ValueError("DVAREarlyStopping needs the training dataset (train_dataset=...) to freeze its batch.")
        self.accelerator = accelerator

        named = {"unet": unet, "transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        self.models: Dict[str, torch.nn.Module] = {k: v for k, v in named.items() if v is not None}
        self.models.update(models or {})
        if objective is None:
            if unet is None and transformer is None:
                raise ValueError("Pass the denoiser (unet= or transformer=), or a custom objective=.")
            if noise_scheduler is None:
                raise ValueError("The diffusion objective needs noise_scheduler=.")
            cfg = self.config
            objective = DiffusionObjective(
                noise_scheduler, prompt_encoder, tokenizer, tokenizer_2, weighting_scheme=cfg.weighting_scheme,
                snr_gamma=cfg.snr_gamma, guidance_scale=cfg.guidance_scale, max_sequence_length=cfg.max_sequence_length,
            )
        self.objective = objective

        self.criterion = self._make_criterion()
        self.eval_batch = eval_batch if eval_batch is not None else FixedEvalBatch(
            train_dataset,
            vae=_unwrap(vae, accelerator) if vae is not None else None,
            noise_scheduler=noise_scheduler,
            batch_size=self.config.eval_batch_size,
            seed=self.config.seed,
            resample=self.config.resample,
            timestep_density=_timestep_density(self.config),
        )
        self.history: List[HistoryRow] = []
        self.stop_step: Optional[int] = None
        self.reason: Optional[str] = None
        self.eval_seconds = 0.0
        self._plain_models: Optional[Dict[str, torch.nn.Module]] = None
        self._cache_prompt_embeddings()

    def _make_criterion(self) -> Any:
        if self.window is None:  # preset="auto"
            return SettlingTimeCriterion(self.threshold, AUTO_LEVEL, nonfinite=self.config.nonfinite)
        # The criterion counts evaluations; the window is meant in optimizer steps. (Before a timed stride
        # is chosen nothing is evaluated: the criterion is remade by _set_stride.)
        evals_in_window = evaluations_in_window(self.window, self.eval_every or 1)
        return DVARCriterion(evals_in_window, self.threshold, nonfinite=self.config.nonfinite)

    @property
    def eval_every(self) -> Optional[int]:
        """The stride k in optimizer steps this stopper evaluates at (resolved from ``"auto"``; None while a
        target overhead's stride is not chosen yet)."""
        return self.config.eval_every

    def _set_stride(self, eval_every: Optional[int]) -> None:
        self.config = replace(self.config, eval_every=eval_every)
        self.criterion = self._make_criterion()
        self._step_clock = []

    def _choose_stride_from_timings(self) -> None:
        """``eval_every="5%"``: time STRIDE_PROBE_STEPS training steps (between calls of :meth:`step`) and an
        evaluation, then fix the stride. Ranks average their timings, so all of them choose the same k."""
        self._synchronize()  # CUDA runs ahead of Python: a step's clock is its kernels' end, not their launch
        self._step_clock.append(time.perf_counter())
        if len(self._step_clock) <= STRIDE_PROBE_STEPS:
            return
        step_seconds = float(np.median(np.diff(self._step_clock)))
        eval_seconds = min(self._timed_evaluation() for _ in range(2))  # the first also pays one-time setup
        _, world = self.rank_and_world
        eval_seconds, step_seconds = (v / world for v in self._all_reduce_sum([eval_seconds, step_seconds], self._device()))
        self._set_stride(stride_for_overhead(eval_seconds, step_seconds, self.overhead_target))
        self.stride_timing = {"target": self.overhead_target, "eval_seconds": round(eval_seconds, 6),
                              "step_seconds": round(step_seconds, 6), "probe_steps": STRIDE_PROBE_STEPS}

    def _timed_evaluation(self) -> float:
        self._synchronize()  # the training step's queued kernels are not the evaluation's cost
        started = time.perf_counter()
        self.evaluate()  # ends in float(loss): synchronized
        return time.perf_counter() - started

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

    # -- the decision --------------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        return self.stop_step is not None

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

    @torch.no_grad()
    def evaluate(self) -> float:
        """The objective on the frozen batch, split across processes and averaged over all examples."""
        started = time.perf_counter()
        rank, world = self.rank_and_world
        batch = self.eval_batch.next()
        shard = batch.shard(rank, world)
        if self._plain_models is None:  # unwrapping walks the model (compiled regions): once, not per evaluation
            self._plain_models = {name: _unwrap(module, self.accelerator) for name, module in self.models.items()}
        models = self._plain_models
        local_sum = 0.0
        if len(shard):
            with eval_mode(models.values()), self._autocast():
                local_sum = float(self.objective(models, shard)) * len(shard)
        total, count = self._all_reduce_sum([local_sum, float(len(shard))], self._device())
        self.eval_seconds += time.perf_counter() - started
        return total / count

    def step(self, global_step: int, train_loss: Any = None) -> bool:
        """Call once per optimizer step (after ``optimizer.step()``); True means stop now.

        Every process must call it at every step: the evaluation is split across them and
        the decision is agreed, so all return the same value at the same step.
        """
        if self.should_stop:
            return True
        if self.eval_every is None:  # eval_every="5%": these first steps are timed, then the stride is fixed
            self._choose_stride_from_timings()
            return False
        if global_step % self.eval_every != 0 or (self.history and global_step <= self.history[-1].step):
            return False  # not an evaluation step, or already evaluated (e.g. called twice)
        eval_loss = self.evaluate()
        local_stop = self.criterion.update(eval_loss)
        stop = self._all_reduce_sum([float(local_stop)], self._device())[0] > 0
        row = HistoryRow(global_step, eval_loss, self.criterion.normalized_variance, _to_float(train_loss))
        self.history.append(row)
        if self.accelerator is not None:
            self.accelerator.log(
                {"dvar/eval_loss": eval_loss, "dvar/normalized_variance": row.normalized_variance}, step=global_step
            )
        if stop:
            self.stop_step = global_step
            self.reason = self.criterion.reason or "stopped by another process"
            if self.eval_every > 1 and self.reason.startswith(("plateau", "settled")):
                self.reason += f" (evaluated every {self.eval_every} steps)"
            if self.config.verbose and self.rank_and_world[0] == 0:
                logger.info(self.status_line())
        return stop

    # -- reporting -----------------------------------------------------------------------

    @property
    def normalized_variance(self) -> float:
        return self.criterion.normalized_variance

    def progress_postfix(self) -> Dict[str, str]:
        """Short fields for a tqdm progress bar: frozen-batch loss and nvar vs threshold."""
        if not self.history:
            return {}
        row = self.history[-1]
        nvar = "n/a" if math.isnan(row.normalized_variance) else f"{row.normalized_variance:.3f}"
        return {"dvar_loss": f"{row.eval_loss:.4f}", "nvar": f"{nvar}/{self.threshold:g}"}

    def status_line(self) -> str:
        """One line: where and why DVAR stopped (with the budget when it is known), or that it did not."""
        if self.should_stop:
            return stop_message(self.stop_step, self.config.max_train_steps, self.reason)
        last = self.history[-1] if self.history else None
        nvar = "n/a" if last is None or math.isnan(last.normalized_variance) else f"{last.normalized_variance:.4g}"
        if self.window is None:  # preset="auto" stops when its statistic rises to the threshold
            statistic, stops_at = "evaluations / settling time", f"stops at {self.threshold:g}"
        else:
            statistic, stops_at = f"var(last {self.window}) / var(all)", f"stops below {self.threshold:g}"
        return (
            f"DVAR did not stop: {len(self.history)} evaluations, last at step {last.step if last else '-'}, "
            f"{statistic} = {nvar} ({stops_at})"
        )

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
            "stopped_early": self.should_stop,
            "stop_step": self.stop_step,
            "reason": self.reason,
            "rule": "auto" if self.window is None else "window",
            "window": self.window,
            "threshold": self.threshold,
            "eval_every": self.eval_every,
            "eval_every_setting": self.eval_every_setting,
            **({"eval_every_timing": self.stride_timing} if self.stride_timing is not None else {}),
            "num_evaluations": len(self.history),
            "eval_seconds": round(self.eval_seconds, 3),
            "message": self.status_line(),
        }
        if max_train_steps is not None:
            out["max_train_steps"] = max_train_steps
            out["steps_saved"] = max_train_steps - self.stop_step if self.stop_step is not None else 0
        return out

    def save_history(
        self, output_dir: str, plot: bool = True, prefix: str = "dvar_history", summary: bool = True
    ) -> List[Path]:
        """Write the history to ``<prefix>.csv`` (the stop row carries its ``stop_reason``), the plot
        ``<prefix>.png`` and, with ``summary``, :meth:`summary` to ``dvar_summary.json``; returns the paths."""
        from .plotting import plot_history

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / f"{prefix}.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow((*HISTORY_COLUMNS, "eval_every", "stop_reason"))
            for row in self.history:
                reason = self.reason if row.step == self.stop_step else ""
                writer.writerow([
                    row.step, repr(row.eval_loss), repr(row.normalized_variance), repr(row.train_loss), self.eval_every, reason
                ])
        paths = [csv_path]
        if plot:
            paths.append(plot_history(self.history, self.threshold, self.stop_step, out / f"{prefix}.png"))
        if summary:
            paths.append(out / SUMMARY_FILE)
            paths[-1].write_text(json.dumps(self.summary(), indent=2) + "\n")
        return paths

    # -- checkpointing -------------------------------------------------------------------

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
        }

    def state_dict(self) -> Dict[str, Any]:
        """State for ``accelerator.register_for_checkpointing`` (plain Python + one tensor)."""
        return {
            "settings": self._settings(),
            "criterion": self.criterion.state_dict(),
            "eval_batch": self.eval_batch.state_dict(),
            "history": [asdict(row) for row in self.history],
            "stop_step": self.stop_step,
            "reason": self.reason,
            "eval_seconds": self.eval_seconds,
            "stride_timing": self.stride_timing,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. With ``eval_every="auto"`` or a target overhead the checkpoint's
        stride is kept (a run resumes with the k it started with, even if the library's ``auto`` changed or
        this machine is faster; a checkpoint from before a timed stride was chosen times the steps again)."""
        saved_every = state["settings"]["eval_every"]
        chosen_by_library = self.eval_every_setting == "auto" or self.overhead_target is not None
        if chosen_by_library and saved_every != self.eval_every:
            self._set_stride(None if saved_every is None else resolve_eval_every(saved_every, self.window or 1))
        for key, value in self._settings().items():
            if state["settings"][key] != value:
                raise ValueError(
                    f"The checkpoint's DVAR {key} is {state['settings'][key]!r} but this run uses {value!r}; "
                    "resume with the same early-stopping settings."
                )
        self.criterion.load_state_dict(state["criterion"])
        self.eval_batch.load_state_dict(state["eval_batch"])
        self.history = [HistoryRow(**row) for row in state["history"]]
        self.stop_step = state["stop_step"]
        self.reason = state["reason"]
        self.eval_seconds = state["eval_seconds"]
        self.stride_timing = state.get("stride_timing")

    def __repr__(self) -> str:
        return (
            f"DVAREarlyStopping(window={self.window}, threshold={self.threshold}, eval_every={self.eval_every}, "
            f"evaluations={len(self.history)}, stop_step={self.stop_step})"
        )


def _timestep_density(config: DVARConfig) -> Any:
    """The scripts' non-uniform timestep density for ``logit_normal``/``mode``, else None (uniform)."""
    if config.weighting_scheme not in ("logit_normal", "mode"):
        return None
    from diffusers.training_utils import compute_density_for_timestep_sampling

    def density(k: int) -> torch.Tensor:
        return compute_density_for_timestep_sampling(
            weighting_scheme=config.weighting_scheme, batch_size=k, logit_mean=config.logit_mean,
            logit_std=config.logit_std, mode_scale=config.mode_scale,
        )

    return density


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

"""DVAR early stopping as a mixin for kohya-ss/sd-scripts' ``NetworkTrainer`` and its subclasses.

kohya's ``NetworkTrainer.train`` is one long method with no callbacks, but it calls overridable
methods at fixed points; the mixin uses only those:

* ``assert_extra_args`` / ``load_target_model``: keep the training dataset group and the
  accelerator; register accelerate save/load-state hooks that store the DVAR state beside
  kohya's (``dvar_state.pt``), before kohya resumes;
* ``sample_images``: called on every process, first with ``epoch=0`` before the loop (the
  batch is frozen there), then right after each ``global_step += 1`` (DVAR evaluates and
  decides there), then after each epoch;
* ``process_batch``: records what kohya passes it (models, strategies, dtypes) so that the
  frozen batch goes through the same call, with ``is_train=False`` under fixed seeds;
* ``get_sai_model_spec``: called inside kohya's ``save_model`` right after it sets
  ``ss_steps``/``ss_epoch``; its keys are merged over them.

How a stop at step S ends the run the way a run of S steps would: ``args.max_train_steps = S``
makes kohya's own ``break`` leave the epoch; each later epoch starts one iteration, in which
``process_batch`` returns the last loss with no path to the weights and turns accelerate's
``sync_gradients`` off, so the optimizer, the scheduler and ``global_step`` stay put, and kohya
breaks again. Saves, samples, validation and logs of those epochs are skipped (one line says so
instead of kohya's "epoch N/M" lines), and the final save runs with ``ss_steps = S`` (DVAR's own
count, right after a ``--resume`` too, where kohya's counter restarts) and ``ss_epoch`` = the epoch
the stop fell in.

A divergence (a NaN/inf frozen-batch or training loss) ends the run the same way, but as a failure:
the network gets back the weights of the last finite evaluation (kept on the CPU at each one), no
step, epoch or state save happens past it, kohya's final save writes those weights (or nothing, when
no evaluation was finite), and ``train`` raises :class:`KohyaTrainingDiverged` (exit 3 from the launcher).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

import torch

from dvar import DVARConfig, DVAREarlyStopping
from dvar.batch import isolated_global_rng
from dvar.reporting import SUMMARY_FILE, summary_json, write_atomically

from .diffusers_model import AsIsLoaderMixin
from .frozen import KohyaFrozenBatch, KohyaShard, item_size

STATE_FILE = "dvar_state.pt"
STATE_FORMAT = 1
NEVER = 10**9  # an epoch period no run reaches: switches off per-epoch validation after the stop


#: kohya's line at the start of every epoch, and its dataset's log record when the epoch changes; after a
#: stop one line replaces those of the idle epochs
EPOCH_LINE = re.compile(r"^\s*epoch \d+/\d+\s*$")
EPOCH_RECORD = ("library.train_util", "epoch is incremented")


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class KohyaPluginError(Exception):
    """Bad input for the kohya plugin (the launcher prints it and exits with status 2)."""


class KohyaTrainingDiverged(RuntimeError):
    """Training diverged (a NaN/inf loss): raised by ``train`` after kohya's run ended (launcher: exit 3)."""


class _NothingToSave(Exception):
    """Raised inside kohya's final ``save_model`` to keep it from writing diverged weights."""


#: What kohya's network trainers train, for dvar's default rule (:func:`dvar.rules.default_rule`).
KOHYA_METHOD = "dreambooth_lora"


def config_from_args(args: Any) -> DVARConfig:
    """The DVAR settings of kohya-style ``--early_stop_*`` flags (or TOML keys): with no preset, dvar's default
    rule for LoRA, or the ``dreambooth_lora`` preset when a window or threshold overrides it."""
    return DVARConfig(
        preset=args.early_stop_preset,
        method=KOHYA_METHOD,
        window=args.early_stop_window,
        threshold=args.early_stop_threshold,
        eval_every=args.early_stop_eval_every,
        eval_batch_size=args.early_stop_batch_size,
        signal=getattr(args, "early_stop_signal", None),
        min_steps=getattr(args, "early_stop_min_steps", None),
        flat_bands=getattr(args, "early_stop_flat_bands", None),
        max_train_steps=None if args.max_train_epochs is not None else args.max_train_steps,
        verbose=False,  # the plugin prints its own lines, through kohya's accelerator
    )


class KohyaObjective:
    """The frozen-batch objective on kohya's own loss: ``objective(models, shard)`` is the size-weighted mean
    over the frozen items, ``per_example_losses`` gives each item's loss too (``signal="normalized"``), with the
    mean timestep kohya drew for it (``signal="bands"``)."""

    #: its per_example_losses results carry ``timesteps`` (kohya draws them inside its loss, so the callback
    #: bands the items by those of the first evaluation)
    reports_timesteps = True

    def __init__(self, item_losses: Callable[[Dict[str, torch.nn.Module], KohyaShard], SimpleNamespace]) -> None:
        self.item_losses = item_losses

    def __call__(self, models: Dict[str, torch.nn.Module], shard: KohyaShard) -> torch.Tensor:
        return self.item_losses(models, shard).loss

    def per_example_losses(self, models: Dict[str, torch.nn.Module], shard: KohyaShard) -> SimpleNamespace:
        return self.item_losses(models, shard)


@dataclass
class DVARRun:
    """What the mixin keeps about one ``train(args)`` call."""

    config: DVARConfig
    started: float = field(default_factory=time.perf_counter)
    dataset: Any = None
    accelerator: Any = None
    frozen: Optional[KohyaFrozenBatch] = None
    stopper: Optional[DVAREarlyStopping] = None
    context: Optional[Dict[str, Any]] = None  # the arguments of kohya's last training process_batch
    last_loss: Optional[torch.Tensor] = None
    dvar_step: int = 0  # optimizer steps trained (survives --resume, unlike kohya's global_step)
    budget: Optional[int] = None
    kohya_stop_step: Optional[int] = None  # kohya's global_step at the stop (its loop's break)
    stop_epoch: Optional[int] = None  # known once the epoch of the stop has ended
    epoch_hint: int = 1
    loaded_state: Optional[Dict[str, Any]] = None
    steps_per_epoch: Optional[int] = None
    kept: Optional[Dict[str, torch.Tensor]] = None  # the network's weights at the last finite evaluation (CPU)
    kept_step: Optional[int] = None
    earlier_wall_time: float = 0.0  # seconds trained before a --resume
    quiet: Optional[logging.Filter] = None  # on kohya's dataset logger during the idle epochs

    @property
    def diverged(self) -> bool:
        return self.stopper is not None and self.stopper.diverged

    @property
    def model_step(self) -> Optional[int]:
        """The step whose weights kohya's final save writes after a stop (None: nothing is saved)."""
        if self.stopper is None or not self.stopper.should_stop:
            return None
        return self.kept_step if self.diverged else self.stopper.stop_step

    @property
    def stopped(self) -> bool:
        return self.kohya_stop_step is not None


class DVARTrainerMixin(AsIsLoaderMixin):
    """Adds ``--early_stop`` to a kohya ``NetworkTrainer`` (SD 1.x/2.x, SDXL, SD3, Flux).

    Build the trainer class with :func:`make_trainer_class`; without ``args.early_stop`` every
    hook passes straight through to kohya (only the diffusers-folder loader of
    :mod:`.diffusers_model` stays, for models kohya cannot convert, such as mini-SD).

    Example::

        import train_network                        # inside an sd-scripts checkout
        Trainer = make_trainer_class(train_network.NetworkTrainer)
        parser = train_network.setup_parser(); add_early_stop_arguments(parser)
        Trainer().train(parser.parse_args())
    """

    dvar_family = "sd"
    _dvar: Optional[DVARRun] = None

    # -- the run -------------------------------------------------------------------------

    def train(self, args):
        if not getattr(args, "early_stop", False):
            self._dvar = None
            return super().train(args)
        run = self._dvar = DVARRun(config=config_from_args(args))
        outcome = "error"
        try:
            try:
                result = super().train(args)
            except _NothingToSave:
                result = None
            outcome = "diverged" if run.diverged else "early_stop" if run.stopped else "budget"
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            try:
                self._dvar_finish(args, outcome)
            finally:
                run.context = run.dataset = run.kept = None  # drop the references to kohya's models and data
                if run.accelerator is not None:  # leave accelerate as kohya found it
                    run.accelerator.gradient_state._set_sync_gradients(True)  # (idle steps turned it off)
                    vars(run.accelerator).pop("print", None)  # (the idle epochs' filter)
                if run.quiet is not None:
                    logging.getLogger(EPOCH_RECORD[0]).removeFilter(run.quiet)
        if run.diverged:
            raise KohyaTrainingDiverged(self._dvar_diverged_message(args))
        return result

    # -- hooks before the loop -------------------------------------------------------------

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        if self._dvar is not None:
            self._dvar.dataset = train_dataset_group
        return super().assert_extra_args(args, train_dataset_group, val_dataset_group)

    def load_target_model(self, args, weight_dtype, accelerator):
        run = self._dvar
        if run is not None:
            run.accelerator = accelerator
            accelerator.register_save_state_pre_hook(self._dvar_save_state)
            accelerator.register_load_state_pre_hook(self._dvar_load_state)
            self._dvar_check_budget(args, accelerator)
        return super().load_target_model(args, weight_dtype, accelerator)

    def _dvar_check_budget(self, args, accelerator) -> None:
        """With --max_train_epochs the step budget is known only now: refuse a window it cannot fill, and give
        it to a rule that derives its stride from it (``auto``)."""
        run = self._dvar
        if args.max_train_epochs is None or run.dataset is None:
            return
        # kohya's own formula (train_network.py), on the DataLoader of batch size 1 over the group
        budget = args.max_train_epochs * math.ceil(
            len(run.dataset) / accelerator.num_processes / args.gradient_accumulation_steps
        )
        run.config = replace(run.config, max_train_steps=budget)
        try:
            window, _ = run.config.resolved_window_threshold()
        except ValueError as error:
            raise KohyaPluginError(f"--max_train_epochs {args.max_train_epochs} ({budget} steps): {error}") from None
        if window is not None and window > budget:  # (preset "auto" has no window)
            raise KohyaPluginError(
                f"--early_stop_window {window} is larger than the step budget of --max_train_epochs "
                f"{args.max_train_epochs} ({budget} steps): DVAR could never fire. Lower the window or train longer."
            )

    # -- hooks inside the loop --------------------------------------------------------------

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        # kohya draws each item's timesteps inside its loss: during a DVAR evaluation, note them (signal="bands")
        noted = getattr(self, "_dvar_timesteps", None)
        if noted is not None:
            noted.append(float(timesteps.detach().float().mean()))
        return super().post_process_loss(loss, args, timesteps, noise_scheduler)

    def process_batch(
        self,
        batch,
        text_encoders,
        unet,
        network,
        vae,
        noise_scheduler,
        vae_dtype,
        weight_dtype,
        accelerator,
        args,
        text_encoding_strategy,
        tokenize_strategy,
        is_train=True,
        train_text_encoder=True,
        train_unet=True,
    ):
        run = self._dvar
        if run is not None and is_train:
            if run.stopped:
                return self._dvar_idle_step(accelerator, args)
            run.context = dict(
                text_encoders=text_encoders, unet=unet, network=network, vae=vae, noise_scheduler=noise_scheduler,
                vae_dtype=vae_dtype, weight_dtype=weight_dtype, accelerator=accelerator, args=args,
                text_encoding_strategy=text_encoding_strategy, tokenize_strategy=tokenize_strategy,
                train_text_encoder=train_text_encoder, train_unet=train_unet,
            )
        loss = super().process_batch(
            batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, accelerator, args,
            text_encoding_strategy, tokenize_strategy,
            is_train=is_train, train_text_encoder=train_text_encoder, train_unet=train_unet,
        )
        if run is not None and is_train:
            run.last_loss = loss.detach()
        return loss

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
        run = self._dvar
        if run is not None:
            if epoch == 0:  # kohya's call before the loop (--sample_at_first)
                self._dvar_freeze()
            elif epoch is None:  # right after global_step += 1, on every process
                self._dvar_on_step(accelerator, args, global_step)
            elif run.stopped and run.stop_epoch is not None:
                return None  # an epoch after the stop: it trained nothing
            elif run.stopped:  # the end of the epoch the stop fell in
                run.stop_epoch = epoch
                args.validate_every_n_epochs = NEVER
                self._dvar_quiet_idle_epochs(accelerator, epoch)
            else:
                run.epoch_hint = epoch + 1
        return super().sample_images(accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet)

    def step_logging(self, accelerator, logs, global_step, epoch):
        run = self._dvar
        if run is not None:
            if run.stop_epoch is not None:
                return None
            run.epoch_hint = epoch
        return super().step_logging(accelerator, logs, global_step, epoch)

    def epoch_logging(self, accelerator, logs, global_step, epoch):
        if self._dvar is not None and self._dvar.stop_epoch is not None:
            return None
        return super().epoch_logging(accelerator, logs, global_step, epoch)

    def get_sai_model_spec(self, args):
        """Called inside kohya's ``save_model`` right after it set ``ss_steps``/``ss_epoch`` from its loop
        counters; the keys returned here are merged over them."""
        spec = super().get_sai_model_spec(args)
        run = self._dvar
        if run is None:
            return spec
        if run.stop_epoch is not None:  # the final save after a stop
            if run.model_step is None:
                raise _NothingToSave()
            epoch = self._dvar_epoch_of(run.kept_step) if run.diverged else run.stop_epoch
            steps: Dict[str, str] = {"ss_steps": str(run.model_step), "ss_epoch": str(epoch)}
        else:  # kohya's global_step restarts at a --resume: the steps trained, by DVAR's own count
            steps = {"ss_steps": str(run.dvar_step)}
        return spec if args.no_metadata else dict(spec, **steps)

    # -- DVAR ----------------------------------------------------------------------------------

    def _dvar_freeze(self) -> None:
        run = self._dvar
        if run.frozen is not None:
            return
        loaded = (run.loaded_state or {}).get("stopper")
        seed = run.config.seed
        if loaded is not None:  # --resume: evaluate exactly the inputs of the interrupted run
            state = loaded["eval_batch"]
            run.frozen = KohyaFrozenBatch(state["items"], seed=state["seed"], indices=state["indices"])
        else:
            if run.dataset is None:
                raise KohyaPluginError("DVAR found no training dataset to freeze (kohya's assert_extra_args was not called).")
            try:
                run.frozen = KohyaFrozenBatch.from_dataset(run.dataset, run.config.eval_batch_size, seed=seed)
            except ValueError as error:
                raise KohyaPluginError(str(error)) from None

    def _dvar_build(self) -> DVAREarlyStopping:
        run = self._dvar
        context = run.context
        if context is None:
            raise RuntimeError("DVAR: kohya did not call process_batch before the optimizer step.")
        self._dvar_freeze()
        self._dvar_encode_images()
        models = {"network": context["network"], "unet": context["unet"]}
        for i, text_encoder in enumerate(context["text_encoders"] or []):
            if isinstance(text_encoder, torch.nn.Module):
                models[f"text_encoder_{i}"] = text_encoder
        accelerator, args = context["accelerator"], context["args"]
        # kohya's num_update_steps_per_epoch (train_network.py), for the epoch of kept weights
        batches = math.ceil(len(run.dataset) / accelerator.num_processes) if run.dataset is not None else None
        run.steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps) if batches else None
        stopper = DVAREarlyStopping(objective=KohyaObjective(self._dvar_item_losses), models=models,
                                    eval_batch=run.frozen, config=run.config)
        if run.loaded_state is not None and run.loaded_state.get("stopper") is not None:
            try:
                stopper.load_state_dict(run.loaded_state["stopper"])
            except ValueError as error:
                raise KohyaPluginError(f"--resume: {error}") from None
        return stopper

    def _dvar_encode_images(self) -> None:
        """Items read without cached latents: encode their images once, with their fixed seed."""
        run, context = self._dvar, self._dvar.context
        base = super(DVARTrainerMixin, self)
        accelerator, args = context["accelerator"], context["args"]
        for position, item in enumerate(run.frozen.items):
            if item.get("latents") is not None or item.get("images") is None:
                continue
            with isolated_global_rng(seed=run.frozen.item_seed(position)), torch.no_grad():
                images = item["images"].to(accelerator.device, dtype=context["vae_dtype"])
                latents = base.encode_images_to_latents(args, context["vae"], images)
            item["latents"] = torch.nan_to_num(latents, 0).cpu()
            item["images"] = None

    def _dvar_item_losses(self, models: Dict[str, torch.nn.Module], shard: KohyaShard) -> SimpleNamespace:
        """Each frozen item's loss (``losses``: kohya's process_batch, is_train=False, called as kohya's
        validation calls it, each item under its own fixed seed) and their size-weighted mean (``loss``)."""
        from accelerate.utils import send_to_device

        context = self._dvar.context
        base = super(DVARTrainerMixin, self)
        accelerator, args, weight_dtype = context["accelerator"], context["args"], context["weight_dtype"]
        text_encoders = [models.get(f"text_encoder_{i}", te) for i, te in enumerate(context["text_encoders"] or [])]
        unet, network = models["unet"], models["network"]
        losses, sizes, timesteps = [], [], []
        for item, seed in zip(shard.items, shard.seeds):
            self._dvar_timesteps = noted = []
            batch = send_to_device(dict(item), accelerator.device)
            try:
                with isolated_global_rng(seed=seed), torch.no_grad():
                    base.on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                                       is_train=False)
                    loss = base.process_batch(
                        batch, text_encoders, unet, network, context["vae"], context["noise_scheduler"],
                        context["vae_dtype"], weight_dtype, accelerator, args,
                        context["text_encoding_strategy"], context["tokenize_strategy"], is_train=False,
                        train_text_encoder=context["train_text_encoder"], train_unet=context["train_unet"],
                    )
                    base.on_validation_step_end(args, accelerator, network, text_encoders, unet, batch, weight_dtype)
            finally:
                self._dvar_timesteps = None
            losses.append(float(loss))
            sizes.append(item_size(item))
            timesteps.append(sum(noted) / len(noted) if noted else math.nan)
        total = sum(loss * size for loss, size in zip(losses, sizes)) / sum(sizes)
        return SimpleNamespace(losses=torch.tensor(losses, dtype=torch.float64),
                               loss=torch.tensor(total, dtype=torch.float64),
                               timesteps=torch.tensor(timesteps, dtype=torch.float64))

    def _dvar_on_step(self, accelerator, args, global_step: int) -> None:
        run = self._dvar
        run.dvar_step += 1
        if run.stopped:
            return
        if run.stopper is None:
            run.stopper = self._dvar_build()
        stopper = run.stopper
        evaluations = len(stopper.history)
        stop = stopper.step(run.dvar_step, run.last_loss)
        evaluated = len(stopper.history) > evaluations
        if evaluated and len(accelerator.trackers) > 0:
            row = stopper.history[-1]
            logs = {"dvar/eval_loss": row.eval_loss}
            if math.isfinite(row.statistic):
                logs["dvar/statistic"] = row.statistic
            self.step_logging(accelerator, logs, global_step, run.epoch_hint)
        if evaluated and stopper.last_finite_step == run.dvar_step:
            self._dvar_keep_weights()
        if not stop:
            return
        run.budget, run.kohya_stop_step = args.max_train_steps, global_step
        args.max_train_steps = global_step  # kohya's own check then leaves the epoch
        args.save_every_n_epochs = None  # a run of global_step steps saves no epoch model past here
        if not stopper.diverged:
            accelerator.print(f"\nDVAR: stopping at step {run.dvar_step} of {run.budget} ({stopper.reason}); "
                              "kohya saves the model of this step.")
            return
        # the weights are broken: back to the last finite evaluation's, and no save of this step or state
        args.save_every_n_steps = None
        args.save_state = args.save_state_on_train_end = False
        if run.kept is not None:
            network = accelerator.unwrap_model(run.context["network"])
            network.load_state_dict(run.kept)
        kept = (f"kohya saves the weights of step {run.kept_step}, the last finite evaluation" if run.kept is not None
                else "no evaluation was finite, so kohya saves no model")
        accelerator.print(f"\nDVAR: training diverged at step {run.dvar_step} ({stopper.reason}); {kept}.")

    def _dvar_keep_weights(self) -> None:
        """Keep a CPU copy of the network's weights (a LoRA: a few MB) at a finite evaluation, to give
        them back if training diverges later."""
        run = self._dvar
        network = run.context["accelerator"].unwrap_model(run.context["network"])
        run.kept = {key: value.detach().to("cpu", copy=True) for key, value in network.state_dict().items()}
        run.kept_step = run.dvar_step

    def _dvar_epoch_of(self, step: Optional[int]) -> Optional[int]:
        per_epoch = self._dvar.steps_per_epoch
        return None if step is None or not per_epoch else max(1, math.ceil(step / per_epoch))

    def _dvar_quiet_idle_epochs(self, accelerator, epoch: int) -> None:
        """One line instead of kohya's "epoch N/M" line for each epoch left after the stop."""
        then = "then saves the model" if self._dvar.model_step is not None else "and saves no model"
        accelerator.print(f"\nDVAR: the epochs after epoch {epoch} are idle: kohya's loop runs them out without "
                          f"training, saving, sampling or logging, {then}.")
        original = accelerator.print

        def print_but_epoch_lines(*args, **kwargs):
            if len(args) == 1 and isinstance(args[0], str) and EPOCH_LINE.match(args[0]):
                return None
            if self._dvar.model_step is None and args and str(args[0]).lstrip().startswith("saving checkpoint:"):
                return None  # kohya's final save, which the plugin stops: nothing is written
            return original(*args, **kwargs)

        accelerator.print = print_but_epoch_lines  # the instance's; train() removes it at the end
        self._dvar.quiet = _DropRecords(EPOCH_RECORD[1])
        logging.getLogger(EPOCH_RECORD[0]).addFilter(self._dvar.quiet)

    def _dvar_idle_step(self, accelerator, args) -> torch.Tensor:
        """One loop iteration of an epoch after the stop: no gradient reaches the weights and
        accelerate skips the optimizer and scheduler steps; kohya then breaks again."""
        accelerator.gradient_state._set_sync_gradients(False)
        args.scale_weight_norms = None  # kohya would apply the max-norm rescaling once more
        last = self._dvar.last_loss
        value = last.detach().float().clone() if last is not None else torch.zeros((), device=accelerator.device)
        return value.requires_grad_(True)

    # -- state and reports ---------------------------------------------------------------------

    def _dvar_state_dict(self) -> Dict[str, Any]:
        run = self._dvar
        return {
            "format": STATE_FORMAT,
            "dvar_step": run.dvar_step,
            "kohya_stop_step": run.kohya_stop_step,
            "budget": run.budget,
            "stopper": run.stopper.state_dict() if run.stopper is not None else None,
            "wall_time_s": run.earlier_wall_time + time.perf_counter() - run.started,
        }

    def _dvar_save_state(self, models, weights, output_dir) -> None:
        if self._dvar is not None:
            torch.save(self._dvar_state_dict(), os.path.join(output_dir, STATE_FILE))

    def _dvar_load_state(self, models, input_dir) -> None:
        run = self._dvar
        path = os.path.join(input_dir, STATE_FILE)
        if run is None:
            return
        if not os.path.isfile(path):
            run.dvar_step = _kohya_state_step(input_dir)
            run.accelerator.print(
                f"DVAR: {input_dir} holds no {STATE_FILE} (saved without --early_stop); DVAR starts its history here, "
                f"at step {run.dvar_step}."
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise KohyaPluginError(f"{path} was written by another version of the dvar kohya plugin (format {state.get('format')}).")
        if state["kohya_stop_step"] is not None:
            raise KohyaPluginError(
                f"The state in {input_dir} was saved after DVAR had stopped the run (step {state['dvar_step']}): "
                "that training is finished. Resume it without --early_stop to train past the stop."
            )
        run.loaded_state = state
        run.dvar_step = state["dvar_step"]
        run.earlier_wall_time = float(state.get("wall_time_s", 0.0))

    def _dvar_finish(self, args, outcome: str) -> None:
        """dvar_summary.json and dvar_history.csv/.png next to kohya's model (main process)."""
        run = self._dvar
        if run is None or run.stopper is None or run.accelerator is None or not run.accelerator.is_main_process:
            return
        stopper = run.stopper
        budget = run.budget if run.budget is not None else args.max_train_steps
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = out / f"{args.output_name or 'last'}.{args.save_model_as}"
        # kohya's final save ran (a file from another run may sit there when it did not)
        saved_model = model.is_file() and (outcome in ("early_stop", "budget") or
                                           (outcome == "diverged" and run.model_step is not None))
        summary: Dict[str, Any] = {
            "trainer": _kohya_base(type(self)).__name__,
            "outcome": outcome,
            **stopper.summary(budget),
            "dvar_steps_seen": run.dvar_step,
            "kohya_global_step_at_stop": run.kohya_stop_step,
            "stop_epoch": run.stop_epoch,
            "model_file": str(model) if saved_model else None,
            "model_step": None if not saved_model else run.model_step if stopper.should_stop else run.dvar_step,
            "frozen_batch": {
                "examples": len(run.frozen) if run.frozen is not None else 0,
                "dataset_indices": run.frozen.indices if run.frozen is not None else [],
                "captions": run.frozen.captions() if run.frozen is not None else [],
            },
            "wall_time_s": round(run.earlier_wall_time + time.perf_counter() - run.started, 2),
        }
        stopper.save_history(str(out))
        write_atomically(out / SUMMARY_FILE, summary_json(summary))
        if stopper.should_stop and not stopper.diverged:
            saved = budget - stopper.stop_step
            run.accelerator.print(
                f"DVAR stopped training at step {stopper.stop_step} of {budget} ({saved} steps, "
                f"{saved / budget:.0%} of the budget, saved): {stopper.reason}. Summary: {out / SUMMARY_FILE}"
            )

    def _dvar_diverged_message(self, args) -> str:
        run = self._dvar
        out = Path(args.output_dir)
        model = out / f"{args.output_name or 'last'}.{args.save_model_as}"
        kept = (f"{model} holds the weights of step {run.kept_step}, the last finite evaluation"
                if run.model_step is not None else "No model was saved: no evaluation was finite")
        return f"{run.stopper.status_line()}. {kept}. Summary (outcome \"diverged\"): {out / SUMMARY_FILE}"


def _kohya_state_step(input_dir: str) -> int:
    """The step kohya wrote into a state folder's ``train_state.json`` (0 if it has none)."""
    import json

    try:
        with open(os.path.join(input_dir, "train_state.json"), encoding="utf-8") as handle:
            return int(json.load(handle)["current_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _kohya_base(cls: type) -> type:
    return next(klass for klass in cls.__mro__[1:] if not issubclass(klass, AsIsLoaderMixin) and klass is not object)


def make_trainer_class(base: type, family: str = "sd") -> type:
    """``DVAR<base>``: the mixin in front of one of kohya's trainer classes.

    Example:
        >>> class NetworkTrainer:  # kohya's, in a real run
        ...     pass
        >>> make_trainer_class(NetworkTrainer).__name__
        'DVARNetworkTrainer'
    """
    return type(f"DVAR{base.__name__}", (DVARTrainerMixin, base), {"dvar_family": family, "__module__": __name__})


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
breaks again. Saves, samples, validation and logs of those epochs are skipped, and the final
save runs with ``ss_steps = S`` and ``ss_epoch`` = the epoch the stop fell in.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from dvar import DVARConfig, DVAREarlyStopping, isolated_global_rng

from .diffusers_model import load_as_is, needs_as_is_loader
from .frozen import KohyaFrozenBatch, KohyaShard, item_size

STATE_FILE = "dvar_state.pt"
STATE_FORMAT = 1
NEVER = 10**9  # an epoch period no run reaches: switches off per-epoch validation after the stop


class KohyaPluginError(Exception):
    """Bad input for the kohya plugin (the launcher prints it and exits with status 2)."""


def config_from_args(args: Any) -> DVARConfig:
    """The DVAR settings of kohya-style ``--early_stop_*`` flags (or TOML keys)."""
    return DVARConfig(
        preset=args.early_stop_preset,
        window=args.early_stop_window,
        threshold=args.early_stop_threshold,
        eval_every=args.early_stop_eval_every,
        eval_batch_size=args.early_stop_batch_size,
        max_train_steps=None if args.max_train_epochs is not None else args.max_train_steps,
    )


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
    dvar_step: int = 0  # optimizer steps seen by DVAR (survives --resume, unlike kohya's counter)
    budget: Optional[int] = None
    kohya_stop_step: Optional[int] = None  # kohya's global_step at the stop (ss_steps)
    stop_epoch: Optional[int] = None  # known once the epoch of the stop has ended
    epoch_hint: int = 1
    loaded_state: Optional[Dict[str, Any]] = None

    @property
    def stopped(self) -> bool:
        return self.kohya_stop_step is not None


class DVARTrainerMixin:
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
            result = super().train(args)
            outcome = "early_stop" if run.stopped else "budget"
            return result
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            try:
                self._dvar_finish(args, outcome)
            finally:
                run.context = run.dataset = None  # drop the references to kohya's models and data
                if run.accelerator is not None:  # leave accelerate as kohya found it (idle steps turned it off)
                    run.accelerator.gradient_state._set_sync_gradients(True)

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
        if self.dvar_family == "sd" and needs_as_is_loader(args.pretrained_model_name_or_path):
            return load_as_is(self, args, weight_dtype, accelerator)
        return super().load_target_model(args, weight_dtype, accelerator)

    def _dvar_check_budget(self, args, accelerator) -> None:
        """With --max_train_epochs the step budget is known only now: refuse a window it cannot fill."""
        run = self._dvar
        if args.max_train_epochs is None or run.dataset is None:
            return
        # kohya's own formula (train_network.py), on the DataLoader of batch size 1 over the group
        budget = args.max_train_epochs * math.ceil(
            len(run.dataset) / accelerator.num_processes / args.gradient_accumulation_steps
        )
        window, _ = run.config.resolved_window_threshold()
        if window is not None and window > budget:  # (preset "auto" has no window)
            raise KohyaPluginError(
                f"--early_stop_window {window} is larger than the step budget of --max_train_epochs "
                f"{args.max_train_epochs} ({budget} steps): DVAR could never fire. Lower the window or train longer."
            )

    # -- hooks inside the loop --------------------------------------------------------------

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
        spec = super().get_sai_model_spec(args)
        run = self._dvar
        if run is not None and run.stop_epoch is not None and not args.no_metadata:
            # merged over what kohya's save_model just set from its loop counters
            spec = dict(spec, ss_steps=str(run.kohya_stop_step), ss_epoch=str(run.stop_epoch))
        return spec

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
        stopper = DVAREarlyStopping(objective=self._dvar_objective, models=models, eval_batch=run.frozen, config=run.config)
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

    def _dvar_objective(self, models: Dict[str, torch.nn.Module], shard: KohyaShard) -> torch.Tensor:
        """kohya's own loss of the family (process_batch, is_train=False) on the frozen items,
        called as kohya's validation calls it, each item under its own fixed seed."""
        from accelerate.utils import send_to_device

        context = self._dvar.context
        base = super(DVARTrainerMixin, self)
        accelerator, args, weight_dtype = context["accelerator"], context["args"], context["weight_dtype"]
        text_encoders = [models.get(f"text_encoder_{i}", te) for i, te in enumerate(context["text_encoders"] or [])]
        unet, network = models["unet"], models["network"]
        total, count = 0.0, 0
        for item, seed in zip(shard.items, shard.seeds):
            batch = send_to_device(dict(item), accelerator.device)
            with isolated_global_rng(seed=seed), torch.no_grad():
                base.on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=False)
                loss = base.process_batch(
                    batch, text_encoders, unet, network, context["vae"], context["noise_scheduler"],
                    context["vae_dtype"], weight_dtype, accelerator, args,
                    context["text_encoding_strategy"], context["tokenize_strategy"],
                    is_train=False, train_text_encoder=context["train_text_encoder"], train_unet=context["train_unet"],
                )
                base.on_validation_step_end(args, accelerator, network, text_encoders, unet, batch, weight_dtype)
            size = item_size(item)
            total += float(loss) * size
            count += size
        return torch.tensor(total / count, dtype=torch.float64)

    def _dvar_on_step(self, accelerator, args, global_step: int) -> None:
        run = self._dvar
        run.dvar_step += 1
        if run.stopped:
            return
        if run.stopper is None:
            run.stopper = self._dvar_build()
        evaluations = len(run.stopper.history)
        stop = run.stopper.step(run.dvar_step, run.last_loss)
        if len(run.stopper.history) > evaluations and len(accelerator.trackers) > 0:
            row = run.stopper.history[-1]
            logs = {"dvar/eval_loss": row.eval_loss}
            if math.isfinite(row.normalized_variance):
                logs["dvar/normalized_variance"] = row.normalized_variance
            self.step_logging(accelerator, logs, global_step, run.epoch_hint)
        if stop:
            run.budget, run.kohya_stop_step = args.max_train_steps, global_step
            args.max_train_steps = global_step  # kohya's own check then leaves the epoch
            args.save_every_n_epochs = None  # a run of global_step steps saves no epoch model past here
            accelerator.print(
                f"\nDVAR: stopping at step {run.dvar_step} of {run.budget} ({run.stopper.reason}); "
                "kohya saves the model of this step."
            )

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
            run.accelerator.print(
                f"DVAR: {input_dir} holds no {STATE_FILE} (saved without --early_stop); DVAR starts its history here."
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
        summary: Dict[str, Any] = {
            "trainer": _kohya_base(type(self)).__name__,
            "outcome": outcome,
            **stopper.summary(budget),
            "preset": run.config.preset if None in (run.config.window, run.config.threshold) else None,
            "dvar_steps_seen": run.dvar_step,
            "kohya_global_step_at_stop": run.kohya_stop_step,
            "stop_epoch": run.stop_epoch,
            "model_file": str(model) if model.is_file() else None,
            "frozen_batch": {
                "examples": len(run.frozen) if run.frozen is not None else 0,
                "dataset_indices": run.frozen.indices if run.frozen is not None else [],
                "captions": run.frozen.captions() if run.frozen is not None else [],
            },
            "wall_time_s": round(time.perf_counter() - run.started, 2),
        }
        stopper.save_history(str(out))
        with open(out / "dvar_summary.json", "w") as handle:
            json.dump(summary, handle, indent=2)
        if stopper.should_stop:
            saved = budget - stopper.stop_step
            run.accelerator.print(
                f"DVAR stopped training at step {stopper.stop_step} of {budget} ({saved} steps, "
                f"{saved / budget:.0%} of the budget, saved): {stopper.reason}. Summary: {out / 'dvar_summary.json'}"
            )


def _kohya_base(cls: type) -> type:
    return next(klass for klass in cls.__mro__[1:] if not issubclass(klass, DVARTrainerMixin) and klass is not object)


def make_trainer_class(base: type, family: str = "sd") -> type:
    """``DVAR<base>``: the mixin in front of one of kohya's trainer classes.

    Example:
        >>> class NetworkTrainer:  # kohya's, in a real run
        ...     pass
        >>> make_trainer_class(NetworkTrainer).__name__
        'DVARNetworkTrainer'
    """
    return type(f"DVAR{base.__name__}", (DVARTrainerMixin, base), {"dvar_family": family, "__module__": __name__})


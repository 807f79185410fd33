"""The training loop the four personalization methods share.

A method (``Method`` subclass) says what is trained and how it is saved; this module
does the rest the way the diffusers example scripts do it (same flags, accelerate for
devices, mixed precision, trackers, checkpoints and multi-process), plus DVAR early
stopping (``--early-stop``), a progress bar that shows it, a ``dvar_summary.json``, and
saving the learned weights whenever training ends: budget reached, early stop, Ctrl-C,
SIGTERM or an error. A run that diverges (NaN/inf loss) is a failure: it exits with
:data:`EXIT_DIVERGED` and keeps the last finite weights, never the broken ones. Every result
file is written whole or not at all (a temporary name, then ``os.replace``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from dvar import DVAREarlyStopping, LossConfig
from dvar.reporting import write_atomically

from .data import UsageError, collate, load_image_folder

from .cli import (
    build_parser,
    check_output_dir,
    dvar_settings,
    find_checkpoint,
    load_components,
    resolve_defaults,
    resolve_model,
    validate_settings,
    warn_photos_on_embedded_model,
)
from .flux import model_family, resolve_flux_settings, sampling_kwargs, unsupported_model
from .method import Components, Method
from .run_end import (
    DIVERGED_FIX,
    EXIT_DIVERGED,
    EXIT_USAGE,
    TRAINER_STATE,
    Diverged,
    Interrupted,
    LastFiniteWeights,
    RunEnd,
    SignalGuard,
    all_finite,
    checkpoint_step,
    empty_folder,
    staged_files,
)

logger = logging.getLogger("dvar.integrations")

# Each checkpoint holds, per process, the torch RNG states that draw the noise and timesteps. accelerate saves them
# too, but before 1.1 reads them back with a plain torch.load, which torch >= 2.6 (weights_only by default) refuses:
# it logs "Could not load random states" and the resumed run draws other noise. This copy loads on every version.
RNG_STATE = "dvar_rng_state_{}.pt"


def rng_state(device: Any) -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(path: Path, device: Any) -> None:
    if not path.is_file():  # a checkpoint written before dvar kept its own copy: accelerate's alone
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def keep_trained_in_fp32(module: torch.nn.Module) -> None:
    """The trained parameters of a module cast to a half dtype back in float32 (diffusers' ``cast_training_params``)."""
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.float()


class TrainingObserver:
    """Watches a run without changing it (the benchmark's monitors). Subclass and override."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        """Models, accelerator and datasets are ready (``trainer.parts``, ``trainer.accelerator``, ...)."""

    def on_step_end(self, trainer: "Trainer", global_step: int, loss: torch.Tensor) -> None:
        """After each optimizer step, on every process."""


# -- the loop ---------------------------------------------------------------------------


def pin_malloc_thresholds() -> bool:
    """Fix glibc malloc's mmap/trim thresholds at 32/64 MiB, the values its dynamic rule ends at; True if set.

    By default glibc gives the free top of the heap back to the kernel at each ``free`` that leaves more
    than the trim threshold there, a threshold it raises only as large blocks are freed. A run whose
    steps peak close to it pays for that in page faults: on mini-SD, DreamBooth's ~6 MB per step crossed
    it once DVAR's first evaluation had left ~1.5 MB of oneDNN state in the heap, and from then on
    most steps gave those 6 MB back and faulted them in again (docs/dreambooth-slowdown.md). Skipped
    when the user set the thresholds (``MALLOC_*_``, ``GLIBC_TUNABLES``) and where the C library is not glibc.
    """
    tunables = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
    if any(name in os.environ for name in tunables) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # not glibc, or no confstr/mallopt here
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 << 20))


def main(method: Method, argv: Optional[Sequence[str]] = None, callbacks: Sequence[TrainingObserver] = ()) -> int:
    """Parse, validate, train; returns the exit code: 0, :data:`EXIT_USAGE` (bad input, nothing written),
    :data:`EXIT_DIVERGED`, 128 + the signal (130 Ctrl-C, 143 SIGTERM); an unexpected error raises."""
    parser = build_parser(method)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    created = None  # the output folder, if this run made it: a bad setting found late leaves nothing behind
    try:
        resolve_defaults(method, args)
        created = None if os.path.exists(args.output_dir) else args.output_dir
        validate_settings(args)
        images = load_image_folder(method.data_dir(args), method.data_flag)
        check_output_dir(args)
        warn_photos_on_embedded_model(method, args)
        pin_malloc_thresholds()
        return Trainer(method, args, images, callbacks).run()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        if created is not None and os.path.isdir(created) and not os.listdir(created):
            os.rmdir(created)
        return EXIT_USAGE


class Trainer:
    def __init__(
        self, method: Method, args: argparse.Namespace, images: Sequence[Any], callbacks: Sequence[TrainingObserver] = ()
    ) -> None:
        self.method, self.args, self.images, self.callbacks = method, args, images, list(callbacks)

    def make_stopper(self, **overrides: Any) -> DVAREarlyStopping:
        """The run's DVAR stopper (``overrides``: DVARConfig fields, e.g. ``resample=("timesteps",)``)."""
        args, parts = self.args, self.parts
        settings = {**dvar_settings(args), "verbose": False, **overrides}  # finish() prints the stop line
        family: Dict[str, Any] = {"unet": parts.unet}
        if parts.family == "flux":  # the loss it trains on: --weighting_scheme, --guidance_scale, ...
            family = dict(transformer=parts.unet, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                          loss=LossConfig.from_args(args))
        with warnings.catch_warnings():  # the trainer says it in its own words, naming the flag (run())
            warnings.filterwarnings("ignore", message="The frozen DVAR batch asks")
            return DVAREarlyStopping(
                vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                noise_scheduler=parts.noise_scheduler, train_dataset=self.eval_dataset, accelerator=self.accelerator,
                **family, **settings,
            )

    def run(self) -> int:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
        from diffusers.optimization import get_scheduler

        args, method = self.args, self.method
        args.model_folder = resolve_model(args.pretrained_model_name_or_path)  # a Hub id: its cached snapshot
        args.model_family = model_family(args.model_folder)
        if args.model_family not in method.families:
            raise unsupported_model(method.name, args.pretrained_model_name_or_path)
        parts = load_components(args.model_folder)
        if parts.family == "flux":
            resolve_flux_settings(args, parts)
        method.validate(args, parts.tokenizer)  # e.g. tokens that already exist: before any write
        if args.resolution is None:
            args.resolution = parts.unet.config.sample_size * 2 ** (len(parts.vae.config.block_out_channels) - 1)
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        if accelerator.is_main_process:  # all input is valid: from here on the output folder is ours
            out = Path(args.output_dir)
            if args.overwrite_output_dir and not args.resume_from_checkpoint and out.is_dir():
                empty_folder(out)
            out.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        train_dataset, eval_dataset = method.build_datasets(args, self.images, accelerator)
        set_seed(args.seed)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

        trainable = method.setup(args, parts, accelerator)
        parts.vae.requires_grad_(False)
        # frozen parts in the compute dtype; for Flux also the frozen base of a trained one, as its script
        for module in (parts.vae, parts.unet, parts.text_encoder, parts.text_encoder_2):
            if module is None:
                continue
            frozen = not any(p.requires_grad for p in module.parameters())
            if weight_dtype != torch.float32 and (frozen or parts.family == "flux"):
                module.to(accelerator.device, dtype=weight_dtype)
                keep_trained_in_fp32(module)
            else:  # no dtype argument at all: diffusers 0.42 warns about any, even None
                module.to(accelerator.device)
        if args.scale_lr:
            args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes

        dataloader = torch.utils.data.DataLoader(
            train_dataset,
            batch_size=args.train_batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed),  # no global-RNG draw on (re)start
        )
        optimizer = torch.optim.AdamW(
            trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        )
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=args.max_train_steps * accelerator.num_processes,
        )
        for name in ("unet", "text_encoder"):  # only what trains is wrapped (DDP refuses frozen modules)
            module = getattr(parts, name)
            if any(p.requires_grad for p in module.parameters()):
                setattr(parts, name, accelerator.prepare(module))
        optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)
        method.prepare_optimizer(optimizer)

        self.parts, self.accelerator, self.eval_dataset, self.weight_dtype = parts, accelerator, eval_dataset, weight_dtype
        self.trainable = trainable
        stopper = None
        if args.early_stop:
            try:
                stopper = self.make_stopper()
            except ValueError as error:  # settings that only the data can refuse (e.g. bands with a few photos)
                raise UsageError(f"--early-stop: {error}") from None
            accelerator.register_for_checkpointing(stopper)
            used = len(stopper.eval_batch)
            if used < args.early_stop_batch_size:
                logger.warning(
                    f"warning: --early-stop-batch-size {args.early_stop_batch_size} is more than the {used} instance "
                    f"examples: the frozen batch holds all {used} (dvar_summary.json: early_stop_batch_size_used)."
                )
        if accelerator.is_main_process:
            config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
            accelerator.init_trackers(f"dvar-{method.name}", config=config)

        self.start_step, self.earlier_wall_time = 0, 0.0
        if args.resume_from_checkpoint:
            checkpoint = find_checkpoint(args)
            accelerator.print(f"Resuming from {checkpoint}")
            accelerator.load_state(str(checkpoint))
            restore_rng_state(checkpoint / RNG_STATE.format(accelerator.process_index), accelerator.device)
            self.start_step = int(checkpoint.name.split("-")[1])
            state_file = checkpoint / TRAINER_STATE
            if state_file.is_file():  # wall time adds up across resumes
                self.earlier_wall_time = float(json.loads(state_file.read_text()).get("wall_time_s", 0.0))
        self.stopper = stopper
        self.keeper = LastFiniteWeights(method, parts, accelerator, enabled=method.keeps_finite_copy)
        if self.start_step:
            self.keeper.propose(self.start_step)  # the checkpoint's weights, confirmed by the first finite loss
        with SignalGuard() as guard:
            end = self.train(dataloader, optimizer, lr_scheduler, guard)
            code = self.finish(end, guard)
        if end.outcome == "error":
            raise end.error
        return code

    def elapsed(self) -> float:
        """Wall time of the run so far, counting the parts before each resume."""
        return self.earlier_wall_time + time.perf_counter() - self.started

    def train(self, dataloader: Any, optimizer: Any, lr_scheduler: Any, guard: SignalGuard) -> RunEnd:
        """The loop; returns how it ended (every exception becomes a :class:`RunEnd`)."""
        from tqdm.auto import tqdm

        args, method, accelerator, parts, stopper = self.args, self.method, self.accelerator, self.parts, self.stopper
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        self.global_step = global_step = self.start_step
        first_epoch = global_step // steps_per_epoch
        resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
        progress = tqdm(
            total=args.max_train_steps, initial=global_step, desc="Steps",
            disable=not accelerator.is_local_main_process or os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
        )
        models = [parts.unet, parts.text_encoder]
        for callback in self.callbacks:
            callback.on_train_begin(self)
        self.started = time.perf_counter()
        self.step_seconds: List[float] = []
        end = RunEnd("budget")
        try:
            for epoch in range(first_epoch, num_epochs):
                for module in models:
                    module.train()
                dataloader.set_epoch(epoch)
                batches = dataloader
                if epoch == first_epoch and resume_batches:
                    batches = accelerator.skip_first_batches(dataloader, resume_batches)
                    # accelerate 1.7-1.14's new loader starts at epoch 0 and would replay epoch 0's shuffle order
                    batches.set_epoch(epoch)
                for batch in batches:
                    step_started = time.perf_counter()
                    with accelerator.accumulate(*models):
                        loss = method.loss(batch, parts, self.weight_dtype, args)
                        self.check_loss(loss, global_step + 1)
                        self.keeper.confirm()  # the loss of the weights proposed after the last step is finite
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm:
                            accelerator.clip_grad_norm_(self.trainable, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                        method.after_optimizer_step(parts, accelerator)
                    if not accelerator.sync_gradients:
                        continue
                    self.global_step = global_step = global_step + 1
                    should_stop = stopper is not None and stopper.step(global_step, loss)
                    self.step_seconds.append(time.perf_counter() - step_started)  # DVAR's evaluation included
                    if stopper is None:
                        self.keeper.propose(global_step)
                    elif stopper.diverged:
                        raise Diverged(global_step, f"the frozen-batch loss became non-finite ({stopper.reason})")
                    elif stopper.last_finite_step == global_step:
                        self.keeper.keep(global_step)
                    for callback in self.callbacks:
                        callback.on_step_end(self, global_step, loss)
                    if global_step % args.checkpointing_steps == 0:
                        if not all_finite(self.trainable):  # a checkpoint of broken weights resumes nothing
                            raise Diverged(global_step, "the trained weights became non-finite")
                        self.save_checkpoint(accelerator, global_step)
                    logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
                    progress.update(1)
                    progress.set_postfix(**{"loss": f"{logs['loss']:.4f}", **(stopper.progress_postfix() if stopper else {})})
                    accelerator.log(logs, step=global_step)
                    if should_stop:
                        end = RunEnd("early_stop")
                        break
                    if global_step >= args.max_train_steps:
                        break
                    guard.check(accelerator)
                if end.outcome == "early_stop" or global_step >= args.max_train_steps:
                    break
        except Diverged as error:
            end = RunEnd("diverged", EXIT_DIVERGED, diverged=error)
        except Exception as error:
            if guard.received is None:
                end = RunEnd("error", 1, error=error)
                accelerator.print(f"\nTraining failed at step {global_step} ({error}); saving the learned weights.")
            else:  # e.g. DataLoader workers, which got the terminal's Ctrl-C too, have exited
                end = self.interrupted(guard.received, global_step)
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM through the guard
            end = self.interrupted(getattr(error, "signum", signal.SIGINT), global_step)
        progress.close()
        return end

    def interrupted(self, signum: int, global_step: int) -> RunEnd:
        self.accelerator.print(f"\nInterrupted ({signal.Signals(signum).name}) at step {global_step}: saving the learned weights.")
        return RunEnd("interrupted", 128 + signum, signum=signum)

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        """Raise :class:`Diverged` when the training loss is NaN/inf, on every process if on any."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bool(bad.item()):
            here = not bool(torch.isfinite(loss.detach()))
            raise Diverged(step, f"the training loss became {loss.item() if here else 'nan on another process'}")

    def save_checkpoint(self, accelerator: Any, global_step: int) -> None:
        """``accelerator.save_state`` into a temporary folder renamed ``checkpoint-N`` once complete, so
        ``--resume_from_checkpoint latest`` never picks a half-written one; with the wall time so far."""
        args = self.args
        out = Path(args.output_dir)
        partial, final = out / f".checkpoint-{global_step}.partial", out / f"checkpoint-{global_step}"
        if accelerator.is_main_process:
            if args.checkpoints_total_limit is not None:
                existing = sorted((p for p in out.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)
                for old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                    shutil.rmtree(old)
            shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
        accelerator.wait_for_everyone()
        rng = rng_state(accelerator.device)
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        torch.save(rng, partial / RNG_STATE.format(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_atomically(partial / TRAINER_STATE, json.dumps({"step": global_step, "wall_time_s": round(self.elapsed(), 3)}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        accelerator.wait_for_everyone()

    def finish(self, end: RunEnd, guard: SignalGuard) -> int:
        """Save the learned weights (the last finite ones), the DVAR history, ``dvar_summary.json`` and
        (after a good run) samples; returns the exit code."""
        args, accelerator, parts, stopper = self.args, self.accelerator, self.parts, self.stopper
        global_step = self.global_step
        if accelerator.num_processes > 1:
            # One write per line: the ranks share stdout, and print() writes the newline separately.
            sys.stdout.write(f"[rank {accelerator.process_index}] training ended at step {global_step} ({end.outcome})\n")
            sys.stdout.flush()
        if end.outcome != "interrupted":
            accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            accelerator.end_training()
            return end.exit_code
        with guard.saving():
            if end.outcome in ("budget", "early_stop") and not all_finite(self.trainable):
                end = RunEnd("diverged", EXIT_DIVERGED, diverged=Diverged(global_step, "the trained weights became non-finite"))
            files, weights_step = self.save_weights(end)
            summary = self.summary(end, files, weights_step)
            with staged_files(args.output_dir) as stage:
                if stopper is not None:
                    stopper.save_history(str(stage), summary=False)  # the summary below holds stopper.summary()
            write_atomically(Path(args.output_dir) / "dvar_summary.json", json.dumps(summary, indent=2) + "\n")
        if end.outcome == "diverged":
            print(f"error: {summary['error']}", file=sys.stderr, flush=True)
        elif stopper is not None and stopper.should_stop:
            stopper.report()  # the callback's stop line: step, budget, steps saved, reason
        if end.outcome == "interrupted" or guard.received is not None:
            where = ", ".join(files) if files else "no weights (nothing was trained yet)"
            accelerator.print(f"Saved {where} and dvar_summary.json in {args.output_dir}.")
        code = end.exit_code
        if end.outcome in ("budget", "early_stop") and args.num_validation_images > 0:
            if guard.received is not None:  # a signal came while saving: leave now, the result is complete
                code = 128 + guard.received
            else:
                try:
                    with guard.at_once():
                        self.save_samples(parts, accelerator, self.weight_dtype)
                except Interrupted as signalled:
                    print("Samples skipped: interrupted (the weights and dvar_summary.json are saved).", file=sys.stderr)
                    code = 128 + signalled.signum
        accelerator.end_training()
        return code

    def save_weights(self, end: RunEnd) -> tuple:
        """Write the result: the current weights when finite and not diverged, else the last finite copy, else
        nothing. Returns (file names, the step the weights are from)."""
        args, method, accelerator, parts = self.args, self.method, self.accelerator, self.parts
        if end.outcome != "diverged" and self.global_step > 0 and all_finite(self.trainable):
            weights_step = self.global_step
        elif self.keeper.state is not None:
            method.load_learned_state(self.keeper.state, parts, accelerator)
            weights_step = self.keeper.step
        else:
            return [], None
        with staged_files(args.output_dir) as stage:
            files = method.save(str(stage), parts, accelerator)
        return files, weights_step

    def summary(self, end: RunEnd, files: List[str], weights_step: Optional[int]) -> Dict[str, Any]:
        args, method, stopper, steps = self.args, self.method, self.stopper, self.step_seconds
        mean_step = sum(steps) / len(steps) if steps else 0.0
        summary: Dict[str, Any] = {
            "method": method.name,
            "outcome": end.outcome,
            "final_step": self.global_step,
            "max_train_steps": args.max_train_steps,
            "weights_step": weights_step,
            "early_stop": bool(stopper),
            "resumed_from_step": self.start_step or None,
            "wall_time_s": round(self.elapsed(), 2),
            "wall_time_s_this_run": round(time.perf_counter() - self.started, 2),
            "mean_step_s": round(mean_step, 4),
            "median_step_s": round(sorted(steps)[len(steps) // 2], 4) if steps else 0.0,
            "saved_files": files,
        }
        if torch.cuda.is_available():
            summary["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if stopper is not None:
            summary.update(stopper.summary(args.max_train_steps))
            summary["time_saved_s_estimate"] = round(summary["steps_saved"] * mean_step, 2)
            summary["early_stop_batch_size"] = args.early_stop_batch_size
            summary["early_stop_batch_size_used"] = len(stopper.eval_batch)
        summary["diverged"] = end.outcome == "diverged"
        if end.signum is not None:
            summary["signal"] = signal.Signals(end.signum).name
        if end.outcome == "diverged":
            summary["diverged_at_step"] = end.diverged.step
            summary["error"] = self.diverged_message(end.diverged, files, weights_step)
        elif end.outcome == "error":
            summary["error"] = f"{type(end.error).__name__}: {end.error}"
        return summary

    def diverged_message(self, diverged: Diverged, files: List[str], weights_step: Optional[int]) -> str:
        args, method = self.args, self.method
        text = f"training diverged at step {diverged.step} of {args.max_train_steps}: {diverged.reason}. "
        if files:
            text += (f"Saved the weights of step {weights_step}, the last whose loss was finite ({', '.join(files)}); "
                     "the diverged weights were not saved. ")
        elif not method.keeps_finite_copy:
            earlier = [p for p in Path(args.output_dir).iterdir() if (checkpoint_step(p) or 0) and checkpoint_step(p) < diverged.step]
            last = max(earlier, key=checkpoint_step, default=None)
            text += (f"{method.name} trains the whole model and keeps no second copy of it in memory, so no weights "
                     "were saved; " + (f"the last checkpoint before the divergence is {last} (its unet/ loads with "
                     "UNet2DConditionModel.from_pretrained). " if last else "no checkpoint was saved before it "
                     "(--checkpointing_steps N keeps one every N steps). "))
        elif self.stopper is not None:
            text += (f"No weights were saved: no evaluation before it had a finite loss (with --early-stop the "
                     f"weights are kept at each evaluation, every {self.stopper.eval_every} steps). ")
        else:
            text += "No weights were saved: no step before it had finite weights. "
        return text + "Likely fix: " + DIVERGED_FIX.format(lr=args.learning_rate, clip=args.max_grad_norm) + "."

    def save_samples(self, parts: Components, accelerator: Any, weight_dtype: torch.dtype) -> None:
        args = self.args
        prompt = args.validation_prompt or self.method.default_validation_prompt(args)
        pipe = self.method.pipeline(parts, accelerator, weight_dtype).to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        extra = sampling_kwargs(args, pipe.transformer, args.num_validation_images) if parts.family == "flux" else {}
        with torch.no_grad(), accelerator.autocast():  # frozen parts may be fp16/bf16, trained ones fp32
            images = pipe(
                [prompt] * args.num_validation_images, num_inference_steps=args.num_inference_steps,
                generator=generator, height=args.resolution, width=args.resolution, **extra,
            ).images
        with staged_files(args.output_dir) as stage:
            (stage / "samples").mkdir()
            for i, image in enumerate(images):
                image.save(stage / "samples" / f"{i:02d}.png")
            (stage / "samples" / "prompt.txt").write_text(prompt + "\n")

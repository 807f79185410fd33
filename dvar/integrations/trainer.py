"""The training loop the four personalization methods share.

A method (``Method`` subclass) says what is trained and how it is saved; this module
does the rest the way the diffusers example scripts do it (same flags, accelerate for
devices, mixed precision, trackers, checkpoints and multi-process), plus DVAR early
stopping (``--early-stop``), a progress bar that shows it, a ``dvar_summary.json``, and
saving the learned weights whenever training ends: budget reached, early stop, Ctrl-C or
an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from dvar import DVAREarlyStopping
from dvar.criterion import PRESETS, overhead_target

from .data import UsageError, collate, load_image_folder

logger = logging.getLogger("dvar.integrations")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass
class Components:
    """The Stable Diffusion parts a method trains or uses."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    model_path: str


@dataclass(frozen=True)
class Budget:
    max_train_steps: int
    learning_rate: float


def default_model_path() -> str:
    from dvar.models import mini_sd

    return str(mini_sd())


def is_embedded_model(path: str) -> bool:
    try:
        return Path(path).resolve() == Path(default_model_path()).resolve()
    except Exception:  # the embedded model is not installed
        return False


class Method:
    """One personalization method. Subclasses keep to what is their own."""

    name: str = ""
    preset: str = ""
    sd_budget: Budget  # the paper's settings on Stable Diffusion
    mini_sd_budget: Budget  # measured for the embedded mini-SD (see integrations/README.md)
    data_flag: str = "--instance_data_dir"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Method-specific flags."""

    def validate(self, args: argparse.Namespace, tokenizer: Any) -> None:
        """Refuse impossible settings (raise UsageError) before anything is written."""

    def data_dir(self, args: argparse.Namespace) -> Optional[str]:
        return args.instance_data_dir

    def build_datasets(self, args: argparse.Namespace, images: Sequence[Any], accelerator: Any) -> tuple:
        """(training dataset, the dataset DVAR freezes its batch from: instance examples only).

        Runs on every process after the output folder exists (class images may be generated there)."""
        raise NotImplementedError

    def setup(self, args: argparse.Namespace, parts: Components, accelerator: Any) -> List[torch.nn.Parameter]:
        """Freeze, add tokens/adapters, return the trainable parameters."""
        raise NotImplementedError

    def loss(self, batch: Dict[str, Any], parts: "Components", weight_dtype: torch.dtype, args: argparse.Namespace) -> torch.Tensor:
        """The training loss of one batch (default: the standard diffusion loss)."""
        return diffusion_loss(batch, parts, weight_dtype)

    def after_optimizer_step(self, parts: Components, accelerator: Any) -> None:
        """Hook after each optimizer step (e.g. restore the frozen token embeddings)."""

    def save(self, output_dir: str, parts: Components, accelerator: Any) -> List[str]:
        """Write the learned weights in the format diffusers loads; return the file names."""
        raise NotImplementedError

    def pipeline(self, parts: Components, accelerator: Any, weight_dtype: torch.dtype) -> Any:
        """A pipeline with the learned weights, for the validation samples."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            parts.model_path,
            unet=accelerator.unwrap_model(parts.unet),
            text_encoder=accelerator.unwrap_model(parts.text_encoder),
            tokenizer=parts.tokenizer,
            vae=parts.vae,
            safety_checker=None,
            requires_safety_checker=False,
        )
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return pipe

    def default_validation_prompt(self, args: argparse.Namespace) -> str:
        return args.instance_prompt

    def learned_state(self, parts: Components, accelerator: Any) -> Dict[str, torch.Tensor]:
        """A copy of what training changed: the trained parameters, of the token table only the new rows.

        Small enough to keep many of (the benchmark snapshots it along a run); inverse of
        :meth:`load_learned_state`."""
        state = {}
        for prefix, module, table, rows in self._learned_parts(parts, accelerator):
            for name, param in module.named_parameters():
                if param is table:
                    state[f"{prefix}.{name}"] = param.detach()[rows].clone()
                elif param.requires_grad:
                    state[f"{prefix}.{name}"] = param.detach().clone()
        return state

    def load_learned_state(self, state: Dict[str, torch.Tensor], parts: Components, accelerator: Any) -> None:
        """Put a :meth:`learned_state` back into the models."""
        with torch.no_grad():
            for prefix, module, table, rows in self._learned_parts(parts, accelerator):
                for name, param in module.named_parameters():
                    value = state.get(f"{prefix}.{name}")
                    if value is None:
                        continue
                    if param is table:
                        param[rows] = value.to(param)
                    else:
                        param.copy_(value)

    def _learned_parts(self, parts: Components, accelerator: Any) -> List[tuple]:
        rows = list(getattr(self, "token_ids", []) or [])
        text_encoder = accelerator.unwrap_model(parts.text_encoder)
        table = text_encoder.get_input_embeddings().weight if rows else None
        return [("unet", accelerator.unwrap_model(parts.unet), None, rows), ("text_encoder", text_encoder, table, rows)]


# -- arguments -------------------------------------------------------------------------


def build_parser(method: Method) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python integrations/{method.name}.py",
        description=f"{method.name.replace('_', ' ').title()} with DVAR early stopping (--early-stop).",
    )
    add = parser.add_argument
    add("--pretrained_model_name_or_path", default=None, help="Local diffusers model folder (default: the embedded mini-SD).")
    add("--output_dir", default=None, help="Where weights, samples and the DVAR history go (default: outputs/<method>).")
    add("--overwrite_output_dir", action="store_true", help="Replace what --output_dir holds.")
    add("--seed", type=int, default=0)
    add("--resolution", type=int, default=None, help="Training resolution (default: the model's native size).")
    add("--center_crop", action=argparse.BooleanOptionalAction, default=True, help="Crop the center square after resizing.")
    add("--random_flip", action="store_true", help="Also train on horizontally flipped images.")
    add("--train_batch_size", type=int, default=1)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_train_steps", type=int, default=None, help="Step budget (default: the paper's on SD, ours on mini-SD).")
    add("--learning_rate", type=float, default=None, help="Default: the paper's on SD, ours on mini-SD.")
    add("--scale_lr", action="store_true", help="Multiply the learning rate by batch size x accumulation x processes.")
    add("--lr_scheduler", default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    add("--report_to", default="none", help="accelerate tracker: tensorboard, wandb, ... or none.")
    add("--logging_dir", default="logs")
    add("--checkpointing_steps", type=int, default=500, help="Save an accelerate checkpoint every N steps.")
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", default=None, help='A checkpoint folder name in --output_dir, or "latest".')
    add("--validation_prompt", default=None, help="Prompt for the sample images saved at the end.")
    add("--num_validation_images", type=int, default=4)
    add("--num_inference_steps", type=int, default=25)
    add("--dataloader_num_workers", type=int, default=0)
    add("--early-stop", "--early_stop", dest="early_stop", action="store_true", help="Stop when DVAR says the concept is learned.")
    add("--early-stop-preset", "--early_stop_preset", dest="early_stop_preset", default=method.preset,
        choices=sorted(PRESETS) + ["auto"],
        help=f"DVAR setting (default: {method.preset}, the paper's for this method); 'auto': no window, stop once "
        "the run is threshold (default 2) times as long as the smoothed frozen-batch loss took to cover 80%% of its "
        "drop.")
    add("--early-stop-window", "--early_stop_window", dest="early_stop_window", type=int, default=None,
        help="DVAR window N in steps (default: the preset's; not with --early-stop-preset auto).")
    add("--early-stop-threshold", "--early_stop_threshold", dest="early_stop_threshold", type=float, default=None,
        help="DVAR threshold (default: the preset's; for auto, the multiple of the loss's settling time at which "
        "it stops).")
    add("--early-stop-eval-every", "--early_stop_eval_every", dest="early_stop_eval_every", type=eval_every_arg,
        default="auto", help="Evaluate the frozen batch every K steps (default auto: window // 30, at least 1; "
        "1 is the paper's every-step setting; a percentage such as 5%%: the K at which evaluating costs about that "
        "share of the training time, timed on the first steps).")
    add("--early-stop-batch-size", "--early_stop_batch_size", dest="early_stop_batch_size", type=int, default=4,
        help="Frozen examples in the DVAR batch.")
    method.add_arguments(parser)
    return parser


def eval_every_arg(text: str) -> Any:
    """``--early-stop-eval-every``: ``auto``, an integer >= 1 or a target overhead such as ``5%``."""
    if text == "auto":
        return text
    if text.endswith("%"):
        try:
            overhead_target(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', an integer >= 1 (1 = every step, the paper's) or a target overhead such as '5%', got {text!r}"
        )
    return value


def resolve_defaults(method: Method, args: argparse.Namespace) -> None:
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = default_model_path()
    budget = method.mini_sd_budget if is_embedded_model(args.pretrained_model_name_or_path) else method.sd_budget
    if args.max_train_steps is None:
        args.max_train_steps = budget.max_train_steps
    if args.learning_rate is None:
        args.learning_rate = budget.learning_rate
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", method.name)


def validate_settings(args: argparse.Namespace) -> None:
    """Settings that can never work, refused before anything is loaded or written."""
    from dvar import DVARConfig
    from dvar.criterion import DVARCriterion, resolve_preset

    if args.max_train_steps < 1:
        raise UsageError(f"--max_train_steps must be >= 1 (got {args.max_train_steps}).")
    if args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        raise UsageError(f"--learning_rate must be a positive number (got {args.learning_rate}).")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "early_stop_batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-') if flag.startswith('early') else flag} must be >= 1.")
    if not Path(args.pretrained_model_name_or_path).is_dir():
        raise UsageError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is not a local diffusers model "
            "folder; dvar runs offline: download the model first, or leave the flag out to use the embedded mini-SD."
        )
    if args.early_stop and args.early_stop_preset == "auto":
        try:
            DVARConfig(preset="auto", window=args.early_stop_window, threshold=args.early_stop_threshold,
                       eval_every=args.early_stop_eval_every, max_train_steps=args.max_train_steps,
                       ).resolved_window_threshold()
        except ValueError as error:
            raise UsageError(f"--early-stop-preset auto: {error}") from None
    elif args.early_stop:
        preset = resolve_preset(args.early_stop_preset)
        window = args.early_stop_window if args.early_stop_window is not None else preset.window
        threshold = args.early_stop_threshold if args.early_stop_threshold is not None else preset.threshold
        try:
            DVARCriterion(window, threshold)
        except ValueError as error:
            raise UsageError(f"--early-stop-window/--early-stop-threshold: {error}") from None
        if window > args.max_train_steps:
            raise UsageError(
                f"--early-stop-window {window} is larger than --max_train_steps {args.max_train_steps}: DVAR could "
                "never fire. Lower the window or raise the step budget."
            )


def check_output_dir(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; pass a folder.")
    if args.resume_from_checkpoint:
        if find_checkpoint(args) is None:
            raise UsageError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint in {out}; "
                "train without it, or pass one of the checkpoint-N folders there."
            )
        return
    if out.exists() and any(out.iterdir()):
        if not args.overwrite_output_dir:
            raise UsageError(
                f"--output_dir {out} already holds another run; pass --overwrite_output_dir to replace it, "
                "--resume_from_checkpoint latest to continue it, or choose another folder."
            )


def find_checkpoint(args: argparse.Namespace) -> Optional[Path]:
    out = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if out.is_dir() else []
        return found[-1] if found else None
    path = Path(args.resume_from_checkpoint)
    path = path if path.is_absolute() or path.parent != Path(".") else out / path
    return path if path.is_dir() else None


# -- the loop ---------------------------------------------------------------------------


def load_components(path: str) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dvar.models import load_exactly  # fails loudly where from_pretrained would leave random weights

    return Components(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=load_exactly(CLIPTextModel, path, "text_encoder").float(),
        vae=load_exactly(AutoencoderKL, path, "vae").float(),
        unet=load_exactly(UNet2DConditionModel, path, "unet").float(),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        model_path=path,
    )


def diffusion_loss(
    batch: Dict[str, Any], parts: Components, weight_dtype: torch.dtype, prior_loss_weight: Optional[float] = None
) -> torch.Tensor:
    """The standard training loss, as in the diffusers scripts (prior preservation: the
    second half of the batch is class examples)."""
    vae, unet, text_encoder, scheduler = parts.vae, parts.unet, parts.text_encoder, parts.noise_scheduler
    pixel_values = batch["pixel_values"].to(vae.device, weight_dtype)
    with torch.no_grad():
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    ids = parts.tokenizer(
        batch["prompt"], padding="max_length", max_length=parts.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(latents.device)
    hidden = text_encoder(ids)[0].to(dtype=weight_dtype)
    pred = unet(noisy, timesteps, hidden).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if prior_loss_weight is None:
        return F.mse_loss(pred.float(), target.float())
    pred, prior_pred = pred.chunk(2)
    target, prior_target = target.chunk(2)
    return F.mse_loss(pred.float(), target.float()) + prior_loss_weight * F.mse_loss(prior_pred.float(), prior_target.float())


class TrainerCallback:
    """Watches a run without changing it (the benchmark's monitors). Subclass and override."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        """Models, accelerator and datasets are ready (``trainer.parts``, ``trainer.accelerator``, ...)."""

    def on_step_end(self, trainer: "Trainer", global_step: int, loss: torch.Tensor) -> None:
        """After each optimizer step, on every process."""


def main(method: Method, argv: Optional[Sequence[str]] = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Parse, validate, train; returns the exit code (2 for bad input, 130 for Ctrl-C)."""
    parser = build_parser(method)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        resolve_defaults(method, args)
        validate_settings(args)
        images = load_image_folder(method.data_dir(args), method.data_flag)
        check_output_dir(args)
        return Trainer(method, args, images, callbacks).run()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


class Trainer:
    def __init__(
        self, method: Method, args: argparse.Namespace, images: Sequence[Any], callbacks: Sequence[TrainerCallback] = ()
    ) -> None:
        self.method, self.args, self.images, self.callbacks = method, args, images, list(callbacks)

    def make_stopper(self, **overrides: Any) -> DVAREarlyStopping:
        """The run's DVAR stopper (``overrides``: DVARConfig fields, e.g. ``resample=("timesteps",)``)."""
        args, parts = self.args, self.parts
        settings = dict(
            preset=args.early_stop_preset, window=args.early_stop_window, threshold=args.early_stop_threshold,
            eval_every=args.early_stop_eval_every, eval_batch_size=args.early_stop_batch_size,
            seed=args.seed, max_train_steps=args.max_train_steps,
            verbose=False,  # the stop line is printed by finish(), after the progress bar
        )
        settings.update(overrides)
        return DVAREarlyStopping(
            unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
            noise_scheduler=parts.noise_scheduler, train_dataset=self.eval_dataset, accelerator=self.accelerator,
            **settings,
        )

    def run(self) -> int:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        args, method = self.args, self.method
        parts = load_components(args.pretrained_model_name_or_path)
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
            if args.overwrite_output_dir and not args.resume_from_checkpoint and Path(args.output_dir).exists():
                shutil.rmtree(args.output_dir)
            os.makedirs(args.output_dir, exist_ok=True)
        accelerator.wait_for_everyone()
        train_dataset, eval_dataset = method.build_datasets(args, self.images, accelerator)
        set_seed(args.seed)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

        trainable = method.setup(args, parts, accelerator)
        parts.vae.requires_grad_(False)
        for module in (parts.vae, parts.unet, parts.text_encoder):  # frozen parts in the compute dtype
            frozen = not any(p.requires_grad for p in module.parameters())
            module.to(accelerator.device, dtype=weight_dtype if frozen and weight_dtype != torch.float32 else None)
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

        self.parts, self.accelerator, self.eval_dataset, self.weight_dtype = parts, accelerator, eval_dataset, weight_dtype
        stopper = None
        if args.early_stop:
            stopper = self.make_stopper()
            accelerator.register_for_checkpointing(stopper)
        if accelerator.is_main_process:
            config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
            accelerator.init_trackers(f"dvar-{method.name}", config=config)

        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        global_step, first_epoch, resume_batches = 0, 0, 0
        if args.resume_from_checkpoint:
            checkpoint = find_checkpoint(args)
            accelerator.print(f"Resuming from {checkpoint}")
            accelerator.load_state(str(checkpoint))
            global_step = int(checkpoint.name.split("-")[1])
            first_epoch = global_step // steps_per_epoch
            resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

        progress = tqdm(
            total=args.max_train_steps, initial=global_step, desc="Steps",
            disable=not accelerator.is_local_main_process or os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
        )
        models = [parts.unet, parts.text_encoder]
        for callback in self.callbacks:
            callback.on_train_begin(self)
        started = time.perf_counter()
        step_seconds: List[float] = []
        outcome, exit_code = "budget", 0
        try:
            for epoch in range(first_epoch, num_epochs):
                for module in models:
                    module.train()
                dataloader.set_epoch(epoch)
                batches = dataloader
                if epoch == first_epoch and resume_batches:
                    batches = accelerator.skip_first_batches(dataloader, resume_batches)
                for batch in batches:
                    step_started = time.perf_counter()
                    with accelerator.accumulate(*models):
                        loss = method.loss(batch, parts, weight_dtype, args)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"the training loss became {loss.item()} at step {global_step + 1}; lower "
                                "--learning_rate or train in fp32/bf16 (--mixed_precision no|bf16)"
                            )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm:
                            accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                        method.after_optimizer_step(parts, accelerator)
                    if not accelerator.sync_gradients:
                        continue
                    global_step += 1
                    should_stop = stopper is not None and stopper.step(global_step, loss)
                    step_seconds.append(time.perf_counter() - step_started)  # DVAR's evaluation included
                    for callback in self.callbacks:
                        callback.on_step_end(self, global_step, loss)
                    if global_step % args.checkpointing_steps == 0:
                        self.save_checkpoint(accelerator, global_step)
                    logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
                    progress.update(1)
                    progress.set_postfix(**{"loss": f"{logs['loss']:.4f}", **(stopper.progress_postfix() if stopper else {})})
                    accelerator.log(logs, step=global_step)
                    if should_stop:
                        outcome = "early_stop"
                        break
                    if global_step >= args.max_train_steps:
                        break
                if outcome == "early_stop" or global_step >= args.max_train_steps:
                    break
        except KeyboardInterrupt:
            outcome, exit_code = "interrupted", EXIT_INTERRUPTED
            accelerator.print(f"\nInterrupted at step {global_step}: saving the learned weights.")
        except Exception as error:
            outcome, exit_code = "error", 1
            accelerator.print(f"\nTraining failed at step {global_step} ({error}); saving the learned weights.")
            self.finish(accelerator, parts, stopper, global_step, started, step_seconds, outcome, weight_dtype, samples=False)
            raise
        progress.close()
        self.finish(
            accelerator, parts, stopper, global_step, started, step_seconds, outcome, weight_dtype,
            samples=outcome != "interrupted",
        )
        return exit_code

    def save_checkpoint(self, accelerator: Any, global_step: int) -> None:
        args = self.args
        if accelerator.is_main_process and args.checkpoints_total_limit is not None:
            existing = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(old)
        accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))

    def finish(
        self, accelerator: Any, parts: Components, stopper: Optional[DVAREarlyStopping], global_step: int,
        started: float, step_seconds: List[float], outcome: str, weight_dtype: torch.dtype, samples: bool,
    ) -> None:
        """Save the learned weights, the summary, the DVAR history and (normally) samples."""
        args, method = self.args, self.method
        if accelerator.num_processes > 1:
            # One write per line: the ranks share stdout, and print() writes the newline separately.
            sys.stdout.write(f"[rank {accelerator.process_index}] training ended at step {global_step} ({outcome})\n")
            sys.stdout.flush()
        if outcome != "interrupted":
            accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            accelerator.end_training()
            return
        files = method.save(args.output_dir, parts, accelerator)
        wall = time.perf_counter() - started
        mean_step = sum(step_seconds) / len(step_seconds) if step_seconds else 0.0
        summary: Dict[str, Any] = {
            "method": method.name,
            "outcome": outcome,
            "final_step": global_step,
            "max_train_steps": args.max_train_steps,
            "early_stop": bool(stopper),
            "wall_time_s": round(wall, 2),
            "mean_step_s": round(mean_step, 4),
            "median_step_s": round(sorted(step_seconds)[len(step_seconds) // 2], 4) if step_seconds else 0.0,
            "saved_files": files,
        }
        if torch.cuda.is_available():
            summary["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if stopper is not None:
            summary.update(stopper.summary(args.max_train_steps))
            summary["time_saved_s_estimate"] = round(summary["steps_saved"] * mean_step, 2)
            stopper.save_history(args.output_dir, summary=False)  # the summary below holds stopper.summary()
            if stopper.should_stop:
                stopper.report()  # the callback's stop line: step, budget, steps saved, reason
        with open(os.path.join(args.output_dir, "dvar_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        if samples and args.num_validation_images > 0:
            self.save_samples(parts, accelerator, weight_dtype)
        accelerator.end_training()

    def save_samples(self, parts: Components, accelerator: Any, weight_dtype: torch.dtype) -> None:
        args = self.args
        prompt = args.validation_prompt or self.method.default_validation_prompt(args)
        pipe = self.method.pipeline(parts, accelerator, weight_dtype).to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        folder = Path(args.output_dir) / "samples"
        folder.mkdir(exist_ok=True)
        with torch.no_grad(), accelerator.autocast():  # frozen parts may be fp16/bf16, trained ones fp32
            images = pipe(
                [prompt] * args.num_validation_images, num_inference_steps=args.num_inference_steps,
                generator=generator, height=args.resolution, width=args.resolution,
            ).images
        for i, image in enumerate(images):
            image.save(folder / f"{i:02d}.png")
        (folder / "prompt.txt").write_text(prompt + "\n")

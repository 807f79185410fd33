"""What a personalization method is to the shared loop: ``Method`` (what trains, how it is saved),
the Stable Diffusion (or Flux) parts it works on, and the default diffusion loss."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F



logger = logging.getLogger("dvar.integrations")



@dataclass
class Components:
    """The parts a method trains or uses. ``unet`` is the denoiser of either family: the
    UNet2DConditionModel (``family="sd"``) or the FluxTransformer2DModel (``family="flux"``, which also
    has the T5 ``text_encoder_2``/``tokenizer_2``; ``text_encoder`` is its CLIP)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    model_path: str
    text_encoder_2: Optional[torch.nn.Module] = None
    tokenizer_2: Any = None
    family: str = "sd"


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
    mini_sd_budget: Budget  # measured for the embedded mini-SD (see docs/trainers.md)
    flux_budget: Optional[Budget] = None  # for FluxPipeline folders, where the method trains them
    mini_flow_budget: Optional[Budget] = None  # measured for the embedded mini-flow (a FluxPipeline folder)
    families: Tuple[str, ...] = ("sd",)  # the model families it trains (Components.family)
    data_flag: str = "--instance_data_dir"
    # Keep a CPU copy of learned_state() at the last good step, to save instead of NaN/inf weights.
    keeps_finite_copy: bool = True

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

        if parts.family == "flux":
            from .flux import flux_pipeline

            return flux_pipeline(parts, accelerator)
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

    def save_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        """The trained weights in a checkpoint folder (main process only; with :meth:`register_checkpoint_hooks`)."""
        raise NotImplementedError

    def load_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> bool:
        """Inverse of ``save_checkpoint_weights``, into the models being trained (every process). False: the
        folder has none of these files (a checkpoint of an older dvar): accelerate loads its own model files."""
        raise NotImplementedError

    def register_checkpoint_hooks(self, parts: Components, accelerator: Any) -> None:
        """``accelerator.save_state``/``load_state`` write and read the method's own small files for the
        models being trained, as diffusers' scripts do, instead of accelerate's whole-model files."""

        def save_hook(models: List[Any], weights: List[Any], folder: str) -> None:
            weights.clear()  # every prepared model is ours: what trains is saved below
            if accelerator.is_main_process:
                Path(folder).mkdir(parents=True, exist_ok=True)
                self.save_checkpoint_weights(folder, parts, accelerator)

        def load_hook(models: List[Any], folder: str) -> None:
            if self.load_checkpoint_weights(folder, parts, accelerator) is not False:
                models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def prepare_optimizer(self, optimizer: Any) -> None:
        """After ``accelerator.prepare``: new token rows keep only their own rows of the optimizer state
        in checkpoints (the whole table's Adam moments would cost 2x the text encoder's embedding)."""
        rows = getattr(self, "token_rows", None)
        if rows is not None:
            rows.checkpoint_only_new_rows(getattr(optimizer, "optimizer", optimizer))

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
        name = "transformer" if parts.family == "flux" else "unet"
        return [(name, accelerator.unwrap_model(parts.unet), None, rows), ("text_encoder", text_encoder, table, rows)]


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

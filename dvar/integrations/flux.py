"""Flux models (``FluxPipeline`` folders) in the trainers, as diffusers'
examples/dreambooth/train_dreambooth_lora_flux.py trains them: the parts, the flags, the training loss
and the sampling settings. Of the trainers, DreamBooth-LoRA trains Flux; the others refuse it.

    python integrations/dreambooth_lora.py --pretrained_model_name_or_path ./FLUX.1-dev \\
        --instance_data_dir ./my_dog --instance_prompt "a photo of sks dog" --early-stop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch

from dvar.objectives import WEIGHTING_SCHEMES, FluxPromptEncoder, PromptEmbeddings, _predict_flux

from .data import UsageError
from .method import Components

FLUX_PIPELINE = "FluxPipeline"
UPSTREAM_RESOLUTION = 512  # train_dreambooth_lora_flux.py's --resolution default
UPSTREAM_MAX_SEQUENCE_LENGTH = 512  # and its --max_sequence_length default
#: train_dreambooth_lora_flux.py's default LoRA targets in the transformer
TRANSFORMER_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]


def pipeline_class(folder: str) -> Optional[str]:
    """``_class_name`` of a diffusers folder's model_index.json (None without one).

    >>> pipeline_class("/nonexistent") is None
    True
    """
    try:
        return json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def model_family(folder: str) -> str:
    """``"flux"`` for a ``FluxPipeline`` folder, else ``"sd"``."""
    return "flux" if pipeline_class(folder) == FLUX_PIPELINE else "sd"


def is_embedded_flow(path: str) -> bool:
    """True if ``path`` is the embedded mini-flow (``dvar.models.mini_flow()``)."""
    from dvar.models import mini_flow

    try:
        return Path(path).resolve() == Path(mini_flow()).resolve()
    except (ImportError, OSError):  # dvar-lab or its mini-flow weights are not installed
        return False


METHOD_TITLES = {"textual_inversion": "Textual Inversion", "dreambooth": "DreamBooth",
                 "custom_diffusion": "Custom Diffusion", "dreambooth_lora": "DreamBooth-LoRA"}


def unsupported_model(method_name: str, name: str) -> UsageError:
    """The refusal of a method that trains Stable Diffusion only, given a Flux folder.

    >>> str(unsupported_model("textual_inversion", "./flux")).split(":")[0]
    'Textual Inversion does not train Flux models'
    """
    return UsageError(
        f"{METHOD_TITLES.get(method_name, method_name)} does not train Flux models: --pretrained_model_name_or_path {name} "
        f"is a {FLUX_PIPELINE} (a FluxTransformer2DModel with CLIP and T5 text encoders), and "
        f"integrations/{method_name}.py trains Stable Diffusion UNets. DreamBooth-LoRA "
        "(integrations/dreambooth_lora.py) supports Flux."
    )


def load_flux_components(path: str) -> Components:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from dvar.models import load_exactly

    return Components(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=load_exactly(CLIPTextModel, path, "text_encoder").float(),
        vae=load_exactly(AutoencoderKL, path, "vae").float(),
        unet=load_exactly(FluxTransformer2DModel, path, "transformer").float(),
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        model_path=path,
        text_encoder_2=load_exactly(T5EncoderModel, path, "text_encoder_2").float(),
        tokenizer_2=T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2"),
        family="flux",
    )


def add_flux_arguments(parser: argparse.ArgumentParser) -> None:
    """train_dreambooth_lora_flux.py's loss flags, with its names and defaults, plus ``--true_cfg_scale``."""
    add = parser.add_argument
    add("--weighting_scheme", choices=list(WEIGHTING_SCHEMES), default="none",
        help="Flux: sigma_sqrt/cosmap weight the loss, logit_normal/mode draw timesteps from that density.")
    add("--logit_mean", type=float, default=0.0, help="Flux: mean of --weighting_scheme logit_normal.")
    add("--logit_std", type=float, default=1.0, help="Flux: std of --weighting_scheme logit_normal.")
    add("--mode_scale", type=float, default=1.29, help="Flux: scale of --weighting_scheme mode.")
    add("--guidance_scale", type=float, default=3.5,
        help="Flux: the guidance value fed to a transformer with a guidance embedding (FLUX.1-dev) while training.")
    add("--max_sequence_length", type=int, default=None,
        help=f"Flux: T5 tokens per prompt (default {UPSTREAM_MAX_SEQUENCE_LENGTH}; 32 for the embedded mini-flow).")
    add("--true_cfg_scale", type=float, default=4.0,
        help="Flux: classifier-free guidance of the sample images for a transformer without a guidance embedding "
             "(negative prompt ''); unused in training.")


def resolve_flux_settings(args: argparse.Namespace, parts: Components) -> None:
    """Fill the Flux defaults that depend on the model and refuse impossible values (UsageError)."""
    # the script's 512, or less for a VAE built for smaller images (FLUX.1's says 1024)
    vae_size = parts.vae.config.get("sample_size")
    resolution = min(UPSTREAM_RESOLUTION, vae_size) if isinstance(vae_size, int) else UPSTREAM_RESOLUTION
    max_sequence_length = UPSTREAM_MAX_SEQUENCE_LENGTH
    if is_embedded_flow(parts.model_path):
        from dvar_lab.models import MINI_FLOW_MAX_SEQUENCE_LENGTH, MINI_FLOW_RESOLUTION

        resolution, max_sequence_length = MINI_FLOW_RESOLUTION, MINI_FLOW_MAX_SEQUENCE_LENGTH
    if args.resolution is None:
        args.resolution = resolution
    if args.max_sequence_length is None:
        args.max_sequence_length = max_sequence_length
    multiple = 2 * 2 ** (len(parts.vae.config.block_out_channels) - 1)  # VAE factor x the 2x2 latent packing
    if args.resolution < multiple or args.resolution % multiple:
        raise UsageError(
            f"--resolution {args.resolution}: this Flux model needs a multiple of {multiple} (its VAE's scale factor "
            "times the 2x2 packing of the latents)."
        )
    if not 1 <= args.max_sequence_length <= UPSTREAM_MAX_SEQUENCE_LENGTH:
        raise UsageError(f"--max_sequence_length must be between 1 and 512 (got {args.max_sequence_length}).")


def encode_prompts(parts: Components, prompts: List[str], max_sequence_length: int) -> PromptEmbeddings:
    """CLIP's pooled output and T5's hidden states, as the script's ``encode_prompt`` (DVAR's own encoder)."""
    encoder = FluxPromptEncoder(parts.tokenizer, parts.tokenizer_2, max_sequence_length)
    captions = SimpleNamespace(captions=list(prompts), text_cache_key=None, input_ids=None)
    return encoder({"text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2}, captions)


def flux_loss(
    batch: Dict[str, Any], parts: Components, weight_dtype: torch.dtype, args: argparse.Namespace,
    prior_loss_weight: Optional[float] = None, cache: Optional[Dict[Any, PromptEmbeddings]] = None,
) -> torch.Tensor:
    """train_dreambooth_lora_flux.py's loss of one batch: shifted and scaled latents, timesteps from
    ``--weighting_scheme``'s density, then :func:`flow_matching_loss` (prior preservation: the second half
    of the batch is class examples). ``cache``: prompt embeddings by prompts, while the text side is frozen.

    Example:
        >>> loss = flux_loss(batch, parts, torch.float32, args)  # doctest: +SKIP
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    vae, scheduler = parts.vae, parts.noise_scheduler
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].to(vae.device, weight_dtype)).latent_dist.sample()
    latents = ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(weight_dtype)
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=args.weighting_scheme, batch_size=latents.shape[0], logit_mean=args.logit_mean,
        logit_std=args.logit_std, mode_scale=args.mode_scale,
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype)
    cond = None
    if cache is not None and not any(p.requires_grad for p in parts.text_encoder.parameters()):
        key = tuple(batch["prompt"])
        if key not in cache:
            with torch.no_grad():
                cache[key] = encode_prompts(parts, batch["prompt"], args.max_sequence_length)
        cond = cache[key]
    return flow_matching_loss(parts, latents, noise, timesteps, sigmas, batch["prompt"], args, prior_loss_weight, cond)


def flow_matching_loss(
    parts: Components, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
    prompts: List[str], args: argparse.Namespace, prior_loss_weight: Optional[float] = None,
    cond: Optional[PromptEmbeddings] = None,
) -> torch.Tensor:
    """The script's loss lines for given latents, noise and timesteps: the transformer's prediction on
    packed latents (with ``--guidance_scale`` where it embeds guidance), target ``noise - latents``,
    ``compute_loss_weighting_for_sd3``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    cond = cond if cond is not None else encode_prompts(parts, prompts, args.max_sequence_length)
    param = next(parts.unet.parameters())
    prediction = _predict_flux(parts.unet, noisy.to(param.dtype), timesteps, cond, args.guidance_scale)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    target = noise - latents

    def mean_loss(weight: torch.Tensor, pred: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        return torch.mean((weight.float() * (pred.float() - goal.float()) ** 2).reshape(goal.shape[0], -1), 1).mean()

    if prior_loss_weight is None:
        return mean_loss(weighting, prediction, target)
    (pred, prior_pred), (goal, prior_goal) = prediction.chunk(2), target.chunk(2)
    weight, prior_weight = weighting.chunk(2)
    return mean_loss(weight, pred, goal) + prior_loss_weight * mean_loss(prior_weight, prior_pred, prior_goal)


def flux_pipeline(parts: Components, accelerator: Any) -> Any:
    """A FluxPipeline with the models being trained (and the folder's scheduler)."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(
        parts.model_path,
        transformer=accelerator.unwrap_model(parts.unet),
        text_encoder=accelerator.unwrap_model(parts.text_encoder),
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        vae=parts.vae,
    )


def sampling_kwargs(args: argparse.Namespace, transformer: torch.nn.Module, count: int) -> Dict[str, Any]:
    """FluxPipeline arguments for ``count`` images: ``max_sequence_length``, and true classifier-free
    guidance (``negative_prompt=""``, ``--true_cfg_scale``) for a transformer without a guidance embedding,
    whose samples are unguided otherwise; one with it keeps the pipeline's ``guidance_scale``, as the script.

    >>> args = argparse.Namespace(max_sequence_length=32, true_cfg_scale=4.0)
    >>> sampling_kwargs(args, SimpleNamespace(config=SimpleNamespace(guidance_embeds=False)), 2)
    {'max_sequence_length': 32, 'negative_prompt': ['', ''], 'true_cfg_scale': 4.0}
    """
    kwargs: Dict[str, Any] = {"max_sequence_length": args.max_sequence_length}
    if not transformer.config.guidance_embeds:
        kwargs.update(negative_prompt=[""] * count, true_cfg_scale=args.true_cfg_scale)
    return kwargs

"""The training objective, evaluated on the frozen batch.

``deterministic_loss`` is the plain function; :class:`DiffusionObjective` is the same
computation with caches for what cannot change between evaluations (the noisy latents,
the token ids of frozen captions, and the prompt embeddings while no text-side parameter
is trained). Both take
``(models, batch)``, the signature any custom objective plugs in with.

Supported out of the box: epsilon-, v- and sample-prediction DDPM-family schedulers (with
the scripts' optional min-SNR weighting, ``snr_gamma``), rectified flow
(``FlowMatchEulerDiscreteScheduler``, frozen sigmas, target ``noise - latents``, the SD3/Flux
scripts' ``weighting_scheme``); SD 1.x/2.x UNets (one CLIP text encoder), SDXL UNets (two
text encoders, pooled embeddings, added time ids from the dataset's ``original_size`` and
``crop_top_left``), Flux transformers (CLIP pooled + T5 embeddings, packed latents, the
guidance embedding), and SD3-style transformers when given a ``prompt_encoder`` callable
(e.g. wrapping ``pipe.encode_prompt``). Each matches what diffusers' training scripts
compute for the same inputs (``tests/test_objectives.py``, ``tests/test_upstream_snippets.py``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .batch import EvalBatch, is_flow_matching

Models = Mapping[str, torch.nn.Module]
Objective = Callable[[Models, EvalBatch], torch.Tensor]
DENOISER_KEYS = ("unet", "transformer", "denoiser", "prior")
#: ``--weighting_scheme`` of diffusers' SD3/Flux scripts: the first two weight the loss, the
#: next two draw timesteps from a non-uniform density (:class:`~dvar.FixedEvalBatch`).
WEIGHTING_SCHEMES = ("sigma_sqrt", "cosmap", "logit_normal", "mode", "none")


@dataclass
class PromptEmbeddings:
    """Text conditioning of the denoiser."""

    hidden_states: torch.Tensor
    pooled: Optional[torch.Tensor] = None


PromptEncoder = Callable[[Models, EvalBatch], PromptEmbeddings]


def _tokenize(tokenizer: Any, captions: Sequence[str], max_length: Optional[int] = None) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def encode_distinct_rows(encode: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``encode(ids)``, running the encoder once per distinct row: a frozen batch often repeats one caption
    (DreamBooth and Custom Diffusion's instance prompt), and each row's encoding does not depend on the others.

    >>> encode_distinct_rows(lambda rows: rows * 10, torch.tensor([[1, 2], [3, 4], [1, 2]])).tolist()
    [[10, 20], [30, 40], [10, 20]]
    """
    distinct, inverse = torch.unique(ids, dim=0, return_inverse=True)
    if distinct.shape[0] == ids.shape[0]:
        return encode(ids)
    return encode(distinct)[inverse]


class CLIPPromptEncoder:
    """SD 1.x/2.x conditioning: the last hidden state of one CLIP text encoder.

    Example:
        >>> encode = CLIPPromptEncoder(tokenizer)  # doctest: +SKIP
        >>> embeddings = encode({"text_encoder": text_encoder}, batch)  # doctest: +SKIP
    """

    text_encoder_keys: Tuple[str, ...] = ("text_encoder",)

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._ids_cache: Dict[Any, torch.Tensor] = {}  # token ids of frozen captions: tokenized once

    def _ids(self, batch: EvalBatch, tokenizer: Any, max_length: Optional[int] = None) -> torch.Tensor:
        if batch.captions is not None:
            if tokenizer is None:
                raise ValueError("The dataset gives caption strings: pass the tokenizer to DVAREarlyStopping.")
            if batch.text_cache_key is None:  # captions redrawn at every evaluation
                return _tokenize(tokenizer, batch.captions, max_length)
            key = (id(tokenizer), len(tokenizer), tuple(batch.captions), max_length)  # (len: tokens added since)
            if key not in self._ids_cache:
                self._ids_cache[key] = _tokenize(tokenizer, batch.captions, max_length)
            return self._ids_cache[key]
        if batch.input_ids is None:
            raise ValueError("The evaluation batch has no captions or input_ids for the text encoder.")
        return batch.input_ids

    def __call__(self, models: Models, batch: EvalBatch) -> PromptEmbeddings:
        text_encoder = models["text_encoder"]
        ids = self._ids(batch, self.tokenizer).to(_device_of(text_encoder))
        return PromptEmbeddings(encode_distinct_rows(lambda rows: text_encoder(rows, return_dict=False)[0], ids))


class SDXLPromptEncoder(CLIPPromptEncoder):
    """SDXL conditioning: penultimate hidden states of both encoders, concatenated, plus
    the pooled projection of the second one (as in diffusers' ``encode_prompt``)."""

    text_encoder_keys = ("text_encoder", "text_encoder_2")

    def __init__(self, tokenizer: Any = None, tokenizer_2: Any = None) -> None:
        super().__init__(tokenizer)
        self.tokenizer_2 = tokenizer_2 if tokenizer_2 is not None else tokenizer

    def __call__(self, models: Models, batch: EvalBatch) -> PromptEmbeddings:
        hidden, pooled = [], None
        for key, tokenizer in (("text_encoder", self.tokenizer), ("text_encoder_2", self.tokenizer_2)):
            encoder = models[key]
            ids = self._ids(batch, tokenizer).to(_device_of(encoder))
            output = encoder(ids, output_hidden_states=True)
            pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


class FluxPromptEncoder(CLIPPromptEncoder):
    """Flux conditioning: the pooled output of the CLIP encoder and the last hidden state of the
    T5 encoder (``text_encoder_2``, ``max_sequence_length`` tokens), as in diffusers'
    ``train_dreambooth_lora_flux.py`` ``encode_prompt``.

    Example:
        >>> encode = FluxPromptEncoder(tokenizer_one, tokenizer_two, max_sequence_length=512)  # doctest: +SKIP
    """

    text_encoder_keys = ("text_encoder", "text_encoder_2")

    def __init__(self, tokenizer: Any = None, tokenizer_2: Any = None, max_sequence_length: Optional[int] = None) -> None:
        super().__init__(tokenizer)
        self.tokenizer_2 = tokenizer_2
        self.max_sequence_length = max_sequence_length or 512  # the scripts' --max_sequence_length default

    def __call__(self, models: Models, batch: EvalBatch) -> PromptEmbeddings:
        clip, t5 = models["text_encoder"], models["text_encoder_2"]
        pooled = clip(self._ids(batch, self.tokenizer, 77).to(_device_of(clip)), output_hidden_states=False).pooler_output
        hidden = t5(self._ids(batch, self.tokenizer_2, self.max_sequence_length).to(_device_of(t5)))[0]
        return PromptEmbeddings(hidden, pooled)


def is_t5(module: torch.nn.Module) -> bool:
    return getattr(getattr(module, "config", None), "model_type", None) in ("t5", "umt5")


def default_prompt_encoder(
    models: Models, tokenizer: Any = None, tokenizer_2: Any = None, max_sequence_length: Optional[int] = None
) -> Optional[PromptEncoder]:
    """Flux's encoder when the second text encoder is a T5, SDXL's when it is a CLIP, CLIP's
    when there is one text encoder, else None."""
    if "text_encoder_2" in models:
        if is_t5(models["text_encoder_2"]):
            return FluxPromptEncoder(tokenizer, tokenizer_2, max_sequence_length)
        return SDXLPromptEncoder(tokenizer, tokenizer_2)
    if "text_encoder" in models:
        return CLIPPromptEncoder(tokenizer)
    return None


def denoiser_of(models: Models) -> torch.nn.Module:
    for key in DENOISER_KEYS:
        if key in models:
            return models[key]
    raise KeyError(f"No denoiser among the models {sorted(models)}; name it one of {DENOISER_KEYS}.")


def noisy_inputs(batch: EvalBatch, noise_scheduler: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, denoiser timesteps, regression target) for the batch's frozen parts."""
    latents, noise, timesteps = batch.latents, batch.noise, batch.timesteps
    if latents is None or noise is None or timesteps is None:
        raise ValueError("The evaluation batch has no latents/noise/timesteps: build it with a noise_scheduler.")
    if is_flow_matching(noise_scheduler):
        sigmas = batch.sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.device)
        return (1.0 - sigmas) * latents + sigmas * noise, timesteps, noise - latents
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}; pass a custom objective.")
    return noisy, timesteps, target


def _sdxl_time_ids(batch: EvalBatch) -> torch.Tensor:
    """(original size, crop top-left, target size) per example, as SDXL scripts' ``compute_time_ids``.

    The size and crop come from the dataset items (``original_size``, ``crop_top_left``, as in
    ``train_dreambooth_lora_sdxl.py``); without them, an uncropped image of the training size.
    """
    height, width = batch.pixel_values.shape[-2:]
    if batch.size_conditioning is not None:
        target = torch.tensor([[height, width]] * len(batch), dtype=torch.float32)
        return torch.cat([batch.size_conditioning.float(), target], dim=1)
    return torch.tensor([[height, width, 0, 0, height, width]] * len(batch), dtype=torch.float32)


def _predict_flux(
    denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: PromptEmbeddings,
    guidance_scale: Optional[float],
) -> torch.Tensor:
    """A FluxTransformer2DModel forward pass on unpacked latents, as ``train_dreambooth_lora_flux.py``."""
    from diffusers import FluxPipeline

    param = next(denoiser.parameters())
    batch_size, channels, height, width = noisy.shape
    guidance = None
    if getattr(denoiser, "module", denoiser).config.guidance_embeds:  # (DDP-wrapped in a trainer's loss)
        if guidance_scale is None:
            raise ValueError(
                "This Flux transformer embeds the guidance scale: pass loss=LossConfig.from_args(args) (or "
                "LossConfig(guidance_scale=args.guidance_scale)) to DVAR, the value the training script feeds it."
            )
        guidance = torch.tensor([guidance_scale], device=param.device).expand(batch_size)
    hidden = cond.hidden_states.to(param.device, param.dtype)
    prediction = denoiser(
        hidden_states=FluxPipeline._pack_latents(noisy, batch_size, channels, height, width),
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=cond.pooled.to(param.device, param.dtype),
        encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3).to(device=param.device, dtype=param.dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, param.device, param.dtype),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(prediction, height=height, width=width, vae_scale_factor=1)


def predict(
    denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Optional[PromptEmbeddings], batch: EvalBatch,
    guidance_scale: Optional[float] = None,
) -> torch.Tensor:
    """One denoiser forward pass, with the call convention of its diffusers class."""
    param = next(denoiser.parameters())
    noisy = noisy.to(param.device, param.dtype)
    timesteps = timesteps.to(param.device)
    hidden = None if cond is None else cond.hidden_states.to(param.device, param.dtype)
    config = getattr(denoiser, "config", {})
    if "guidance_embeds" in config:  # FluxTransformer2DModel
        if cond is None or cond.pooled is None:
            raise ValueError("A Flux transformer needs pooled CLIP and T5 embeddings (text_encoder, text_encoder_2).")
        return _predict_flux(denoiser, noisy, timesteps, cond, guidance_scale)
    if hasattr(denoiser, "add_embedding") or "cross_attention_dim" in config:  # UNet2DConditionModel
        added: Optional[Dict[str, torch.Tensor]] = None
        if config.get("addition_embed_type") == "text_time":
            if cond is None or cond.pooled is None:
                raise ValueError("This SDXL-style UNet needs pooled text embeddings (text_encoder_2).")
            added = {
                "text_embeds": cond.pooled.to(param.device, param.dtype),
                "time_ids": _sdxl_time_ids(batch).to(param.device, param.dtype),
            }
        return denoiser(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
    if "pooled_projection_dim" in config:  # SD3Transformer2DModel
        pooled = cond.pooled.to(param.device, param.dtype)
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False
        )[0]
    return denoiser(noisy, timesteps, hidden)


def text_side_trainable(models: Models, keys: Sequence[str]) -> bool:
    """True if any parameter of the text encoders requires grad (TI, DreamBooth with --train_text_encoder)."""
    return any(p.requires_grad for key in keys if key in models for p in models[key].parameters())


@dataclass
class LossConfig:
    """The training script's loss options, so that the frozen batch's loss is the one it trains on.

    Field names are the diffusers scripts' flags; :meth:`from_args` reads those a script has.

    Example:
        >>> LossConfig.from_args(argparse.Namespace(snr_gamma=5.0, learning_rate=1e-4))
        LossConfig(weighting_scheme='none', logit_mean=0.0, logit_std=1.0, mode_scale=1.29, snr_gamma=5.0, guidance_scale=None, max_sequence_length=None)
    """

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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LossConfig":
        """The options a training script's parsed ``args`` holds (the others keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def timestep_density(self) -> Optional[Callable[[int], torch.Tensor]]:
        """The scripts' non-uniform timestep density for ``logit_normal``/``mode``, else None (uniform)."""
        if self.weighting_scheme not in ("logit_normal", "mode"):
            return None
        from diffusers.training_utils import compute_density_for_timestep_sampling

        def density(k: int) -> torch.Tensor:
            return compute_density_for_timestep_sampling(
                weighting_scheme=self.weighting_scheme, batch_size=k, logit_mean=self.logit_mean,
                logit_std=self.logit_std, mode_scale=self.mode_scale,
            )

        return density


class DiffusionObjective:
    """The diffusion training loss on the frozen batch, with caches.

    Args:
        noise_scheduler: the training noise scheduler (its ``prediction_type`` and timesteps).
        prompt_encoder: ``(models, batch) -> PromptEncoder``; by default CLIP (SD) or
            SDXL, from which text encoders are in ``models``.
        tokenizer, tokenizer_2: for caption strings.
        cache_text: cache the prompt embeddings. Default: while no text-encoder
            parameter requires grad.

    Example:
        >>> objective = DiffusionObjective(noise_scheduler, tokenizer=tokenizer)  # doctest: +SKIP
        >>> loss = objective({"unet": unet, "text_encoder": text_encoder}, fixed_batch.next())  # doctest: +SKIP
    """

    def __init__(
        self,
        noise_scheduler: Any,
        prompt_encoder: Optional[PromptEncoder] = None,
        tokenizer: Any = None,
        tokenizer_2: Any = None,
        cache_text: Optional[bool] = None,
        weighting_scheme: str = "none",
        snr_gamma: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        max_sequence_length: Optional[int] = None,
    ) -> None:
        check_loss_settings(noise_scheduler, weighting_scheme, snr_gamma)
        self.noise_scheduler = noise_scheduler
        self.prompt_encoder = prompt_encoder
        self.tokenizers = (tokenizer, tokenizer_2)
        self.cache_text = cache_text
        self.weighting_scheme = weighting_scheme
        self.snr_gamma = snr_gamma
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self._text_cache: Dict[Any, PromptEmbeddings] = {}
        self._input_cache: Dict[Any, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _encoder(self, models: Models) -> Optional[PromptEncoder]:
        if self.prompt_encoder is None:
            self.prompt_encoder = default_prompt_encoder(models, *self.tokenizers, self.max_sequence_length)
        return self.prompt_encoder

    def text_encoder_keys(self, models: Models) -> Tuple[str, ...]:
        encoder = self._encoder(models)
        return getattr(encoder, "text_encoder_keys", ("text_encoder", "text_encoder_2", "text_encoder_3"))

    def cache_prompt_embeddings(self, models: Models, batch: EvalBatch) -> bool:
        """Encode the batch's prompts now if they can be cached (frozen text side, frozen captions).

        True if they are cached: the text encoders are then no longer needed for this batch.
        """
        if batch.prompt_embeds is not None and self.prompt_encoder is None:
            return True  # precomputed by the dataset: no text encoder is used
        if self._encoder(models) is None or batch.text_cache_key is None:
            return False
        keys = self.text_encoder_keys(models)
        if not (self.cache_text if self.cache_text is not None else not text_side_trainable(models, keys)):
            return False
        self._prompt_embeddings(models, batch)
        return True

    def _prompt_embeddings(self, models: Models, batch: EvalBatch) -> Optional[PromptEmbeddings]:
        if batch.prompt_embeds is not None and self.prompt_encoder is None:  # precomputed by the dataset
            return PromptEmbeddings(batch.prompt_embeds)
        encoder = self._encoder(models)
        if encoder is None:
            return None
        keys = self.text_encoder_keys(models)
        cache = self.cache_text if self.cache_text is not None else not text_side_trainable(models, keys)
        if not cache or batch.text_cache_key is None:
            return encoder(models, batch)
        if batch.text_cache_key not in self._text_cache:
            self._text_cache[batch.text_cache_key] = encoder(models, batch)
        return self._text_cache[batch.text_cache_key]

    def _noisy_inputs(self, batch: EvalBatch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = batch.input_cache_key
        if key is not None and key in self._input_cache:
            return self._input_cache[key]
        inputs = tuple(t.to(device) for t in noisy_inputs(batch, self.noise_scheduler))
        if key is not None:
            self._input_cache[key] = inputs
        return inputs

    def __call__(self, models: Models, batch: EvalBatch) -> torch.Tensor:
        denoiser = denoiser_of(models)
        noisy, timesteps, target = self._noisy_inputs(batch, _device_of(denoiser))
        cond = self._prompt_embeddings(models, batch)
        prediction = predict(denoiser, noisy, timesteps, cond, batch, self.guidance_scale)
        # the reductions below are the scripts' own, line for line
        if self.weighting_scheme in ("sigma_sqrt", "cosmap"):  # train_dreambooth_lora_flux.py / _sd3.py
            from diffusers.training_utils import compute_loss_weighting_for_sd3

            sigmas = batch.sigmas.to(prediction.device).view(-1, *([1] * (prediction.ndim - 1)))
            weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme, sigmas=sigmas)
            squared = (weighting.float() * (prediction.float() - target.float()) ** 2).reshape(target.shape[0], -1)
            return torch.mean(squared, 1).mean()
        if self.snr_gamma is not None:  # train_dreambooth_lora_sdxl.py --snr_gamma
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            base_weight = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
            v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
            mse_loss_weights = base_weight + 1 if v_prediction else base_weight
            loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
            return (loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights).mean()
        return F.mse_loss(prediction.float(), target.float())

    def per_example_losses(self, models: Models, batch: EvalBatch) -> "PerExampleLosses":
        """Each example's loss (shape ``[len(batch)]``) with its timestep, and the batch loss that calling the
        objective returns, bit for bit, from the same forward pass (the benchmark records them to replay rules).

        Example:
            >>> out = objective.per_example_losses(models, frozen_batch)  # doctest: +SKIP
            >>> out.losses.shape, out.timesteps.shape, out.loss == objective(models, frozen_batch)  # doctest: +SKIP
            (torch.Size([4]), torch.Size([4]), tensor(True))
        """
        denoiser = denoiser_of(models)
        noisy, timesteps, target = self._noisy_inputs(batch, _device_of(denoiser))
        cond = self._prompt_embeddings(models, batch)
        prediction = predict(denoiser, noisy, timesteps, cond, batch, self.guidance_scale)
        dims = list(range(1, prediction.ndim))
        if self.weighting_scheme in ("sigma_sqrt", "cosmap"):  # as __call__: mean over each example, then the batch
            from diffusers.training_utils import compute_loss_weighting_for_sd3

            sigmas = batch.sigmas.to(prediction.device).view(-1, *([1] * (prediction.ndim - 1)))
            weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme, sigmas=sigmas)
            per_example = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(
                target.shape[0], -1), 1)
            return PerExampleLosses(per_example, timesteps, per_example.mean())
        if self.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            base_weight = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
            v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
            mse_loss_weights = base_weight + 1 if v_prediction else base_weight
            loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
            per_example = loss.mean(dim=dims) * mse_loss_weights
            return PerExampleLosses(per_example, timesteps, per_example.mean())
        per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=dims)
        return PerExampleLosses(per_example, timesteps, F.mse_loss(prediction.float(), target.float()))


class PerExampleLosses(NamedTuple):
    """:meth:`DiffusionObjective.per_example_losses`: each example's loss and timestep, and the batch loss."""

    losses: torch.Tensor
    timesteps: torch.Tensor
    loss: torch.Tensor


def check_loss_settings(noise_scheduler: Any, weighting_scheme: str = "none", snr_gamma: Optional[float] = None) -> None:
    """Reject loss settings the training scripts would not combine with this scheduler."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"Unknown weighting_scheme {weighting_scheme!r}; choose one of {WEIGHTING_SCHEMES}.")
    flow = is_flow_matching(noise_scheduler)
    if weighting_scheme != "none" and not flow:
        raise ValueError(
            f"weighting_scheme={weighting_scheme!r} is a flow-matching (SD3/Flux) option, but the noise scheduler is "
            f"{type(noise_scheduler).__name__}; for DDPM-family schedulers use snr_gamma= (min-SNR) or nothing."
        )
    if snr_gamma is not None and (flow or snr_gamma <= 0):
        raise ValueError(
            f"snr_gamma={snr_gamma} needs a DDPM-family noise scheduler and a value > 0 "
            f"(got {type(noise_scheduler).__name__}); flow matching uses weighting_scheme=."
        )


def deterministic_loss(
    models: Models,
    batch: EvalBatch,
    noise_scheduler: Any,
    tokenizer: Any = None,
    tokenizer_2: Any = None,
    prompt_encoder: Optional[PromptEncoder] = None,
    **loss_settings: Any,
) -> torch.Tensor:
    """The training loss of ``models`` on ``batch``, without caches (``loss_settings``: the
    ``weighting_scheme``/``snr_gamma``/``guidance_scale``/``max_sequence_length`` of
    :class:`DiffusionObjective`).

    Call it under ``torch.no_grad()`` with the models in eval mode, or let
    :class:`~dvar.DVAREarlyStopping` do that.

    Example:
        >>> with torch.no_grad():  # doctest: +SKIP
        ...     loss = deterministic_loss({"unet": unet, "text_encoder": te}, batch.next(), scheduler, tokenizer)
    """
    objective = DiffusionObjective(noise_scheduler, prompt_encoder, tokenizer, tokenizer_2, cache_text=False, **loss_settings)
    return objective(models, batch)

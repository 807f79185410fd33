"""The training objective, evaluated on the frozen batch.

``deterministic_loss`` is the plain function; :class:`DiffusionObjective` is the same
computation with caches for what cannot change between evaluations (the noisy latents,
the token ids of frozen captions, and the prompt embeddings while no text-side parameter
is trained). Both take
``(models, batch)``, the signature any custom objective plugs in with.

Supported out of the box: epsilon-, v- and sample-prediction DDPM-family schedulers,
rectified flow (``FlowMatchEulerDiscreteScheduler``, frozen sigmas, target
``noise - latents``); SD 1.x/2.x UNets (one CLIP text encoder), SDXL UNets (two text
encoders, pooled embeddings, added time ids), and SD3-style transformers when given a
``prompt_encoder`` callable (e.g. wrapping ``pipe.encode_prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .batch import EvalBatch, is_flow_matching

Models = Mapping[str, torch.nn.Module]
Objective = Callable[[Models, EvalBatch], torch.Tensor]
DENOISER_KEYS = ("unet", "transformer", "denoiser", "prior")


@dataclass
class PromptEmbeddings:
    """Text conditioning of the denoiser."""

    hidden_states: torch.Tensor
    pooled: Optional[torch.Tensor] = None


PromptEncoder = Callable[[Models, EvalBatch], PromptEmbeddings]


def _tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class CLIPPromptEncoder:
    """SD 1.x/2.x conditioning: the last hidden state of one CLIP text encoder.

    Example:
        >>> encode = CLIPPromptEncoder(tokenizer)  # doctest: +SKIP
        >>> embeddings = encode({"text_encoder": text_encoder}, batch)
    """

    text_encoder_keys: Tuple[str, ...] = ("text_encoder",)

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._ids_cache: Dict[Any, torch.Tensor] = {}  # token ids of frozen captions: tokenized once

    def _ids(self, batch: EvalBatch, tokenizer: Any) -> torch.Tensor:
        if batch.captions is not None:
            if tokenizer is None:
                raise ValueError("The dataset gives caption strings: pass the tokenizer to DVAREarlyStopping.")
            if batch.text_cache_key is None:  # captions redrawn at every evaluation
                return _tokenize(tokenizer, batch.captions)
            key = (id(tokenizer), len(tokenizer), tuple(batch.captions))  # (len: tokens added since)
            if key not in self._ids_cache:
                self._ids_cache[key] = _tokenize(tokenizer, batch.captions)
            return self._ids_cache[key]
        if batch.input_ids is None:
            raise ValueError("The evaluation batch has no captions or input_ids for the text encoder.")
        return batch.input_ids

    def __call__(self, models: Models, batch: EvalBatch) -> PromptEmbeddings:
        text_encoder = models["text_encoder"]
        ids = self._ids(batch, self.tokenizer).to(_device_of(text_encoder))
        return PromptEmbeddings(text_encoder(ids, return_dict=False)[0])


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


def default_prompt_encoder(models: Models, tokenizer: Any = None, tokenizer_2: Any = None) -> Optional[PromptEncoder]:
    """SDXL encoder when a second text encoder is given, CLIP when one is, else None."""
    if "text_encoder_2" in models:
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
    height, width = batch.pixel_values.shape[-2:]
    # (original size, crop top-left, target size), as for an uncropped training image.
    return torch.tensor([[height, width, 0, 0, height, width]] * len(batch), dtype=torch.float32)


def predict(
    denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Optional[PromptEmbeddings], batch: EvalBatch
) -> torch.Tensor:
    """One denoiser forward pass, with the call convention of its diffusers class."""
    param = next(denoiser.parameters())
    noisy = noisy.to(param.device, param.dtype)
    timesteps = timesteps.to(param.device)
    hidden = None if cond is None else cond.hidden_states.to(param.device, param.dtype)
    config = getattr(denoiser, "config", {})
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


class DiffusionObjective:
    """The diffusion training loss on the frozen batch, with caches.

    Args:
        noise_scheduler: the training noise scheduler (its ``prediction_type`` and timesteps).
        prompt_encoder: ``(models, batch) -> PromptEmbeddings``; by default CLIP (SD) or
            SDXL, from which text encoders are in ``models``.
        tokenizer, tokenizer_2: for caption strings.
        cache_text: cache the prompt embeddings. Default: while no text-encoder
            parameter requires grad.

    Example:
        >>> objective = DiffusionObjective(noise_scheduler, tokenizer=tokenizer)  # doctest: +SKIP
        >>> loss = objective({"unet": unet, "text_encoder": text_encoder}, fixed_batch.next())
    """

    def __init__(
        self,
        noise_scheduler: Any,
        prompt_encoder: Optional[PromptEncoder] = None,
        tokenizer: Any = None,
        tokenizer_2: Any = None,
        cache_text: Optional[bool] = None,
    ) -> None:
        self.noise_scheduler = noise_scheduler
        self.prompt_encoder = prompt_encoder
        self.tokenizers = (tokenizer, tokenizer_2)
        self.cache_text = cache_text
        self._text_cache: Dict[Any, PromptEmbeddings] = {}
        self._input_cache: Dict[Any, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _encoder(self, models: Models) -> Optional[PromptEncoder]:
        if self.prompt_encoder is None:
            self.prompt_encoder = default_prompt_encoder(models, *self.tokenizers)
        return self.prompt_encoder

    def _prompt_embeddings(self, models: Models, batch: EvalBatch) -> Optional[PromptEmbeddings]:
        if batch.prompt_embeds is not None and self.prompt_encoder is None:  # precomputed by the dataset
            return PromptEmbeddings(batch.prompt_embeds)
        encoder = self._encoder(models)
        if encoder is None:
            return None
        keys = getattr(encoder, "text_encoder_keys", ("text_encoder", "text_encoder_2", "text_encoder_3"))
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
        prediction = predict(denoiser, noisy, timesteps, cond, batch)
        return F.mse_loss(prediction.float(), target.float())


def deterministic_loss(
    models: Models,
    batch: EvalBatch,
    noise_scheduler: Any,
    tokenizer: Any = None,
    tokenizer_2: Any = None,
    prompt_encoder: Optional[PromptEncoder] = None,
) -> torch.Tensor:
    """The training loss of ``models`` on ``batch``, without caches.

    Call it under ``torch.no_grad()`` with the models in eval mode, or let
    :class:`~dvar.DVAREarlyStopping` do that.

    Example:
        >>> with torch.no_grad():  # doctest: +SKIP
        ...     loss = deterministic_loss({"unet": unet, "text_encoder": te}, batch.next(), scheduler, tokenizer)
    """
    objective = DiffusionObjective(noise_scheduler, prompt_encoder, tokenizer, tokenizer_2, cache_text=False)
    return objective(models, batch)

"""Loading a diffusers SD-1.x-style folder that kohya cannot convert (for example mini-SD).

kohya's ``train_util.load_target_model`` always converts a diffusers UNet into its own
SD-1.5-shaped UNet (320/640/1280/1280 channels) and scales latents by 0.18215. A smaller model
in the same format (mini-SD: 32/64/112 channels, VAE scaling factor 0.31636) fails there with
``size mismatch for conv_in.weight``. For such folders only, the plugin loads the diffusers
parts as they are: kohya's LoRA finds the same module names (``Transformer2DModel``,
``ResnetBlock2D``, ...) in diffusers' UNet, and the latents are scaled by the VAE's own
``scaling_factor``. Real SD 1.x/2.x checkpoints keep kohya's own loader.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

#: The widths and depth kohya's SD UNet (library/original_unet.py) is built with.
SD_UNET_SHAPE = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}


def unet_config(path: Optional[str]) -> Optional[dict]:
    """The UNet config of a diffusers folder, or None for a single-file checkpoint or a hub id."""
    if not path or not os.path.isdir(path):
        return None
    config = Path(path) / "unet" / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text())


def needs_as_is_loader(path: Optional[str]) -> bool:
    """True for a local diffusers folder whose UNet is not shaped like SD 1.x/2.x's.

    >>> needs_as_is_loader("sd-v1-5.safetensors")  # a file: kohya's loader
    False
    """
    config = unet_config(path)
    if config is None:
        return False
    return list(config.get("block_out_channels", [])) != SD_UNET_SHAPE["block_out_channels"] or config.get(
        "layers_per_block"
    ) != SD_UNET_SHAPE["layers_per_block"]


def load_text_encoder(path: str) -> Any:
    """The folder's CLIP text encoder with all its weights, whichever transformers saved it.

    transformers >= 5 saves ``CLIPTextModel`` weights without the ``text_model.`` prefix that
    transformers 4.x (sd-scripts pins 4.54) expects; there ``from_pretrained`` then initialises
    every weight at random and only warns. Such files are loaded here with the prefix restored.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from .plugin import KohyaPluginError

    model, info = CLIPTextModel.from_pretrained(
        path, subfolder="text_encoder", torch_dtype=torch.float32, output_loading_info=True
    )
    if not info["missing_keys"] and not info["unexpected_keys"]:
        return model
    files = sorted((Path(path) / "text_encoder").glob("*.safetensors"))
    state = {key: value for file in files for key, value in load_file(str(file)).items()}
    expected = set(model.state_dict())
    if not expected & set(state):
        state = {f"text_model.{key}": value for key, value in state.items()}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KohyaPluginError(
            f"the text encoder in {path} does not match CLIPTextModel of transformers here "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})."
        )
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return model


class AsIsLoaderMixin:
    """In front of a kohya trainer class: loads a diffusers folder kohya cannot convert (mini-SD) as it
    is; every other model goes to kohya's own ``load_target_model``. The launcher uses it alone
    (without DVAR) when ``--early_stop`` is off and the model needs it.

    Example:
        >>> class NetworkTrainer:  # kohya's, in a real run
        ...     pass
        >>> make_loader_class(NetworkTrainer).__name__
        'AsIsNetworkTrainer'
    """

    dvar_family = "sd"

    def load_target_model(self, args, weight_dtype, accelerator):
        if self.dvar_family == "sd" and needs_as_is_loader(args.pretrained_model_name_or_path):
            return load_as_is(self, args, weight_dtype, accelerator)
        return super().load_target_model(args, weight_dtype, accelerator)


def make_loader_class(base: type, family: str = "sd") -> type:
    """``AsIs<base>``: kohya's trainer class with only the loader of :class:`AsIsLoaderMixin` in front."""
    return type(f"AsIs{base.__name__}", (AsIsLoaderMixin, base), {"dvar_family": family, "__module__": __name__})


def load_as_is(trainer: Any, args: Any, weight_dtype: torch.dtype, accelerator: Any) -> tuple:
    """``load_target_model`` for such folders: (model version, text encoder, VAE, diffusers UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from library import model_util  # kohya's

    from .plugin import KohyaPluginError

    path = args.pretrained_model_name_or_path
    if args.vae is not None:
        raise KohyaPluginError(f"--vae cannot replace the VAE of {path}: its latents differ from SD's.")
    logger.info(f"load the diffusers model in {path} as it is (its UNet is not SD-1.5-shaped)")
    text_encoder = load_text_encoder(path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    trainer.vae_scale_factor = vae.config.scaling_factor
    if args.xformers:
        unet.enable_xformers_memory_efficient_attention()
        vae.set_use_memory_efficient_attention_xformers(True)
    version = model_util.get_model_version_str_for_sd1_sd2(args.v2, args.v_parameterization)
    return version, text_encoder, vae, unet

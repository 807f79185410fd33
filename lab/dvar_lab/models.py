"""The pretrained models bundled with dvar.

``mini-SD`` is a small but genuinely pretrained text-to-image model in the Stable Diffusion
1.x format (``AutoencoderKL`` + ``UNet2DConditionModel`` with cross-attention +
``CLIPTextModel`` + the SD 1.x CLIP tokenizer + a DDPM scheduler), trained from scratch on
the synthetic 64x64 world of :mod:`dvar_lab.world` by ``benchmarks/embedded/pretrain_mini_sd.py``
(see ``benchmarks/embedded/MINI_SD.md``). It loads offline with the stock diffusers API and
samples a 64x64 image in a fraction of a second on a CPU, so personalization runs (Textual
Inversion, DreamBooth, LoRA, Custom Diffusion) and their early stopping can be exercised on a
laptop.

Example:
    >>> from dvar_lab.models import load_mini_sd_pipeline
    >>> pipe = load_mini_sd_pipeline()
    >>> image = pipe("a large red solid star in the center, on a gray background",
    ...              num_inference_steps=25, guidance_scale=5.0).images[0]
    >>> image.size
    (64, 64)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from dvar.models import load_exactly

__all__ = ["MINI_SD_RESOLUTION", "SCHEDULERS", "load_mini_sd_pipeline", "mini_sd"]

#: Image side (pixels) that mini-SD generates.
MINI_SD_RESOLUTION = 64

#: Scheduler names accepted by :func:`load_mini_sd_pipeline` and their diffusers classes.
SCHEDULERS: dict[str, str] = {
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}

_REQUIRED = (
    "model_index.json",
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
)


def mini_sd() -> Path:
    """Path of the bundled mini-SD diffusers folder (inside the installed ``dvar_lab`` package).

    Raises:
        FileNotFoundError: if the folder or one of its parts is missing (e.g. an install
            without package data, or a checkout where the weights were not pulled).

    Example:
        >>> (mini_sd() / "model_index.json").is_file()
        True
    """
    path = Path(__file__).resolve().parent / "assets" / "mini-sd"
    missing = [name for name in _REQUIRED if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"the bundled mini-SD model is incomplete at {path} (missing: {', '.join(missing)}); "
            "reinstall dvar-lab (pip install ./lab) with its package data, or rebuild the weights with "
            "`python benchmarks/embedded/pretrain_mini_sd.py --out lab/dvar_lab/assets/mini-sd`"
        )
    return path


def load_mini_sd_pipeline(
    scheduler: str = "dpm",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path | None = None,
    **kwargs: Any,
):
    """Load mini-SD as a ``diffusers.StableDiffusionPipeline`` (offline).

    Args:
        scheduler: sampler, one of :data:`SCHEDULERS` (``"dpm"``: DPM-Solver++ multistep,
            good at 20-25 steps; ``"ddim"``; ``"ddpm"``: the training scheduler; ...), built
            ``from_config`` of the bundled scheduler.
        device: where to put the pipeline.
        dtype: weights dtype (the files are float16; float32 is the default since float16
            matmuls are slow or unsupported on CPUs).
        path: another mini-SD folder (e.g. a fresh ``pretrain_mini_sd.py --out``); default:
            the bundled :func:`mini_sd`.
        **kwargs: passed on to ``StableDiffusionPipeline.from_pretrained``.

    Example:
        >>> pipe = load_mini_sd_pipeline(scheduler="ddim")
        >>> type(pipe.scheduler).__name__
        'DDIMScheduler'
    """
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if scheduler not in SCHEDULERS:
        raise ValueError(
            f"unknown scheduler {scheduler!r}; expected one of {sorted(SCHEDULERS)}"
        )
    root = mini_sd() if path is None else path
    with warnings.catch_warnings():
        # newer diffusers rename ``torch_dtype`` to ``dtype``; the old name works everywhere
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        # the models one by one, each checked to load exactly (the pipeline loader only warns)
        models = {
            name: kwargs.pop(name) if name in kwargs else load_exactly(cls, root, name, torch_dtype=dtype, local_files_only=True)
            for name, cls in (("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel), ("vae", AutoencoderKL))
        }
        pipe = StableDiffusionPipeline.from_pretrained(
            root,
            **models,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
            **kwargs,
        )
    if scheduler != "ddpm":
        scheduler_cls = getattr(diffusers, SCHEDULERS[scheduler])
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

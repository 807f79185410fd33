"""The pretrained models bundled with dvar.

``mini-SD`` is a small but genuinely pretrained text-to-image model in the Stable Diffusion
1.x format (``AutoencoderKL`` + ``UNet2DConditionModel`` with cross-attention +
``CLIPTextModel`` + the SD 1.x CLIP tokenizer + a DDPM scheduler), trained from scratch on
the synthetic 64x64 world of :mod:`dvar_lab.world` by ``benchmarks/embedded/pretrain_mini_sd.py``
(see ``benchmarks/embedded/MINI_SD.md``). It loads offline with the stock diffusers API and
samples a 64x64 image in a fraction of a second on a CPU, so personalization runs (Textual
Inversion, DreamBooth, LoRA, Custom Diffusion) and their early stopping can be exercised on a
laptop.

``mini-flow`` is its flow-matching sibling in the Flux format (``FluxTransformer2DModel`` +
``FlowMatchEulerDiscreteScheduler`` + a CLIP text encoder for the pooled vector + a small
``T5EncoderModel`` for the token sequence + mini-SD's VAE), trained on the same world by
``benchmarks/embedded/pretrain_mini_flow.py`` (see ``benchmarks/embedded/MINI_FLOW.md``).

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

__all__ = [
    "MINI_FLOW_MAX_SEQUENCE_LENGTH",
    "MINI_FLOW_RESOLUTION",
    "MINI_SD_RESOLUTION",
    "SCHEDULERS",
    "load_mini_flow_pipeline",
    "load_mini_sd_pipeline",
    "mini_flow",
    "mini_sd",
]

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

#: Image side (pixels) that mini-flow generates.
MINI_FLOW_RESOLUTION = 64

#: T5 tokens mini-flow was mostly trained with: every world caption fits, and sampling is ~10x
#: faster than at ``FluxPipeline``'s default of 512 (which it was also trained on, less).
MINI_FLOW_MAX_SEQUENCE_LENGTH = 32

_REQUIRED_FLOW = (
    "model_index.json",
    "transformer",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "scheduler",
)


def _bundled(name: str, required: tuple[str, ...], script: str) -> Path:
    path = Path(__file__).resolve().parent / "assets" / name
    missing = [part for part in required if not (path / part).exists()]
    if missing:
        raise FileNotFoundError(
            f"the bundled {name} model is incomplete at {path} (missing: {', '.join(missing)}); "
            "reinstall dvar-lab (pip install ./lab) with its package data, or rebuild the weights with "
            f"`python benchmarks/embedded/{script} --out lab/dvar_lab/assets/{name}`"
        )
    return path


def mini_sd() -> Path:
    """Path of the bundled mini-SD diffusers folder (inside the installed ``dvar_lab`` package).

    Raises:
        FileNotFoundError: if the folder or one of its parts is missing (e.g. an install
            without package data, or a checkout where the weights were not pulled).

    Example:
        >>> (mini_sd() / "model_index.json").is_file()
        True
    """
    return _bundled("mini-sd", _REQUIRED, "pretrain_mini_sd.py")


def mini_flow() -> Path:
    """Path of the bundled mini-flow diffusers folder (a ``FluxPipeline``; inside ``dvar_lab``).

    Raises:
        FileNotFoundError: if the folder or one of its parts is missing (an install without
            package data, or a checkout where the weights were not built or pulled).

    Example:
        >>> import json
        >>> json.loads((mini_flow() / "model_index.json").read_text())["_class_name"]
        'FluxPipeline'
    """
    return _bundled("mini-flow", _REQUIRED_FLOW, "pretrain_mini_flow.py")


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


def load_mini_flow_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path | None = None,
    **kwargs: Any,
):
    """Load mini-flow as a ``diffusers.FluxPipeline`` (offline), each model checked to load exactly.

    The pipeline's default image size is set to 64x64 (``FluxPipeline`` otherwise defaults to
    1024 / 8 * the VAE factor, 512x512 here). mini-flow is not guidance-distilled: sample with
    true classifier-free guidance (``negative_prompt=""``, ``true_cfg_scale``) and, for speed,
    ``max_sequence_length=MINI_FLOW_MAX_SEQUENCE_LENGTH``.

    Args:
        device: where to put the pipeline.
        dtype: weights dtype (the files are float16; float32 by default, for CPUs).
        path: another mini-flow folder (e.g. a fresh ``pretrain_mini_flow.py --out``); default:
            the bundled :func:`mini_flow`.
        **kwargs: passed on to ``FluxPipeline.from_pretrained``.

    Example:
        >>> pipe = load_mini_flow_pipeline()
        >>> image = pipe("a large red solid star in the center, on a gray background", negative_prompt="",
        ...              true_cfg_scale=5.0, num_inference_steps=20, max_sequence_length=32).images[0]
        >>> image.size
        (64, 64)
    """
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    root = mini_flow() if path is None else Path(path)
    parts = (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel),
             ("transformer", FluxTransformer2DModel), ("vae", AutoencoderKL))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        models = {
            name: kwargs.pop(name) if name in kwargs else load_exactly(cls, root, name, torch_dtype=dtype, local_files_only=True)
            for name, cls in parts
        }
        pipe = FluxPipeline.from_pretrained(root, **models, torch_dtype=dtype, local_files_only=True, **kwargs)
    pipe.default_sample_size = MINI_FLOW_RESOLUTION // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

"""The pretrained models bundled with dvar.

``mini-SD`` is a small but genuinely pretrained text-to-image model in the Stable Diffusion
1.x format (``AutoencoderKL`` + ``UNet2DConditionModel`` with cross-attention +
``CLIPTextModel`` + the SD 1.x CLIP tokenizer + a DDPM scheduler), trained from scratch on
the synthetic 64x64 world of :mod:`dvar.world` by ``benchmarks/embedded/pretrain_mini_sd.py``
(see ``benchmarks/embedded/MINI_SD.md``). It loads offline with the stock diffusers API and
samples a 64x64 image in a fraction of a second on a CPU, so personalization runs (Textual
Inversion, DreamBooth, LoRA, Custom Diffusion) and their early stopping can be exercised on a
laptop.

Example:
    >>> from dvar.models import load_mini_sd_pipeline
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

__all__ = [
    "MINI_SD_RESOLUTION",
    "SCHEDULERS",
    "IncompleteWeightsError",
    "load_exactly",
    "load_mini_sd_pipeline",
    "mini_sd",
    "portable_clip_text_state_dict",
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


def mini_sd() -> Path:
    """Path of the bundled mini-SD diffusers folder (inside the installed ``dvar`` package).

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
            "reinstall dvar with its package data, or rebuild the weights with "
            "`python benchmarks/embedded/pretrain_mini_sd.py --out dvar/assets/mini-sd`"
        )
    return path


class IncompleteWeightsError(RuntimeError):
    """A model's weights did not all load: it would run partly randomly initialised."""


def _keys(info: dict, name: str) -> list:
    return sorted(str(k) for k in (info.get(name) or []))


def load_exactly(cls: Any, path: str | Path, subfolder: str | None = None, allow_unexpected: bool = False, **kwargs: Any):
    """``cls.from_pretrained`` (a transformers or diffusers model class) that raises
    :class:`IncompleteWeightsError` unless every weight of the model comes from the file.

    ``from_pretrained`` only warns when a parameter is missing from the file (it is then
    randomly initialised) or a weight of the file fits no parameter, e.g. a text encoder saved
    by transformers 5 (keys without ``text_model.``) loaded by transformers 4.
    ``allow_unexpected``: the file may hold more (a full CLIP checkpoint for its vision tower).

    Example:
        >>> from transformers import CLIPTextModel
        >>> text_encoder = load_exactly(CLIPTextModel, mini_sd(), subfolder="text_encoder")
    """
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing, unexpected = _keys(info, "missing_keys"), _keys(info, "unexpected_keys")
    mismatched, errors = _keys(info, "mismatched_keys"), [str(e) for e in info.get("error_msgs") or []]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) of the model are not in the file (e.g. {missing[:3]})")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} weight(s) of the file fit no parameter (e.g. {unexpected[:3]})")
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) have another shape (e.g. {mismatched[:3]})")
    problems += errors
    if problems:
        import diffusers
        import transformers

        where = Path(path) / subfolder if subfolder else Path(path)
        raise IncompleteWeightsError(
            f"{cls.__name__} from {where} did not load exactly: {'; '.join(problems)}. It would run with "
            f"randomly initialised weights. The file was probably written by another library version (this is "
            f"transformers {transformers.__version__}, diffusers {diffusers.__version__}): install the version "
            "that wrote it, or re-save the weights in a format both read (see dvar.models.portable_clip_text_state_dict)."
        )
    return model


def portable_clip_text_state_dict(state_dict: dict) -> dict:
    """A ``CLIPTextModel`` state dict with the ``text_model.`` key prefix, which transformers 4
    needs and transformers 5 also reads (transformers 5 saves the keys without it).

    Example:
        >>> portable_clip_text_state_dict({"embeddings.token_embedding.weight": 0})
        {'text_model.embeddings.token_embedding.weight': 0}
    """
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


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

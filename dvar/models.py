"""Loading models exactly, and the embedded models' paths.

:func:`load_exactly` is ``from_pretrained`` that refuses to leave any weight randomly initialised.
The embedded models (``mini_sd()``, ``mini_flow()``) ship in the separate ``dvar-lab`` distribution (``pip install
./lab`` from a dvar checkout), so that the library a kohya or diffusers user adds stays small.

Example:
    >>> (mini_sd() / "model_index.json").is_file()
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["IncompleteWeightsError", "load_exactly", "mini_flow", "mini_sd", "portable_clip_text_state_dict"]


def mini_sd() -> Path:
    """Path of the embedded mini-SD, a 64x64 Stable-Diffusion-1.x-format model (from ``dvar-lab``).

    Raises:
        ModuleNotFoundError: ``dvar-lab`` is not installed; the message says how to install it.
    """
    return _lab_models().mini_sd()


def mini_flow() -> Path:
    """Path of the embedded mini-flow, a 64x64 Flux-format (rectified-flow transformer) model (from ``dvar-lab``).

    Raises:
        ModuleNotFoundError: ``dvar-lab`` is not installed; the message says how to install it.
    """
    return _lab_models().mini_flow()


def _lab_models() -> Any:
    try:
        from dvar_lab import models
    except ModuleNotFoundError as error:
        if error.name not in ("dvar_lab", "dvar_lab.models"):
            raise
        raise ModuleNotFoundError(
            "The embedded models ship in the dvar-lab distribution, which is not installed: from a dvar "
            "checkout run `pip install ./lab` (or pass --pretrained_model_name_or_path a diffusers model).",
            name="dvar_lab",
        ) from None
    return models


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

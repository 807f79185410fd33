"""The synthetic image world that the bundled mini Stable Diffusion model is trained on.

It provides scenes and their captions (:mod:`dvar_lab.world.scenes`), an attribute classifier
that scores generated images against their prompts (:mod:`dvar_lab.world.classifier`) and the
48 bundled personalization concepts (:mod:`dvar_lab.world.concepts`).

Example:
    >>> from dvar_lab.world import Scene, render
    >>> render(Scene("star", "yellow", "solid", "large", "center", "blue"), rng=0).size
    (64, 64)
"""

from typing import Any

from dvar_lab.world.classifier import AttributeClassifier
from dvar_lab.world.scenes import (
    ATTRIBUTES,
    HELD_OUT,
    Scene,
    SceneDataset,
    is_held_out,
    render,
    sample_scene,
    sample_scenes,
)

__all__ = [
    "ATTRIBUTES",
    "HELD_OUT",
    "AttributeClassifier",
    "ConceptInfo",
    "EvalPrompt",
    "Scene",
    "SceneDataset",
    "concept_dir",
    "is_held_out",
    "list_concepts",
    "render",
    "sample_scene",
    "sample_scenes",
]

_CONCEPT_NAMES = ("ConceptInfo", "EvalPrompt", "concept_dir", "list_concepts")


def __getattr__(name: str) -> Any:
    # Imported lazily so that ``python -m dvar_lab.world.concepts`` runs without a double import.
    if name in _CONCEPT_NAMES:
        from dvar_lab.world import concepts

        return getattr(concepts, name)
    raise AttributeError(f"module 'dvar_lab.world' has no attribute {name!r}")

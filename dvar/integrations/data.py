"""Reading a user's folder of photos, and the training datasets built from it.

Any photo a person hands over works: JPEG/PNG/WebP/..., EXIF-rotated, grayscale, RGBA,
palette or CMYK, any size (resized on the short side, then center-cropped). Files that
are not images or are corrupt are skipped with a warning; a folder with none usable is a
:class:`UsageError`.

Every random choice of the datasets (prompt template, flip) is a function of the example
index, so the shuffled order (drawn by the sampler's own seeded generator) is the only
randomness, and a resumed run reads exactly the examples it would have read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError



class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix (exit code 2)."""


@dataclass
class LoadedImage:
    path: Path
    image: Image.Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency over white, CMYK/16-bit/float converted, EXIF rotation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).clip(0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image_folder(folder: Optional[str], what: str = "--instance_data_dir") -> List[LoadedImage]:
    """All readable images directly in ``folder`` (sorted by name), as RGB.

    Raises :class:`UsageError` for a missing or empty folder or one without a usable image;
    warns with the list of skipped files when only some are unusable.
    """
    if not folder:
        raise UsageError(f"{what} is required: the folder with the photos of your concept.")
    root = Path(folder)
    if not root.exists():
        raise UsageError(f"{what} {root} does not exist; pass the folder that holds your photos.")
    if not root.is_dir():
        raise UsageError(f"{what} {root} is a file, not a folder; pass the folder that holds your photos.")
    files = sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise UsageError(f"{what} {root} is empty; put 3-6 photos of your concept (JPEG, PNG or WebP) in it.")
    loaded, skipped = [], []
    for path in files:
        try:
            with Image.open(path) as probe:
                probe.verify()  # catches truncated/corrupt files cheaply
            with Image.open(path) as image:
                image.load()
                loaded.append(LoadedImage(path, to_rgb(image)))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            skipped.append(f"{path.name} ({type(error).__name__})")
    if not loaded:
        raise UsageError(
            f"{what} {root} has no readable images ({len(skipped)} files skipped: {', '.join(skipped[:5])}"
            f"{'...' if len(skipped) > 5 else ''}); add JPEG, PNG or WebP photos of your concept."
        )
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} file(s) in {root} that are not readable images: {', '.join(skipped)}")
    return loaded


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize the short side to ``resolution`` (Lanczos), crop to a square, scale to [-1, 1], CHW."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.LANCZOS)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = top = 0
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)  # diffusers' textual_inversion.py imagenet_templates_small

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


class ConceptDataset(torch.utils.data.Dataset):
    """Training examples of one concept: every (image, prompt, flip) combination.

    Index ``i`` maps to image ``i % n_images`` first, so the first K indices are K
    different photos (DVAR freezes the first K examples in dataset order), then to the
    prompt and the flip. Items: ``pixel_values`` in [-1, 1] and ``prompt``.

    Example:
        >>> ds = ConceptDataset(images, prompts=["a photo of sks dog"], resolution=512)  # doctest: +SKIP
    """

    def __init__(
        self,
        images: Sequence[LoadedImage],
        prompts: Sequence[str],
        resolution: int,
        random_flip: bool = False,
        center_crop: bool = True,
    ) -> None:
        if not images:
            raise UsageError("No training images.")
        self.tensors = [image_to_tensor(item.image, resolution, center_crop) for item in images]
        self.paths = [item.path for item in images]
        self.prompts = list(prompts)
        self.flips = (False, True) if random_flip else (False,)

    def __len__(self) -> int:
        return len(self.tensors) * len(self.prompts) * len(self.flips)

    def locate(self, index: int) -> Tuple[int, int, bool]:
        n_images, n_prompts = len(self.tensors), len(self.prompts)
        image = index % n_images
        prompt = (index // n_images) % n_prompts
        flip = self.flips[(index // (n_images * n_prompts)) % len(self.flips)]
        return image, prompt, flip

    def __getitem__(self, index: int) -> Dict[str, object]:
        image, prompt, flip = self.locate(index)
        pixels = self.tensors[image]
        return {"pixel_values": pixels.flip(-1) if flip else pixels, "prompt": self.prompts[prompt]}


class PriorPreservationDataset(torch.utils.data.Dataset):
    """Instance examples paired with class examples (DreamBooth's prior preservation)."""

    def __init__(self, instance: ConceptDataset, class_images: ConceptDataset) -> None:
        self.instance, self.class_images = instance, class_images

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_images))

    def __getitem__(self, index: int) -> Dict[str, object]:
        example = dict(self.instance[index % len(self.instance)])
        prior = self.class_images[index % len(self.class_images)]
        example["class_pixel_values"], example["class_prompt"] = prior["pixel_values"], prior["prompt"]
        return example


def collate(examples: List[Dict[str, object]]) -> Dict[str, object]:
    """Stack a batch; with prior preservation, class examples follow the instance ones."""
    pixels = [e["pixel_values"] for e in examples]
    prompts = [e["prompt"] for e in examples]
    if "class_pixel_values" in examples[0]:
        pixels += [e["class_pixel_values"] for e in examples]
        prompts += [e["class_prompt"] for e in examples]
    return {"pixel_values": torch.stack(pixels), "prompt": prompts}

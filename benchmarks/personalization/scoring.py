"""Concepts to benchmark and how generated images are scored.

Two scorers share one interface:

* :class:`WorldScorer` (mini-SD's synthetic world): identity = the world's ground truth, the
  :class:`~dvar_lab.world.AttributeClassifier`'s mean probability for the concept's own shape, colour
  and pattern; embedding identity (the paper's CLIP-I role, and what CLIP-s watches) = cosine
  similarity of EfficientNet-Lite0 ImageNet features (:mod:`dvar_lab.metrics.identity`) to the
  training images; alignment = the classifier reading back the background and size an
  evaluation prompt asks for.
* :class:`ClipScorer` (real photos, a local CLIP): identity = embedding identity = CLIP
  image-image similarity; alignment = CLIP image-text similarity to the prompt with the
  concept's identifier removed, as in the DVAR paper.

Example:
    >>> concept = bundled_concepts("textual_inversion")[0]
    >>> concept.identity_prompts[0], len(concept.eval_prompts)
    ('a photo of a {}', 8)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

#: Only these are scored for alignment on mini-SD: it follows background and size words but not
#: position ones (37% on held-out captions, chance 33%; benchmarks/embedded/MINI_SD.md).
WORLD_ALIGNMENT_ATTRIBUTES = ("background", "size")
#: The concept's own look, read back by the attribute classifier (the primary identity score on mini-SD).
LOOK_ATTRIBUTES = ("shape", "color", "pattern")


@dataclass(frozen=True)
class EvalPrompt:
    """A new-context prompt (``{}`` for the concept) and what a scorer can check in its images."""

    template: str
    attributes: Dict[str, str] = field(default_factory=dict)
    class_word: str = ""

    def text_without_concept(self) -> str:
        """The prompt with the concept replaced by its class word (CLIP text alignment)."""
        return " ".join(self.template.format(self.class_word).split())


@dataclass(frozen=True)
class ConceptSpec:
    """One concept: its photo folder and the prompts it is scored on."""

    name: str
    path: Path
    class_word: str
    identity_prompts: Tuple[str, ...]
    eval_prompts: Tuple[EvalPrompt, ...]
    look: Dict[str, str] = field(default_factory=dict)  # shape / color / pattern on the synthetic world
    initializer_token: str = ""  # a one-token word to start new tokens from (default: the class word)

    def reference_images(self) -> List[Image.Image]:
        from dvar.integrations.data import load_image_folder

        return [loaded.image for loaded in load_image_folder(str(self.path), "--concepts")]


def bundled_concepts(group: Optional[str] = None, root: Optional[Path] = None) -> List[ConceptSpec]:
    """The synthetic world's concepts (``lab/dvar_lab/assets/concepts``, or ``root`` made with another seed)."""
    from dvar_lab.world import list_concepts

    specs = []
    for info in list_concepts(group, root):
        prompts = tuple(
            EvalPrompt(p.prompt, {a: getattr(p, a) for a in WORLD_ALIGNMENT_ATTRIBUTES}, info.class_word)
            for p in info.eval_prompts
        )
        look = {attribute: getattr(info, attribute) for attribute in LOOK_ATTRIBUTES}
        specs.append(ConceptSpec(info.name, info.path, info.class_word, tuple(info.train_prompts), prompts, look))
    return specs


def folder_concepts(entries: Sequence[Dict[str, Any]], root: Path, identity_prompts: Sequence[str],
                    eval_templates: Sequence[str], skip_missing: bool = False) -> List[ConceptSpec]:
    """Concepts from a config file: ``{"name", "class_word"}`` entries whose photos are ``root/<name>``."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--concepts {root} is not a folder; pass the folder holding one photo folder per concept")
    specs, missing = [], []
    for entry in entries:
        folder = Path(root) / entry.get("folder", entry["name"])
        if not folder.is_dir():
            missing.append(entry["name"])
            continue
        prompts = tuple(EvalPrompt(t, {}, entry["class_word"]) for t in eval_templates)
        specs.append(ConceptSpec(entry["name"], folder, entry["class_word"], tuple(identity_prompts), prompts,
                                 initializer_token=entry.get("initializer_token", "")))
    if missing and not (skip_missing and specs):
        raise FileNotFoundError(
            f"{len(missing)} concept(s) have no photo folder under {root}: {', '.join(missing[:8])}"
            f"{'...' if len(missing) > 8 else ''}; add their photos there, or pass --skip-missing-concepts to run the others"
        )
    if missing:
        warnings.warn(f"skipping {len(missing)} concept(s) without photos under {root}: {', '.join(missing)}")
    return specs


class _EmbeddingIdentity:
    """Embedding identity = mean cosine similarity of image embeddings to the concept's training images."""

    def __init__(self, encoder: Any) -> None:  # a dvar_lab.metrics image encoder
        self.encoder = encoder
        self._references: Dict[str, torch.Tensor] = {}

    def references(self, concept: ConceptSpec) -> torch.Tensor:
        if concept.name not in self._references:
            self._references[concept.name] = self.encoder.encode(concept.reference_images())
        return self._references[concept.name]

    def embedding_identity(self, images: Sequence[Image.Image], concept: ConceptSpec) -> float:
        from dvar_lab.metrics import mean_pairwise_cosine

        return float(mean_pairwise_cosine(self.encoder.encode(list(images)), self.references(concept)))


class WorldScorer(_EmbeddingIdentity):
    """Identity by the world's attribute classifier (the concept's look), embedding identity by
    EfficientNet-Lite0 features, alignment by the classifier."""

    def __init__(self, device: str = "cpu") -> None:
        from dvar_lab.metrics import IdentityEncoder
        from dvar_lab.world import AttributeClassifier

        super().__init__(IdentityEncoder(device=device))
        self.classifier = AttributeClassifier.load(device=device)

    def identity(self, images: Sequence[Image.Image], concept: ConceptSpec) -> float:
        """The classifier's mean probability for the concept's own shape, colour and pattern in the images."""
        if not concept.look:
            raise ValueError(f"concept {concept.name} has no look (shape/color/pattern) to score on the world")
        scores = self.classifier.expected_probability(list(images), [concept.look] * len(images))
        return sum(scores.values()) / len(scores)

    def alignment(self, images: Sequence[Image.Image], prompts: Sequence[EvalPrompt]) -> Tuple[Optional[float], Dict[str, float]]:
        by_attribute = self.classifier.caption_agreement(list(images), [p.attributes for p in prompts])
        if not by_attribute:
            return None, {}
        return sum(by_attribute.values()) / len(by_attribute), by_attribute


class ClipScorer(_EmbeddingIdentity):
    """CLIP image-image identity and image-text alignment, from a local CLIP folder (transformers format)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection
        from transformers.utils import logging as hf_logging

        from dvar.models import load_exactly

        from dvar_lab.metrics import ClipImageEncoder

        if not Path(path).is_dir():
            raise FileNotFoundError(f"--clip {path}: not a local CLIP folder (transformers format, e.g. clip-vit-base-patch32)")
        super().__init__(ClipImageEncoder(path, device=device))
        config = CLIPConfig.from_pretrained(path, local_files_only=True)
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim  # as ClipImageEncoder does for the vision tower
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the vision tower's weights are left out on purpose
        try:
            self.text_model = load_exactly(  # a text weight missing from the file fails loudly
                CLIPTextModelWithProjection, path, config=text_config, local_files_only=True, allow_unexpected=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        self.text_model.eval().requires_grad_(False).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def _texts(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True).to(self.device)
        return torch.nn.functional.normalize(self.text_model(**inputs).text_embeds, dim=-1)

    def identity(self, images: Sequence[Image.Image], concept: ConceptSpec) -> float:
        return self.embedding_identity(images, concept)

    def alignment(self, images: Sequence[Image.Image], prompts: Sequence[EvalPrompt]) -> Tuple[Optional[float], Dict[str, float]]:
        image_embeds = self.encoder.encode(list(images))
        similarity = (image_embeds * self._texts([p.text_without_concept() for p in prompts]).to(image_embeds)).sum(-1)
        return float(similarity.mean()), {}

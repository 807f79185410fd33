"""The 48 bundled personalization concepts: novel objects of the synthetic world.

Each concept is an object the pretrained mini-SD never saw: a held-out
(color, pattern, shape) combination from :data:`dvar_lab.world.HELD_OUT`, alone or with a
smaller solid shape inside it. It comes as a folder ``<name>/`` holding only its 5 training
images (the same object at different positions, sizes and backgrounds), so that the folder
works as the ``--train_data_dir``/``--instance_data_dir`` of any trainer, and beside it a
``<name>.json`` with its class word, training prompts and evaluation prompts (new contexts,
each with the attributes the :class:`~dvar_lab.world.AttributeClassifier` checks). The 48 concepts are split 9 / 9 / 30 into
``textual_inversion``, ``custom_diffusion`` and ``dreambooth``, as in the DVAR paper.

The bundled set is regenerated with::

    python -m dvar_lab.world.concepts --out lab/dvar_lab/assets/concepts --seed 0

Example:
    >>> from dvar_lab.world import list_concepts, concept_dir
    >>> ti = list_concepts("textual_inversion")
    >>> len(ti), len(ti[0].image_paths())
    (9, 5)
    >>> concept_dir(ti[0].name) == ti[0].path
    True
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from dvar_lab.world.scenes import (
    BACKGROUND_CONFLICTS,
    BACKGROUNDS,
    COLORS,
    FULL_TEMPLATES,
    HELD_OUT,
    INNER_SHAPES,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    Scene,
    render,
)

__all__ = [
    "GROUP_SIZES",
    "OBJECT_POOLS",
    "TRAIN_PROMPTS",
    "ConceptImage",
    "ConceptInfo",
    "EvalPrompt",
    "concept_dir",
    "default_root",
    "design_concepts",
    "list_concepts",
    "metadata_path",
    "object_pool",
    "render_concept",
    "write_concepts",
]

#: Concepts per training-method group, in order (mirrors the DVAR paper's 9 / 9 / 30).
GROUP_SIZES: dict[str, int] = {"textual_inversion": 9, "custom_diffusion": 9, "dreambooth": 30}
N_IMAGES = 5
N_EVAL_PROMPTS = 8
#: Context-free training prompts; they match the short pretraining caption templates.
TRAIN_PROMPTS: tuple[str, ...] = tuple(t.format(object="{}") for t in TEMPLATES if "{background}" not in t)
_IMAGE_TEMPLATE = 1  # "a photo of a {size} {} {position}, on a {background} background"

Context = tuple[str, str, str]  # (background, position, size)


def metadata_path(folder: Union[str, Path]) -> Path:
    """The metadata file of a concept folder: ``<name>.json`` beside (not in) the folder.

    The folder itself holds only images, so the diffusers example scripts, which open every
    file of their data folder as an image, can train on it.

    Example:
        >>> metadata_path("lab/dvar_lab/assets/concepts/red_dotted_ring")
        PosixPath('lab/dvar_lab/assets/concepts/red_dotted_ring.json')
    """
    folder = Path(folder)
    return folder.parent / f"{folder.name}.json"


def default_root() -> Path:
    """The bundled concepts folder (``lab/dvar_lab/assets/concepts``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "concepts"


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt with a ``{}`` placeholder for the concept and the context it asks for.

    Example:
        >>> EvalPrompt("a {} on the left, on a gray background", "gray", "left", "small").attributes()
        {'background': 'gray', 'position': 'left', 'size': 'small'}
    """

    prompt: str
    background: str
    position: str
    size: str

    def attributes(self) -> dict[str, str]:
        """The attributes an :class:`~dvar_lab.world.AttributeClassifier` can check."""
        return {"background": self.background, "position": self.position, "size": self.size}


@dataclass(frozen=True)
class ConceptImage(EvalPrompt):
    """One training image: its file name, a caption (``{}`` for the concept) and its context."""

    file: str = ""


@dataclass(frozen=True)
class ConceptInfo:
    """Metadata of one concept, as stored in ``<name>.json`` beside its image folder.

    Example:
        >>> c = list_concepts()[0]
        >>> c.class_prompt, c.train_prompts[0]
        ('a photo of a circle', 'a photo of a {}')
    """

    name: str
    group: str
    kind: str  # "held_out_object" (or "seen_object") or "composite"
    class_word: str
    shape: str
    color: str
    pattern: str
    inner_shape: Optional[str]
    inner_color: Optional[str]
    train_prompts: tuple[str, ...]
    images: tuple[ConceptImage, ...]
    eval_prompts: tuple[EvalPrompt, ...]
    seed: int
    index: int
    path: Path = field(default=Path("."), compare=False)

    @property
    def description(self) -> str:
        """The words for the object, e.g. ``'red dotted ring with a blue star inside'``."""
        im = self.images[0]
        return self.scene(im.background, im.position, im.size).object_phrase()

    @property
    def class_prompt(self) -> str:
        """Prompt for DreamBooth prior-preservation images, e.g. ``'a photo of a star'``."""
        return f"a photo of a {self.class_word}"

    @property
    def signature(self) -> tuple[str, str, str]:
        """The outer object's (color, pattern, shape); in :data:`HELD_OUT` for the bundled set."""
        return (self.color, self.pattern, self.shape)

    def scene(self, background: str, position: str, size: str) -> Scene:
        """The concept placed in a context, e.g. to render a reference for an eval prompt."""
        return Scene(
            self.shape, self.color, self.pattern, size, position, background, self.inner_shape, self.inner_color
        )

    def image_paths(self) -> list[Path]:
        """Paths of the training images, in order."""
        return [self.path / im.file for im in self.images]

    def load_images(self) -> list[Image.Image]:
        """The training images as RGB PIL images."""
        return [Image.open(p).convert("RGB") for p in self.image_paths()]

    def to_json(self) -> dict[str, Any]:
        """The ``<name>.json`` content."""
        return {
            "name": self.name,
            "group": self.group,
            "kind": self.kind,
            "class_word": self.class_word,
            "description": self.description,
            "object": {
                "shape": self.shape,
                "color": self.color,
                "pattern": self.pattern,
                "inner_shape": self.inner_shape,
                "inner_color": self.inner_color,
            },
            "train_prompts": list(self.train_prompts),
            "images": [{"file": im.file, **_context_json(im)} for im in self.images],
            "eval_prompts": [_context_json(p) for p in self.eval_prompts],
            "seed": self.seed,
            "index": self.index,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path = Path(".")) -> ConceptInfo:
        """Inverse of :meth:`to_json`; ``path`` is the concept's folder."""
        obj = data["object"]
        return cls(
            name=data["name"],
            group=data["group"],
            kind=data["kind"],
            class_word=data["class_word"],
            shape=obj["shape"],
            color=obj["color"],
            pattern=obj["pattern"],
            inner_shape=obj["inner_shape"],
            inner_color=obj["inner_color"],
            train_prompts=tuple(data["train_prompts"]),
            images=tuple(
                ConceptImage(im["prompt"], im["background"], im["position"], im["size"], im["file"])
                for im in data["images"]
            ),
            eval_prompts=tuple(
                EvalPrompt(p["prompt"], p["background"], p["position"], p["size"]) for p in data["eval_prompts"]
            ),
            seed=int(data["seed"]),
            index=int(data["index"]),
            path=path,
        )


def _context_json(prompt: EvalPrompt) -> dict[str, str]:
    return {"prompt": prompt.prompt, "background": prompt.background, "position": prompt.position, "size": prompt.size}


# --------------------------------------------------------------------------- design


def _allowed_backgrounds(color: str, inner_color: Optional[str]) -> list[str]:
    # The inner object can show on the background (inside a ring's hole), so check it too.
    return [b for b in BACKGROUNDS if not {color, inner_color} & BACKGROUND_CONFLICTS[b]]


def _training_contexts(gen: np.random.Generator, backgrounds: Sequence[str], n: int) -> list[Context]:
    """``n`` distinct contexts with every position and both sizes, over 2-3 backgrounds.

    At least one allowed background is left for the evaluation prompts.
    """
    train_bgs = [backgrounds[i] for i in gen.permutation(len(backgrounds))[: 3 if len(backgrounds) >= 5 else 2]]
    while True:
        positions = list(POSITIONS) + [POSITIONS[i] for i in gen.integers(len(POSITIONS), size=n - len(POSITIONS))]
        sizes = [SIZES[i % 2] for i in range(n)]
        bgs = [train_bgs[i % len(train_bgs)] for i in range(n)]
        bg_order, position_order, size_order = gen.permutation(n), gen.permutation(n), gen.permutation(n)
        contexts = [(bgs[a], positions[b], sizes[c]) for a, b, c in zip(bg_order, position_order, size_order)]
        if len(set(contexts)) == n:
            return contexts


def _eval_contexts(
    gen: np.random.Generator, backgrounds: Sequence[str], seen: Sequence[Context], n: int
) -> list[Context]:
    """``n`` contexts not used for training, spread over backgrounds, unseen ones first."""
    seen_bgs = {c[0] for c in seen}
    order = sorted(backgrounds, key=lambda b: (b in seen_bgs, gen.random()))
    pools = {b: [(b, p, s) for p, s in itertools.product(POSITIONS, SIZES) if (b, p, s) not in seen] for b in order}
    for pool in pools.values():
        gen.shuffle(pool)  # type: ignore[arg-type]
    out: list[Context] = []
    while len(out) < n:
        for b in order:
            if pools[b] and len(out) < n:
                out.append(pools[b].pop())
    return out


#: Which objects a concept set draws from: ``held_out`` (never seen in pretraining: genuinely novel,
#: but mini-SD cannot draw them even from words; half of them with a smaller shape inside) or
#: ``seen`` (plain objects whose combination mini-SD saw in pretraining: a method still has to learn
#: the colour and pattern, since the concept's prompts name only its shape, and mini-SD can render
#: what it learns; the benchmark's default).
OBJECT_POOLS: tuple[str, ...] = ("held_out", "seen")


def object_pool(objects: str) -> list[tuple[str, str, str]]:
    """The sorted (color, pattern, shape) objects of the pool ``objects`` (:data:`OBJECT_POOLS`).

    Example:
        >>> len(object_pool("held_out")), len(object_pool("seen"))
        (64, 192)
    """
    if objects not in OBJECT_POOLS:
        raise ValueError(f"unknown object pool {objects!r}; expected one of {OBJECT_POOLS}")
    every = itertools.product(COLORS, PATTERNS, SHAPES)
    return sorted(HELD_OUT) if objects == "held_out" else sorted(o for o in every if o not in HELD_OUT)


def design_concepts(seed: int = 0, objects: str = "held_out") -> list[ConceptInfo]:
    """The concept set for ``seed`` (metadata only; :func:`render_concept` draws the images).

    The objects come from the pool ``objects`` (:data:`OBJECT_POOLS`); with ``held_out``, every
    second one has a smaller solid shape inside (a composite). ``seed=0`` gives the bundled set.

    Example:
        >>> [c.name for c in design_concepts(0)] == [c.name for c in list_concepts()]
        True
    """
    gen = np.random.default_rng((seed, 0))
    total = sum(GROUP_SIZES.values())
    pool = object_pool(objects)
    signatures = [pool[i] for i in gen.permutation(len(pool))[:total]]
    groups = [g for g, k in GROUP_SIZES.items() for _ in range(k)]
    concepts = []
    for index, ((color, pattern, shape), group) in enumerate(zip(signatures, groups)):
        cgen = np.random.default_rng((seed, 1, index))
        inner_shape = inner_color = None
        if index % 2 == 1 and objects == "held_out":
            inner_shape = INNER_SHAPES[cgen.integers(len(INNER_SHAPES))]
            inner_color = [c for c in COLORS if c != color][cgen.integers(len(COLORS) - 1)]
        backgrounds = _allowed_backgrounds(color, inner_color)
        train = _training_contexts(cgen, backgrounds, N_IMAGES)
        evals = _eval_contexts(cgen, backgrounds, train, N_EVAL_PROMPTS)

        def prompt(context: Context, template: int) -> str:
            background, position, size = context
            scene = Scene(shape, color, pattern, size, position, background, inner_shape, inner_color)
            return scene.caption(template, object_phrase="{}")

        name = "_".join(w for w in (color, pattern, shape, inner_color, inner_shape) if w)
        concepts.append(
            ConceptInfo(
                name=name,
                group=group,
                kind=f"{objects}_object" if inner_shape is None else "composite",
                class_word=shape,
                shape=shape,
                color=color,
                pattern=pattern,
                inner_shape=inner_shape,
                inner_color=inner_color,
                train_prompts=TRAIN_PROMPTS,
                images=tuple(
                    ConceptImage(prompt(c, _IMAGE_TEMPLATE), *c, file=f"{i:02d}.png") for i, c in enumerate(train)
                ),
                eval_prompts=tuple(
                    EvalPrompt(prompt(c, FULL_TEMPLATES[cgen.integers(len(FULL_TEMPLATES))]), *c) for c in evals
                ),
                seed=seed,
                index=index,
            )
        )
    return concepts


def render_concept(info: ConceptInfo, size: int = 64) -> list[Image.Image]:
    """Render the training images of a designed concept (deterministic in its seed/index)."""
    return [
        render(info.scene(im.background, im.position, im.size), size, rng=(info.seed, 2, info.index, i))
        for i, im in enumerate(info.images)
    ]


def write_concepts(out: Union[str, Path], seed: int = 0, objects: str = "held_out") -> list[ConceptInfo]:
    """Design, render and write a concept set: per concept a folder of PNGs and a
    ``<name>.json`` beside it, and ``index.json``.

    Concepts already in ``out`` that are not part of the new set are deleted.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    designed = design_concepts(seed, objects)
    names = {info.name for info in designed}
    for stale in out.glob("*.json"):
        if stale.stem not in names and json.loads(stale.read_text()).get("name") == stale.stem:  # an old concept
            shutil.rmtree(out / stale.stem, ignore_errors=True)
            stale.unlink()
    written = []
    for info in designed:
        folder = out / info.name
        folder.mkdir(exist_ok=True)
        for im, image in zip(info.images, render_concept(info)):
            image.save(folder / im.file, optimize=True)
        metadata_path(folder).write_text(json.dumps(info.to_json(), indent=2) + "\n")
        written.append(ConceptInfo.from_json(info.to_json(), folder))
    index = {
        "seed": seed,
        "groups": GROUP_SIZES,
        "concepts": [{"name": c.name, "group": c.group, "kind": c.kind, "class_word": c.class_word} for c in written],
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written


# --------------------------------------------------------------------------- lookup


def list_concepts(group: Optional[str] = None, root: Union[str, Path, None] = None) -> list[ConceptInfo]:
    """The concepts under ``root`` (default: the bundled ones), optionally of one group.

    Example:
        >>> len(list_concepts()), len(list_concepts("dreambooth"))
        (48, 30)
    """
    root = default_root() if root is None else Path(root)
    if group is not None and group not in GROUP_SIZES:
        raise ValueError(f"unknown group {group!r}; expected one of {tuple(GROUP_SIZES)}")
    index = json.loads((root / "index.json").read_text())
    out = []
    for entry in index["concepts"]:
        if group is None or entry["group"] == group:
            folder = root / entry["name"]
            out.append(ConceptInfo.from_json(json.loads(metadata_path(folder).read_text()), folder))
    return out


def concept_dir(name: str, root: Union[str, Path, None] = None) -> Path:
    """Folder of the concept ``name`` (raises ``KeyError`` if there is none).

    Example:
        >>> (concept_dir(list_concepts()[0].name) / "00.png").exists()
        True
    """
    folder = (default_root() if root is None else Path(root)) / name
    if not folder.is_dir() or not metadata_path(folder).is_file():
        raise KeyError(f"no concept {name!r} under {folder.parent}")
    return folder


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write a set of personalization concepts of the synthetic world.")
    parser.add_argument("--out", type=Path, default=default_root())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", choices=OBJECT_POOLS, default="held_out",
                        help="held_out: objects never seen in pretraining; seen: combinations mini-SD can draw.")
    args = parser.parse_args(argv)
    concepts = write_concepts(args.out, args.seed, args.objects)
    print(f"wrote {len(concepts)} concepts to {args.out}")


if __name__ == "__main__":
    main()

"""Specification of the synthetic world: scenes, captions, the classifier and the bundled concepts."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dvar_lab.world import (
    HELD_OUT,
    AttributeClassifier,
    Scene,
    SceneDataset,
    concept_dir,
    list_concepts,
    render,
    sample_scenes,
)
from dvar_lab.world.classifier import CLASSIFIER_ATTRIBUTES, augment
from dvar_lab.world.concepts import GROUP_SIZES, design_concepts, metadata_path, render_concept, write_concepts
from dvar_lab.world.scenes import (
    ATTRIBUTES,
    BACKGROUND_CONFLICTS,
    COLORS,
    FULL_TEMPLATES,
    PATTERNS,
    SHAPES,
    TEMPLATES,
    sample_scene,
)

POSITION_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}
UNSEEN_SEED = 31337  # used neither for pretraining captions nor for training the classifier


def pixels_hash(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def classifier() -> AttributeClassifier:
    return AttributeClassifier.load()


@pytest.fixture(scope="module")
def concepts():
    return list_concepts()


# --------------------------------------------------------------------------- scenes


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_same_seed_gives_identical_scenes_pixels_and_captions(seed: int) -> None:
    first, again = SceneDataset(6, seed), SceneDataset(6, seed)
    for i in range(6):
        a, b = first[i], again[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert a["caption"] == b["caption"] and a["labels"] == b["labels"]
    assert sample_scenes(50, seed) == sample_scenes(50, seed)


def test_scene_i_does_not_depend_on_how_many_are_drawn() -> None:
    assert sample_scenes(20, seed=3) == sample_scenes(40, seed=3)[:20]
    assert [SceneDataset(40, seed=3).scene(i) for i in range(20)] == sample_scenes(20, seed=3)


@pytest.mark.parametrize(("rng_a", "rng_b", "same"), [(5, 5, True), (5, 6, False), (None, None, True)])
def test_render_is_deterministic_in_its_rng(rng_a, rng_b, same: bool) -> None:
    scene = Scene("star", "red", "dotted", "large", "left", "grass", "circle", "blue")
    assert (pixels_hash(render(scene, rng=rng_a)) == pixels_hash(render(scene, rng=rng_b))) is same


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_gives_an_rgb_square_of_the_requested_size(size: int) -> None:
    image = render(sample_scenes(1, seed=0)[0], size=size, rng=0)
    assert (image.mode, image.size) == ("RGB", (size, size))


def test_dataset_item_layout() -> None:
    item = SceneDataset(3, seed=0)[2]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert set(item["labels"]) == set(ATTRIBUTES) | {"inner_shape", "inner_color"}
    batch = torch.utils.data.default_collate([SceneDataset(4, seed=0)[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4


@pytest.mark.parametrize("template", FULL_TEMPLATES)
def test_full_captions_mention_every_attribute(template: int) -> None:
    for order, scene in enumerate(sample_scenes(100, seed=template, composite_prob=0.3)):
        caption = scene.caption(template, order=order % 2)
        for attr in ("shape", "color", "pattern", "size", "background"):
            assert getattr(scene, attr) in caption.split(" ") or f"{getattr(scene, attr)}," in caption, (attr, caption)
        assert POSITION_WORDS[scene.position] in caption
        if scene.is_composite:
            assert f"{scene.inner_color} {scene.inner_shape} inside" in caption


@pytest.mark.parametrize(
    ("scene", "template", "order", "caption"),
    [
        (Scene("circle", "red", "striped", "small", "left", "green"), 0, 0,
         "a small red striped circle on the left, on a green background"),
        (Scene("circle", "red", "striped", "small", "left", "green"), 3, 1,
         "on the left, a small striped red circle on a green background"),
        (Scene("ring", "black", "dotted", "large", "center", "gray", "star", "orange"), 2, 0,
         "a gray background with a large black dotted ring with an orange star inside in the center"),
        (Scene("heart", "yellow", "solid", "large", "right", "gray"), 6, 0, "a photo of a yellow solid heart"),
    ],
)
def test_caption_examples(scene: Scene, template: int, order: int, caption: str) -> None:
    assert scene.caption(template, order=order) == caption


def test_concept_prompts_put_a_placeholder_where_the_object_goes() -> None:
    scene = Scene("cross", "blue", "checkered", "small", "right", "beige")
    assert scene.caption(1, object_phrase="{}") == "a photo of a small {} on the right, on a beige background"
    assert all(t.count("{object}") == 1 for t in TEMPLATES)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shape="hexagon"),
        dict(color="pink"),
        dict(pattern="wavy"),
        dict(size="medium"),
        dict(position="top"),
        dict(background="sky"),
        dict(color="green", background="grass"),  # object colour would vanish into the background
        dict(color="red", background="brick"),
        dict(inner_shape="star"),  # inner colour missing
        dict(inner_shape="ring", inner_color="blue"),  # a ring's hole is unreadable when small
        dict(inner_shape="star", inner_color="red"),  # same colour as the outer object
        dict(background="grass", inner_shape="star", inner_color="green"),  # shows through a ring's hole
    ],
)
def test_invalid_scenes_are_rejected(kwargs: dict) -> None:
    base = dict(shape="circle", color="red", pattern="solid", size="small", position="left", background="gray")
    with pytest.raises(ValueError):
        Scene(**{**base, **kwargs})


def test_sampled_objects_never_share_their_colour_with_the_background() -> None:
    for scene in sample_scenes(2000, seed=4):
        assert scene.color not in BACKGROUND_CONFLICTS[scene.background]


# --------------------------------------------------------------------------- held-out objects


def test_held_out_is_a_quarter_of_all_objects_with_one_pattern_per_colour_and_shape() -> None:
    assert len(HELD_OUT) == 64
    for color, shape in itertools.product(COLORS, SHAPES):
        assert sum((color, p, shape) in HELD_OUT for p in PATTERNS) == 1


@pytest.mark.parametrize(("attr", "position"), [("color", 0), ("pattern", 1), ("shape", 2)])
def test_every_word_still_occurs_in_pretraining(attr: str, position: int) -> None:
    seen = {scene.signature[position] for scene in sample_scenes(3000, seed=0)}
    assert seen == set(ATTRIBUTES[attr])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_objects_never_appear_in_pretraining_scenes(seed: int) -> None:
    assert not any(s.signature in HELD_OUT for s in sample_scenes(3000, seed))
    dataset = SceneDataset(500, seed)
    assert not any(dataset.scene(i).signature in HELD_OUT for i in range(500))


def test_exclude_can_be_turned_off_for_the_classifier() -> None:
    assert any(s.signature in HELD_OUT for s in sample_scenes(500, seed=0, exclude=()))


# --------------------------------------------------------------------------- classifier


def test_bundled_classifier_reads_fresh_scenes_from_an_unseen_seed(classifier: AttributeClassifier) -> None:
    scenes = [sample_scene((UNSEEN_SEED, i), exclude=()) for i in range(200)]
    images = [render(s, rng=(UNSEEN_SEED, i, 1)) for i, s in enumerate(scenes)]
    scores = classifier.caption_agreement(images, scenes)
    assert set(scores) == set(CLASSIFIER_ATTRIBUTES)
    assert min(scores.values()) >= 0.9, scores


def test_classifier_accepts_tensors_and_other_sizes(classifier: AttributeClassifier) -> None:
    scenes = sample_scenes(8, seed=UNSEEN_SEED)
    images = [render(s, rng=i) for i, s in enumerate(scenes)]
    as_tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    assert classifier.predict(images) == classifier.predict(as_tensor)
    big = [render(s, size=128, rng=i) for i, s in enumerate(scenes)]
    assert set(classifier.predict(big)) == set(CLASSIFIER_ATTRIBUTES)


def test_caption_agreement_scores_only_the_attributes_asked_for(classifier: AttributeClassifier) -> None:
    scene = Scene("square", "blue", "solid", "large", "center", "beige")
    wrong = {"background": "brick", "position": "center"}
    assert classifier.caption_agreement([render(scene, rng=0)], [wrong]) == {"background": 0.0, "position": 1.0}


def test_expected_probability_is_the_soft_caption_agreement(classifier: AttributeClassifier) -> None:
    """High for the words in the picture, low for others, only for the attributes asked for, averaged per image."""
    scenes = sample_scenes(16, seed=UNSEEN_SEED)
    images = [render(s, rng=i) for i, s in enumerate(scenes)]
    right = classifier.expected_probability(images, scenes)
    assert set(right) == set(CLASSIFIER_ATTRIBUTES) and min(right.values()) > 0.8, right
    wrong = [{"color": next(c for c in COLORS if c != s.color)} for s in scenes]
    assert set(classifier.expected_probability(images, wrong)) == {"color"}
    assert classifier.expected_probability(images, wrong)["color"] < 0.1
    one_each = [classifier.expected_probability([im], [s])["shape"] for im, s in zip(images[:2], scenes[:2])]
    assert classifier.expected_probability(images[:2], scenes[:2])["shape"] == pytest.approx(sum(one_each) / 2)


@pytest.mark.parametrize(("objects", "in_held_out"), [("held_out", True), ("seen", False)])
def test_concept_sets_draw_their_outer_objects_from_the_pool_asked_for(objects: str, in_held_out: bool) -> None:
    designed = design_concepts(0, objects)
    assert len(designed) == 48 and len({c.name for c in designed}) == 48
    assert all((c.signature in HELD_OUT) == in_held_out for c in designed)
    kinds = {"held_out": {"held_out_object", "composite"}, "seen": {"seen_object"}}[objects]
    assert {c.kind for c in designed} == kinds, "composites only among the held-out (bundled) concepts"


def test_an_unknown_object_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown object pool"):
        design_concepts(0, "novel")


def test_bundled_classifier_is_small() -> None:
    from dvar_lab.world.classifier import default_weights_path

    assert default_weights_path().stat().st_size < 2_000_000


def test_augment_keeps_shape_and_range() -> None:
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)


# --------------------------------------------------------------------------- concepts


def test_there_are_48_concepts_with_unique_names(concepts) -> None:
    assert len(concepts) == 48
    assert len({c.name for c in concepts}) == 48


@pytest.mark.parametrize(("group", "count"), [("textual_inversion", 9), ("custom_diffusion", 9), ("dreambooth", 30)])
def test_concepts_are_split_like_the_paper(group: str, count: int) -> None:
    assert GROUP_SIZES[group] == count
    assert len(list_concepts(group)) == count
    assert all(c.group == group for c in list_concepts(group))


def test_each_concept_folder_has_five_rgb_64px_pngs(concepts) -> None:
    for concept in concepts:
        assert concept_dir(concept.name) == concept.path
        paths = sorted(concept.path.glob("*.png"))
        assert [p.name for p in paths] == [f"{i:02d}.png" for i in range(5)] == [im.file for im in concept.images]
        for path in paths:
            with Image.open(path) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))


def test_each_concept_folder_holds_only_images_as_the_diffusers_scripts_read_them(concepts) -> None:
    """diffusers' textual_inversion.py and the DreamBooth scripts open every file of
    --train_data_dir / --instance_data_dir as an image; the metadata lies beside the folder."""
    for concept in concepts:
        # examples/textual_inversion/textual_inversion.py, TextualInversionDataset
        image_paths = [os.path.join(concept.path, file_path) for file_path in os.listdir(concept.path)]
        for path in image_paths:
            image = Image.open(path)
            if not image.mode == "RGB":
                image = image.convert("RGB")
            assert np.array(image).astype(np.uint8).shape == (64, 64, 3), path
        assert sorted(os.listdir(concept.path)) == [im.file for im in concept.images]
        assert metadata_path(concept.path) == concept.path.parent / f"{concept.name}.json"
        assert json.loads(metadata_path(concept.path).read_text())["name"] == concept.name


def test_write_concepts_reproduces_the_bundled_files_and_removes_stale_ones(tmp_path) -> None:
    stale = tmp_path / "old_concept"
    stale.mkdir()
    (stale / "00.png").write_bytes(b"")
    (tmp_path / "old_concept.json").write_text(json.dumps({"name": "old_concept"}))
    write_concepts(tmp_path, seed=0)
    assert not stale.exists() and not (tmp_path / "old_concept.json").exists()
    root = list_concepts()[0].path.parent
    for concept in list_concepts()[:3]:  # byte-identical: PNGs and metadata
        for name in [f"{concept.name}.json"] + [f"{concept.name}/{im.file}" for im in concept.images]:
            assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name
    assert (tmp_path / "index.json").read_bytes() == (root / "index.json").read_bytes()


def test_committed_metadata_matches_a_fresh_design(concepts) -> None:
    fresh = design_concepts(seed=0)
    assert [c.to_json() for c in concepts] == [c.to_json() for c in fresh]
    index = json.loads((concepts[0].path.parent / "index.json").read_text())
    assert [e["name"] for e in index["concepts"]] == [c.name for c in fresh]


@pytest.mark.parametrize("index", [0, 17, 47])
def test_committed_images_match_a_fresh_rendering(concepts, index: int) -> None:
    concept = concepts[index]
    fresh = render_concept(design_concepts(seed=0)[index])
    assert [pixels_hash(im) for im in concept.load_images()] == [pixels_hash(im) for im in fresh]


def test_no_concept_object_appears_in_pretraining(concepts) -> None:
    signatures = {c.signature for c in concepts}
    assert signatures <= HELD_OUT
    pretraining = {s.signature for seed in (0, 1) for s in sample_scenes(3000, seed)}
    assert not signatures & pretraining


def test_concepts_mix_plain_held_out_objects_and_composites(concepts) -> None:
    kinds = [c.kind for c in concepts]
    assert kinds.count("held_out_object") == kinds.count("composite") == 24
    for c in concepts:
        assert (c.inner_shape is None) == (c.kind == "held_out_object")
        assert c.class_word == c.shape and c.class_prompt == f"a photo of a {c.shape}"


def test_concept_images_vary_position_size_and_background(concepts) -> None:
    for c in concepts:
        contexts = [(im.background, im.position, im.size) for im in c.images]
        assert len(set(contexts)) == 5
        assert {im.position for im in c.images} == {"left", "center", "right"}
        assert {im.size for im in c.images} == {"small", "large"}
        assert len({im.background for im in c.images}) >= 2


def test_eval_prompts_are_new_contexts_the_classifier_can_check(concepts) -> None:
    for c in concepts:
        seen = {(im.background, im.position, im.size) for im in c.images}
        assert len(c.eval_prompts) == 8
        assert any(p.background not in {b for b, _, _ in seen} for p in c.eval_prompts)
        for p in c.eval_prompts:
            assert p.prompt.count("{}") == 1
            assert (p.background, p.position, p.size) not in seen
            assert p.background in p.prompt and POSITION_WORDS[p.position] in p.prompt and p.size in p.prompt
            c.scene(p.background, p.position, p.size)  # a valid scene: no colour clash
        assert all(t.count("{}") == 1 for t in c.train_prompts)


def test_another_seed_gives_another_set_of_novel_concepts() -> None:
    other = design_concepts(seed=1)
    assert len(other) == 48 and {c.signature for c in other} <= HELD_OUT
    assert [c.name for c in other] != [c.name for c in design_concepts(seed=0)]


@pytest.mark.parametrize(
    ("call", "error"),
    [(lambda: concept_dir("no_such_concept"), KeyError), (lambda: list_concepts("lora"), ValueError)],
)
def test_lookup_errors(call, error) -> None:
    with pytest.raises(error):
        call()

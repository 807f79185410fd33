"""Tiny, randomly initialised diffusers components built in code.

For tests, the overhead benchmark and smoke runs: the real diffusers/transformers
classes (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``...) at toy sizes,
with the Stable Diffusion 1.x tokenizer that ships with dvar. Nothing is downloaded.

Example:
    >>> parts = tiny_sd(seed=0)
    >>> sorted(parts)
    ['noise_scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Union

import torch

TOKENIZER_DIR = Path(__file__).parent / "assets" / "mini-sd" / "tokenizer"


def sd_tokenizer() -> Any:
    """The Stable Diffusion 1.x CLIP tokenizer, from the files bundled with dvar."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def _text_config(hidden_size: int = 32, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def tiny_sd(seed: int = 0, prediction_type: str = "epsilon", resolution: int = 16) -> Dict[str, Any]:
    """SD 1.x-shaped parts: UNet (cross-attention), VAE (4 latent channels, 2x down), CLIP text encoder, DDPM."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_text_config())
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": sd_tokenizer(), "noise_scheduler": scheduler}


def tiny_sdxl(seed: int = 0, resolution: int = 16) -> Dict[str, Any]:
    """SDXL-shaped parts: two text encoders (the second with projection), text_time UNet."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = tiny_sd(seed, resolution=resolution)
    torch.manual_seed(seed + 1)
    parts["unet"] = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    parts["text_encoder"] = CLIPTextModel(_text_config())
    parts["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(projection_dim=32))
    parts["tokenizer_2"] = parts["tokenizer"]
    parts["noise_scheduler"] = EulerDiscreteScheduler(num_train_timesteps=1000)
    return parts


def tiny_sd3(seed: int = 0, resolution: int = 16) -> Dict[str, Any]:
    """SD3-shaped parts: an MMDiT transformer and a flow-matching scheduler (text side given as embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    parts = tiny_sd(seed, resolution=resolution)
    torch.manual_seed(seed + 2)
    parts.pop("unet")
    parts["transformer"] = SD3Transformer2DModel(
        sample_size=resolution // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=32,
    )
    parts["noise_scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return parts


def t5_tokenizer(model_max_length: int = 512) -> Any:
    """A tiny T5-style (Unigram, ``</s>``-terminated) fast tokenizer built in code: whole words
    for the usual prompts, single characters for anything else."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = (
        "photo of sks circle dog cat the red green blue yellow black white purple orange dotted striped "
        "checkered solid star heart ring cross square triangle diamond on in background left right center "
        "small large with inside"
    ).split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [("\u2581" + c, -4.0) for c in string.ascii_lowercase]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=model_max_length,
    )


def tiny_flux(seed: int = 0, resolution: int = 16, guidance_embeds: bool = True) -> Dict[str, Any]:
    """Flux-shaped parts: a FluxTransformer2DModel (packed 2x2 latents, guidance embedding as in
    FLUX.1-dev), a VAE with a shift factor, CLIP + T5 text encoders, Flux's flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    text_encoder = CLIPTextModel(_text_config())
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return {
        "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": sd_tokenizer(),
        "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "noise_scheduler": scheduler,
    }


class ToyConceptDataset(torch.utils.data.Dataset):
    """A few smooth random "photos" of one concept with a caption, shaped like the diffusers
    example datasets (``pixel_values`` in [-1, 1] and ``prompt``), with a random flip
    drawn from the global RNG as the real ones do."""

    def __init__(
        self, num_images: int = 5, resolution: int = 16, seed: int = 0, prompt: str = "a photo of sks dog", flip: bool = True
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(num_images, 3, 4, 4, generator=generator) * 2 - 1
        self.images = torch.nn.functional.interpolate(coarse, size=resolution, mode="bilinear", align_corners=False)
        self.prompt = prompt
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image = self.images[index]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"pixel_values": image, "prompt": self.prompt}


def save_tiny_pipeline(kind: str, path: Union[str, Path], seed: int = 0, resolution: int = 16, **options: Any) -> Path:
    """A tiny random ``"sd"``, ``"sdxl"`` or ``"flux"`` pipeline saved with ``save_pretrained`` as ``path``: a model
    folder that ``DiffusionPipeline.from_pretrained`` and the training scripts load like a real checkpoint.
    ``options`` go to the builder (e.g. ``guidance_embeds=False`` for Flux).

    Example:
        >>> import tempfile
        >>> folder = save_tiny_pipeline("flux", Path(tempfile.mkdtemp()) / "tiny-flux", guidance_embeds=False)
        >>> (folder / "transformer" / "config.json").is_file()
        True
    """
    import diffusers

    builders = {
        "sd": (tiny_sd, "StableDiffusionPipeline",
               dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
        "sdxl": (tiny_sdxl, "StableDiffusionXLPipeline", {}),
        "flux": (tiny_flux, "FluxPipeline", {}),
    }
    if kind not in builders:
        raise ValueError(f"unknown tiny pipeline {kind!r}: choose sd, sdxl or flux")
    build, pipeline_class, extra = builders[kind]
    parts = build(seed=seed, resolution=resolution, **options)
    components = {("scheduler" if name == "noise_scheduler" else name): part for name, part in parts.items()}
    pipe = getattr(diffusers, pipeline_class)(**components, **extra)
    pipe.save_pretrained(path)
    return Path(path)


def collate(examples: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "prompt": [e["prompt"] for e in examples],
    }

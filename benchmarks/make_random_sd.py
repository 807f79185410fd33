"""Write a randomly initialised pipeline with Stable Diffusion 1.5's shapes (for GPU timing
and memory checks where no real checkpoint can be downloaded).

    python benchmarks/make_random_sd.py /tmp/random-sd15
"""

from __future__ import annotations

import sys

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dvar_lab.tiny import sd_tokenizer


def random_sd15() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.x shapes
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=sd_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


if __name__ == "__main__":
    pipe = random_sd15()
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6 for name in ("unet", "vae", "text_encoder")}
    print("parameters (M):", {k: round(v, 1) for k, v in counts.items()})
    pipe.save_pretrained(sys.argv[1])

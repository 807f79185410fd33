"""A fake of sd-scripts' ``flux_train_network.py`` for dvar's CI: ``FluxNetworkTrainer`` overrides
the hooks the real one overrides, with its own argument names (``ae``, ``flux``), a
flow-matching objective with sigmoid-sampled noise levels, text-encoder outputs cached into the
dataset items, and the text encoder dropped before the loop. Mini-SD's UNet stands in for Flux's
transformer."""

from __future__ import annotations

import argparse

import torch

import train_network
from library import train_util


class FluxNetworkTrainer(train_network.NetworkTrainer):
    def __init__(self):
        super().__init__()
        self.validation_step_ends = 0

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset, weight_dtype):
        text_encoders[0].to(accelerator.device, dtype=weight_dtype)
        dataset.cache_text_encoder_outputs(text_encoders[0])

    def is_text_encoder_not_needed_for_training(self, args):
        return True

    def sample_images(self, accelerator, args, epoch, global_step, device, ae, tokenizer, text_encoder, flux):
        self.sample_calls.append((epoch, global_step))

    def get_noise_scheduler(self, args, device):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.1582)

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet,
                                  network, weight_dtype, train_unet, is_train=True):
        noise = torch.randn_like(latents)
        sigmas = torch.sigmoid(torch.randn((latents.shape[0],), device=latents.device)).view(-1, 1, 1, 1)
        noisy_model_input = (1 - sigmas) * latents + sigmas * noise
        timesteps = sigmas.view(-1) * 1000
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            model_pred = unet(noisy_model_input, timesteps, text_encoder_conds[0]).sample
        return model_pred, noise - latents, timesteps, None

    def get_sai_model_spec(self, args):
        return {"modelspec.architecture": "flux-1-dev/lora"}

    def on_validation_step_end(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype):
        self.validation_step_ends += 1  # the real one prepares block swapping for the next forward


def setup_parser() -> argparse.ArgumentParser:
    return train_network.setup_parser()


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer = FluxNetworkTrainer()
    trainer.train(args)

"""A fake of sd-scripts' ``sdxl_train_network.py`` for dvar's CI: ``SdxlNetworkTrainer`` with the
real one's flag and argument names (``is_sdxl``, ``sample_images(..., tokenizer, ...)``); mini-SD's
parts stand in for SDXL's."""

from __future__ import annotations

import argparse

import train_network
from library import train_util


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    def __init__(self):
        super().__init__()
        self.is_sdxl = True

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        pass

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizer, text_encoder, unet):
        self.sample_calls.append((epoch, global_step))

    def get_sai_model_spec(self, args):
        return {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}


def setup_parser() -> argparse.ArgumentParser:
    return train_network.setup_parser()


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer = SdxlNetworkTrainer()
    trainer.train(args)

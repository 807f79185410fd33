"""The parts of sd-scripts' ``library/train_util.py`` that the fake ``train_network.py`` uses.

Written for dvar's tests (not kohya's code): the same names and behaviour where the DVAR plugin
meets them (dataset items are bucket batches, ``shuffle_buckets`` reseeds ``random``, the
collator sets the epoch, accelerate save/load state, kohya's file names), much less of the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from PIL import Image

logger = logging.getLogger(__name__)  # kohya's: library.train_util

BucketBatchIndex = namedtuple("BucketBatchIndex", ["bucket_index", "bucket_batch_size", "batch_index"])


# -- arguments ---------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--pretrained_model_name_or_path", type=str, required=False)
    add("--v2", action="store_true")
    add("--v_parameterization", action="store_true")
    add("--vae", type=str, default=None)
    add("--xformers", action="store_true")
    add("--train_data_dir", type=str, default=None)
    add("--reg_data_dir", type=str, default=None)
    add("--prior_loss_weight", type=float, default=1.0)
    add("--caption_extension", type=str, default=".txt")
    add("--flip_aug", action="store_true")
    add("--resolution", type=int, default=64)
    add("--cache_latents", action="store_true")
    add("--output_dir", type=str, default=None)
    add("--output_name", type=str, default=None)
    add("--save_model_as", type=str, default="safetensors")
    add("--no_metadata", action="store_true")
    add("--learning_rate", type=float, default=1e-4)
    add("--max_train_steps", type=int, default=1600)
    add("--max_train_epochs", type=int, default=None)
    add("--train_batch_size", type=int, default=1)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_grad_norm", type=float, default=1.0)
    add("--scale_weight_norms", type=float, default=None)
    add("--seed", type=int, default=None)
    add("--save_every_n_steps", type=int, default=None)
    add("--save_every_n_epochs", type=int, default=None)
    add("--save_state", action="store_true")
    add("--save_state_on_train_end", action="store_true")
    add("--resume", type=str, default=None)
    add("--skip_until_initial_step", action="store_true")
    add("--validate_every_n_epochs", type=int, default=None)
    add("--log_with", type=str, default=None, choices=[None, "jsonl"])
    add("--logging_dir", type=str, default=None)
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    add("--deepspeed", action="store_true")
    add("--config_file", type=str, default=None)


def verify_command_line_training_args(args: argparse.Namespace) -> None:
    """kohya warns here when wandb would publish secrets; nothing to do in the fake."""


def read_config_from_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """kohya's: TOML sections flattened into a namespace, then sys.argv parsed over it."""
    import tomllib

    if not args.config_file:
        return args
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    with open(path, "rb") as handle:
        config = tomllib.load(handle)
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    args = parser.parse_args(namespace=argparse.Namespace(**flat))
    args.config_file = os.path.splitext(args.config_file)[0]
    return args


# -- dataset ---------------------------------------------------------------------------------


@dataclass
class ImageInfo:
    image_key: str
    absolute_path: str
    caption: str
    is_reg: bool
    latents: Optional[torch.Tensor] = None
    latents_flipped: Optional[torch.Tensor] = None
    text_encoder_outputs: Optional[List[torch.Tensor]] = None


class BucketManager:
    def __init__(self) -> None:
        self.buckets: List[List[str]] = [[]]

    def shuffle(self) -> None:
        for bucket in self.buckets:
            random.shuffle(bucket)


def _pil_to_tensor(path: str) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """``<repeats>_<class tokens>/`` folders with images and .txt captions, one bucket, batches of
    ``batch_size``; items are kohya's batch dicts."""

    def __init__(self, args: argparse.Namespace, tokenize: Any) -> None:
        self.batch_size = args.train_batch_size
        self.seed = args.seed
        self.flip_aug = args.flip_aug
        self.tokenize = tokenize
        self.prior_loss_weight = args.prior_loss_weight
        self.current_epoch = 0
        self.image_data: Dict[str, ImageInfo] = {}
        self.bucket_manager = BucketManager()
        self.num_train_images = self.num_reg_images = 0
        for root, is_reg in ((args.train_data_dir, False), (args.reg_data_dir, True)):
            for folder in sorted(Path(root).iterdir()) if root else []:
                repeats, class_tokens = folder.name.split("_", 1)
                for image in sorted(folder.glob("*.png")):
                    caption_file = image.with_suffix(args.caption_extension)
                    caption = caption_file.read_text().strip() if caption_file.is_file() else class_tokens
                    self.image_data[str(image)] = ImageInfo(str(image), str(image), caption, is_reg)
                    self.bucket_manager.buckets[0] += [str(image)] * int(repeats)
                    if is_reg:
                        self.num_reg_images += int(repeats)
                    else:
                        self.num_train_images += int(repeats)
        count = len(self.bucket_manager.buckets[0])
        self.buckets_indices = [
            BucketBatchIndex(0, self.batch_size, i) for i in range((count + self.batch_size - 1) // self.batch_size)
        ]
        self.shuffle_buckets()

    def shuffle_buckets(self) -> None:
        random.seed(self.seed + self.current_epoch)  # as kohya: reseeds Python's global generator
        random.shuffle(self.buckets_indices)
        self.bucket_manager.shuffle()

    def set_current_epoch(self, epoch: int) -> None:
        if epoch > self.current_epoch:
            logger.info("epoch is incremented. current_epoch: {}, epoch: {}".format(self.current_epoch, epoch))
        while self.current_epoch < epoch:
            self.current_epoch += 1
            self.shuffle_buckets()

    def set_current_step(self, step: int) -> None:
        self.current_step = step

    def __len__(self) -> int:
        return len(self.buckets_indices)

    @torch.no_grad()
    def cache_latents(self, vae: torch.nn.Module, encode: Any) -> None:
        for info in self.image_data.values():
            image = _pil_to_tensor(info.absolute_path)[None].to(vae.device, vae.dtype)
            info.latents = encode(vae, image)[0].cpu()
            info.latents_flipped = encode(vae, torch.flip(image, [3]))[0].cpu()

    @torch.no_grad()
    def cache_text_encoder_outputs(self, text_encoder: torch.nn.Module) -> None:
        for info in self.image_data.values():
            ids = self.tokenize(info.caption).to(text_encoder.device)
            info.text_encoder_outputs = [text_encoder(ids)[0][0].cpu()]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        batch_index = self.buckets_indices[index]
        bucket = self.bucket_manager.buckets[batch_index.bucket_index]
        start = batch_index.batch_index * batch_index.bucket_batch_size
        latents, images, captions, weights, te_outputs, flippeds = [], [], [], [], [], []
        for key in bucket[start : start + batch_index.bucket_batch_size]:
            info = self.image_data[key]
            flipped = self.flip_aug and random.random() < 0.5
            if info.latents is not None:
                latents.append(info.latents_flipped if flipped else info.latents)
            else:
                image = _pil_to_tensor(info.absolute_path)
                images.append(torch.flip(image, [2]) if flipped else image)
            captions.append(info.caption)
            weights.append(self.prior_loss_weight if info.is_reg else 1.0)
            te_outputs.append(info.text_encoder_outputs)
            flippeds.append(flipped)
        return {
            "loss_weights": torch.tensor(weights),
            "latents": torch.stack(latents) if latents else None,
            "images": torch.stack(images) if images else None,
            "captions": captions,
            "input_ids_list": [torch.stack([self.tokenize(c) for c in captions])[:, None, :]],
            "text_encoder_outputs_list": (
                [torch.stack([t[0] for t in te_outputs])] if te_outputs[0] is not None else None
            ),
            "network_multipliers": torch.ones(len(captions)),
            "flippeds": flippeds,
            "custom_attributes": [{} for _ in captions],
            "alpha_masks": None,
        }


class DatasetGroup(torch.utils.data.ConcatDataset):
    def __init__(self, datasets: List[DreamBoothDataset]) -> None:
        super().__init__(datasets)
        self.num_train_images = sum(d.num_train_images for d in datasets)
        self.num_reg_images = sum(d.num_reg_images for d in datasets)

    def set_current_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_current_epoch(epoch)

    def set_current_step(self, step: int) -> None:
        for dataset in self.datasets:
            dataset.set_current_step(step)

    def new_cache_latents(self, vae: torch.nn.Module, encode: Any) -> None:
        for dataset in self.datasets:
            dataset.cache_latents(vae, encode)

    def cache_text_encoder_outputs(self, text_encoder: torch.nn.Module) -> None:
        for dataset in self.datasets:
            dataset.cache_text_encoder_outputs(text_encoder)


class collator_class:
    """kohya's collate_fn: sets the dataset's epoch and step, returns the single item."""

    def __init__(self, epoch: Any, step: Any, dataset: Any) -> None:
        self.current_epoch, self.current_step, self.dataset = epoch, step, dataset

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        self.dataset.set_current_epoch(self.current_epoch.value)
        self.dataset.set_current_step(self.current_step.value)
        return examples[0]


# -- accelerator, trackers, files --------------------------------------------------------------


class JsonlTracker(GeneralTracker):
    """An accelerate tracker that appends ``{"step", "values"}`` lines to ``<logging_dir>/log.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, logging_dir: str) -> None:
        super().__init__()
        self.path = Path(logging_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> Any:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: Optional[int] = None, **kwargs: Any) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "values": {k: float(v) for k, v in values.items()}}) + "\n")


def prepare_accelerator(args: argparse.Namespace) -> Accelerator:
    log_with = [JsonlTracker(args.logging_dir)] if args.log_with == "jsonl" else None
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=log_with,
    )


def init_trackers(accelerator: Accelerator, args: argparse.Namespace, name: str) -> None:
    if args.log_with is not None:
        accelerator.init_trackers(name)


def resume_from_local_or_hf_if_specified(accelerator: Accelerator, args: argparse.Namespace) -> None:
    if args.resume:
        accelerator.load_state(args.resume)


def get_step_ckpt_name(args: argparse.Namespace, ext: str, step_no: int) -> str:
    return f"{args.output_name or 'at'}-step{step_no:08d}{ext}"


def get_epoch_ckpt_name(args: argparse.Namespace, ext: str, epoch_no: int) -> str:
    return f"{args.output_name or 'epoch'}-{epoch_no:06d}{ext}"


def get_last_ckpt_name(args: argparse.Namespace, ext: str) -> str:
    return f"{args.output_name or 'last'}{ext}"


def save_and_remove_state_stepwise(args: argparse.Namespace, accelerator: Accelerator, step_no: int) -> None:
    accelerator.save_state(os.path.join(args.output_dir, f"{args.output_name or 'at'}-step{step_no:08d}-state"))


def save_and_remove_state_on_epoch_end(args: argparse.Namespace, accelerator: Accelerator, epoch_no: int) -> None:
    accelerator.save_state(os.path.join(args.output_dir, f"{args.output_name or 'epoch'}-{epoch_no:06d}-state"))


def save_state_on_train_end(args: argparse.Namespace, accelerator: Accelerator) -> None:
    accelerator.save_state(os.path.join(args.output_dir, f"{args.output_name or 'last'}-state"))


class LossRecorder:
    def __init__(self) -> None:
        self.losses: List[float] = []

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        self.losses.append(loss)

    @property
    def moving_average(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else 0.0

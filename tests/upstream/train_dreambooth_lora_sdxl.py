"""diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py (commit 58eb52c), cut down, with
DVAR (lines ending in ``# DVAR``). The loss lines are the script's own (``--snr_gamma`` included,
EDM-style training left out), moved into :func:`denoising_loss` so that tests can feed it the
frozen batch; the dataset is the script's, with PIL in place of torchvision."""

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from PIL.ImageOps import exif_transpose
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.import_utils import is_xformers_available
from diffusers.utils.torch_utils import is_compiled_module
from dvar import DVAREarlyStopping, LossConfig  # DVAR


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Simple example of a training script.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    parser.add_argument("--instance_data_dir", type=str, required=True)
    parser.add_argument("--instance_prompt", type=str, required=True)
    parser.add_argument("--class_prompt", type=str, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output_dir", type=str, default="lora-dreambooth-model")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--center_crop", default=False, action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--max_grad_norm", default=1.0, type=float)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        help="The image interpolation method to use for resizing images.",
    )
    parser.add_argument("--dvar_window", type=int, default=None, help="DVAR window N in steps (default: dvar's default rule)")  # DVAR
    parser.add_argument("--dvar_threshold", type=float, default=None, help="DVAR threshold (default: dvar's default rule)")  # DVAR

    if input_args is not None:
        args = parser.parse_args(input_args)
    else:
        args = parser.parse_args()
    return args


class DreamBoothDataset(Dataset):
    """
    A dataset to prepare the instance and class images with the prompts for fine-tuning the model.
    It pre-processes the images (once, at construction: size, random crop and flip for SD-XL micro-conditioning).
    """

    def __init__(self, args, instance_data_root, instance_prompt, class_prompt, size=1024, repeats=1, center_crop=False):
        self.size = size
        self.center_crop = center_crop
        self.instance_prompt = instance_prompt
        self.custom_instance_prompts = None
        self.class_prompt = class_prompt

        self.instance_data_root = Path(instance_data_root)
        if not self.instance_data_root.exists():
            raise ValueError("Instance images root doesn't exists.")
        instance_images = [Image.open(path) for path in list(Path(instance_data_root).iterdir())]

        self.instance_images = []
        for img in instance_images:
            self.instance_images.extend([img] * repeats)

        # image processing to prepare for using SD-XL micro-conditioning
        self.original_sizes = []
        self.crop_top_lefts = []
        self.pixel_values = []
        interpolation = getattr(Image, args.image_interpolation_mode.upper())
        for image in self.instance_images:
            image = exif_transpose(image)
            if not image.mode == "RGB":
                image = image.convert("RGB")
            self.original_sizes.append((image.height, image.width))
            scale = size / min(image.size)  # transforms.Resize(size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), interpolation)
            if args.random_flip and random.random() < 0.5:
                # flip
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if args.center_crop:
                y1 = max(0, int(round((image.height - args.resolution) / 2.0)))
                x1 = max(0, int(round((image.width - args.resolution) / 2.0)))
            else:  # transforms.RandomCrop.get_params draws from the torch RNG
                y1 = int(torch.randint(0, image.height - args.resolution + 1, size=(1,)))
                x1 = int(torch.randint(0, image.width - args.resolution + 1, size=(1,)))
            image = image.crop((x1, y1, x1 + args.resolution, y1 + args.resolution))
            crop_top_left = (y1, x1)
            self.crop_top_lefts.append(crop_top_left)
            tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            self.pixel_values.append((tensor - 0.5) / 0.5)

        self.num_instance_images = len(self.instance_images)
        self._length = self.num_instance_images

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        example = {}
        instance_image = self.pixel_values[index % self.num_instance_images]
        original_size = self.original_sizes[index % self.num_instance_images]
        crop_top_left = self.crop_top_lefts[index % self.num_instance_images]
        example["instance_images"] = instance_image
        example["original_size"] = original_size
        example["crop_top_left"] = crop_top_left
        example["instance_prompt"] = self.instance_prompt
        return example


def collate_fn(examples, with_prior_preservation=False):
    pixel_values = [example["instance_images"] for example in examples]
    prompts = [example["instance_prompt"] for example in examples]
    original_sizes = [example["original_size"] for example in examples]
    crop_top_lefts = [example["crop_top_left"] for example in examples]
    pixel_values = torch.stack(pixel_values)
    pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
    return {"pixel_values": pixel_values, "prompts": prompts, "original_sizes": original_sizes, "crop_top_lefts": crop_top_lefts}


def tokenize_prompt(tokenizer, prompt):
    text_inputs = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    text_input_ids = text_inputs.input_ids
    return text_input_ids


# Adapted from pipelines.StableDiffusionXLPipeline.encode_prompt
def encode_prompt(text_encoders, tokenizers, prompt, text_input_ids_list=None):
    prompt_embeds_list = []

    for i, text_encoder in enumerate(text_encoders):
        if tokenizers is not None:
            tokenizer = tokenizers[i]
            text_input_ids = tokenize_prompt(tokenizer, prompt)
        else:
            assert text_input_ids_list is not None
            text_input_ids = text_input_ids_list[i]

        prompt_embeds = text_encoder(
            text_input_ids.to(text_encoder.device), output_hidden_states=True, return_dict=False
        )

        # We are only ALWAYS interested in the pooled output of the final text encoder
        pooled_prompt_embeds = prompt_embeds[0]
        prompt_embeds = prompt_embeds[-1][-2]
        bs_embed, seq_len, _ = prompt_embeds.shape
        prompt_embeds = prompt_embeds.view(bs_embed, seq_len, -1)
        prompt_embeds_list.append(prompt_embeds)

    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    pooled_prompt_embeds = pooled_prompt_embeds.view(bs_embed, -1)
    return prompt_embeds, pooled_prompt_embeds


def compute_time_ids(original_size, crops_coords_top_left, resolution, device, weight_dtype):
    # Adapted from pipeline.StableDiffusionXLPipeline._get_add_time_ids (a closure over args in the script)
    target_size = (resolution, resolution)
    add_time_ids = list(original_size + crops_coords_top_left + target_size)
    add_time_ids = torch.tensor([add_time_ids])
    add_time_ids = add_time_ids.to(device, dtype=weight_dtype)
    return add_time_ids


def denoising_loss(args, noise_scheduler, unet, model_input, noise, timesteps, prompt_embeds, unet_add_text_embeds,
                   add_time_ids, elems_to_repeat_text_embeds):
    """The script's loss lines for given latents, noise and timesteps (no EDM, frozen text encoders)."""
    noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
    unet_added_conditions = {
        "time_ids": add_time_ids,
        "text_embeds": unet_add_text_embeds.repeat(elems_to_repeat_text_embeds, 1),
    }
    prompt_embeds_input = prompt_embeds.repeat(elems_to_repeat_text_embeds, 1, 1)
    model_pred = unet(
        noisy_model_input,
        timesteps,
        prompt_embeds_input,
        added_cond_kwargs=unet_added_conditions,
        return_dict=False,
    )[0]

    # Get the target for loss depending on the prediction type
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(model_input, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

    if args.snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        # Compute loss-weights as per Section 3.4 of https://huggingface.co/papers/2303.09556.
        snr = compute_snr(noise_scheduler, timesteps)
        base_weight = (
            torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        )
        if noise_scheduler.config.prediction_type == "v_prediction":
            # Velocity objective needs to be floored to an SNR weight of one.
            mse_loss_weights = base_weight + 1
        else:
            # Epsilon and sample both use the same loss weights.
            mse_loss_weights = base_weight
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
        loss = loss.mean()
    return loss


def main(args):
    logging_dir = Path(args.output_dir, "logs")
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=accelerator_project_config,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    path = args.pretrained_model_name_or_path
    tokenizer_one = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False)
    tokenizer_two = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")

    # We only train the additional adapter LoRA layers
    vae.requires_grad_(False)
    text_encoder_one.requires_grad_(False)
    text_encoder_two.requires_grad_(False)
    unet.requires_grad_(False)

    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16

    unet.to(accelerator.device, dtype=weight_dtype)
    # The VAE is always in float32 to avoid NaN losses.
    vae.to(accelerator.device, dtype=torch.float32)
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)

    unet_lora_config = LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    unet.add_adapter(unet_lora_config)

    def unwrap_model(model):
        model = accelerator.unwrap_model(model)
        model = model._orig_mod if is_compiled_module(model) else model
        return model

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            unet_lora_layers_to_save = None
            for model in models:
                if isinstance(model, type(unwrap_model(unet))):
                    unet_lora_layers_to_save = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                else:
                    raise ValueError(f"unexpected save model: {model.__class__}")
                weights.pop()
            StableDiffusionXLPipeline.save_lora_weights(output_dir, unet_lora_layers=unet_lora_layers_to_save)

    accelerator.register_save_state_pre_hook(save_model_hook)

    unet_lora_parameters = list(filter(lambda p: p.requires_grad, unet.parameters()))
    optimizer = torch.optim.AdamW([{"params": unet_lora_parameters, "lr": args.learning_rate}])

    train_dataset = DreamBoothDataset(
        args,
        instance_data_root=args.instance_data_dir,
        instance_prompt=args.instance_prompt,
        class_prompt=args.class_prompt,
        size=args.resolution,
        repeats=args.repeats,
        center_crop=args.center_crop,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=lambda examples: collate_fn(examples)
    )

    # the instance prompt is encoded once (frozen text encoders, no custom captions)
    with torch.no_grad():
        prompt_embeds, unet_add_text_embeds = encode_prompt(
            [text_encoder_one, text_encoder_two], [tokenizer_one, tokenizer_two], args.instance_prompt
        )

    overrode_max_train_steps = False
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        overrode_max_train_steps = True
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    # Prepare everything with our `accelerator`.
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )

    # We need to recalculate our total training steps as the size of the training dataloader may have changed.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    # Afterwards we recalculate our number of training epochs
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    stopper = DVAREarlyStopping(  # DVAR
        unet=unet, vae=vae, text_encoder=text_encoder_one, tokenizer=tokenizer_one, text_encoder_2=text_encoder_two,
        tokenizer_2=tokenizer_two, noise_scheduler=noise_scheduler, train_dataset=train_dataset,
        accelerator=accelerator, method="dreambooth_lora", loss=LossConfig.from_args(args),  # --snr_gamma
        window=args.dvar_window, threshold=args.dvar_threshold, max_train_steps=args.max_train_steps,
    )
    accelerator.register_for_checkpointing(stopper)  # DVAR

    # We need to initialize the trackers we use, and also store our configuration.
    global_step = 0
    first_epoch = 0
    if args.resume_from_checkpoint:
        dirs = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")), key=lambda x: int(x.split("-")[1]))
        path = dirs[-1]
        accelerator.load_state(os.path.join(args.output_dir, path))
        global_step = int(path.split("-")[1])
        first_epoch = global_step // num_update_steps_per_epoch

    progress_bar = tqdm(range(0, args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    for epoch in range(first_epoch, args.num_train_epochs):
        unet.train()
        for step, batch in enumerate(train_dataloader):
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample()
                model_input = model_input * vae.config.scaling_factor
                model_input = model_input.to(weight_dtype)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device)
                timesteps = timesteps.long()
                add_time_ids = torch.cat(
                    [
                        compute_time_ids(s, c, args.resolution, accelerator.device, weight_dtype)
                        for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])
                    ]
                )
                loss = denoising_loss(args, noise_scheduler, unet, model_input, noise, timesteps, prompt_embeds,
                                      unet_add_text_embeds, add_time_ids, elems_to_repeat_text_embeds=bsz)

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet_lora_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                stopper.step(global_step, loss)  # DVAR: on every process, before the checkpointing below

                if accelerator.is_main_process:
                    if global_step % args.checkpointing_steps == 0:
                        # _before_ saving state, check if this save would set us over the `checkpoints_total_limit`
                        if args.checkpoints_total_limit is not None:
                            checkpoints = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")),
                                                 key=lambda x: int(x.split("-")[1]))
                            for removing_checkpoint in checkpoints[: max(0, len(checkpoints) - args.checkpoints_total_limit + 1)]:
                                shutil.rmtree(os.path.join(args.output_dir, removing_checkpoint))
                        save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                        accelerator.save_state(save_path)

            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)

            if global_step >= args.max_train_steps or stopper.should_stop:  # DVAR
                break

        if accelerator.is_main_process:
            pass  # (per-epoch validation with args.validation_prompt: log_validation(..., torch_dtype=weight_dtype))
        if stopper.should_stop:  # DVAR: leave the epoch loop too
            break
    if stopper.diverged:  # DVAR: a NaN/inf loss is a failure: exit non-zero, save nothing
        raise SystemExit(stopper.status_line())

    # Save the lora layers
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = unwrap_model(unet)
        unet = unet.to(torch.float32)
        unet_lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        text_encoder_lora_layers = None
        text_encoder_2_lora_layers = None

        StableDiffusionXLPipeline.save_lora_weights(
            save_directory=args.output_dir,
            unet_lora_layers=unet_lora_layers,
            text_encoder_lora_layers=text_encoder_lora_layers,
            text_encoder_2_lora_layers=text_encoder_2_lora_layers,
        )
        stopper.save_history(args.output_dir)  # DVAR: dvar_history.csv/.png, dvar_summary.json

    accelerator.end_training()
    return result(accelerator, global_step, epoch, args, stopper)


def result(accelerator, global_step, epoch, args, stopper):
    out = {
        "rank": accelerator.process_index, "global_step": global_step, "epoch": epoch,
        "num_train_epochs": args.num_train_epochs, "stop_step": stopper.stop_step, "reason": stopper.reason,
        "eval_losses": [row.eval_loss for row in stopper.history],
    }
    # one file per rank: lines the ranks print to a shared stdout can interleave
    Path(args.output_dir, f"result_rank{accelerator.process_index}.json").write_text(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main(parse_args()) else 1)

"""A fake of sd-scripts' ``train_network.py`` for dvar's CI (kohya itself cannot be installed there).

Written for these tests, not taken from kohya: ``NetworkTrainer`` has the method names,
signatures and order of calls of ``train_network.py`` at commit 48d368fa (2026-02-16) wherever
the DVAR plugin hooks in or relies on them (``assert_extra_args``, ``load_target_model``,
``cache_text_encoder_outputs_if_needed``, the accelerate save/load-state hooks, the resume,
``sample_images`` before the loop / after ``global_step += 1`` / after each epoch,
``process_batch`` -> ``get_noise_pred_and_target``, the ``max_train_steps`` break that leaves
one epoch, ``save_model`` setting ``ss_steps``/``ss_epoch`` then merging ``get_sai_model_spec``,
and the final save after the epoch loop). Models are mini-SD's real diffusers parts; the
dataset, LoRA and file names follow kohya's. Two deliberate differences: the DataLoader draws
its order from a generator reseeded per epoch, and the resume skips batches itself, so that a
resumed run is step-exact and the tests can demand the same stop. Its ``global_step`` after a
resume restarts as kohya's does, at the state's step less the batches of the skipped epochs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import sys
import time
from multiprocessing import Value
from typing import List

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from library import train_util


class NetworkTrainer:
    def __init__(self):
        self.vae_scale_factor = 0.18215
        self.is_sdxl = False
        self.sample_calls: List[tuple] = []  # (epoch, global_step) of each sample_images call

    # -- logging -------------------------------------------------------------------------

    def step_logging(self, accelerator: Accelerator, logs: dict, global_step: int, epoch: int):
        self.accelerator_logging(accelerator, logs, global_step, global_step, epoch)

    def epoch_logging(self, accelerator: Accelerator, logs: dict, global_step: int, epoch: int):
        self.accelerator_logging(accelerator, logs, epoch, global_step, epoch)

    def accelerator_logging(self, accelerator, logs, step_value, global_step, epoch, val_step=None):
        for tracker in accelerator.trackers:
            tracker.log(logs, step=step_value)

    # -- model family hooks --------------------------------------------------------------

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        pass

    def load_target_model(self, args, weight_dtype, accelerator):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        path = args.pretrained_model_name_or_path
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
        self.vae_scale_factor = vae.config.scaling_factor
        return "sd_v1", text_encoder, vae, unet

    def get_tokenize_strategy(self, args):
        from transformers import CLIPTokenizer

        from dvar_lab.tiny import TOKENIZER_DIR

        tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
        return lambda text: tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids[0]

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset, weight_dtype):
        for t_enc in text_encoders:
            t_enc.to(accelerator.device, dtype=weight_dtype)

    def is_text_encoder_not_needed_for_training(self, args):
        return False

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, **kwargs):
        return unet(noisy_latents, timesteps, text_conds[0]).sample

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
        self.sample_calls.append((epoch, global_step))

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        pass

    def get_noise_scheduler(self, args, device):
        from diffusers import DDPMScheduler

        return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, clip_sample=False)

    def encode_images_to_latents(self, args, vae, images):
        return vae.encode(images).latent_dist.sample()

    def shift_scale_latents(self, args, latents):
        return latents * self.vae_scale_factor

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet,
                                  network, weight_dtype, train_unet, is_train=True):
        noise = torch.randn_like(latents)  # the global generator, as kohya's train_util
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            noise_pred = self.call_unet(args, accelerator, unet, noisy_latents, timesteps, text_encoder_conds, batch,
                                        weight_dtype)
        return noise_pred, noise, timesteps, None

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        return loss

    def get_sai_model_spec(self, args):
        return {"modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.date": time.strftime("%Y-%m-%d")}

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train: bool = True):
        pass

    def on_validation_step_end(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype):
        pass

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True) -> torch.Tensor:
        with torch.no_grad():
            if batch.get("latents") is not None:
                latents = batch["latents"].to(accelerator.device)
            else:
                latents = self.encode_images_to_latents(args, vae, batch["images"].to(accelerator.device, dtype=vae_dtype))
            latents = self.shift_scale_latents(args, latents)
        text_encoder_conds = batch.get("text_encoder_outputs_list") or []
        if len(text_encoder_conds) == 0 or train_text_encoder:
            with torch.set_grad_enabled(is_train and train_text_encoder), accelerator.autocast():
                ids = batch["input_ids_list"][0].to(accelerator.device)
                text_encoder_conds = [text_encoders[0](ids.reshape(-1, ids.shape[-1]))[0]]
        noise_pred, target, timesteps, weighting = self.get_noise_pred_and_target(
            args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet, network, weight_dtype,
            train_unet, is_train=is_train,
        )
        loss = torch.nn.functional.mse_loss(noise_pred.float(), target.float(), reduction="none")
        if weighting is not None:
            loss = loss * weighting
        loss = loss.mean(dim=list(range(1, loss.ndim)))
        loss = loss * batch["loss_weights"]
        loss = self.post_process_loss(loss, args, timesteps, noise_scheduler)
        return loss.mean()

    # -- the loop ------------------------------------------------------------------------

    def train(self, args):
        session_id = random.randint(0, 2**32)
        if args.seed is None:
            args.seed = random.randint(0, 2**32)
        set_seed(args.seed)

        tokenize_strategy = self.get_tokenize_strategy(args)
        train_dataset_group = train_util.DatasetGroup([train_util.DreamBoothDataset(args, tokenize_strategy)])
        val_dataset_group = None
        current_epoch, current_step = Value("i", 0), Value("i", 0)
        collator = train_util.collator_class(current_epoch, current_step, train_dataset_group)

        self.assert_extra_args(args, train_dataset_group, val_dataset_group)  # may change some args

        accelerator = train_util.prepare_accelerator(args)
        is_main_process = accelerator.is_main_process
        weight_dtype = save_dtype = vae_dtype = torch.float32

        model_version, text_encoder, vae, unet = self.load_target_model(args, weight_dtype, accelerator)
        text_encoders = text_encoder if isinstance(text_encoder, list) else [text_encoder]

        if args.cache_latents:
            vae.to(accelerator.device, dtype=vae_dtype).requires_grad_(False).eval()
            train_dataset_group.new_cache_latents(vae, lambda v, x: self.encode_images_to_latents(args, v, x))
            vae.to("cpu")

        text_encoding_strategy = None
        self.cache_text_encoder_outputs_if_needed(args, accelerator, unet, vae, text_encoders, train_dataset_group, weight_dtype)

        sys.path.append(os.path.dirname(__file__))
        network_module = importlib.import_module("networks.lora")
        network = network_module.create_network(1.0, 4, 4.0, vae, text_encoder, unet)
        self.post_process_network(args, accelerator, network, text_encoders, unet)
        train_unet, train_text_encoder = True, False
        network.apply_to(text_encoder, unet, train_text_encoder, train_unet)

        optimizer = torch.optim.AdamW(network.prepare_optimizer_params(None, None, args.learning_rate))
        generator = torch.Generator()
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset_group, batch_size=1, shuffle=True, collate_fn=collator, num_workers=0, generator=generator
        )
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * math.ceil(
                len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps
            )
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # kohya's default: constant

        unet.requires_grad_(False)
        for t_enc in text_encoders:
            t_enc.requires_grad_(False)
        # kohya prepares the UNet; accelerate leaves a module without trainable parameters unwrapped on
        # GPUs, but wraps it in DDP (and fails) on several CPU processes, where the fake runs in tests
        unet.to(accelerator.device)
        network, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            network, optimizer, train_dataloader, lr_scheduler
        )
        training_model = network
        unet.eval()
        for t_enc in text_encoders:
            t_enc.eval()
        accelerator.unwrap_model(network).prepare_grad_etc(text_encoder, unet)
        if not args.cache_latents:
            vae.requires_grad_(False).eval().to(accelerator.device, dtype=vae_dtype)

        def save_model_hook(models, weights, output_dir):
            with open(os.path.join(output_dir, "train_state.json"), "w", encoding="utf-8") as f:
                json.dump({"current_epoch": current_epoch.value, "current_step": current_step.value + 1}, f)

        steps_from_state = None

        def load_model_hook(models, input_dir):
            nonlocal steps_from_state
            with open(os.path.join(input_dir, "train_state.json"), encoding="utf-8") as f:
                steps_from_state = json.load(f)["current_step"]

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

        train_util.resume_from_local_or_hf_if_specified(accelerator, args)

        num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

        metadata = {
            "ss_session_id": session_id,
            "ss_num_batches_per_epoch": len(train_dataloader),
            "ss_num_epochs": num_train_epochs,
            "ss_max_train_steps": args.max_train_steps,
            "ss_base_model_version": model_version,
            "ss_seed": args.seed,
        }
        metadata = {k: str(v) for k, v in metadata.items()}
        minimum_metadata = {k: metadata[k] for k in ("ss_base_model_version",)}

        initial_step = steps_from_state or 0
        epoch_to_start = initial_step // num_update_steps_per_epoch if args.skip_until_initial_step else 0
        # kohya's counter after a resume: the state's step less the batches of the skipped epochs
        global_step = initial_step - epoch_to_start * len(train_dataloader) if args.skip_until_initial_step else 0
        skip_batches = (initial_step - epoch_to_start * num_update_steps_per_epoch) * args.gradient_accumulation_steps

        noise_scheduler = self.get_noise_scheduler(args, accelerator.device)
        train_util.init_trackers(accelerator, args, "network_train")
        loss_recorder = train_util.LossRecorder()
        del train_dataset_group

        def save_model(ckpt_name, unwrapped_nw, steps, epoch_no, force_sync_upload=False):
            os.makedirs(args.output_dir, exist_ok=True)
            ckpt_file = os.path.join(args.output_dir, ckpt_name)
            accelerator.print(f"\nsaving checkpoint: {ckpt_file}")
            metadata["ss_training_finished_at"] = str(time.time())
            metadata["ss_steps"] = str(steps)
            metadata["ss_epoch"] = str(epoch_no)
            metadata_to_save = minimum_metadata if args.no_metadata else metadata
            sai_metadata = self.get_sai_model_spec(args)
            metadata_to_save.update(sai_metadata)
            unwrapped_nw.save_weights(ckpt_file, save_dtype, metadata_to_save)

        if self.is_text_encoder_not_needed_for_training(args):
            text_encoders = []
            text_encoder = None

        tokenizers = [tokenize_strategy]
        self.sample_images(accelerator, args, 0, global_step, accelerator.device, vae, tokenizers, text_encoder, unet)

        for epoch in range(epoch_to_start, num_train_epochs):
            accelerator.print(f"\nepoch {epoch+1}/{num_train_epochs}\n")
            current_epoch.value = epoch + 1
            metadata["ss_epoch"] = str(epoch + 1)
            accelerator.unwrap_model(network).on_epoch_start(text_encoder, unet)
            generator.manual_seed(args.seed + epoch)  # (the fake's step-exact order; see the docstring)

            for step, batch in enumerate(train_dataloader):
                current_step.value = global_step
                if skip_batches > 0:
                    skip_batches -= 1
                    continue
                with accelerator.accumulate(training_model):
                    self.on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True)
                    loss = self.process_batch(
                        batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                        accelerator, args, text_encoding_strategy, tokenize_strategy,
                        is_train=True, train_text_encoder=train_text_encoder, train_unet=train_unet,
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm != 0.0:
                        accelerator.clip_grad_norm_(accelerator.unwrap_model(network).get_trainable_params(),
                                                    args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                if args.scale_weight_norms:
                    accelerator.unwrap_model(network).apply_max_norm_regularization(args.scale_weight_norms,
                                                                                  accelerator.device)

                if accelerator.sync_gradients:
                    global_step += 1
                    self.sample_images(accelerator, args, None, global_step, accelerator.device, vae, tokenizers,
                                       text_encoder, unet)
                    if args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0:
                        accelerator.wait_for_everyone()
                        if accelerator.is_main_process:
                            ckpt_name = train_util.get_step_ckpt_name(args, "." + args.save_model_as, global_step)
                            save_model(ckpt_name, accelerator.unwrap_model(network), global_step, epoch)
                            if args.save_state:
                                train_util.save_and_remove_state_stepwise(args, accelerator, global_step)

                current_loss = loss.detach().item()
                loss_recorder.add(epoch=epoch, step=step, loss=current_loss)
                if len(accelerator.trackers) > 0:
                    logs = {"loss/current": current_loss, "loss/average": loss_recorder.moving_average}
                    self.step_logging(accelerator, logs, global_step, epoch + 1)

                if global_step >= args.max_train_steps:
                    break

            should_validate_epoch = (
                (epoch + 1) % args.validate_every_n_epochs == 0 if args.validate_every_n_epochs is not None else False
            )
            if should_validate_epoch:
                self.validation_epochs = getattr(self, "validation_epochs", []) + [epoch + 1]

            if len(accelerator.trackers) > 0:
                self.epoch_logging(accelerator, {"loss/epoch_average": loss_recorder.moving_average}, global_step, epoch + 1)

            accelerator.wait_for_everyone()
            if args.save_every_n_epochs is not None:
                saving = (epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs
                if is_main_process and saving:
                    ckpt_name = train_util.get_epoch_ckpt_name(args, "." + args.save_model_as, epoch + 1)
                    save_model(ckpt_name, accelerator.unwrap_model(network), global_step, epoch + 1)
                    if args.save_state:
                        train_util.save_and_remove_state_on_epoch_end(args, accelerator, epoch + 1)

            self.sample_images(accelerator, args, epoch + 1, global_step, accelerator.device, vae, tokenizers,
                               text_encoder, unet)

        metadata["ss_training_finished_at"] = str(time.time())
        if is_main_process:
            network = accelerator.unwrap_model(network)
        accelerator.end_training()
        if is_main_process and (args.save_state or args.save_state_on_train_end):
            train_util.save_state_on_train_end(args, accelerator)
        if is_main_process:
            ckpt_name = train_util.get_last_ckpt_name(args, "." + args.save_model_as)
            save_model(ckpt_name, network, global_step, num_train_epochs, force_sync_upload=True)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train_util.add_training_arguments(parser)
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer = NetworkTrainer()
    trainer.train(args)

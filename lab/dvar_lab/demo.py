"""A minimal training script in the shape of the diffusers examples, with DVAR added.

The lines marked ``# DVAR`` are all that a diffusers script needs. It fine-tunes a tiny,
randomly initialised UNet on a few toy images and prints one JSON line per process.

    python -m dvar_lab.demo --output_dir outputs/demo --early_stop
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m dvar_lab.demo --output_dir outputs/demo --early_stop
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from dvar import DVAREarlyStopping  # DVAR
from dvar_lab.tiny import ToyConceptDataset, collate, tiny_sd


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune a tiny UNet with DVAR early stopping (a demo).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_steps", type=int, default=120)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing_steps", type=int, default=0)
    parser.add_argument("--resume_from_checkpoint", default=None)
    parser.add_argument("--early_stop", action="store_true")
    parser.add_argument("--attach_only", action="store_true", help="attach DVAR but never stop (threshold ~0)")
    parser.add_argument("--window", type=int, default=15)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--eval_every", type=int, default=1)
    parser.add_argument("--preset", default=None, help="a DVAR preset ('auto': the settling-time rule) instead of the window")
    parser.add_argument("--signal", default="loss", choices=("loss", "normalized", "bands"))
    parser.add_argument("--min_steps", type=int, default=None)
    parser.add_argument("--no_flip", action="store_true", help="no random flips (exact resume, see tests)")
    parser.add_argument("--interrupt_at_step", type=int, default=0, help="simulate an interruption after this step")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    parts = tiny_sd(seed=0)
    unet, vae, text_encoder, tokenizer, noise_scheduler = (
        parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["noise_scheduler"]
    )
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    train_dataset = ToyConceptDataset(num_images=5, resolution=16, flip=not args.no_flip)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
        # a private generator: creating an iterator (e.g. on resume) must not draw from the global RNG
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)

    stopper = None
    if args.early_stop or args.attach_only:
        stopper = DVAREarlyStopping(  # DVAR
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=noise_scheduler,
            train_dataset=train_dataset, accelerator=accelerator, eval_every=args.eval_every,
            **({"preset": args.preset} if args.preset else
               {"window": args.window, "threshold": 1e-12 if args.attach_only else args.threshold}),
            signal=args.signal, min_steps=args.min_steps, max_train_steps=args.max_train_steps,
        )
        accelerator.register_for_checkpointing(stopper)  # DVAR
        initial_eval_loss = stopper.evaluate()  # not needed by DVAR: lets tests compare 1 vs 2 processes

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    global_step, first_epoch, resume_step = 0, 0, 0
    if args.resume_from_checkpoint:
        dirs = sorted(
            (d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")), key=lambda d: int(d.split("-")[1])
        )
        path = dirs[-1] if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
        accelerator.load_state(os.path.join(args.output_dir, path))
        # accelerate < 1.1 cannot read its own copy of the RNG state back on torch >= 2.6 (torch.load weights_only)
        rng_file = os.path.join(args.output_dir, path, f"rng_state_{accelerator.process_index}.pt")
        torch.set_rng_state(torch.load(rng_file, weights_only=True))
        global_step = int(path.split("-")[1])
        first_epoch = global_step // num_update_steps_per_epoch
        resume_step = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    losses = []
    for epoch in range(first_epoch, num_train_epochs):
        unet.train()
        train_dataloader.set_epoch(epoch)
        dataloader = train_dataloader
        if epoch == first_epoch and resume_step:
            dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
            # accelerate 1.7-1.14 would replay epoch 0's shuffle order here: the new loader starts at epoch 0
            dataloader.set_epoch(epoch)
        for batch in dataloader:
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                    input_ids = tokenizer(
                        batch["prompt"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                    ).input_ids
                    encoder_hidden_states = text_encoder(input_ids)[0]
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
                loss = F.mse_loss(model_pred.float(), noise.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                losses.append(loss.item())
                should_stop = stopper is not None and stopper.step(global_step, loss)  # DVAR (before checkpointing)
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    checkpoint, rng = os.path.join(args.output_dir, f"checkpoint-{global_step}"), torch.get_rng_state()
                    accelerator.save_state(checkpoint)
                    torch.save(rng, os.path.join(checkpoint, f"rng_state_{accelerator.process_index}.pt"))
                if should_stop:  # DVAR
                    break  # DVAR
            if global_step >= args.max_train_steps or global_step == args.interrupt_at_step:
                break
        if (stopper is not None and stopper.should_stop) or global_step >= args.max_train_steps:  # DVAR
            break
        if global_step == args.interrupt_at_step:
            break

    accelerator.wait_for_everyone()
    weights = accelerator.unwrap_model(unet).state_dict()
    checksum = float(sum(t.double().sum() for t in weights.values()))
    result = {
        "rank": accelerator.process_index,
        "global_step": global_step,
        "stop_step": None if stopper is None else stopper.stop_step,
        "reason": None if stopper is None else stopper.reason,
        "eval_losses": [] if stopper is None else [row.eval_loss for row in stopper.history],
        "signals": [] if stopper is None else [row.signal for row in stopper.history],
        "initial_eval_loss": None if stopper is None else initial_eval_loss,
        "checksum": checksum,
    }
    if stopper is not None and accelerator.is_main_process:
        paths = stopper.save_history(args.output_dir)  # DVAR: history, plot, dvar_summary.json
        stopper.report()  # DVAR: one line, where and why it stopped
        print(f"history: {', '.join(str(p) for p in paths)}")
    torch.save(weights, os.path.join(args.output_dir, f"unet_rank{accelerator.process_index}.pt"))
    # one file per rank: lines the ranks print to a shared stdout can interleave
    Path(args.output_dir, f"result_rank{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()

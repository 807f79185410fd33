"""Cost of DVAR per training step, and how ``eval_every`` moves the stop step.

Trains one small pipeline's UNet (DreamBooth-style) for ``--steps`` optimizer steps
without the callback and then with it at each ``eval_every``, all in this one process,
and prints seconds per step, their ratio, and the stop step each ``eval_every`` gives on
the same loss trace (attaching DVAR does not change the training trajectory, so every
run sees the same trace; the eval_every=1 trace subsampled every k steps is exactly what
the eval_every=k run evaluates).

    python benchmarks/overhead.py            # tiny pipeline, a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from dvar import DVAREarlyStopping, first_stop_step
from dvar.tiny import ToyConceptDataset, collate, tiny_sd


class Run:
    """One training run of a small pipeline's UNet (DreamBooth-style), optionally with DVAR attached."""

    def __init__(self, eval_every: Optional[int], resolution: int, batch_size: int, window: int) -> None:
        torch.manual_seed(0)
        parts = tiny_sd(seed=0, resolution=resolution)
        self.unet, self.vae, self.text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        self.tokenizer, self.scheduler = parts["tokenizer"], parts["noise_scheduler"]
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        dataset = ToyConceptDataset(num_images=5, resolution=resolution, flip=False)  # no global RNG: runs interleave
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
        )
        self.batches = iter(())
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-3)
        self.rng = torch.Generator().manual_seed(0)  # each run its own training randomness, identical across runs
        self.stopper = None
        if eval_every is not None:
            self.stopper = DVAREarlyStopping(
                unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                noise_scheduler=self.scheduler, train_dataset=dataset, window=window,
                threshold=1e-12, eval_every=eval_every,  # never stops: every run is timed to the end
            )
        self.step, self.seconds = 0, 0.0

    def _next_batch(self) -> Dict[str, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def train(self, steps: int, timed: bool = True) -> None:
        started = time.perf_counter()
        for _ in range(steps):
            batch = self._next_batch()
            with torch.no_grad():
                dist = self.vae.encode(batch["pixel_values"]).latent_dist
                latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.rng)) * self.vae.config.scaling_factor
                ids = self.tokenizer(batch["prompt"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                hidden = self.text_encoder(ids)[0]
            noise = torch.randn(latents.shape, generator=self.rng)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.rng)
            pred = self.unet(self.scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
            loss = F.mse_loss(pred, noise)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.step += 1
            if self.stopper is not None:
                self.stopper.step(self.step, loss)
        if timed:
            self.seconds += time.perf_counter() - started

    @property
    def trace(self) -> List[float]:
        return [] if self.stopper is None else [row.eval_loss for row in self.stopper.history]


def stop_step_on_trace(trace: List[float], eval_every: int, window: int, threshold: float) -> Optional[int]:
    """Stop step (in optimizer steps) when the every-step trace is only seen every k steps."""
    sub = trace[eval_every - 1 :: eval_every]
    n = first_stop_step(sub, max(2, math.ceil(window / eval_every)), threshold)
    return None if n is None else n * eval_every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per run")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--window", type=int, default=60)
    parser.add_argument("--threshold", type=float, default=0.15)
    parser.add_argument("--eval_every", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--block", type=int, default=10, help="steps per round-robin timing block")
    args = parser.parse_args()

    print(f"torch threads: {torch.get_num_threads()}, steps per run: {args.steps}, "
          f"resolution {args.resolution}, train batch {args.train_batch_size}, eval batch 4")
    runs = {k: Run(k, args.resolution, args.train_batch_size, args.window) for k in [None, *args.eval_every]}
    for run in runs.values():
        run.train(5, timed=False)  # warm-up
    # Round-robin blocks: background load drifts hit every configuration alike.
    for _ in range(math.ceil(args.steps / args.block)):
        for run in runs.values():
            run.train(args.block)
    seconds = {k: run.seconds / (run.step - 5) for k, run in runs.items()}
    baseline = seconds[None]
    full_trace = runs[1].trace if 1 in runs else []
    reference = stop_step_on_trace(full_trace, 1, args.window, args.threshold)

    print(f"\nDVAR window {args.window}, threshold {args.threshold}; stop step with eval_every=1: {reference}\n")
    print("| eval_every | s/step without | s/step with | ratio | stop step | moved vs eval_every=1 |")
    print("|---|---|---|---|---|---|")
    for k in args.eval_every:
        stop = stop_step_on_trace(full_trace, k, args.window, args.threshold)
        moved = "n/a" if stop is None or reference is None else f"{stop - reference:+d} steps"
        # the eval_every=k run evaluated exactly these steps of the same trajectory
        assert runs[k].trace == full_trace[k - 1 :: k], "attaching DVAR changed the training trajectory"
        print(f"| {k} | {baseline:.4f} | {seconds[k]:.4f} | {seconds[k] / baseline:.3f} | {stop} | {moved} |")


if __name__ == "__main__":
    main()

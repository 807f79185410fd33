"""Train the bundled attribute classifier of the synthetic world (a few minutes on 2 CPU cores).

Renders ``--train-size`` scenes of every object (held-out ones included), trains
:class:`dvar_lab.world.AttributeClassifier` with blur/noise/colour augmentation, reports the
per-attribute accuracy on ``--eval-size`` scenes from an unseen seed and saves the weights.

Example:
    python benchmarks/embedded/train_attribute_classifier.py \
        --out lab/dvar_lab/assets/world/attribute_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dvar_lab.world.classifier import CLASSIFIER_ATTRIBUTES, AttributeClassifier, augment
from dvar_lab.world.scenes import HELD_OUT, render, sample_scene

COMPOSITE_PROB = 0.2


def _render_one(args: tuple[int, int]) -> tuple[np.ndarray, list[int], bool]:
    seed, index = args
    scene = sample_scene((seed, index), exclude=(), composite_prob=COMPOSITE_PROB)
    image = np.asarray(render(scene, rng=(seed, index, 1)), dtype=np.uint8)
    labels = scene.labels()
    return image, [labels[a] for a in CLASSIFIER_ATTRIBUTES], scene.signature in HELD_OUT


def render_set(n: int, seed: int, workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [N, 3, 64, 64] uint8, labels [N, A] int64 and a held-out-object mask [N]."""
    jobs = [(seed, i) for i in range(n)]
    if workers > 1:
        with Pool(workers) as pool:
            rows = pool.map(_render_one, jobs, chunksize=256)
    else:
        rows = [_render_one(j) for j in jobs]
    images = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    held = torch.tensor([r[2] for r in rows])
    return images, labels, held


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


@torch.no_grad()
def accuracy(
    model: AttributeClassifier, images: torch.Tensor, labels: torch.Tensor, aug_seed: int | None = None
) -> dict[str, float]:
    """Per-attribute accuracy, optionally on augmented copies of the images."""
    model.eval()
    gen = None if aug_seed is None else torch.Generator().manual_seed(aug_seed)
    correct = torch.zeros(len(CLASSIFIER_ATTRIBUTES))
    for start in range(0, len(images), 500):
        x = to_float(images[start : start + 500])
        if gen is not None:
            x = augment(x, gen)
        out = model(x)
        for j, attr in enumerate(CLASSIFIER_ATTRIBUTES):
            correct[j] += (out[attr].argmax(1) == labels[start : start + 500, j]).sum()
    return {a: round(float(c) / len(images), 4) for a, c in zip(CLASSIFIER_ATTRIBUTES, correct)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lab/dvar_lab/assets/world/attribute_classifier.safetensors"))
    parser.add_argument("--train-size", type=int, default=16000)
    parser.add_argument("--train-seed", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--eval-seed", type=int, default=999)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="torch seed (init, shuffling, augmentation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, default=None, help="optional JSON file for the metrics")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    train_x, train_y, _ = render_set(args.train_size, args.train_seed, args.threads)
    eval_x, eval_y, eval_held = render_set(args.eval_size, args.eval_seed, args.threads)
    print(f"rendered {len(train_x)} + {len(eval_x)} scenes in {time.time() - t0:.0f}s", flush=True)

    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(train_x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        total = 0.0
        for b in range(len(train_x) // args.batch_size):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            x = augment(to_float(train_x[idx]), gen)
            out = model(x)
            loss = sum(
                F.cross_entropy(out[a], train_y[idx, j], label_smoothing=0.05)
                for j, a in enumerate(CLASSIFIER_ATTRIBUTES)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = accuracy(model, eval_x, eval_y)
        elapsed = time.time() - t0
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / (b + 1):.3f} eval {acc} ({elapsed:.0f}s)", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    # Score the saved (float16) weights exactly as users will load them.
    loaded = AttributeClassifier.load(args.out)
    report = {
        "eval_seed": args.eval_seed,
        "eval_size": args.eval_size,
        "clean": accuracy(loaded, eval_x, eval_y),
        "augmented": accuracy(loaded, eval_x, eval_y, aug_seed=1),
        "held_out_objects": accuracy(loaded, eval_x[eval_held], eval_y[eval_held]),
        "held_out_objects_n": int(eval_held.sum()),
        "seconds": round(time.time() - t0),
        "bytes": args.out.stat().st_size,
    }
    print(json.dumps(report, indent=2))
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

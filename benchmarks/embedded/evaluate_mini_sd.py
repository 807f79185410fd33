"""Evaluate the bundled mini-SD: prompt following, sample grid and sampling speed.

* Prompt following: ``--n`` scenes from a seed never used in pretraining
  (``sample_scenes(n, seed=12345)``), one caption each (full templates, cycled), one sample
  each with ``--steps`` DPM-Solver++ steps and classifier-free guidance; the
  :class:`dvar_lab.world.AttributeClassifier` reads every attribute back and the per-attribute
  accuracy is reported, next to two ceilings measured the same way: the renders of the same
  scenes ("real") and their VAE reconstructions ("VAE").
* ``--sweep``: guidance scales tried on the first ``--sweep-n`` scenes before the main run;
  the best mean accuracy (shape, colour, background) picks the guidance scale.
* The seconds per 64x64 sample on this CPU (batch 1, and per image in a batch of 16).
* A sample grid with captions, ``lab/dvar_lab/assets/mini-sd/samples.png``.

Writes ``benchmarks/embedded/mini_sd_eval.json`` and prints a markdown table.

Example::

    python benchmarks/embedded/evaluate_mini_sd.py --n 200 --steps 25 --sweep 3 5 7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dvar_lab.models import load_mini_sd_pipeline, mini_sd
from dvar_lab.world import AttributeClassifier, Scene, render, sample_scenes
from dvar_lab.world.classifier import CLASSIFIER_ATTRIBUTES
from dvar_lab.world.scenes import FULL_TEMPLATES, to_tensor

EVAL_SEED = 12345  # never used by pretrain_mini_sd.py (it renders sample_scene((0, i)))
GRID_PROMPTS = (
    Scene("star", "yellow", "solid", "large", "center", "blue"),
    Scene("circle", "red", "striped", "small", "left", "green"),
    Scene("square", "blue", "checkered", "large", "right", "beige"),
    Scene("heart", "purple", "dotted", "large", "center", "gray"),
    Scene("triangle", "orange", "solid", "small", "right", "grass"),
    Scene("ring", "white", "solid", "large", "left", "brick"),
    Scene("cross", "black", "striped", "large", "center", "beige"),
    Scene("diamond", "green", "solid", "small", "center", "brick"),
)


def caption_for(scene: Scene, i: int) -> str:
    return scene.caption(FULL_TEMPLATES[i % len(FULL_TEMPLATES)], order=0)


@torch.no_grad()
def generate(
    pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 50
) -> torch.Tensor:
    """Images [N, 3, 64, 64] in [-1, 1]; sample ``i`` uses the generator seeded ``seed + i``."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gens = [
            torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))
        ]
        images = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
        ).images
        out.append(images.mul(2).sub(1).clamp(-1, 1).float())
    return torch.cat(out)


@torch.no_grad()
def vae_roundtrip(pipe, images: torch.Tensor) -> torch.Tensor:
    latents = pipe.vae.encode(images).latent_dist.mean
    return pipe.vae.decode(latents).sample.clamp(-1, 1)


def table(rows: dict[str, dict[str, float]]) -> str:
    attrs = list(CLASSIFIER_ATTRIBUTES)
    lines = [
        "| images | " + " | ".join(attrs) + " |",
        "| --- |" + " --- |" * len(attrs),
    ]
    for name, scores in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * scores[a]:.1f}%" for a in attrs) + " |"
        )
    return "\n".join(lines)


def time_sampling(
    pipe, steps: int, guidance: float, repeats: int = 5
) -> dict[str, float]:
    prompt = "a large red solid star in the center, on a gray background"
    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(r),
        )
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    pipe(
        [prompt] * 16,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
    )
    batched = (time.perf_counter() - t0) / 16
    return {
        "batch1_median_s": float(np.median(times)),
        "batch1_min_s": float(np.min(times)),
        "batch16_per_image_s": batched,
    }


def save_grid(
    pipe, path: Path, steps: int, guidance: float, per_prompt: int = 4
) -> None:
    """Rows: a prompt, a render of its scene, then ``per_prompt`` samples (2x nearest upscaling)."""
    from PIL import Image, ImageDraw, ImageFont

    scale, text_w, pad = 2, 300, 4
    cell = 64 * scale
    rows = len(GRID_PROMPTS)
    width = text_w + (per_prompt + 1) * (cell + pad) + pad
    height = rows * (cell + pad) + pad + 18
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 3), "prompt", fill=(0, 0, 0), font=font)
    draw.text((text_w + pad, 3), "render", fill=(0, 0, 0), font=font)
    draw.text(
        (text_w + 2 * (cell + pad), 3),
        f"mini-SD samples ({steps} DPM-Solver++ steps, guidance {guidance:g})",
        fill=(0, 0, 0),
        font=font,
    )
    for r, scene in enumerate(GRID_PROMPTS):
        prompt = scene.caption()
        y = 18 + pad + r * (cell + pad)
        words, lines, line = prompt.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 44:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines):
            draw.text((pad, y + 40 + 12 * k), text, fill=(0, 0, 0), font=font)
        ref = render(scene, rng=1).resize((cell, cell), Image.Resampling.NEAREST)
        canvas.paste(ref, (text_w + pad, y))
        gens = [torch.Generator().manual_seed(100 * r + j) for j in range(per_prompt)]
        images = pipe(
            [prompt] * per_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
        ).images
        for j, im in enumerate(images):
            canvas.paste(
                im.resize((cell, cell), Image.Resampling.NEAREST),
                (text_w + pad + (j + 1) * (cell + pad), y),
            )
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        path, optimize=True
    )  # keeps it small


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, default=mini_sd(), help="mini-SD folder (default: the bundled one)"
    )
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default: the sweep's best (or 5.0)",
    )
    p.add_argument("--sweep", type=float, nargs="*", default=[3.0, 5.0, 7.0])
    p.add_argument("--sweep-n", type=int, default=40)
    p.add_argument("--scheduler", default="dpm")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--json",
        type=Path,
        default=REPO / "benchmarks" / "embedded" / "mini_sd_eval.json",
    )
    p.add_argument("--grid", type=Path, default=None, help="default: MODEL/samples.png")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.grid = args.grid or args.model / "samples.png"
    t_start = time.time()

    pipe = load_mini_sd_pipeline(scheduler=args.scheduler, device=args.device, path=args.model)
    clf = AttributeClassifier.load(device=args.device)
    scenes = sample_scenes(args.n, seed=EVAL_SEED)
    prompts = [caption_for(s, i) for i, s in enumerate(scenes)]
    model = args.model.resolve()
    result: dict = {
        "model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else args.model),
        "n": args.n,
        "steps": args.steps,
        "scheduler": type(pipe.scheduler).__name__,
        "eval_seed": EVAL_SEED,
    }

    sweep = {}
    for g in args.sweep if args.guidance is None else []:
        images = generate(pipe, prompts[: args.sweep_n], args.steps, g, args.seed)
        sweep[g] = clf.caption_agreement(images.cpu(), scenes[: args.sweep_n])
        print(
            f"guidance {g:g} on {args.sweep_n}: "
            + ", ".join(f"{a} {100 * v:.0f}%" for a, v in sweep[g].items()),
            flush=True,
        )
    if args.guidance is not None:
        guidance = args.guidance
    elif sweep:
        guidance = max(
            sweep,
            key=lambda g: np.mean(
                [sweep[g][a] for a in ("shape", "color", "background")]
            ),
        )
    else:
        guidance = 5.0
    result["guidance"] = guidance
    result["sweep"] = {str(g): s for g, s in sweep.items()}

    t0 = time.time()
    images = generate(pipe, prompts, args.steps, guidance, args.seed)
    result["generation_s"] = time.time() - t0
    real = torch.stack(
        [to_tensor(render(s, rng=(EVAL_SEED, i, 1))) for i, s in enumerate(scenes)]
    ).to(args.device)
    rows = {
        f"mini-SD samples (guidance {guidance:g})": clf.caption_agreement(
            images.cpu(), scenes
        ),
        "VAE reconstructions of renders": clf.caption_agreement(
            vae_roundtrip(pipe, real).cpu(), scenes
        ),
        "renders (classifier ceiling)": clf.caption_agreement(real.cpu(), scenes),
    }
    result["accuracy"] = rows
    result["pixel_std_mean"] = float(images.std(dim=(1, 2, 3)).mean())
    print()
    print(table(rows))

    if not args.no_timing:
        result["sample_time"] = time_sampling(pipe, args.steps, guidance)
        result["sample_time"]["threads"] = args.threads
        print(
            f"\nseconds per 64x64 sample ({args.steps} steps, CFG): "
            + json.dumps(result["sample_time"])
        )
    if not args.no_grid:
        save_grid(pipe, args.grid, args.steps, guidance)
        print(f"wrote {args.grid} ({args.grid.stat().st_size / 1e3:.0f} KB)")
    files = [f for f in args.model.rglob("*") if f.is_file() and f.name != "samples.png"]
    result["size_bytes"] = sum(f.stat().st_size for f in files)
    result["total_s"] = time.time() - t_start
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

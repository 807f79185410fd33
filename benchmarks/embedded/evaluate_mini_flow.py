"""Evaluate the bundled mini-flow: prompt following, sample grid and sampling speed.

The same protocol as ``evaluate_mini_sd.py``, on ``FluxPipeline``:

* Prompt following: ``--n`` scenes from a seed never used in pretraining
  (``sample_scenes(n, seed=12345)``), one caption each (full templates, cycled), one sample
  each with ``--steps`` Euler (flow-matching) steps and true classifier-free guidance
  (``negative_prompt=""``, ``true_cfg_scale``; mini-flow is not guidance-distilled) at
  ``--max-sequence-length`` T5 tokens; the :class:`dvar_lab.world.AttributeClassifier` reads every
  attribute back, next to its ceilings: the renders of the same scenes and their VAE reconstructions.
* ``--long-n``: the first N scenes again at ``FluxPipeline``'s default 512 T5 tokens.
* ``--sweep``: guidance scales tried on the first ``--sweep-n`` scenes before the main run;
  the best mean accuracy (shape, colour, background) picks the guidance scale.
* The seconds per 64x64 sample on this CPU (batch 1, and per image in a batch of 16).
* A sample grid with captions, ``MODEL/samples.png``.

Writes ``benchmarks/embedded/mini_flow_eval.json`` and prints a markdown table. Example::

    python benchmarks/embedded/evaluate_mini_flow.py --n 200 --steps 28 --sweep 3 5 7

To score a run that is still training, export its checkpoint elsewhere first::

    python benchmarks/embedded/pretrain_mini_flow.py --export-only --out /tmp/mini-flow-now
    python benchmarks/embedded/evaluate_mini_flow.py --model /tmp/mini-flow-now --json /tmp/mini-flow-now.json
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

from benchmarks.embedded.evaluate_mini_sd import EVAL_SEED, GRID_PROMPTS, caption_for, table, vae_roundtrip
from dvar_lab.models import MINI_FLOW_MAX_SEQUENCE_LENGTH, load_mini_flow_pipeline, mini_flow
from dvar_lab.world import AttributeClassifier, render, sample_scenes
from dvar_lab.world.scenes import to_tensor


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, max_sequence_length: int,
             batch: int = 50) -> torch.Tensor:
    """Images [N, 3, 64, 64] in [-1, 1]; sample ``i`` uses the generator seeded ``seed + i``."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        images = pipe(
            chunk, negative_prompt=[""] * len(chunk), true_cfg_scale=guidance, num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))],
            max_sequence_length=max_sequence_length, output_type="pt",
        ).images
        out.append(images.mul(2).sub(1).clamp(-1, 1).float())
    return torch.cat(out)


def time_sampling(pipe, steps: int, guidance: float, max_sequence_length: int, repeats: int = 5) -> dict[str, float]:
    prompt = "a large red solid star in the center, on a gray background"

    def run(n: int, seed: int) -> float:
        t0 = time.perf_counter()
        generate(pipe, [prompt] * n, steps, guidance, seed, max_sequence_length)
        return time.perf_counter() - t0

    run(1, 0)  # warm-up
    times = [run(1, r) for r in range(repeats)]
    return {"batch1_median_s": float(np.median(times)), "batch1_min_s": float(np.min(times)),
            "batch16_per_image_s": run(16, 0) / 16}


def save_grid(pipe, path: Path, steps: int, guidance: float, max_sequence_length: int, per_prompt: int = 4) -> None:
    """Rows: a prompt, a render of its scene, then ``per_prompt`` samples (2x nearest upscaling)."""
    from PIL import Image, ImageDraw, ImageFont

    scale, text_w, pad = 2, 300, 4
    cell = 64 * scale
    width = text_w + (per_prompt + 1) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, len(GRID_PROMPTS) * (cell + pad) + pad + 18), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 3), "prompt", fill=(0, 0, 0), font=font)
    draw.text((text_w + pad, 3), "render", fill=(0, 0, 0), font=font)
    draw.text((text_w + 2 * (cell + pad), 3), f"mini-flow samples ({steps} Euler steps, true CFG {guidance:g})",
              fill=(0, 0, 0), font=font)
    for r, scene in enumerate(GRID_PROMPTS):
        prompt = scene.caption()
        y = 18 + pad + r * (cell + pad)
        lines, line = [], ""
        for word in prompt.split():
            if len(line) + len(word) + 1 > 44:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        for k, text in enumerate([*lines, line]):
            draw.text((pad, y + 40 + 12 * k), text, fill=(0, 0, 0), font=font)
        canvas.paste(render(scene, rng=1).resize((cell, cell), Image.Resampling.NEAREST), (text_w + pad, y))
        images = generate(pipe, [prompt] * per_prompt, steps, guidance, 100 * r, max_sequence_length)
        for j, image in enumerate(images):
            array = image.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(array).resize((cell, cell), Image.Resampling.NEAREST),
                         (text_w + pad + (j + 1) * (cell + pad), y))
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # keeps it small


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="mini-flow folder (default: the bundled one)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=None, help="true_cfg_scale; default: the sweep's best (or 5.0)")
    p.add_argument("--sweep", type=float, nargs="*", default=[3.0, 5.0, 7.0])
    p.add_argument("--sweep-n", type=int, default=40)
    p.add_argument("--max-sequence-length", type=int, default=MINI_FLOW_MAX_SEQUENCE_LENGTH)
    p.add_argument("--long-n", type=int, default=40, help="scenes also scored at 512 T5 tokens (0: none)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "embedded" / "mini_flow_eval.json")
    p.add_argument("--grid", type=Path, default=None, help="default: MODEL/samples.png")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    if args.model is not None and not (args.model / "model_index.json").is_file():
        p.error(f"--model {args.model} is not a diffusers folder (no model_index.json)")
    args.model = args.model or mini_flow()
    torch.set_num_threads(args.threads)
    args.grid = args.grid or args.model / "samples.png"
    t_start = time.time()
    length = args.max_sequence_length

    pipe = load_mini_flow_pipeline(device=args.device, path=args.model)
    clf = AttributeClassifier.load(device=args.device)
    scenes = sample_scenes(args.n, seed=EVAL_SEED)
    prompts = [caption_for(s, i) for i, s in enumerate(scenes)]
    model = args.model.resolve()
    info_path = args.model / "training_info.json"
    result: dict = {
        "model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else args.model),
        "steps_trained": json.loads(info_path.read_text()).get("steps_done") if info_path.exists() else None,
        "n": args.n, "steps": args.steps, "scheduler": type(pipe.scheduler).__name__,
        "max_sequence_length": length, "eval_seed": EVAL_SEED,
    }

    sweep = {}
    for g in args.sweep if args.guidance is None else []:
        images = generate(pipe, prompts[: args.sweep_n], args.steps, g, args.seed, length)
        sweep[g] = clf.caption_agreement(images.cpu(), scenes[: args.sweep_n])
        print(f"guidance {g:g} on {args.sweep_n}: " + ", ".join(f"{a} {100 * v:.0f}%" for a, v in sweep[g].items()),
              flush=True)
    if args.guidance is not None:
        guidance = args.guidance
    elif sweep:
        guidance = max(sweep, key=lambda g: np.mean([sweep[g][a] for a in ("shape", "color", "background")]))
    else:
        guidance = 5.0
    result["guidance"] = guidance
    result["sweep"] = {str(g): s for g, s in sweep.items()}

    t0 = time.time()
    images = generate(pipe, prompts, args.steps, guidance, args.seed, length)
    result["generation_s"] = time.time() - t0
    real = torch.stack([to_tensor(render(s, rng=(EVAL_SEED, i, 1))) for i, s in enumerate(scenes)]).to(args.device)
    rows = {f"mini-flow samples ({length} T5 tokens, true CFG {guidance:g})": clf.caption_agreement(images.cpu(), scenes)}
    if args.long_n:
        long_images = generate(pipe, prompts[: args.long_n], args.steps, guidance, args.seed, 512)
        rows[f"the first {args.long_n} at 512 T5 tokens (FluxPipeline's default)"] = clf.caption_agreement(
            long_images.cpu(), scenes[: args.long_n]
        )
        rows[f"the first {args.long_n} at {length} T5 tokens (same noise)"] = clf.caption_agreement(
            images[: args.long_n].cpu(), scenes[: args.long_n]
        )
    rows["VAE reconstructions of renders"] = clf.caption_agreement(vae_roundtrip(pipe, real).cpu(), scenes)
    rows["renders (classifier ceiling)"] = clf.caption_agreement(real.cpu(), scenes)
    result["accuracy"] = rows
    result["pixel_std_mean"] = float(images.std(dim=(1, 2, 3)).mean())
    print()
    print(table(rows))

    if not args.no_timing:
        result["sample_time"] = {**time_sampling(pipe, args.steps, guidance, length), "threads": args.threads}
        print(f"\nseconds per 64x64 sample ({args.steps} steps, true CFG): " + json.dumps(result["sample_time"]))
    if not args.no_grid:
        save_grid(pipe, args.grid, args.steps, guidance, length)
        print(f"wrote {args.grid} ({args.grid.stat().st_size / 1e3:.0f} KB)")
    files = [f for f in args.model.rglob("*") if f.is_file() and f.name != "samples.png"]
    result["size_bytes"] = sum(f.stat().st_size for f in files)
    result["total_s"] = time.time() - t_start
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

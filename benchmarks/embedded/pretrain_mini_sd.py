"""Pretrain mini-SD, the small Stable-Diffusion-format model bundled with dvar.

Everything is trained from scratch on the synthetic world of :mod:`dvar_lab.world` (64x64
captioned scenes; the ``HELD_OUT`` objects are never shown). The defaults are the recipe of
the bundled weights, about an hour on 2 CPU cores (or minutes with ``--device cuda``):

1. render ``--n-images`` scenes (seed ``--seed``) once and cache them in the work dir;
2. stage 1: the VAE (``AutoencoderKL``, 64x64x3 <-> 16x16x4) with L1 + L2 + a small KL term;
3. encode every image to its latent posterior (mean, std) and set the VAE ``scaling_factor``
   from the measured latent std;
4. stage 2: UNet (``UNet2DConditionModel``, cross-attention) + CLIP text encoder
   (``CLIPTextModel``), jointly, with the epsilon-prediction loss, 10% caption dropout for
   classifier-free guidance and an EMA of the UNet;
5. stage 3 (``--decoder-steps``): the VAE decoder alone, the encoder frozen so the latents
   the UNet learned stay valid; it sharpens the colours the decoder blurs;
6. write the diffusers folder (fp16 safetensors) to ``--out``, leaving the bundled
   ``tokenizer/`` untouched.

Stage 2's loss weighting over timesteps (``--loss-weighting``):

* ``min-snr``: Min-SNR-gamma, epsilon-loss weight min(SNR, gamma) / SNR (x0-space weight
  min(SNR, gamma)). It learns shapes but all but ignores the high-noise steps where the
  background and the layout are decided.
* ``min-snr-v``: weight min(SNR + 1, gamma) / SNR (x0-space weight min(SNR + 1, gamma), like
  a truncated v-prediction loss). It learns backgrounds but, from scratch, shapes poorly.
* ``min-snr-then-v`` (default): ``min-snr`` up to UNet step ``--min-snr-v-from``, then
  ``min-snr-v``.

With ``--init-from DIR`` (an exported mini-SD folder) the run continues instead: the VAE
decoder only (``--vae-steps`` more steps), then the UNet + text encoder.

The run is reproducible from ``--seed`` (every random draw of step ``k`` comes from a
generator seeded with ``(seed, stage, k)``) and resumable: the work dir holds a checkpoint per
stage (model, EMA and optimizer state) written every ``--ckpt-minutes``; rerunning the same
command continues from it. Example::

    nohup python benchmarks/embedded/pretrain_mini_sd.py --work /tmp/mini-sd-work \
        --out lab/dvar_lab/assets/mini-sd > /tmp/mini-sd-work.log 2>&1 &

Timings and the evaluation of the bundled weights: ``benchmarks/embedded/MINI_SD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dvar.models import load_exactly, portable_clip_text_state_dict
from dvar_lab.world import HELD_OUT, render, sample_scene
from dvar_lab.world.scenes import TEMPLATES

TOKENIZER_DIR = REPO / "lab" / "dvar_lab" / "assets" / "mini-sd" / "tokenizer"
SHORT_TEMPLATES = tuple(i for i, t in enumerate(TEMPLATES) if "{background}" not in t)


# --------------------------------------------------------------------------- architecture


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=128,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 112),
        layers_per_block=1,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- helpers


T_START = time.time()
meta_extra: dict = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence((seed, stage, step)).generate_state(1)[0])
    )


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StageCheckpoint:
    """The resumable state of one training stage in the work dir.

    ``save`` writes it atomically at most every ``every_minutes`` (or when forced); the state
    also carries the stage's accumulated training seconds, so that a stage resumed after an
    interruption still reports its whole cost. Example::

        ckpt = StageCheckpoint(work / "vae_ckpt.pt", every_minutes=3.0)
        state = ckpt.resume("cpu")      # None on a fresh start, else the saved dict
        ...
        ckpt.save({"model": vae.state_dict(), "step": step})   # every 3 minutes at most
    """

    def __init__(self, path: Path, every_minutes: float) -> None:
        self.path = path
        self.every_s = every_minutes * 60
        self.last_save = time.time()
        self.elapsed_before: float | None = 0.0  # training seconds of earlier invocations
        self.started = time.time()

    def resume(self, device) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False, map_location=device)
        self.elapsed_before = state.get("elapsed_s")  # None: saved before it was recorded
        return state

    @property
    def elapsed_s(self) -> float | None:
        """Training seconds of this stage over every invocation (None if an older checkpoint
        did not record them)."""
        if self.elapsed_before is None:
            return None
        return self.elapsed_before + time.time() - self.started

    def save(self, state: dict, force: bool = False) -> None:
        if force or time.time() - self.last_save > self.every_s:
            atomic_save({**state, "elapsed_s": self.elapsed_s}, self.path)
            self.last_save = time.time()


def _render_one(job: tuple[int, int, float]) -> tuple[np.ndarray, dict]:
    seed, i, composite_prob = job
    scene = sample_scene((seed, i), composite_prob=composite_prob)
    assert scene.signature not in HELD_OUT, scene
    return np.asarray(render(scene, rng=(seed, i, 1)), dtype=np.uint8), scene.to_dict()


def render_dataset(
    work: Path, n: int, seed: int, composite_prob: float, workers: int = 1
) -> dict:
    """Images [N, 3, 64, 64] uint8 and the scenes, cached in ``work/data.pt``."""
    path = work / "data.pt"
    if path.exists():
        data = torch.load(path, weights_only=False)
        if data["n"] == n and data["seed"] == seed:
            return data
    images = np.zeros((n, 64, 64, 3), dtype=np.uint8)
    scenes = []
    t0 = time.time()
    jobs = [(seed, i, composite_prob) for i in range(n)]
    if workers > 1:
        from multiprocessing import Pool

        with Pool(workers) as pool:
            results = pool.map(_render_one, jobs, chunksize=64)
    else:
        results = map(_render_one, jobs)
    for i, (image, scene) in enumerate(results):
        images[i] = image
        scenes.append(scene)
        if (i + 1) % 2000 == 0:
            log(f"rendered {i + 1}/{n} ({time.time() - t0:.0f}s)")
    data = {
        "n": n,
        "seed": seed,
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "scenes": scenes,
    }
    atomic_save(data, path)
    return data


def to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(127.5).sub(1.0)


def make_caption(
    scene: dict, gen: np.random.Generator, dropout: float, class_only: float
) -> str:
    """A random caption for ``scene``: dropped (""), class word only, or a full template."""
    from dvar_lab.world import Scene

    u = gen.random()
    if u < dropout:
        return ""
    if u < dropout + class_only:  # e.g. "a photo of a star" (DreamBooth class prompts)
        return TEMPLATES[SHORT_TEMPLATES[gen.integers(len(SHORT_TEMPLATES))]].format(
            object=scene["shape"]
        )
    s = Scene(**scene)
    caption = s.caption(int(gen.integers(len(TEMPLATES))), order=int(gen.integers(2)))
    assert s.signature not in HELD_OUT
    return caption


# --------------------------------------------------------------------------- stage 1: VAE


def load_part(init_from: Path, name: str):
    """A component of an exported mini-SD folder, in float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = {
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
    }[name]
    return load_exactly(cls, init_from / name, torch_dtype=torch.float32)


def train_vae(
    args,
    work: Path,
    images: torch.Tensor,
    vae,
    *,
    stage: int,
    steps: int,
    lr: float,
    decoder_only: bool,
):
    """Train ``vae`` for ``steps`` steps: stage 1 trains all of it; decoder-only runs (stage 1
    with ``--init-from``, stage 3 after the UNet) keep the encoder, and so the latent space
    the UNet is trained on, as it is. Returns the VAE and its held-out reconstruction metrics."""
    vae = vae.to(args.device)
    dev = args.device
    if decoder_only:
        trainable = list(vae.decoder.parameters()) + list(
            vae.post_quant_conv.parameters()
        )
        for p_ in vae.parameters():
            p_.requires_grad_(False)
        for p_ in trainable:
            p_.requires_grad_(True)
    else:
        trainable = list(vae.parameters())
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    name = "vae" if stage == 1 else "decoder"
    ckpt = StageCheckpoint(work / f"{name}_ckpt.pt", args.ckpt_minutes)
    start = 0
    if (state := ckpt.resume(dev)) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"{name}: resumed at step {start}")

    def checkpoint(step: int, force: bool = False) -> None:
        ckpt.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, force)

    n = images.shape[0]
    n_val = 256
    train_n = n - n_val
    t0 = time.time()
    vae.train()
    for step in range(start, steps):
        gen = step_generator(args.seed, stage, step)
        idx = torch.randint(0, train_n, (args.vae_batch,), generator=gen)
        x = to_pixels(images[idx]).to(dev)
        for g in opt.param_groups:
            g["lr"] = (
                lr
                * min(1.0, (step + 1) / 100)
                * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            )
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + l2 + (0.0 if decoder_only else args.kl_weight * kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            log(
                f"{name} step {step + 1}/{steps} l1 {l1.item():.4f} l2 {l2.item():.5f} kl/dim {kl.item():.3f} "
                f"({(time.time() - t0) / (step + 1 - start):.2f}s/step)"
            )
        checkpoint(step + 1)
    if start < steps:
        checkpoint(steps, force=True)
    vae.eval()
    with torch.no_grad():
        x = to_pixels(images[train_n:]).to(dev)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        val_l1 = (rec - x).abs().mean().item()
        psnr = (
            (10 * torch.log10(4.0 / (rec - x).pow(2).mean(dim=(1, 2, 3)))).mean().item()
        )
    log(f"{name} done: held-out L1 {val_l1:.4f}, PSNR {psnr:.2f} dB")
    meta_extra[f"{name}_train_s_all_invocations"] = ckpt.elapsed_s
    return vae, {"val_l1": val_l1, "val_psnr_db": psnr}


@torch.no_grad()
def encode_latents(
    vae, images: torch.Tensor, work: Path, keep_scaling_factor: bool = False
) -> dict:
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    means, stds = [], []
    dev = next(vae.parameters()).device
    for start in range(0, images.shape[0], 256):
        post = vae.encode(to_pixels(images[start : start + 256]).to(dev)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    gen = torch.Generator().manual_seed(0)
    sample_std = (mean + std * torch.randn(mean.shape, generator=gen)).std().item()
    scaling_factor = 1.0 / sample_std
    if keep_scaling_factor:  # continuing: the UNet was trained with the exported factor
        scaling_factor = float(vae.config.scaling_factor)
    out = {"mean": mean.half(), "std": std.half(), "scaling_factor": scaling_factor}
    atomic_save(out, path)
    log(
        f"latents {tuple(mean.shape)}, latent std {sample_std:.4f} -> scaling_factor {scaling_factor:.4f}"
    )
    return out


# --------------------------------------------------------------------------- stage 2: UNet + text


def train_diffusion(args, work: Path, data: dict, lat: dict):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    dev = args.device
    torch.manual_seed(args.seed + 1)
    if args.init_from is not None:
        unet = load_part(args.init_from, "unet").to(dev)
        text_encoder = load_part(args.init_from, "text_encoder").to(dev)
    else:
        unet = build_unet().to(dev)
        text_encoder = build_text_encoder().to(dev)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    scheduler = build_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ckpt = StageCheckpoint(work / "diffusion_ckpt.pt", args.ckpt_minutes)
    start = 0
    if (state := ckpt.resume(dev)) is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"diffusion: resumed at step {start}")

    def checkpoint(step: int, force: bool = False) -> None:
        state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict()}
        ckpt.save({**state, "ema": ema, "opt": opt.state_dict(), "step": step}, force)
    log(
        f"UNet {n_params(unet) / 1e6:.2f}M params, text encoder {n_params(text_encoder) / 1e6:.2f}M params"
    )

    alphas_cumprod = scheduler.alphas_cumprod.float().to(dev)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Min-SNR-gamma for epsilon: the x0-space weight is min(SNR, gamma), which all but
    # ignores the high-noise steps where the global layout (background, position) is set.
    min_snr = torch.clamp(snr, max=args.snr_gamma) / snr
    # "min-snr-v": the x0-space weight is min(SNR + 1, gamma), i.e. the v-prediction loss
    # truncated like Min-SNR, still on epsilon: high-noise steps get x0-weight ~1. From scratch
    # it learns layout and colour but shapes poorly (t 300-600 weigh ~27x less than t >= 800), so
    # the default recipe learns shapes with min-snr first and switches at --min-snr-v-from.
    min_snr_v = torch.clamp(snr + 1, max=args.snr_gamma) / snr
    switch_step = {"min-snr": None, "min-snr-v": 0, "min-snr-then-v": args.min_snr_v_from}[
        args.loss_weighting
    ]
    scale = lat["scaling_factor"]
    mean_all, std_all = lat["mean"], lat["std"]
    n = mean_all.shape[0] - 256  # the last 256 images are kept out (VAE validation)
    token_cache: dict[str, torch.Tensor] = {}

    def tokenize(captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in token_cache]
        if missing:
            ids = tokenizer(
                missing,
                padding="max_length",
                max_length=77,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            token_cache.update(zip(missing, ids))
        return torch.stack([token_cache[c] for c in captions])

    unet.train()
    text_encoder.train()
    state = unet.state_dict()
    float_keys = [k for k, v in state.items() if v.is_floating_point()]
    model_float = [state[k] for k in float_keys]
    ema_float = [ema[k] for k in float_keys]
    t0 = time.time()
    running = 0.0
    for step in range(start, args.unet_steps):
        if args.max_minutes and time.time() - T_START > 60 * args.max_minutes:
            log(
                f"--max-minutes {args.max_minutes} reached: stopping stage 2 at step {step}"
            )
            meta_extra["stopped_at_step"] = step
            break
        gen = step_generator(args.seed, 2, step)
        npgen = np.random.default_rng((args.seed, 2, step))
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        captions = [
            make_caption(
                data["scenes"][i], npgen, args.caption_dropout, args.class_only
            )
            for i in idx.tolist()
        ]
        ids = tokenize(captions).to(dev)
        mu, sd = mean_all[idx].float(), std_all[idx].float()
        latents = (mu + sd * torch.randn(mu.shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        noisy, noise, t = noisy.to(dev), noise.to(dev), t.to(dev)
        lr = (
            args.lr
            * min(1.0, (step + 1) / args.warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        enc = text_encoder(ids)[0]
        pred = unet(noisy, t, enc).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss_weight = min_snr_v if switch_step is not None and step >= switch_step else min_snr
        loss = (per * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema_float, decay)
            torch._foreach_add_(ema_float, model_float, alpha=1 - decay)
        running = (
            0.98 * running + 0.02 * per.mean().item()
            if step > start
            else per.mean().item()
        )
        if (step + 1) % 50 == 0:
            rate = (time.time() - t0) / (step + 1 - start)
            log(
                f"UNet step {step + 1}/{args.unet_steps} loss {running:.4f} lr {lr:.2e} "
                f"({rate:.2f}s/step, ~{rate * (args.unet_steps - step - 1) / 60:.0f} min left)"
            )
        checkpoint(step + 1, force=step + 1 == args.unet_steps)
    if "stopped_at_step" in meta_extra:
        checkpoint(meta_extra["stopped_at_step"], force=True)
    meta_extra["diffusion_train_s_all_invocations"] = ckpt.elapsed_s
    unet.load_state_dict(ema)
    return unet.cpu(), text_encoder.cpu(), tokenizer


# --------------------------------------------------------------------------- export


def export(
    out: Path, vae, unet, text_encoder, tokenizer, scaling_factor: float, meta: dict
) -> None:
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=float(scaling_factor))
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    tmp = out.parent / (out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(tmp / name, out / name)
    shutil.copy(tmp / "model_index.json", out / "model_index.json")
    # transformers 5 writes the text encoder's keys without "text_model.", which transformers 4
    # silently ignores (random weights): write them in the form both versions read exactly.
    weights = out / "text_encoder" / "model.safetensors"
    save_file(portable_clip_text_state_dict(load_file(weights)), weights, metadata={"format": "pt"})
    # transformers loads a model in the dtype its config names, diffusers in float32: a plain
    # ``from_pretrained`` would pair a float16 text encoder with a float32 UNet.
    config_path = out / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    if not (out / "tokenizer").exists():  # the bundled tokenizer is never overwritten
        shutil.copytree(tmp / "tokenizer", out / "tokenizer")
    shutil.rmtree(tmp)
    (out / "training_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/mini-sd-work"),
        help="checkpoints and caches",
    )
    p.add_argument("--out", type=Path, default=REPO / "lab" / "dvar_lab" / "assets" / "mini-sd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=16000)
    p.add_argument("--composite-prob", type=float, default=0.2)
    p.add_argument("--vae-steps", type=int, default=1600)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument(
        "--kl-weight",
        type=float,
        default=1e-5,
        help="KL per latent dim, relative to the L1+L2 pixel loss",
    )
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=800,
        help="stage 3: VAE-decoder-only steps after the UNet (sharper colours; latents unchanged)",
    )
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument(
        "--loss-weighting",
        choices=("min-snr", "min-snr-v", "min-snr-then-v"),
        default="min-snr-then-v",
        help="UNet loss weighting over timesteps (see the module docstring)",
    )
    p.add_argument(
        "--min-snr-v-from",
        type=int,
        default=3000,
        help="min-snr-then-v: the UNet step where min-snr gives way to min-snr-v",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from an exported mini-SD folder: decoder-only VAE steps, then UNet + text encoder",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop stage 2 early after this many minutes (0: never)",
    )
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--class-only",
        type=float,
        default=0.05,
        help="fraction of captions 'a photo of a <shape>'",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    p.add_argument("--render-workers", type=int, default=1)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "args.json").write_text(
        json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2)
    )
    t_start = time.time()
    timings = {}

    data = render_dataset(
        args.work, args.n_images, args.seed, args.composite_prob, args.render_workers
    )
    timings["render_s"] = time.time() - t_start
    log(f"data: {data['images'].shape[0]} images")

    t = time.time()
    torch.manual_seed(args.seed)
    continuing = args.init_from is not None
    vae, vae_metrics = train_vae(
        args,
        args.work,
        data["images"],
        load_part(args.init_from, "vae") if continuing else build_vae(),
        stage=1,
        steps=args.vae_steps,
        lr=args.vae_lr,
        decoder_only=continuing,
    )
    timings["vae_s"] = time.time() - t
    t = time.time()
    lat = encode_latents(
        vae, data["images"], args.work, keep_scaling_factor=args.init_from is not None
    )
    timings["encode_s"] = time.time() - t
    t = time.time()
    unet, text_encoder, tokenizer = train_diffusion(args, args.work, data, lat)
    timings["diffusion_s"] = time.time() - t
    if args.decoder_steps:
        t = time.time()
        vae, meta_extra["decoder"] = train_vae(
            args,
            args.work,
            data["images"],
            vae,
            stage=3,
            steps=args.decoder_steps,
            lr=args.decoder_lr,
            decoder_only=True,
        )
        timings["decoder_s"] = time.time() - t
    timings["total_s_this_invocation"] = time.time() - t_start

    meta = {
        "args": {
            k: str(v)
            for k, v in vars(args).items()
            if k not in ("work", "out", "init_from")
        },
        "init_from_training_info": (
            json.loads((args.init_from / "training_info.json").read_text())
            if args.init_from is not None
            and (args.init_from / "training_info.json").exists()
            else None
        ),
        "params": {
            "unet": n_params(unet),
            "text_encoder": n_params(text_encoder),
            "vae": n_params(vae),
        },
        "vae": vae_metrics,
        "scaling_factor": lat["scaling_factor"],
        "timings": timings,
        "torch_threads": args.threads,
        **meta_extra,
        "device": args.device,
    }
    export(
        args.out, vae.cpu(), unet, text_encoder, tokenizer, lat["scaling_factor"], meta
    )
    log(f"total {timings['total_s_this_invocation'] / 60:.1f} min (this invocation)")


if __name__ == "__main__":
    main()

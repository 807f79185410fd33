"""Pretrain mini-flow, the small Flux-format (rectified-flow transformer) model bundled with dvar.

mini-flow is a ``FluxPipeline`` folder: a ``FluxTransformer2DModel`` (double- and single-stream
blocks, RoPE, packed 2x2 latents), ``FlowMatchEulerDiscreteScheduler``, a CLIP text encoder for
the pooled vector and a small ``T5EncoderModel`` with a T5 (Unigram, ``</s>``) tokenizer for the
token sequence, and an ``AutoencoderKL``. It is trained on the synthetic world of
:mod:`dvar_lab.world` (64x64 captioned scenes; the ``HELD_OUT`` objects are never shown):

1. render ``--n-images`` scenes (seed ``--seed``; the very scenes mini-SD saw) and cache them;
2. take mini-SD's trained VAE and CLIP text encoder (``--parts-from``, default the bundled
   mini-SD) unchanged, and encode every image to its latent posterior; the VAE's
   ``shift_factor`` and ``scaling_factor`` are set, as in Flux, to the measured latent mean and
   1 / std about it;
3. train the transformer and the T5 encoder from scratch, jointly, with the rectified-flow loss
   (target ``noise - latents``; sigma from SD3's logit-normal, 30% of them uniform), 10%
   caption dropout (for true classifier-free guidance) and an EMA of both;
4. write the diffusers folder (fp16 safetensors) to ``--out``.

Text length: ``FluxPipeline`` pads the T5 sequence to ``max_sequence_length`` (default 512) and
the transformer attends to every pad. Most steps use ``--max-sequence-length`` (32, enough for
every caption and 16x cheaper); every ``--long-every``-th step is a small batch at 512 tokens,
so that the pipeline's default length works too.

The run is reproducible from ``--seed`` (every random draw of step ``k`` comes from a generator
seeded with ``(seed, stage, k)``) and resumable: the work dir holds the rendered data, the
latents and a checkpoint (model, EMA and optimizer state) written every ``--ckpt-minutes``;
rerunning the same command continues from it. ``--export-only`` writes the folder from the
latest checkpoint without training (e.g. to evaluate a run that is still going). Example::

    nohup nice -n 15 python benchmarks/embedded/pretrain_mini_flow.py --work /tmp/mini-flow-work \\
        --out lab/dvar_lab/assets/mini-flow > /tmp/mini-flow-work.log 2>&1 &

Timings and the evaluation of the bundled weights: ``benchmarks/embedded/MINI_FLOW.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.embedded.pretrain_mini_sd import (  # the same world, captions and checkpointing
    StageCheckpoint,
    atomic_save,
    log,
    make_caption,
    n_params,
    render_dataset,
    step_generator,
    to_pixels,
)
from dvar.models import load_exactly
from dvar_lab.world.scenes import ATTRIBUTES, TEMPLATES

STAGE = 2  # the seed stream of the transformer steps (``step_generator(seed, STAGE, step)``)
LATENT_SIDE = 16  # 64x64 pixels / the VAE's 4x
EXTRA_WORDS = (  # beyond the world's captions: DreamBooth's identifier and common prompt words
    "sks photo picture rendering image drawing painting style object toy dog cat person "
    "a an the of on in at with and inside background left right center"
).split()


# --------------------------------------------------------------------------- architecture


def build_t5_tokenizer():
    """A T5-style fast tokenizer (Unigram, ``</s>`` appended, ``<pad>`` = 0) built in code:
    one piece per word of the world's captions, single characters for any other text.

    Example:
        >>> build_t5_tokenizer()("a red star").input_ids
        [57, 12, 7, 1]
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words: list[str] = []
    for vocabulary in ATTRIBUTES.values():
        words += vocabulary
    for template in TEMPLATES:
        words += [w for w in template.replace(",", " ").split() if not w.startswith("{")]
    words += EXTRA_WORDS
    words = list(dict.fromkeys(words))  # unique, in a fixed order
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [("\u2581" + c, -4.0) for c in string.ascii_lowercase + string.digits]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=512,
    )


def build_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=128, d_ff=256, d_kv=32, num_layers=3, num_heads=4,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    )


def build_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2x2 (as FLUX.1 packs its 16 into 64)
        num_layers=3,  # double-stream (MM-DiT) blocks
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,  # the T5 width
        pooled_projection_dim=128,  # the CLIP width
        guidance_embeds=False,  # not guidance-distilled (like FLUX.1-schnell): true CFG instead
        axes_dims_rope=(8, 12, 12),
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's dynamic shifting, with the base at this model's 64 image tokens: shift e^0.5
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=64, max_image_seq_len=4096,
    )


def load_parts(parts_from: Path):
    """mini-SD's VAE, CLIP text encoder and tokenizer, in float32."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = load_exactly(AutoencoderKL, parts_from / "vae", torch_dtype=torch.float32)
    clip = load_exactly(CLIPTextModel, parts_from / "text_encoder", torch_dtype=torch.float32)
    return vae.eval().requires_grad_(False), clip.eval().requires_grad_(False), CLIPTokenizer.from_pretrained(
        parts_from / "tokenizer"
    )


# --------------------------------------------------------------------------- latents


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, work: Path) -> dict:
    """Posterior mean/std of every image (cached in ``work/latents.pt``) and the Flux-style
    ``shift_factor`` / ``scaling_factor`` measured on one posterior sample per image."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    means, stds = [], []
    for start in range(0, images.shape[0], 256):
        post = vae.encode(to_pixels(images[start : start + 256])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    shift = z.mean().item()
    out = {"mean": mean.half(), "std": std.half(), "shift_factor": shift, "scaling_factor": 1.0 / (z - shift).std().item()}
    atomic_save(out, path)
    log(f"latents {tuple(mean.shape)}: shift_factor {shift:.4f}, scaling_factor {out['scaling_factor']:.4f}")
    return out


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, 4, 16, 16] latents -> [B, 64, 16] tokens, exactly as ``FluxPipeline._pack_latents``."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids() -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, LATENT_SIDE // 2, LATENT_SIDE // 2, "cpu", torch.float32)


# --------------------------------------------------------------------------- training


class TextCache:
    """Token ids (T5, padded to any length) and CLIP pooled vectors per caption, computed once."""

    def __init__(self, tokenizer_2, clip, clip_tokenizer, short_len: int) -> None:
        self.tokenizer_2, self.clip, self.clip_tokenizer, self.short_len = tokenizer_2, clip, clip_tokenizer, short_len
        self.ids: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if missing:
            ids = self.tokenizer_2(missing, padding="max_length", max_length=self.short_len, truncation=False,
                                   return_tensors="pt").input_ids
            if ids.shape[1] != self.short_len:
                raise ValueError(f"a caption is longer than --max-sequence-length {self.short_len}: {missing}")
            clip_ids = self.clip_tokenizer(missing, padding="max_length", max_length=77, truncation=True,
                                           return_tensors="pt").input_ids
            pooled = self.clip(clip_ids).pooler_output
            self.ids.update(zip(missing, ids))
            self.pooled.update(zip(missing, pooled))
        ids = torch.stack([self.ids[c] for c in captions])
        if length > self.short_len:  # the pipeline pads with <pad> (id 0) up to max_sequence_length
            ids = torch.nn.functional.pad(ids, (0, length - self.short_len), value=self.tokenizer_2.pad_token_id)
        return ids, torch.stack([self.pooled[c] for c in captions])


def flow_loss(transformer, t5, batch: dict, img_ids: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss of one batch: x_t = (1 - sigma) x0 + sigma noise, target noise - x0
    (``train_dreambooth_lora_flux.py``'s convention; the transformer gets sigma as the timestep)."""
    x0, noise, sigma = batch["x0"], batch["noise"], batch["sigma"]
    s = sigma.view(-1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    enc = t5(batch["ids"])[0]
    pred = transformer(
        hidden_states=noisy, timestep=sigma, pooled_projections=batch["pooled"], encoder_hidden_states=enc,
        txt_ids=torch.zeros(enc.shape[1], 3), img_ids=img_ids, return_dict=False,
    )[0]
    return (pred - (noise - x0)).pow(2).mean()


def learning_rate(args, step: int) -> float:
    """Linear warmup, then a cosine from ``--lr`` to 10% of it over ``--steps``. With ``--extended-from N`` the
    steps before N follow an N-step cosine and the later ones the ``--steps`` cosine (a warm restart): exactly
    what training to N steps and then rerunning the same command with a larger ``--steps`` does.

    >>> args = argparse.Namespace(lr=1.0, warmup=1, steps=12, extended_from=8)
    >>> [round(learning_rate(args, s), 3) for s in (0, 7, 8, 11)]
    [1.0, 0.134, 0.325, 0.115]
    """
    total = args.extended_from if args.extended_from and step < args.extended_from else args.steps
    return args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))


def make_batch(args, step: int, data: dict, lat: dict, text: TextCache, n_train: int) -> dict:
    """Step ``step``'s batch, every random draw from its own seeded generator."""
    long = args.long_every > 0 and (step + 1) % args.long_every == 0
    size, length = (args.long_batch, 512) if long else (args.batch, args.max_sequence_length)
    gen = step_generator(args.seed, STAGE, step)
    npgen = np.random.default_rng((args.seed, STAGE, step))
    idx = torch.randint(0, n_train, (size,), generator=gen)
    captions = [make_caption(data["scenes"][i], npgen, args.caption_dropout, args.class_only) for i in idx.tolist()]
    ids, pooled = text(captions, length)
    mu, sd = lat["mean"][idx].float(), lat["std"][idx].float()
    z = mu + sd * torch.randn(mu.shape, generator=gen)
    x0 = pack((z - lat["shift_factor"]) * lat["scaling_factor"])
    noise = torch.randn(x0.shape, generator=gen)
    # SD3's logit-normal sigma, mixed with uniform ones: the high-noise steps where the layout and
    # background are decided are rare under the logit-normal alone (sigma > 0.85: 4%)
    logit_normal = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(size, generator=gen))
    uniform = torch.rand(size, generator=gen)
    sigma = torch.where(torch.rand(size, generator=gen) < args.uniform_frac, uniform, logit_normal)
    return {"x0": x0, "noise": noise, "sigma": sigma, "ids": ids, "pooled": pooled, "long": long}


@torch.no_grad()
def validation_loss(args, transformer, t5, data: dict, lat: dict, text: TextCache, n_train: int) -> float:
    """Flow loss on the held-out images (fixed captions, noise and a sigma grid): a curve that
    only moves with the model."""
    n = lat["mean"].shape[0]
    idx = torch.arange(n_train, n)
    npgen = np.random.default_rng((args.seed, 99))
    captions = [make_caption(data["scenes"][i], npgen, 0.0, 0.0) for i in idx.tolist()]
    gen = torch.Generator().manual_seed(args.seed + 99)
    ids, pooled = text(captions, args.max_sequence_length)
    z = lat["mean"][idx].float()
    x0 = pack((z - lat["shift_factor"]) * lat["scaling_factor"])
    noise = torch.randn(x0.shape, generator=gen)
    sigma = (torch.arange(len(idx)) % 8 + 0.5) / 8
    losses = []
    for start in range(0, len(idx), 64):
        part = slice(start, start + 64)
        batch = {"x0": x0[part], "noise": noise[part], "sigma": sigma[part], "ids": ids[part], "pooled": pooled[part]}
        losses.append(flow_loss(transformer, t5, batch, image_ids()).item() * len(idx[part]))
    return sum(losses) / len(idx)


def train_flow(args, work: Path, data: dict, lat: dict, text: TextCache, meta: dict, export_only: bool = False):
    torch.manual_seed(args.seed + 1)
    transformer = build_transformer()
    t5 = build_t5(len(text.tokenizer_2))
    modules = torch.nn.ModuleDict({"transformer": transformer, "t5": t5})
    ema = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    params = list(modules.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ckpt = StageCheckpoint(work / "flow_ckpt.pt", args.ckpt_minutes)
    start = 0
    history: list = []
    if (state := ckpt.resume("cpu")) is not None:
        modules.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        start, history = state["step"], state["history"]
        meta["cpu_s_before"] = state.get("cpu_s", 0.0)
        log(f"flow: resumed at step {start}")
    log(f"transformer {n_params(transformer) / 1e6:.2f}M params, T5 {n_params(t5) / 1e6:.2f}M params")
    cpu_before = meta.get("cpu_s_before", 0.0)
    cpu_t0 = time.process_time()

    def checkpoint(step: int, force: bool = False) -> None:
        state = {"model": modules.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step,
                 "history": history, "cpu_s": cpu_before + time.process_time() - cpu_t0}
        ckpt.save(state, force)

    float_keys = [k for k, v in modules.state_dict().items() if v.is_floating_point()]
    model_state = modules.state_dict()
    model_float, ema_float = [model_state[k] for k in float_keys], [ema[k] for k in float_keys]
    n_train = data["images"].shape[0] - args.n_val
    img_ids = image_ids()
    t0, running, steps_done = time.time(), None, 0
    meta["steps_done"] = start
    modules.train()
    for step in range(start, start if export_only else args.steps):
        if args.max_minutes and time.time() - T_START > 60 * args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached: stopping at step {step}")
            checkpoint(step, force=True)
            break
        batch = make_batch(args, step, data, lat, text, n_train)
        lr = learning_rate(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = flow_loss(transformer, t5, batch, img_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema_float, decay)
            torch._foreach_add_(ema_float, model_float, alpha=1 - decay)
        if not batch["long"]:
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        steps_done += 1
        if (step + 1) % 50 == 0:
            rate = (time.time() - t0) / steps_done
            cpu_rate = (time.process_time() - cpu_t0) / steps_done
            log(f"step {step + 1}/{args.steps} loss {running:.4f} lr {lr:.2e} ({rate:.2f}s/step, "
                f"{cpu_rate:.2f} CPU-s/step, ~{rate * (args.steps - step - 1) / 60:.0f} min left)")
        if args.val_every and (step + 1) % args.val_every == 0:
            modules.eval()
            val = validation_loss(args, transformer, t5, data, lat, text, n_train)
            modules.train()
            history.append({"step": step + 1, "train_loss": running, "val_loss": val})
            log(f"step {step + 1}: held-out flow loss {val:.4f}")
        checkpoint(step + 1, force=step + 1 == args.steps)
        meta["steps_done"] = step + 1
    # training seconds and CPU seconds over every invocation (an export-only one adds none)
    meta["flow_train_s_all_invocations"] = ckpt.elapsed_before if export_only else ckpt.elapsed_s
    meta["flow_cpu_s_all_invocations"] = cpu_before + (0.0 if export_only else time.process_time() - cpu_t0)
    meta["history"] = history
    modules.load_state_dict(ema)
    return transformer.eval(), t5.eval()


# --------------------------------------------------------------------------- export


def export(out: Path, parts_from: Path, vae, transformer, t5, tokenizer_2, lat: dict, meta: dict) -> None:
    """Write the FluxPipeline folder: fp16 safetensors, the text encoders' configs in float32,
    mini-SD's CLIP text encoder and tokenizer copied file for file."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    vae.register_to_config(shift_factor=float(lat["shift_factor"]), scaling_factor=float(lat["scaling_factor"]))
    pipe = FluxPipeline(
        scheduler=build_scheduler(), vae=vae.half(), text_encoder=CLIPTextModel.from_pretrained(parts_from / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(parts_from / "tokenizer"), text_encoder_2=t5.half(),
        tokenizer_2=tokenizer_2, transformer=transformer.half(),
    )
    tmp = out.parent / (out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("text_encoder", "tokenizer"):  # unchanged: the very files of --parts-from
        shutil.rmtree(tmp / name)
        shutil.copytree(parts_from / name, tmp / name)
    # transformers loads a model in the dtype its config names, diffusers in float32
    config_path = tmp / "text_encoder_2" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    # transformers 5 names the fast T5 tokenizer "T5Tokenizer", which transformers 4 reads as the
    # sentencepiece one (it needs a spiece.model there is none of): name the class both load.
    # diffusers < 0.32 warns about the optional image-encoder entries: leave them out.
    index = json.loads((tmp / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if k not in ("image_encoder", "feature_extractor")}
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # transformers 5 also writes "extra_special_tokens": [], which transformers 4.5x reads as a dict and fails on
    # ("'list' object has no attribute 'keys'"): leave an empty one out.
    config_path = tmp / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config = {k: v for k, v in config.items() if not (k == "extra_special_tokens" and not v)}
    config_path.write_text(json.dumps({**config, "tokenizer_class": "T5TokenizerFast"}, indent=2, sort_keys=True) + "\n")
    (tmp / "training_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(tmp / name, out / name)
    for name in ("model_index.json", "training_info.json"):
        shutil.copy(tmp / name, out / name)
    shutil.rmtree(tmp)
    log(f"wrote {out}")


T_START = time.time()


def main(argv=None) -> None:
    from dvar_lab.models import mini_sd

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/mini-flow-work"), help="checkpoints and caches")
    p.add_argument("--out", type=Path, default=REPO / "lab" / "dvar_lab" / "assets" / "mini-flow")
    p.add_argument("--parts-from", type=Path, default=None,
                   help="the mini-SD folder whose VAE, CLIP text encoder and tokenizer are reused (default: bundled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=16000)
    p.add_argument("--n-val", type=int, default=256, help="the last N images: held out (validation loss)")
    p.add_argument("--composite-prob", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=13000)
    p.add_argument("--extended-from", type=int, default=None,
                   help="the steps before N follow an N-step cosine, the rest the --steps cosine (see learning_rate)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-sequence-length", type=int, default=32, help="T5 tokens of the ordinary steps")
    p.add_argument("--long-every", type=int, default=8, help="every Nth step uses 512 T5 tokens (0: never)")
    p.add_argument("--long-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--logit-mean", type=float, default=0.0, help="sigma = sigmoid(N(mean, std))")
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--uniform-frac", type=float, default=0.3, help="fraction of sigmas drawn uniformly instead")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--class-only", type=float, default=0.05, help="fraction of captions 'a photo of a <shape>'")
    p.add_argument("--val-every", type=int, default=500, help="held-out flow loss every N steps (0: never)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (checkpointed) after this many minutes")
    p.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA; no training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render-workers", type=int, default=1)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    args = p.parse_args(argv)
    parts_from = args.parts_from or mini_sd()
    bundled = args.out.resolve() == (REPO / "lab" / "dvar_lab" / "assets" / "mini-flow").resolve()
    if bundled and (args.export_only or args.max_minutes):
        p.error("--export-only and --max-minutes export an unfinished model: pass another --out "
                "(the bundled folder only ever gets a finished run)")
    if args.export_only and not (args.work / "flow_ckpt.pt").exists():
        p.error(f"--export-only: no checkpoint in {args.work} (flow_ckpt.pt); start the run without --export-only first")
    if args.extended_from is not None and not 0 < args.extended_from < args.steps:
        p.error(f"--extended-from {args.extended_from} must be between 0 and --steps {args.steps}")
    if args.n_val >= args.n_images:
        p.error(f"--n-val {args.n_val} leaves no training images of --n-images {args.n_images}")

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    t = time.time()
    data = render_dataset(args.work, args.n_images, args.seed, args.composite_prob, args.render_workers)
    timings["render_s"] = time.time() - t
    vae, clip, clip_tokenizer = load_parts(parts_from)
    t = time.time()
    lat = encode_latents(vae, data["images"], args.work)
    timings["encode_s"] = time.time() - t
    tokenizer_2 = build_t5_tokenizer()
    text = TextCache(tokenizer_2, clip, clip_tokenizer, args.max_sequence_length)
    meta: dict = {}
    t = time.time()
    transformer, t5 = train_flow(args, args.work, data, lat, text, meta, export_only=args.export_only)
    timings["flow_s_this_invocation"] = time.time() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    info = {
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("work", "out", "parts_from", "export_only")},
        "parts_from": "mini-SD (VAE, CLIP text encoder, tokenizer; unchanged)",
        "params": {"transformer": n_params(transformer), "text_encoder_2": n_params(t5),
                   "text_encoder": n_params(clip), "vae": n_params(vae)},
        "shift_factor": lat["shift_factor"],
        "scaling_factor": lat["scaling_factor"],
        "timings": timings,
        "cpu_s_this_invocation": usage.ru_utime + usage.ru_stime,
        "torch_threads": args.threads,
        "complete": meta["steps_done"] >= args.steps,
        **meta,
    }
    export(args.out, parts_from, vae, transformer, t5, tokenizer_2, lat, info)
    if not info["complete"]:
        log(f"exported an unfinished model ({meta['steps_done']}/{args.steps} steps): rerun to continue")


if __name__ == "__main__":
    main()

"""DreamBooth with DVAR early stopping.

Fine-tunes the whole UNet (and, with ``--train_text_encoder``, the text encoder) on a few
photos of one subject bound to a rare identifier ("a photo of sks dog"), optionally with
diffusers' prior-preservation loss on class images sampled from the base model. Saves a
full pipeline folder, which ``StableDiffusionPipeline.from_pretrained(output_dir)`` loads
without dvar installed. Flags and behaviour follow diffusers'
examples/dreambooth/train_dreambooth.py.

    python integrations/dreambooth.py --early-stop                      # mini-SD, bundled concept
    python integrations/dreambooth.py --pretrained_model_name_or_path ./sd-v1-5 \\
        --instance_data_dir ./my_dog --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_prompt "a photo of a dog" --early-stop

``DreamBoothBase`` holds what DreamBooth and DreamBooth-LoRA (integrations/dreambooth_lora.py)
share: the instance/class flags, their checks, the datasets, class-image generation and
the prior-preservation loss.
"""

from __future__ import annotations

import argparse
import logging
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch


from .concepts import bundled_concept, concept_class_word
from .data import ConceptDataset, LoadedImage, PriorPreservationDataset, UsageError, load_image_folder
from .method import Budget, Components, Method, diffusion_loss
from .trainer import main as train_main

logger = logging.getLogger("dvar.integrations")

CLASS_IMAGES_SUBDIR = "class_images"  # default --class_data_dir, inside --output_dir
CLASS_SAMPLING_STEPS = 25  # DPMSolver++ steps per generated class image


class DreamBoothBase(Method):
    """Instance/class data, prior preservation and their flags: shared by the DreamBooth methods."""

    data_flag = "--instance_data_dir"
    instance_prompt_help = (
        "Prompt with the identifier of the subject, e.g. 'a photo of sks dog' (default for a bundled "
        "concept: 'a photo of sks <its class word>')."
    )
    can_train_text_encoder = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--instance_data_dir", default=None, help="Folder of photos of the subject (default: a bundled concept).")
        add("--instance_prompt", default=None, help=self.instance_prompt_help)
        add("--with_prior_preservation", action="store_true",
            help="Add diffusers' prior-preservation loss on class images from the base model.")
        add("--class_data_dir", default=None,
            help="Folder of class images; missing ones are generated there with the base model (default: "
                 f"<output_dir>/{CLASS_IMAGES_SUBDIR}, which --overwrite_output_dir regenerates; pass a folder "
                 "outside --output_dir to reuse the samples between runs).")
        add("--class_prompt", default=None,
            help="Prompt of the class images, e.g. 'a photo of a dog' (default for a bundled concept: "
                 "'a photo of a <its class word>').")
        add("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
        add("--num_class_images", type=int, default=8,
            help="Class images to train on; missing ones are generated (diffusers' default is 100; 8 keeps a "
                 "quick run quick).")
        add("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
        add("--prior_generation_precision", choices=["fp32", "fp16", "bf16"], default=None,
            help="Precision for generating class images (default: fp16 on CUDA, else fp32).")
        if self.can_train_text_encoder:
            add("--train_text_encoder", action="store_true", help="Train the text encoder as well.")
        else:
            parser.set_defaults(train_text_encoder=False)
        add("--gradient_checkpointing", action="store_true",
            help="Trade compute for memory in the trained models (recompute activations in the backward pass).")

    def data_dir(self, args: argparse.Namespace) -> Optional[str]:
        if args.instance_data_dir is None:
            args.instance_data_dir = str(bundled_concept(self.name).path)
        return args.instance_data_dir

    def default_instance_prompt(self, args: argparse.Namespace, class_word: Optional[str]) -> Optional[str]:
        return None if class_word is None else f"a photo of sks {class_word}"

    def validate(self, args: argparse.Namespace, tokenizer: Any) -> None:
        class_word = concept_class_word(args.instance_data_dir)
        if args.instance_prompt is None:
            args.instance_prompt = self.default_instance_prompt(args, class_word)
        if not args.instance_prompt:
            raise UsageError(
                f"--instance_prompt is required for {args.instance_data_dir}: the prompt with the identifier of "
                "your subject, e.g. --instance_prompt 'a photo of sks dog'."
            )
        for flag in ("num_class_images", "sample_batch_size"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)}).")
        if not args.prior_loss_weight >= 0 or args.prior_loss_weight == float("inf"):
            raise UsageError(f"--prior_loss_weight must be a number >= 0 (got {args.prior_loss_weight}).")
        if not args.with_prior_preservation:
            for flag in ("class_data_dir", "class_prompt"):  # as diffusers: a warning, not an error
                if getattr(args, flag) is not None:
                    warnings.warn(f"--{flag} is ignored without --with_prior_preservation.", stacklevel=2)
            return
        if args.class_prompt is None:
            if class_word is None:
                raise UsageError(
                    "--with_prior_preservation needs --class_prompt, the prompt of the class of your subject "
                    "without its identifier, e.g. --class_prompt 'a photo of a dog'."
                )
            args.class_prompt = f"a photo of a {class_word}"
        if args.class_data_dir is None:
            args.class_data_dir = os.path.join(args.output_dir, CLASS_IMAGES_SUBDIR)
        folder = Path(args.class_data_dir)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--class_data_dir {folder} is a file; pass a folder (it is created if missing).")
        if folder.resolve() == Path(args.instance_data_dir).resolve():
            raise UsageError(
                "--class_data_dir is --instance_data_dir: generated class images would be mixed with your photos; "
                "pass another folder."
            )
        if folder.resolve() == Path(args.output_dir).resolve():
            raise UsageError(
                f"--class_data_dir is --output_dir; pass a folder of its own, e.g. {folder / CLASS_IMAGES_SUBDIR}."
            )

    def build_datasets(self, args: argparse.Namespace, images: Sequence[Any], accelerator: Any) -> tuple:
        self.args = args
        instance = ConceptDataset(images, [args.instance_prompt], args.resolution, args.random_flip, args.center_crop)
        self.class_images: List[LoadedImage] = []
        if not args.with_prior_preservation:
            return instance, instance
        self.class_images = prepare_class_images(args, accelerator)
        classes = ConceptDataset(
            self.class_images, [args.class_prompt], args.resolution, args.random_flip, args.center_crop
        )
        # DVAR freezes its batch from the instance examples only (first K = K different photos).
        return PriorPreservationDataset(instance, classes), instance

    def loss(self, batch: Any, parts: Components, weight_dtype: torch.dtype, args: argparse.Namespace) -> torch.Tensor:
        weight = args.prior_loss_weight if args.with_prior_preservation else None
        return diffusion_loss(batch, parts, weight_dtype, prior_loss_weight=weight)

    def prepare_models(self, args: argparse.Namespace, parts: Components, accelerator: Any) -> None:
        """Common start of ``setup``: everything frozen, checkpointing hooks."""
        self.register_checkpoint_hooks(parts, accelerator)
        parts.unet.requires_grad_(False)
        parts.text_encoder.requires_grad_(False)
        if args.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if args.train_text_encoder:  # non-reentrant: LoRA weights get gradients though the input has none
                encoder = parts.text_encoder
                if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5
                    encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# -- class images ------------------------------------------------------------------------


def existing_images(folder: Path) -> List[LoadedImage]:
    if not folder.is_dir() or not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
        return []
    try:
        return load_image_folder(str(folder), "--class_data_dir")
    except UsageError:  # only files that are not images
        return []


def prepare_class_images(args: argparse.Namespace, accelerator: Any) -> List[LoadedImage]:
    """The first ``--num_class_images`` images of ``--class_data_dir``, generating the missing ones
    (on the main process; the others wait, then read the folder)."""
    folder = Path(args.class_data_dir)
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            have = len(existing_images(folder))
            if have < args.num_class_images:
                generate_class_images(args, folder, have, args.num_class_images - have, accelerator.device)
        images = existing_images(folder)[: args.num_class_images]
    if len(images) < args.num_class_images:
        raise UsageError(f"--class_data_dir {folder}: could not read the {args.num_class_images} class images.")
    return images


def generate_class_images(args: argparse.Namespace, folder: Path, start: int, count: int, device: Any) -> None:
    """Sample ``count`` images of ``--class_prompt`` with the base model into ``folder``.

    Image ``i`` uses seed ``--seed + i`` whatever the batch size, so a partly filled folder
    is completed with the images a fresh run would have made.
    """
    from diffusers import DPMSolverMultistepScheduler, FluxPipeline, StableDiffusionPipeline
    from tqdm.auto import tqdm

    from .flux import model_family, sampling_kwargs

    cuda = torch.device(device).type == "cuda"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, torch.float16 if cuda else torch.float32
    )
    logger.info(f"Generating {count} class images of '{args.class_prompt}' in {folder}")
    model = getattr(args, "model_folder", args.pretrained_model_name_or_path)
    flux = model_family(model) == "flux"
    if flux:  # its own flow-matching scheduler, at the training resolution
        pipe = FluxPipeline.from_pretrained(model).to(device, dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, safety_checker=None, requires_safety_checker=False
        ).to(device, dtype)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    indices = list(range(start, start + count))
    batches = [indices[i : i + args.sample_batch_size] for i in range(0, count, args.sample_batch_size)]
    for batch in tqdm(batches, desc="Generating class images"):
        generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in batch]
        extra = {}
        if flux:
            extra = dict(sampling_kwargs(args, pipe.transformer, len(batch)), height=args.resolution,
                         width=args.resolution)
        with torch.no_grad():
            images = pipe(
                [args.class_prompt] * len(batch), num_inference_steps=CLASS_SAMPLING_STEPS, generator=generators,
                **extra,
            ).images
        for i, image in zip(batch, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:16]
            partial = folder / f".{i:05d}.partial.png"  # renamed once whole: a killed run leaves no broken image
            image.save(partial)
            os.replace(partial, folder / f"{i:05d}-{digest}.png")
    del pipe
    if cuda:
        torch.cuda.empty_cache()


# -- the method --------------------------------------------------------------------------


class DreamBooth(DreamBoothBase):
    name = "dreambooth"
    preset = "dreambooth"
    # diffusers' train_dreambooth.py: --learning_rate default 5e-6; its README trains SD 1.x for
    # 400 steps (800 with prior preservation). 1000 matches DreamBooth-LoRA's budget in the DVAR paper.
    sd_budget = Budget(max_train_steps=1000, learning_rate=5e-6)
    mini_sd_budget = Budget(max_train_steps=1000, learning_rate=1e-4)  # measured: docs/trainers.md
    # The learned state is the whole UNet (3.4 GB on SD 1.5): a second copy to fall back on after a
    # divergence would double its memory, so a diverged run writes no weights and points at its last checkpoint.
    keeps_finite_copy = False

    def setup(self, args: argparse.Namespace, parts: Components, accelerator: Any) -> List[torch.nn.Parameter]:
        self.prepare_models(args, parts, accelerator)
        parts.unet.requires_grad_(True)
        trainable = list(parts.unet.parameters())
        if args.train_text_encoder:
            parts.text_encoder.requires_grad_(True)
            trainable += list(parts.text_encoder.parameters())
        return trainable

    def save_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        # as train_dreambooth.py: checkpoint-N/unet (and text_encoder) load with from_pretrained
        accelerator.unwrap_model(parts.unet).save_pretrained(os.path.join(folder, "unet"))
        if self.args.train_text_encoder:
            accelerator.unwrap_model(parts.text_encoder).save_pretrained(os.path.join(folder, "text_encoder"))

    def load_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        from diffusers import UNet2DConditionModel

        from dvar.models import load_exactly

        unet = accelerator.unwrap_model(parts.unet)
        unet.load_state_dict(load_exactly(UNet2DConditionModel, folder, "unet").state_dict())
        if self.args.train_text_encoder:
            text_encoder = accelerator.unwrap_model(parts.text_encoder)
            saved = load_exactly(type(text_encoder), folder, "text_encoder")
            text_encoder.load_state_dict(saved.state_dict())

    def save(self, output_dir: str, parts: Components, accelerator: Any) -> List[str]:
        """The base pipeline with the trained UNet (and text encoder), as train_dreambooth.py saves it."""
        from diffusers import StableDiffusionPipeline

        trained = {"unet": accelerator.unwrap_model(parts.unet)}
        if self.args.train_text_encoder:  # else the base's, as stored (not the copy cast for mixed precision)
            trained["text_encoder"] = accelerator.unwrap_model(parts.text_encoder)
        pipe = StableDiffusionPipeline.from_pretrained(parts.model_path, **trained)
        pipe.save_pretrained(output_dir)
        out = Path(output_dir)
        folders = [
            name for name, value in pipe.config.items()
            if not name.startswith("_") and isinstance(value, (list, tuple)) and value[0] is not None
        ]
        files = [str(p.relative_to(out)) for name in folders for p in sorted((out / name).rglob("*")) if p.is_file()]
        return ["model_index.json"] + files


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(DreamBooth(), argv)


if __name__ == "__main__":
    sys.exit(main())

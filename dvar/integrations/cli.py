"""The trainers' flags (diffusers' names), their defaults, and every check that runs before anything is
loaded or written: settings, the model (a local folder or a Hub id from the cache), precision, the output
folder. Bad input exits 2 with nothing written."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from dvar.rules import DEFAULT_PRESET, PRESETS, default_rule
from dvar.stride import overhead_target

from .data import UsageError
from .flux import is_embedded_flow
from .method import Components, Method, default_model_path, is_embedded_model

logger = logging.getLogger("dvar.integrations")



# -- arguments -------------------------------------------------------------------------


def build_parser(method: Method) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python integrations/{method.name}.py",
        description=f"{method.name.replace('_', ' ').title()} with DVAR early stopping (--early-stop).",
    )
    add = parser.add_argument
    add("--pretrained_model_name_or_path", default=None,
        help="A local diffusers model folder or a Hugging Face Hub id such as runwayml/stable-diffusion-v1-5 (read from "
        "the local Hugging Face cache, downloaded unless HF_HUB_OFFLINE=1; default: the embedded mini-SD, a 64x64 "
        "model of synthetic shapes for trying dvar out).")
    add("--output_dir", default=None, help="Where weights, samples and the DVAR history go (default: outputs/<method>).")
    add("--overwrite_output_dir", action="store_true", help="Replace what --output_dir holds.")
    add("--seed", type=int, default=0)
    add("--resolution", type=int, default=None, help="Training resolution (default: the model's native size; 512 for Flux).")
    add("--center_crop", action=argparse.BooleanOptionalAction, default=True, help="Crop the center square after resizing.")
    add("--random_flip", action="store_true", help="Also train on horizontally flipped images.")
    add("--train_batch_size", type=int, default=1)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_train_steps", type=int, default=None, help="Step budget (default: the paper's on SD, ours on mini-SD).")
    add("--learning_rate", type=float, default=None, help="Default: the paper's on SD, ours on mini-SD.")
    add("--scale_lr", action="store_true", help="Multiply the learning rate by batch size x accumulation x processes.")
    add("--lr_scheduler", default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    add("--report_to", default="none", help="accelerate tracker: tensorboard, wandb, ... or none.")
    add("--logging_dir", default="logs")
    add("--checkpointing_steps", type=int, default=500, help="Save an accelerate checkpoint every N steps.")
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", default=None, help='A checkpoint folder name in --output_dir, or "latest".')
    add("--validation_prompt", default=None, help="Prompt for the sample images saved at the end.")
    add("--num_validation_images", type=int, default=4)
    add("--num_inference_steps", type=int, default=25)
    add("--dataloader_num_workers", type=int, default=0)
    add("--early-stop", "--early_stop", dest="early_stop", action="store_true", help="Stop when DVAR says the concept is learned.")
    default = default_rule(method.name)
    add("--early-stop-preset", "--early_stop_preset", dest="early_stop_preset", default=None,
        choices=sorted(PRESETS) + ["auto", DEFAULT_PRESET],
        help=f"DVAR rule. Default: with no window or threshold given, dvar's default for this method "
        f"({default.describe().replace('%', '%%')}: see docs/rules.md); with one, the paper's {method.preset} preset "
        "they override. 'auto': no window, stop once the run is threshold (default 2) times as long as the smoothed "
        "frozen-batch loss took to cover 80%% of its drop.")
    add("--early-stop-window", "--early_stop_window", dest="early_stop_window", type=int, default=None,
        help="DVAR window N in steps (default: the preset's; not with --early-stop-preset auto).")
    add("--early-stop-threshold", "--early_stop_threshold", dest="early_stop_threshold", type=float, default=None,
        help="DVAR threshold (default: the preset's; for auto, the multiple of the loss's settling time at which "
        "it stops).")
    add("--early-stop-eval-every", "--early_stop_eval_every", dest="early_stop_eval_every", type=eval_every_arg,
        default="auto", help="Evaluate the frozen batch every K steps (default auto: window // 30, at least 1; "
        "1 is the paper's every-step setting; a percentage such as 5%%: the K at which evaluating costs about that "
        "share of the training time, timed on the first steps).")
    add("--early-stop-batch-size", "--early_stop_batch_size", dest="early_stop_batch_size", type=int, default=4,
        help="Frozen examples in the DVAR batch.")
    add("--early-stop-signal", "--early_stop_signal", dest="early_stop_signal", default=None,
        choices=("loss", "normalized", "bands"),
        help=f"What the rule watches (default: {default.signal} with dvar's default rule, else loss): loss (the frozen "
        "batch's mean loss), normalized (the mean of each frozen "
        "example's loss divided by its first, so high-noise examples weigh as much as low-noise ones) or bands (the "
        "normalized losses in 3 timestep bands, a rule on each; stops once all have settled).")
    add("--early-stop-level", "--early_stop_level", dest="early_stop_level", type=float, default=None,
        help="For auto: the share of its drop by which the smoothed loss counts as settled (default: the default "
        "rule's, else 0.8).")
    add("--early-stop-flat-bands", "--early_stop_flat_bands", dest="early_stop_flat_bands", default=None,
        choices=("hold", "skip"),
        help="With bands: whether a band whose loss has not fallen beyond its noise holds the stop once the others "
        "have settled (hold) or not (skip); default: the default rule's, else hold.")
    add("--early-stop-min-steps", "--early_stop_min_steps", dest="early_stop_min_steps", type=int, default=None,
        help="Never stop before this optimizer step (a NaN/inf loss still stops at once).")
    method.add_arguments(parser)
    return parser


def eval_every_arg(text: str) -> Any:
    """``--early-stop-eval-every``: ``auto``, an integer >= 1 or a target overhead such as ``5%``."""
    if text == "auto":
        return text
    if text.endswith("%"):
        try:
            overhead_target(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', an integer >= 1 (1 = every step, the paper's) or a target overhead such as '5%', got {text!r}"
        )
    return value


def resolve_defaults(method: Method, args: argparse.Namespace) -> None:
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = default_model_path()
    budget = method.mini_sd_budget if is_embedded_model(args.pretrained_model_name_or_path) else method.sd_budget
    if method.flux_budget is not None and known_model_family(args.pretrained_model_name_or_path) == "flux":
        embedded_flow = method.mini_flow_budget is not None and is_embedded_flow(args.pretrained_model_name_or_path)
        budget = method.mini_flow_budget if embedded_flow else method.flux_budget
    if args.max_train_steps is None:
        args.max_train_steps = budget.max_train_steps
    if args.learning_rate is None:
        args.learning_rate = budget.learning_rate
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", method.name)
    args.early_stop_method = method.name  # DVARConfig's: the default rule, or the paper preset a window overrides


def dvar_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`~dvar.DVARConfig` fields that the ``--early-stop-*`` flags (after :func:`resolve_defaults`) and
    the run's ``--seed`` and ``--max_train_steps`` name: the one place where flags become settings.

    Example:
        >>> from dvar import DVARConfig
        >>> from dvar.integrations.textual_inversion import TextualInversion
        >>> args = build_parser(TextualInversion()).parse_args(["--early-stop", "--early-stop-window", "200"])
        >>> resolve_defaults(TextualInversion(), args)
        >>> DVARConfig(**dvar_settings(args)).resolved_window_threshold()  # the TI preset's threshold, overridden window
        (200, 0.15)
    """
    return dict(
        preset=args.early_stop_preset, method=args.early_stop_method, window=args.early_stop_window,
        threshold=args.early_stop_threshold, eval_every=args.early_stop_eval_every,
        eval_batch_size=args.early_stop_batch_size, signal=args.early_stop_signal, min_steps=args.early_stop_min_steps,
        flat_bands=args.early_stop_flat_bands, level=args.early_stop_level, seed=args.seed,
        max_train_steps=args.max_train_steps,
    )


def validate_settings(args: argparse.Namespace) -> None:
    """Settings that can never work, refused before anything is loaded or written."""
    from dvar import DVARConfig
    from dvar.rules import DVARCriterion, resolve_preset

    if args.max_train_steps < 1:
        raise UsageError(f"--max_train_steps must be >= 1 (got {args.max_train_steps}).")
    if args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        raise UsageError(f"--learning_rate must be a positive number (got {args.learning_rate}).")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "early_stop_batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-') if flag.startswith('early') else flag} must be >= 1.")
    check_model_name(args.pretrained_model_name_or_path)
    check_mixed_precision(args.mixed_precision)
    if args.early_stop and args.early_stop_min_steps is not None and not 0 <= args.early_stop_min_steps <= args.max_train_steps:
        raise UsageError(f"--early-stop-min-steps {args.early_stop_min_steps} must be between 0 and --max_train_steps "
                         f"{args.max_train_steps}: past the budget DVAR could never stop the run.")
    if not args.early_stop:
        return
    config = DVARConfig(**dvar_settings(args))
    if config.is_auto:
        which = config.default_rule_text if config.uses_default else "--early-stop-preset auto"
        try:
            config.resolved_window_threshold()
        except ValueError as error:
            raise UsageError(f"{which}: {error}") from None
        return
    preset = resolve_preset(config.rule_preset) if config.rule_preset else None  # None: window and threshold given
    window = args.early_stop_window if args.early_stop_window is not None else preset.window
    threshold = args.early_stop_threshold if args.early_stop_threshold is not None else preset.threshold
    try:
        DVARCriterion(window, threshold)
    except ValueError as error:
        raise UsageError(f"--early-stop-window/--early-stop-threshold: {error}") from None
    if window > args.max_train_steps:
        raise UsageError(
            f"--early-stop-window {window} is larger than --max_train_steps {args.max_train_steps}: DVAR could "
            "never fire. Lower the window or raise the step budget."
        )
    try:
        config.resolved_window_threshold()  # what no flag above names: the signal with the frozen batch, the stride
    except ValueError as error:
        raise UsageError(f"--early-stop-signal {config.signal}: {error}") from None


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path: loaded through the Hugging Face cache.

    >>> is_hub_id("runwayml/stable-diffusion-v1-5"), is_hub_id("./sd-v1-5"), is_hub_id("/models/sd")
    (True, False, False)
    """
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and not Path(name).exists()


def check_model_name(name: str) -> None:
    """A local folder, or a Hub id (resolved when loading, by :func:`resolve_model`)."""
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"--pretrained_model_name_or_path {name} is a file; pass a diffusers model folder (with model_index.json), "
            "a Hugging Face Hub id such as runwayml/stable-diffusion-v1-5, or leave the flag out for the embedded mini-SD."
        )
    if not path.exists() and not is_hub_id(name):
        raise UsageError(
            f"--pretrained_model_name_or_path {name} does not exist; pass a local diffusers model folder, a Hugging "
            "Face Hub id such as runwayml/stable-diffusion-v1-5, or leave the flag out for the embedded mini-SD."
        )


def resolve_model(name: str) -> str:
    """The local folder of a model: ``name`` itself, or a Hub id's snapshot in the Hugging Face cache
    (``DiffusionPipeline.download``: downloaded first unless ``HF_HUB_OFFLINE=1``).

    Raises :class:`UsageError` naming the id, the cache and ``HF_HUB_OFFLINE`` when it cannot be had."""
    if Path(name).is_dir():
        return name
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return str(DiffusionPipeline.download(name, local_files_only=offline or None))
    except (OSError, ValueError) as error:  # not cached, no such repo, gated, no network
        if offline:
            raise UsageError(
                f"--pretrained_model_name_or_path {name}: no local folder of that name, and the Hugging Face Hub model "
                f"{name} is not in the local cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 forbids "
                f"downloading it. Download it once with network (unset HF_HUB_OFFLINE, or run `hf download {name}`), "
                "point HF_HOME at the cache that holds it, or pass a local diffusers model folder."
            ) from None
        raise UsageError(
            f"--pretrained_model_name_or_path {name}: could not get the Hugging Face Hub model {name} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check the id and the "
            "network; for a gated model accept its license on the Hub and log in (`hf auth login`); or pass a local "
            "diffusers model folder."
        ) from None


def known_model_family(name: str) -> Optional[str]:
    """The family (``"sd"``/``"flux"``) of a local folder or of a Hub id already in the local cache, without
    downloading anything; None when it is not known yet."""
    from .flux import model_family

    if Path(name).is_dir():
        return model_family(name)
    if not is_hub_id(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(name, "model_index.json")
    except Exception:  # an id the cache cannot hold
        return None
    return model_family(str(Path(index).parent)) if isinstance(index, str) else None


def training_device() -> torch.device:
    """The device accelerate will train on (before the Accelerator exists)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_mixed_precision(flag: Optional[str]) -> None:
    """Refuse fp16/bf16 where the device cannot train in it (fp16 on the CPU; bf16 where a probe fails)."""
    precision = flag or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's setting
    if precision not in ("fp16", "bf16"):
        return
    device = training_device()
    source = "--mixed_precision" if flag else "ACCELERATE_MIXED_PRECISION (accelerate config)"
    if precision == "fp16" and device.type == "cpu":
        raise UsageError(
            f"{source} fp16 needs a GPU, and this run trains on the CPU: pass --mixed_precision no (fp32) or bf16."
        )
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    try:
        if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError("torch.cuda.is_bf16_supported() is False")
        with torch.autocast(device.type, dtype=dtype):
            probe = torch.ones(4, 4, device=device) @ torch.ones(4, 4, device=device)
        if not bool(torch.isfinite(probe.float()).all()):
            raise RuntimeError("a probe matmul gave non-finite values")
    except (RuntimeError, TypeError, ValueError) as error:
        raise UsageError(
            f"{source} {precision} does not run on this {device.type} device ({error}): pass --mixed_precision no "
            f"(fp32){' or fp16' if precision == 'bf16' and device.type == 'cuda' else ''}."
        ) from None


def check_writable_folder(folder: Path, flag: str) -> None:
    """``folder`` is, or can be created as, a folder this process can write in (probed with a temporary file,
    which catches read-only mounts that permission bits do not show)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:  # exists() is False under a regular file too
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file, not a folder"
        raise UsageError(f"{flag} {folder} {where}; pass a folder path.")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".dvar-write-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        what = "in it" if existing == folder else f"in {existing}, where it would be created"
        raise UsageError(
            f"{flag} {folder}: cannot write {what} ({error.strerror or error}); pass a folder you can write to, "
            "or fix its permissions."
        ) from None


def check_output_dir(args: argparse.Namespace) -> None:
    """Before the model loads: the output folder is writable and holds no other run (or it is the one resumed)."""
    out = Path(args.output_dir)
    check_writable_folder(out, "--output_dir")
    if getattr(args, "with_prior_preservation", False) and getattr(args, "class_data_dir", None):
        check_writable_folder(Path(args.class_data_dir), "--class_data_dir")
    if args.resume_from_checkpoint:
        if find_checkpoint(args) is None:
            raise UsageError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint in {out}; "
                "train without it, or pass one of the checkpoint-N folders there."
            )
        return
    if out.exists() and any(out.iterdir()):
        if not args.overwrite_output_dir:
            raise UsageError(
                f"--output_dir {out} already holds another run; pass --overwrite_output_dir to replace it, "
                "--resume_from_checkpoint latest to continue it, or choose another folder."
            )


def find_checkpoint(args: argparse.Namespace) -> Optional[Path]:
    out = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if out.is_dir() else []
        return found[-1] if found else None
    path = Path(args.resume_from_checkpoint)
    path = path if path.is_absolute() or path.parent != Path(".") else out / path
    return path if path.is_dir() else None


# -- the model -------------------------------------------------------------------------


def load_components(path: str) -> Components:
    """The parts of a Stable Diffusion folder, or of a FluxPipeline folder (``Components.family``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dvar.models import load_exactly  # fails loudly where from_pretrained would leave random weights

    from .flux import load_flux_components, model_family

    if model_family(path) == "flux":
        return load_flux_components(path)
    return Components(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=load_exactly(CLIPTextModel, path, "text_encoder").float(),
        vae=load_exactly(AutoencoderKL, path, "vae").float(),
        unet=load_exactly(UNet2DConditionModel, path, "unet").float(),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        model_path=path,
    )


def warn_photos_on_embedded_model(method: Method, args: argparse.Namespace) -> None:
    from .concepts import concept_metadata

    folder = method.data_dir(args)
    if is_embedded_model(args.pretrained_model_name_or_path) and concept_metadata(folder) is None:
        logger.warning(
            f"warning: {method.data_flag} {folder} is your own photos, but the model is the embedded mini-SD, a 64x64 "
            "model trained on synthetic shapes to try dvar out: it cannot learn or draw real photos, so its samples "
            "and stop step mean nothing for them. Pass a real model: --pretrained_model_name_or_path "
            "runwayml/stable-diffusion-v1-5 (a Hugging Face Hub id, from the local cache) or a local diffusers folder."
        )

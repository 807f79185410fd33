"""``python -m dvar.integrations.kohya <script> [kohya flags] --early_stop``: kohya's scripts, with DVAR.

Each supported script is run the way its own ``if __name__ == "__main__":`` block runs it
(``setup_parser()``, ``verify_command_line_training_args``, ``read_config_from_file``, then
``Trainer().train(args)``), with the ``--early_stop*`` flags added to its parser and the
:class:`~.plugin.DVARTrainerMixin` in front of its trainer class.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from dvar.criterion import PRESETS

from .plugin import DVARTrainerMixin, KohyaPluginError, config_from_args, make_trainer_class

ENV_VAR = "SD_SCRIPTS"
VERIFIED_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"

#: script name -> (module, trainer class, model family)
SCRIPTS: Dict[str, Tuple[str, str, str]] = {
    "train_network": ("train_network", "NetworkTrainer", "sd"),
    "sdxl_train_network": ("sdxl_train_network", "SdxlNetworkTrainer", "sdxl"),
    "sd3_train_network": ("sd3_train_network", "Sd3NetworkTrainer", "sd3"),
    "flux_train_network": ("flux_train_network", "FluxNetworkTrainer", "flux"),
}

#: How kohya's NetworkTrainer.train calls each hook: (positional arguments, keyword arguments).
HOOK_CALLS: Dict[str, Tuple[int, Tuple[str, ...]]] = {
    "train": (1, ()),
    "assert_extra_args": (3, ()),
    "load_target_model": (3, ()),
    "process_batch": (12, ("is_train", "train_text_encoder", "train_unet")),
    "sample_images": (9, ()),
    "step_logging": (3, ("epoch",)),
    "epoch_logging": (4, ()),
    "get_sai_model_spec": (1, ()),
    "on_step_start": (7, ("is_train",)),
    "on_validation_step_end": (7, ()),
    "encode_images_to_latents": (3, ()),
}

#: Lines of NetworkTrainer.train the plugin's stop relies on (its order of calls).
TRAIN_MARKERS = (
    "self.assert_extra_args(args, train_dataset_group, val_dataset_group)",
    "self.load_target_model(args, weight_dtype, accelerator)",
    "train_util.resume_from_local_or_hf_if_specified(accelerator, args)",
    "self.sample_images(accelerator, args, 0, global_step",
    "global_step += 1",
    "if global_step >= args.max_train_steps:",
    "sai_metadata = self.get_sai_model_spec(args)",
    "metadata_to_save.update(sai_metadata)",
)


def usage() -> str:
    return (
        "usage: python -m dvar.integrations.kohya {" + ",".join(SCRIPTS) + "} [--sd_scripts PATH] "
        "[kohya's flags] [--early_stop ...]\n"
        "Runs kohya-ss/sd-scripts' script with DVAR early stopping (--early_stop); run it inside your sd-scripts "
        f"checkout, or give it with --sd_scripts PATH or {ENV_VAR}=PATH. `... train_network --help` lists all flags."
    )


def find_sd_scripts(given: Optional[str]) -> Path:
    """The sd-scripts checkout: ``--sd_scripts``, else ``$SD_SCRIPTS``, else the current folder."""
    candidates = [(given, "--sd_scripts")] if given else []
    if not given and os.environ.get(ENV_VAR):
        candidates.append((os.environ[ENV_VAR], f"${ENV_VAR}"))
    if not candidates:
        candidates.append((os.getcwd(), "the current folder"))
    path, source = candidates[0]
    root = Path(path).expanduser().resolve()
    if not (root / "train_network.py").is_file() or not (root / "library" / "train_util.py").is_file():
        raise KohyaPluginError(
            f"kohya-ss/sd-scripts not found in {root} ({source}): it has no train_network.py and library/train_util.py. "
            f"Run inside your sd-scripts checkout, or pass --sd_scripts PATH (or set {ENV_VAR}=PATH)."
        )
    return root


def import_script(root: Path, script: str) -> Any:
    """Import kohya's script module (its ``library`` package comes from the same checkout)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(SCRIPTS[script][0])
    except ImportError as error:
        raise KohyaPluginError(
            f"importing {script}.py from {root} failed ({error}). Install sd-scripts' requirements in this "
            "environment (pip install -r requirements.txt inside the checkout; torchvision must match torch)."
        ) from None


def check_trainer(trainer_cls: type) -> List[str]:
    """What, in this sd-scripts version, the plugin cannot hook (empty when it can)."""
    problems = []
    kohya_classes = [klass for klass in trainer_cls.__mro__ if not issubclass(klass, DVARTrainerMixin)]
    for name, (positional, keywords) in HOOK_CALLS.items():
        # kohya's own method: the one the mixin's override passes the call on to
        method = next((vars(klass)[name] for klass in kohya_classes if name in vars(klass)), None)
        if method is None:
            problems.append(f"{trainer_cls.__name__}.{name} is missing")
            continue
        try:
            inspect.signature(method).bind(None, *range(positional), **{key: None for key in keywords})
        except TypeError as error:
            problems.append(f"{trainer_cls.__name__}.{name}{inspect.signature(method)} cannot take kohya's call ({error})")
    try:
        source = inspect.getsource(next(vars(klass)["train"] for klass in kohya_classes if "train" in vars(klass)))
    except (OSError, TypeError, StopIteration):
        source = ""
    problems += [f"NetworkTrainer.train no longer has `{marker}`" for marker in TRAIN_MARKERS if marker not in source]
    return problems


def add_early_stop_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The kohya-style DVAR flags (also read from kohya's ``--config_file`` TOML)."""
    group = parser.add_argument_group("DVAR early stopping (dvar.integrations.kohya)")
    group.add_argument("--early_stop", action="store_true",
                       help="stop when the loss on a frozen batch of the training images plateaus (DVAR)")
    group.add_argument("--early_stop_preset", type=str, default="dreambooth_lora", choices=sorted(PRESETS) + ["auto"],
                       help="published DVAR window/threshold (default dreambooth_lora: 440 steps, 0.4), or 'auto' "
                            "(no window; needs --max_train_steps or --early_stop_eval_every)")
    group.add_argument("--early_stop_window", type=int, default=None,
                       help="DVAR window N in optimizer steps (overrides the preset)")
    group.add_argument("--early_stop_threshold", type=float, default=None,
                       help="stop when var(last N) / var(all) < this (overrides the preset); for 'auto', the "
                            "multiple of the loss's settling time at which it stops (default 2)")
    group.add_argument("--early_stop_eval_every", type=_eval_every, default="auto",
                       help="evaluate the frozen batch every this many optimizer steps (default auto: the window // 30, "
                            "at least 1; 1 is the paper's every-step setting; a percentage such as 5%%: the stride at which "
                            "evaluating costs about that share of the training time)")
    group.add_argument("--early_stop_batch_size", type=int, default=4,
                       help="training examples in the frozen DVAR batch (default 4, as the paper)")
    return parser


def _eval_every(text: str) -> Union[int, str]:
    """``--early_stop_eval_every``: ``auto``, a percentage or an integer (validated with the other DVAR settings)."""
    return text if text == "auto" or text.endswith("%") else int(text)


def validate_args(args: argparse.Namespace) -> None:
    """Refuse DVAR settings that can never work, and setups the plugin cannot stop."""
    if not getattr(args, "early_stop", False):
        return
    if getattr(args, "deepspeed", False):
        raise KohyaPluginError(
            "--early_stop does not support --deepspeed: DeepSpeed steps the optimizer inside backward, so the "
            "plugin cannot end the run at the stop step. Train without --deepspeed, or without --early_stop."
        )
    if args.early_stop_batch_size < 1:
        raise KohyaPluginError(f"--early_stop_batch_size must be >= 1 (got {args.early_stop_batch_size}).")
    try:
        config_from_args(args).resolved_window_threshold()
    except ValueError as error:
        raise KohyaPluginError(f"--early_stop_window/--early_stop_threshold/--early_stop_eval_every: {error}") from None


def _pop_option(argv: List[str], flag: str) -> Tuple[Optional[str], List[str]]:
    out, value, i = [], None, 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith(flag + "="):
            value = argv[i].split("=", 1)[1]
        else:
            out.append(argv[i])
        i += 1
    return value, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    script = argv[0][:-3] if argv[0].endswith(".py") else argv[0]
    script = os.path.basename(script)
    if script not in SCRIPTS:
        print(
            f"error: {argv[0]!r} is not a kohya script the DVAR plugin supports; choose one of {', '.join(SCRIPTS)}.",
            file=sys.stderr,
        )
        return 2
    given, rest = _pop_option(argv[1:], "--sd_scripts")
    try:
        root = find_sd_scripts(given)
        module = import_script(root, script)
        trainer_cls = getattr(module, SCRIPTS[script][1])
        problems = check_trainer(trainer_cls)
        if problems:
            raise KohyaPluginError(
                f"unsupported sd-scripts version in {root}: " + "; ".join(problems)
                + f". The plugin was verified with commit {VERIFIED_COMMIT[:10]}; check that one out."
            )
    except KohyaPluginError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    parser = add_early_stop_arguments(module.setup_parser())
    sys.argv = [str(root / f"{script}.py"), *rest]  # kohya's read_config_from_file parses sys.argv again
    args = parser.parse_args(rest)
    module.train_util.verify_command_line_training_args(args)
    args = module.train_util.read_config_from_file(args, parser)
    trainer = make_trainer_class(trainer_cls, SCRIPTS[script][2])()
    try:
        validate_args(args)
        trainer.train(args)
    except KohyaPluginError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

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
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from dvar.rules import DEFAULT_PRESET, PRESETS, default_rule

from .diffusers_model import AsIsLoaderMixin, make_loader_class, needs_as_is_loader
from .plugin import (
    KOHYA_METHOD,
    DVARTrainerMixin,
    KohyaPluginError,
    KohyaTrainingDiverged,
    config_from_args,
    make_trainer_class,
)

ENV_VAR = "SD_SCRIPTS"
EXIT_USAGE = 2  # bad input: nothing was trained or written
EXIT_DIVERGED = 3  # the loss became NaN/inf (as dvar's trainers; 1 stays kohya's own crashes)
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
    "post_process_loss": (4, ()),
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
    kohya_classes = [klass for klass in trainer_cls.__mro__ if not issubclass(klass, (DVARTrainerMixin, AsIsLoaderMixin))]
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


def _preset(value: Any) -> str:
    if isinstance(value, str) and (value in PRESETS or value in ("auto", DEFAULT_PRESET)):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a DVAR preset; choose one of {', '.join(sorted(PRESETS) + ['auto', DEFAULT_PRESET])}."
    )


def _as_int(value: Any) -> Optional[int]:
    """An int from a TOML int or a command-line string, else None (bools, floats and words are not)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _whole(what: str, example: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = _as_int(value)
        if number is None:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number; give {what}, such as {example}.")
        return number

    return convert


def _threshold(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{value!r} is not a number; give the threshold as a positive number, such as 0.4.")


def _eval_every(value: Any) -> Union[int, str]:
    """``auto``, a percentage such as ``5%``, or a whole number of steps (ranges are checked with the other settings)."""
    if isinstance(value, str) and (value == "auto" or value.endswith("%")):
        return value
    number = _as_int(value)
    if number is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a stride; give a whole number of optimizer steps (1: every step, the paper's setting), "
            "a share of the training time such as 5%, or auto."
        )
    return number


def _signal(value: Any) -> str:
    if value in ("loss", "normalized", "bands"):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a DVAR signal; choose loss (the frozen batch's mean loss), "
                                     "normalized (each frozen batch's loss over its first) or bands (those in 3 "
                                     "timestep bands, each settling).")


def _flat_bands(value: Any) -> str:
    if value in ("hold", "skip"):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a choice for a flat band; choose hold (it holds the stop until "
                                     "it falls and settles) or skip (a band that has not fallen does not hold it).")


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false.")


#: dest -> how its value, from the command line or kohya's TOML, is read (argparse.ArgumentTypeError if bad)
EARLY_STOP_FLAGS: Dict[str, Callable[[Any], Any]] = {
    "early_stop": _switch,
    "early_stop_preset": _preset,
    "early_stop_window": _whole("the DVAR window in optimizer steps", "440"),
    "early_stop_threshold": _threshold,
    "early_stop_eval_every": _eval_every,
    "early_stop_batch_size": _whole("how many training examples to freeze", "4"),
    "early_stop_signal": _signal,
    "early_stop_min_steps": _whole("the optimizer step before which DVAR never stops", "400"),
    "early_stop_flat_bands": _flat_bands,
}


def add_early_stop_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The kohya-style DVAR flags (also read from kohya's ``--config_file`` TOML)."""
    group = parser.add_argument_group("DVAR early stopping (dvar.integrations.kohya)")
    group.add_argument("--early_stop", action="store_true",
                       help="stop when the loss on a frozen batch of the training images plateaus (DVAR)")
    group.add_argument("--early_stop_preset", type=_preset, default=None,
                       help=f"DVAR rule: a published window/threshold ({', '.join(sorted(PRESETS))}), 'auto' (no "
                            "window: a multiple of the loss's settling time) or 'default'. Default: with no "
                            "--early_stop_window or --early_stop_threshold, dvar's default for LoRA ("
                            f"{default_rule(KOHYA_METHOD).describe().replace('%', '%%')}); with one, the "
                            "dreambooth_lora preset (440 steps, 0.4) it overrides")
    group.add_argument("--early_stop_window", type=EARLY_STOP_FLAGS["early_stop_window"], default=None,
                       help="DVAR window N in optimizer steps (overrides the preset)")
    group.add_argument("--early_stop_threshold", type=_threshold, default=None,
                       help="stop when var(last N) / var(all) < this (overrides the preset); for 'auto', the "
                            "multiple of the loss's settling time at which it stops (default 2)")
    group.add_argument("--early_stop_eval_every", type=_eval_every, default="auto",
                       help="evaluate the frozen batch every this many optimizer steps (default auto: the window // 30, "
                            "at least 1; 1 is the paper's every-step setting; a percentage such as 5%%: the stride at which "
                            "evaluating costs about that share of the training time)")
    group.add_argument("--early_stop_batch_size", type=EARLY_STOP_FLAGS["early_stop_batch_size"], default=4,
                       help="training examples in the frozen DVAR batch (default 4, as the paper)")
    group.add_argument("--early_stop_signal", type=_signal, default=None,
                       help="what the rule watches (default: the default rule's, else loss): loss (the frozen "
                            "batch's mean loss), normalized (the mean of each frozen example's loss divided by its "
                            "first) or bands (those in 3 timestep bands, a rule on each, stopping once all have "
                            "settled)")
    group.add_argument("--early_stop_min_steps", type=EARLY_STOP_FLAGS["early_stop_min_steps"], default=None,
                       help="never stop before this optimizer step (a NaN/inf loss still stops at once)")
    group.add_argument("--early_stop_flat_bands", type=_flat_bands, default=None,
                       help="with bands: whether a band whose loss has not fallen beyond its noise holds the stop once "
                            "the others have settled (hold) or not (skip); default: the default rule's, else hold")
    return parser


def _read_early_stop_values(args: argparse.Namespace) -> None:
    """Values from kohya's TOML reach ``args`` as TOML typed them (argparse converts only command-line
    strings): read them with the flags' own converters, so a bad one gets the same message."""
    for dest, convert in EARLY_STOP_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            setattr(args, dest, convert(value))
        except argparse.ArgumentTypeError as error:
            raise KohyaPluginError(f"{dest} (--{dest} or a key of --config_file): {error}") from None


def validate_args(args: argparse.Namespace) -> None:
    """Refuse DVAR settings that can never work, and setups the plugin cannot stop."""
    _read_early_stop_values(args)
    if not getattr(args, "early_stop", False):
        return
    if getattr(args, "deepspeed", False):
        raise KohyaPluginError(
            "--early_stop does not support --deepspeed: DeepSpeed steps the optimizer inside backward, so the "
            "plugin cannot end the run at the stop step. Train without --deepspeed, or without --early_stop."
        )
    if args.early_stop_batch_size < 1:
        raise KohyaPluginError(f"--early_stop_batch_size must be >= 1 (got {args.early_stop_batch_size}).")
    config = config_from_args(args)
    if config.is_auto and config.max_train_steps is None and config.eval_every == "auto":
        # --max_train_epochs: the stride comes from the step budget, known once kohya has built its data
        config = replace(config, eval_every=1)
    try:
        config.resolved_window_threshold()
    except ValueError as error:
        raise KohyaPluginError(f"--early_stop_window/--early_stop_threshold/--early_stop_eval_every/"
                               f"--early_stop_min_steps: {error}") from None


class _PreflightParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its usage and exit; the launcher prints dvar's words
        raise KohyaPluginError(message if message.endswith(".") else f"{message}.")


def preflight(argv: Sequence[str]) -> argparse.Namespace:
    """The DVAR flags of the command line, read and checked before sd-scripts is imported (which takes
    seconds): a bad value is refused at once. What needs kohya's parser (its own flags, a
    ``--config_file``, kohya's default budget) is checked again after it.

    Example:
        >>> preflight(["--output_dir", "out", "--early_stop", "--early_stop_window", "40"]).early_stop_window
        40
        >>> preflight(["--early_stop_eval_every", "abc"])
        Traceback (most recent call last):
        ...
        dvar.integrations.kohya.plugin.KohyaPluginError: argument --early_stop_eval_every: 'abc' is not a stride; give a whole number of optimizer steps (1: every step, the paper's setting), a share of the training time such as 5%, or auto.
    """
    parser = _PreflightParser(add_help=False, allow_abbrev=False)
    add_early_stop_arguments(parser)
    # kohya's flags the checks read; their own errors stay kohya's
    for flag in ("--max_train_steps", "--max_train_epochs", "--config_file"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--deepspeed", action="store_true")
    args, _ = parser.parse_known_args(list(argv))
    try:
        steps = int(args.max_train_steps)
    except (TypeError, ValueError):
        steps = None
    # the step budget is known here only when the command line gives it and nothing can change it
    args.max_train_steps = steps if args.max_train_epochs is None and args.config_file is None else None
    args.max_train_epochs = None
    validate_args(args)
    return args


def trainer_class(kohya_cls: type, family: str, args: argparse.Namespace) -> type:
    """The class to train with: with ``--early_stop``, the DVAR mixin in front of kohya's class (after
    checking that this sd-scripts version takes it); without, kohya's own class (plus the as-is loader
    only when the model is a diffusers folder kohya cannot convert, such as mini-SD)."""
    if not args.early_stop:
        if family == "sd" and needs_as_is_loader(args.pretrained_model_name_or_path):
            return make_loader_class(kohya_cls, family)
        return kohya_cls
    problems = check_trainer(kohya_cls)
    if problems:
        raise KohyaPluginError(
            f"unsupported sd-scripts version in {Path(inspect.getfile(kohya_cls)).parent}: " + "; ".join(problems)
            + f". The plugin was verified with commit {VERIFIED_COMMIT[:10]}; check that one out, or train without "
            "--early_stop."
        )
    return make_trainer_class(kohya_cls, family)


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
    """Run kohya's script with the DVAR flags: 0 when kohya's run ends (at the budget or at a DVAR stop),
    3 when training diverged, 2 on bad input (before anything is trained or written)."""
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
        return EXIT_USAGE
    given, rest = _pop_option(argv[1:], "--sd_scripts")
    module_name, class_name, family = SCRIPTS[script]
    try:
        if not any(flag in ("-h", "--help") for flag in rest):
            preflight(rest)
        root = find_sd_scripts(given)
        module = import_script(root, script)
    except KohyaPluginError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    parser = add_early_stop_arguments(module.setup_parser())
    sys.argv = [str(root / f"{script}.py"), *rest]  # kohya's read_config_from_file parses sys.argv again
    args = parser.parse_args(rest)
    module.train_util.verify_command_line_training_args(args)
    args = module.train_util.read_config_from_file(args, parser)
    try:
        validate_args(args)
        trainer = trainer_class(getattr(module, class_name), family, args)()
        trainer.train(args)
    except KohyaPluginError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KohyaTrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0

"""dvar.integrations.kohya on a loop of kohya's shape (tests/kohya_fake: sd-scripts' class and
method names and order of calls, mini-SD's real diffusers parts); the real sd-scripts run is
benchmarks/kohya_check.sh."""

import contextlib
import csv
import functools
import inspect
import io
from argparse import Namespace
import json
import logging
import math
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dvar.integrations import kohya
from dvar.integrations.kohya import KohyaFrozenBatch, KohyaPluginError, check_trainer, make_trainer_class
from dvar.integrations.kohya.diffusers_model import AsIsLoaderMixin
from dvar.integrations.kohya.frozen import candidate_order
from dvar.models import mini_sd

FAKE = Path(__file__).parent / "kohya_fake"
KOHYA_MODULES = ("train_network", "sdxl_train_network", "flux_train_network", "library", "networks")
STEPS_PER_EPOCH = 5  # 5 photos, 1 repeat, batch 1
BUDGET = 60
EARLY = ["--early_stop", "--early_stop_window", "8", "--early_stop_threshold", "0.3", "--early_stop_batch_size", "2"]


def forget_kohya():
    for name in list(sys.modules):
        if name.split(".")[0] in KOHYA_MODULES:
            del sys.modules[name]


@pytest.fixture(scope="module")
def fake_kohya():
    """The fake checkout on sys.path (as the launcher puts a real one), cleaned up afterwards."""
    forget_kohya()
    sys.path.insert(0, str(FAKE))
    import flux_train_network
    import sdxl_train_network
    import train_network

    yield {"train_network": train_network.NetworkTrainer, "sdxl_train_network": sdxl_train_network.SdxlNetworkTrainer,
           "flux_train_network": flux_train_network.FluxNetworkTrainer}
    sys.path.remove(str(FAKE))
    forget_kohya()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory, concept_dir):
    """kohya's DreamBooth layout: <repeats>_<class tokens>/ with the images and .txt captions."""
    root = tmp_path_factory.mktemp("kohya-data")
    folder = root / "img" / "1_sks circle"
    folder.mkdir(parents=True)
    from dvar_lab.world.concepts import metadata_path

    concept = json.loads(metadata_path(concept_dir).read_text())
    for image in concept["images"]:
        shutil.copy(Path(concept_dir) / image["file"], folder / image["file"])
        (folder / image["file"]).with_suffix(".txt").write_text(image["prompt"].format("sks circle"))
    return root


def flags(photos, out, *extra):
    return ["--pretrained_model_name_or_path", str(mini_sd()), "--train_data_dir", str(photos / "img"),
            "--output_dir", str(out), "--output_name", "lora", "--learning_rate", "1e-3", "--seed", "7",
            "--cache_latents", "--log_with", "jsonl", "--logging_dir", str(out / "logs"), *extra]


def train(trainer_cls, family, argv, console=None):
    """What the launcher does, keeping the trainer to look at afterwards (and what it printed, in ``console``)."""
    import train_network

    parser = kohya.add_early_stop_arguments(train_network.setup_parser())
    args = parser.parse_args(argv)
    kohya.launch.validate_args(args)
    trainer = make_trainer_class(trainer_cls, family)()
    with contextlib.redirect_stdout(console if console is not None else sys.stdout):
        trainer.train(args)
    return trainer


def lora(path):
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def logged(out, key):
    rows = [json.loads(line) for line in (out / "logs" / "log.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if key in row["values"]]


def saved_files(out):
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("dvar_") and p.name != "logs")


# -- a stop is a shorter kohya run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_runs(fake_kohya, photos, tmp_path_factory):
    """An early-stopped run (saving models and states as it goes), then plain kohya runs of the
    steps it trained, with and without the mixin."""
    root = tmp_path_factory.mktemp("sd-runs")
    saving = ["--save_every_n_epochs", "1", "--save_every_n_steps", "4", "--save_state"]
    console = io.StringIO()
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("library.train_util").addHandler(handler)
    logging.getLogger("library.train_util").setLevel(logging.INFO)
    try:
        early = train(fake_kohya["train_network"], "sd",
                      flags(photos, root / "early", "--max_train_steps", str(BUDGET), *saving, *EARLY), console)
    finally:
        logging.getLogger("library.train_util").removeHandler(handler)
        logging.getLogger("library.train_util").setLevel(logging.NOTSET)
    incremented = [int(m.group(1)) for m in map(re.compile(r"epoch is incremented.*epoch: (\d+)$").match, records) if m]
    stop = json.loads((root / "early" / "dvar_summary.json").read_text())["stop_step"]
    plain = train(fake_kohya["train_network"], "sd", flags(photos, root / "plain", "--max_train_steps", str(stop), *saving),
                  io.StringIO())
    return {"root": root, "stop": stop, "early": early, "plain": plain, "console": console.getvalue(),
            "incremented": incremented}


def test_the_stop_ends_the_run_as_a_plain_run_of_that_many_steps(sd_runs):
    root, stop = sd_runs["root"], sd_runs["stop"]
    summary = json.loads((root / "early" / "dvar_summary.json").read_text())
    epoch = math.ceil(stop / STEPS_PER_EPOCH)
    assert summary["outcome"] == "early_stop" and summary["reason"].startswith("plateau")
    assert 8 <= stop < BUDGET and epoch > 1, "the settings must stop mid-budget, after the first epoch"
    assert summary["stop_epoch"] == epoch and summary["steps_saved"] == BUDGET - stop
    assert (summary["eval_every_setting"], summary["eval_every"]) == ("auto", 1), "the default stride: max(1, 8 // 30)"
    early, early_meta = lora(root / "early" / "lora.safetensors")
    plain, plain_meta = lora(root / "plain" / "lora.safetensors")
    assert early.keys() == plain.keys() and all(torch.equal(early[k], plain[k]) for k in early)
    assert (early_meta["ss_steps"], early_meta["ss_epoch"]) == (plain_meta["ss_steps"], plain_meta["ss_epoch"]) == (
        str(stop), str(epoch))
    assert early_meta["ss_max_train_steps"] == str(BUDGET)  # the budget it was given stays on record
    # the same files (step and epoch models, states), the same sampling calls and logged steps
    assert saved_files(root / "early") == saved_files(root / "plain")
    assert sd_runs["early"].sample_calls == sd_runs["plain"].sample_calls
    for key in ("loss/current", "loss/epoch_average"):
        assert logged(root / "early", key) == logged(root / "plain", key)
    assert logged(root / "early", "dvar/eval_loss") == list(range(1, stop + 1))
    history = (root / "early" / "dvar_history.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == list(range(1, stop + 1))


def test_after_a_stop_one_line_replaces_the_idle_epochs_lines(sd_runs):
    """kohya prints "epoch N/M" as each epoch starts, and its dataset logs "epoch is incremented"; the
    epochs left after a stop train nothing."""
    console, epoch = sd_runs["console"], math.ceil(sd_runs["stop"] / STEPS_PER_EPOCH)
    started = [int(n) for n in re.findall(r"^epoch (\d+)/\d+$", console, flags=re.M)]
    assert started == list(range(1, epoch + 1)), "kohya's lines up to the stop's epoch, none after"
    assert sd_runs["incremented"] == list(range(1, epoch + 1))
    assert console.count(f"DVAR: the epochs after epoch {epoch} are idle") == 1
    assert BUDGET // STEPS_PER_EPOCH > epoch + 1, "the run must have idle epochs to hide"


def test_without_early_stop_the_mixin_changes_nothing(sd_runs, fake_kohya, photos):
    root, stop = sd_runs["root"], sd_runs["stop"]
    bare = fake_kohya["train_network"]()  # kohya's own class, no mixin
    import train_network

    bare.train(train_network.setup_parser().parse_args(flags(photos, root / "bare", "--max_train_steps", str(stop))))
    with_mixin, _ = lora(root / "plain" / "lora.safetensors")
    without, _ = lora(root / "bare" / "lora.safetensors")
    assert all(torch.equal(with_mixin[k], without[k]) for k in without)
    assert not list((root / "plain").glob("dvar_*"))


def test_resume_from_a_kohya_state_reaches_the_same_stop(sd_runs, fake_kohya, photos):
    """From a state past the first epoch, where kohya's global_step restarts at 8 - 5 = 3: the stop, the
    history, the LoRA and its ss_steps/ss_epoch are those of the uninterrupted run."""
    root, stop = sd_runs["root"], sd_runs["stop"]
    state = root / "early" / "lora-step00000008-state"
    assert torch.load(state / "dvar_state.pt", weights_only=True)["dvar_step"] == 8 > STEPS_PER_EPOCH
    train(fake_kohya["train_network"], "sd", flags(photos, root / "resumed", "--max_train_steps", str(BUDGET), *EARLY,
                                                  "--resume", str(state), "--skip_until_initial_step"))
    first = (root / "early" / "dvar_history.csv").read_text()
    again = (root / "resumed" / "dvar_history.csv").read_text()
    assert again == first  # the 8 restored rows and every later evaluation
    assert json.loads((root / "resumed" / "dvar_summary.json").read_text())["stop_step"] == stop
    early, _ = lora(root / "early" / "lora.safetensors")
    resumed, meta = lora(root / "resumed" / "lora.safetensors")
    assert all(torch.equal(early[k], resumed[k]) for k in early)
    assert (meta["ss_steps"], meta["ss_epoch"]) == (str(stop), str(math.ceil(stop / STEPS_PER_EPOCH)))


# -- other model families ----------------------------------------------------------------------------


def test_flux_trainer_with_cached_text_and_flow_matching_stops_the_same_way(fake_kohya, photos, tmp_path):
    flux = fake_kohya["flux_train_network"]
    early = train(flux, "flux", flags(photos, tmp_path / "early", "--max_train_steps", str(BUDGET), *EARLY))
    summary = json.loads((tmp_path / "early" / "dvar_summary.json").read_text())
    stop = summary["stop_step"]
    assert summary["outcome"] == "early_stop" and stop < BUDGET
    train(flux, "flux", flags(photos, tmp_path / "plain", "--max_train_steps", str(stop)))
    a, meta = lora(tmp_path / "early" / "lora.safetensors")
    b, _ = lora(tmp_path / "plain" / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (meta["ss_steps"], meta["ss_epoch"], meta["modelspec.architecture"]) == (
        str(stop), str(math.ceil(stop / STEPS_PER_EPOCH)), "flux-1-dev/lora")
    # each frozen item went through the family's validation hooks (block swapping in real Flux)
    assert early.validation_step_ends == summary["num_evaluations"] * 2
    assert summary["frozen_batch"]["examples"] == 2


def test_the_normalized_signal_follows_each_frozen_kohya_batch_and_holds_to_the_floor(fake_kohya, photos, tmp_path):
    rule = ["--early_stop", "--early_stop_preset", "auto", "--early_stop_threshold", "1.5", "--early_stop_eval_every", "1",
            "--early_stop_batch_size", "2", "--early_stop_signal", "normalized", "--early_stop_min_steps", "55"]
    train(fake_kohya["train_network"], "sd", flags(photos, tmp_path / "run", "--max_train_steps", str(BUDGET), *rule))
    summary = json.loads((tmp_path / "run" / "dvar_summary.json").read_text())
    with open(tmp_path / "run" / "dvar_history.csv") as handle:
        signal = [float(row["signal"]) for row in csv.DictReader(handle)]
    # the rule fires at step 48 on the items' normalized losses and is held to the floor
    assert (summary["outcome"], summary["rule"], summary["stop_step"]) == ("early_stop", "not_before", 55)
    assert "normalized loss" in summary["reason"] and "held until min_steps=55" in summary["reason"]
    assert signal[0] == 1.0 and len(set(signal)) == len(signal) == 55


def test_the_bands_signal_bands_kohyas_frozen_items_by_the_timesteps_kohya_drew(fake_kohya, photos, tmp_path):
    rule = ["--early_stop", "--early_stop_preset", "auto", "--early_stop_threshold", "1.5", "--early_stop_eval_every", "1",
            "--early_stop_batch_size", "3", "--early_stop_signal", "bands"]
    straight = tmp_path / "straight"
    train(fake_kohya["train_network"], "sd", flags(photos, straight, "--max_train_steps", str(BUDGET), *rule))
    summary = json.loads((straight / "dvar_summary.json").read_text())
    # three frozen items, one per band, each named with the timestep kohya drew for it at the first evaluation
    assert (summary["outcome"], summary["rule"]) == ("early_stop", "all_settled"), summary
    assert summary["reason"].startswith("settled: every timestep band has settled (low-noise band (t ")
    assert all(f"{band} (t " in summary["reason"] for band in ("mid-noise band", "high-noise band"))


@pytest.mark.parametrize("script, family", [("train_network", "sd"), ("sdxl_train_network", "sdxl"),
                                            ("flux_train_network", "flux")])
def test_the_mixin_takes_every_call_kohya_makes(fake_kohya, script, family):
    cls = make_trainer_class(fake_kohya[script], family)
    assert check_trainer(fake_kohya[script]) == [] and check_trainer(cls) == []
    for name, (positional, keywords) in kohya.HOOK_CALLS.items():  # the overrides take kohya's calls too
        inspect.signature(getattr(cls, name)).bind(None, *range(positional), **{key: None for key in keywords})
    assert cls.__mro__[1:4] == (kohya.DVARTrainerMixin, AsIsLoaderMixin, fake_kohya[script])
    assert cls().dvar_family == family


def test_a_changed_hook_is_reported_as_an_unsupported_version_only_with_early_stop(fake_kohya):
    class Changed(fake_kohya["train_network"]):
        def process_batch(self, batch, models, args):  # a new signature
            return None

    problems = check_trainer(make_trainer_class(Changed))
    assert len(problems) == 1 and "process_batch" in problems[0]
    with pytest.raises(KohyaPluginError, match="unsupported sd-scripts version.*or train without --early_stop"):
        kohya.launch.trainer_class(Changed, "sd", Namespace(early_stop=True, pretrained_model_name_or_path="m"))
    # without --early_stop the launcher runs kohya's own class and checks nothing
    assert kohya.launch.trainer_class(Changed, "sd", Namespace(early_stop=False, pretrained_model_name_or_path="m")) is Changed


@pytest.mark.parametrize("early_stop, model, family, expected", [
    (False, "model.safetensors", "sd", "NetworkTrainer"),  # kohya's class itself: its script unchanged
    (False, "MINI_SD", "sd", "AsIsNetworkTrainer"),  # only the loader of a folder kohya cannot convert
    (False, "MINI_SD", "flux", "NetworkTrainer"),
    (True, "model.safetensors", "sd", "DVARNetworkTrainer"),
])
def test_the_launcher_puts_dvar_in_front_of_kohya_only_with_early_stop(fake_kohya, early_stop, model, family, expected):
    args = Namespace(early_stop=early_stop, pretrained_model_name_or_path=str(mini_sd()) if model == "MINI_SD" else model)
    cls = kohya.launch.trainer_class(fake_kohya["train_network"], family, args)
    assert cls.__name__ == expected and issubclass(cls, fake_kohya["train_network"])
    assert issubclass(cls, kohya.DVARTrainerMixin) is early_stop


# -- divergence --------------------------------------------------------------------------------------


def nan_losses_from(trainer_cls, first_nan):
    """kohya's process_batch, whose training loss turns NaN from the ``first_nan``-th training step on."""
    original = trainer_cls.process_batch

    @functools.wraps(original)
    def process_batch(self, batch, *args, is_train=True, **kwargs):
        loss = original(self, batch, *args, is_train=is_train, **kwargs)
        if is_train:
            self.training_calls = getattr(self, "training_calls", 0) + 1
            if self.training_calls >= first_nan:
                loss = loss * float("nan")
        return loss

    return process_batch


@pytest.mark.parametrize("first_nan, kept", [(7, 6), (1, None)], ids=["kept-step-6", "nothing-finite"])
def test_a_divergence_exits_3_keeps_the_last_finite_weights_and_saves_nothing_after(
        fake_kohya, photos, tmp_path, capsys, monkeypatch, first_nan, kept):
    trainer_cls = fake_kohya["train_network"]
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(trainer_cls, "process_batch", nan_losses_from(trainer_cls, first_nan))
    out = tmp_path / "early"
    saving = ["--save_every_n_steps", "2", "--save_state"]
    argv = flags(photos, out, "--max_train_steps", str(BUDGET), *EARLY, *saving)
    assert kohya.main(["train_network", "--sd_scripts", str(FAKE), *argv]) == 3  # as dvar's trainers
    err = capsys.readouterr().err
    summary = json.loads((out / "dvar_summary.json").read_text())
    assert (summary["outcome"], summary["diverged"], summary["stop_kind"], summary["stopped_early"]) == (
        "diverged", True, "non_finite", False)
    assert summary["stop_step"] == first_nan and summary["model_step"] == kept
    last = err.rstrip().splitlines()[-1]
    assert last.startswith(f"error: DVAR ended training at step {first_nan} of {BUDGET} because it diverged")
    assert "lower the learning rate" in last
    steps_saved = [f"lora-step{step:08d}{suffix}" for step in range(2, first_nan, 2) for suffix in (".safetensors", "-state")]
    if kept is None:
        assert "No model was saved: no evaluation was finite" in last and summary["model_file"] is None
        assert saved_files(out) == sorted(steps_saved)
        return
    assert f"lora.safetensors holds the weights of step {kept}" in last
    assert summary["model_file"] == str(out / "lora.safetensors")
    assert saved_files(out) == sorted(steps_saved + ["lora.safetensors"]), "no save of a step past the divergence"
    train(trainer_cls, "sd", flags(photos, tmp_path / "plain", "--max_train_steps", str(kept)), io.StringIO())
    weights, meta = lora(out / "lora.safetensors")
    plain, _ = lora(tmp_path / "plain" / "lora.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert weights.keys() == plain.keys() and all(torch.equal(weights[k], plain[k]) for k in plain)
    assert (meta["ss_steps"], meta["ss_epoch"]) == (str(kept), str(math.ceil(kept / STEPS_PER_EPOCH)))


# -- the frozen batch --------------------------------------------------------------------------------


def test_frozen_batch_takes_new_training_images_first_and_no_regularization_images(fake_kohya, photos, tmp_path):
    from library import train_util
    import train_network

    reg = tmp_path / "reg" / "2_circle"
    reg.mkdir(parents=True)
    for png in sorted((photos / "img" / "1_sks circle").glob("*.png"))[:2]:
        shutil.copy(png, reg / png.name)
    args = train_network.setup_parser().parse_args(
        ["--train_data_dir", str(photos / "img"), "--reg_data_dir", str(tmp_path / "reg"), "--seed", "3",
         "--flip_aug", "--train_batch_size", "1"])
    dataset = train_util.DatasetGroup([train_util.DreamBoothDataset(args, lambda text: torch.zeros(77, dtype=torch.long))])
    order = candidate_order(dataset)
    keys = [dataset.datasets[0].bucket_manager.buckets[0][dataset.datasets[0].buckets_indices[i].batch_index]
            for i in order]
    assert len(order) == 5 and len(set(keys)) == 5 and all("/reg/" not in key for key in keys)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    frozen = KohyaFrozenBatch.from_dataset(dataset, num_examples=3, seed=0)
    again = KohyaFrozenBatch.from_dataset(dataset, num_examples=3, seed=0)
    assert (random.getstate(), torch.get_rng_state().tolist()) == (states[0], states[2].tolist())
    assert (np.random.get_state()[1] == states[1]).all()
    assert len(frozen) == 3 and frozen.indices == order[:3]
    assert [item["flippeds"] for item in frozen.items] == [item["flippeds"] for item in again.items]


# -- bad input ---------------------------------------------------------------------------------------


BAD = [
    # id, argv after the script name, what the message must name
    ("epochs-too-few-for-the-window", ["--max_train_epochs", "1", "--early_stop", "--early_stop_window", "8"],
     "--max_train_epochs 1 (5 steps)"),
    ("window-from-toml", ["--max_train_steps", "10", "--config_file", "TOML"], "could never fire"),
    ("eval-every-from-toml", ["--config_file", "TOML_ABC"],
     "early_stop_eval_every (--early_stop_eval_every or a key of --config_file): 'abc' is not a stride"),
    ("resume-a-finished-run", ["--max_train_steps", str(BUDGET), *EARLY, "--resume", "FINISHED"], "training is finished"),
    *[(f"before-kohya-{name}", argv, message) for name, argv, message in [
        # refused before sd-scripts is imported (which takes seconds), in dvar's words, not after kohya's usage text
        ("eval-every-abc", ["--early_stop", "--early_stop_eval_every", "abc"],
         "argument --early_stop_eval_every: 'abc' is not a stride; give a whole number of optimizer steps"),
        ("window-abc", ["--early_stop_window=abc"], "argument --early_stop_window: 'abc' is not a whole number; give the"),
        ("threshold-abc", ["--early_stop_threshold", "x"], "argument --early_stop_threshold: 'x' is not a number"),
        ("batch-size-half", ["--early_stop_batch_size", "0.5"], "'0.5' is not a whole number; give how many training"),
        ("unknown-preset", ["--early_stop_preset", "lora"], "'lora' is not a DVAR preset; choose one of custom_diffusion,"),
        ("percent-out-of-range", ["--early_stop", "--early_stop_eval_every", "150%"], "a percentage in (0, 100]"),
        ("window-over-budget", ["--max_train_steps", "10", "--early_stop", "--early_stop_window", "20"],
         "could never fire"),
        ("threshold-zero", ["--early_stop", "--early_stop_window", "4", "--early_stop_threshold", "0"], "threshold"),
        ("eval-every-zero", ["--early_stop", "--early_stop_eval_every", "0"], "eval_every must be >= 1"),
        ("batch-size-zero", ["--early_stop", "--early_stop_batch_size", "0"], "--early_stop_batch_size must be >= 1"),
        ("deepspeed", ["--early_stop", "--deepspeed"], "does not support --deepspeed"),
        ("signal-abc", ["--early_stop_signal", "median"], "'median' is not a DVAR signal; choose loss"),
        ("flat-bands-abc", ["--early_stop_flat_bands", "ignore"], "'ignore' is not a choice for a flat band; choose hold"),
        ("flat-bands-without-bands", ["--early_stop", "--early_stop_preset", "auto", "--early_stop_flat_bands", "skip"],
         "flat_bands='skip' says what a flat timestep band does, but signal='loss' watches no bands"),
        ("min-steps-over-budget", ["--max_train_steps", "10", "--early_stop", "--early_stop_min_steps", "20"],
         "min_steps (20) is past the step budget (10)"),
    ]],
]


@pytest.mark.parametrize("name, argv, message", BAD, ids=[b[0] for b in BAD])
def test_bad_settings_exit_2_naming_the_flag_and_write_nothing(fake_kohya, photos, tmp_path, capsys, monkeypatch,
                                                               request, name, argv, message):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    tomls = {"TOML": "[dvar]\nearly_stop = true\nearly_stop_window = 20\n",
             "TOML_ABC": '[dvar]\nearly_stop = true\nearly_stop_eval_every = "abc"\n'}
    for key, text in tomls.items():
        (tmp_path / f"{key}.toml").write_text(text)
    if "FINISHED" in argv:  # a state saved at the end of a run, after its stop
        argv = [str(request.getfixturevalue("sd_runs")["root"] / "early" / "lora-state") if a == "FINISHED" else a
                for a in argv]
    argv = [str(tmp_path / f"{a}.toml") if a in tomls else a for a in argv]
    out = tmp_path / "out"
    # an empty folder as sd-scripts: a flag refused before kohya loads is refused with its own message
    sd_scripts = tmp_path if name.startswith("before-kohya") else FAKE
    assert kohya.main(["train_network", "--sd_scripts", str(sd_scripts), *flags(photos, out, *argv)]) == 2
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]  # (libraries may log above it)
    assert last.startswith("error: ") and message in last and not re.search("^usage:", err, flags=re.M)
    assert not list(out.glob("*.safetensors")) and not list(out.glob("dvar_*"))


@pytest.mark.parametrize("argv, env, message", [
    (["train_network", "--sd_scripts", "EMPTY"], {}, "kohya-ss/sd-scripts not found in"),
    (["train_network"], {"SD_SCRIPTS": "EMPTY"}, "($SD_SCRIPTS)"),
    (["train_network"], {}, "(the current folder)"),
    (["train_db"], {}, "not a kohya script the DVAR plugin supports"),
])
def test_sd_scripts_not_found_or_unsupported_script_exits_2(tmp_path, capsys, monkeypatch, argv, env, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SD_SCRIPTS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path) if value == "EMPTY" else value)
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    assert kohya.main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unsupported_sd_scripts_version_exits_2(tmp_path, capsys, monkeypatch):
    copy = tmp_path / "sd-scripts"
    shutil.copytree(FAKE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy / "train_network.py").read_text()
    (copy / "train_network.py").write_text(source.replace("sai_metadata = self.get_sai_model_spec(args)",
                                                          "sai_metadata = {}"))
    forget_kohya()
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert kohya.main(["train_network", "--sd_scripts", str(copy), "--early_stop"]) == 2
    finally:
        forget_kohya()
    err = capsys.readouterr().err
    assert "unsupported sd-scripts version" in err and "get_sai_model_spec" in err and kohya.VERIFIED_COMMIT[:10] in err


# -- which models the plugin loads itself ------------------------------------------------------------


@pytest.mark.parametrize("unet_config, as_is", [
    ({"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}, False),  # SD 1.x/2.x: kohya's loader
    ({"block_out_channels": [32, 64, 112], "layers_per_block": 1}, True),  # mini-SD
    ({"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 1}, True),
    (None, False),  # a single-file checkpoint
])
def test_only_diffusers_folders_kohya_cannot_convert_are_loaded_as_they_are(tmp_path, unet_config, as_is):
    from dvar.integrations.kohya.diffusers_model import needs_as_is_loader

    path = tmp_path / "model.safetensors"
    if unet_config is not None:
        path = tmp_path / "model"
        (path / "unet").mkdir(parents=True)
        (path / "unet" / "config.json").write_text(json.dumps(unet_config))
    assert needs_as_is_loader(str(path)) is as_is


@pytest.mark.parametrize("prefix", ["", "text_model."], ids=["transformers-5-keys", "transformers-4-keys"])
def test_the_text_encoder_loads_with_every_weight_of_its_file(tmp_path, prefix):
    """transformers 4.x (sd-scripts pins 4.54) re-initialises a CLIPTextModel saved by 5.x at
    random and only warns; the plugin's loader must give the file's weights in either case."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from dvar.integrations.kohya.diffusers_model import load_text_encoder
    from dvar_lab.tiny import _text_config

    torch.manual_seed(0)
    model = CLIPTextModel(_text_config())
    folder = tmp_path / "model" / "text_encoder"
    model.config.save_pretrained(folder)
    weights = {key.removeprefix("text_model."): value for key, value in model.state_dict().items()}
    save_file({prefix + key: value.contiguous() for key, value in weights.items()}, str(folder / "model.safetensors"))
    loaded = {key.removeprefix("text_model."): value for key, value in load_text_encoder(str(tmp_path / "model")).state_dict().items()}
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


@pytest.mark.parametrize("budget", [["--max_train_steps", "60"], ["--max_train_epochs", "12"]])  # 5 steps an epoch
def test_early_stop_alone_runs_dvars_default_rule_for_lora_with_a_step_or_epoch_budget(fake_kohya, photos, tmp_path,
                                                                                        budget):
    train(fake_kohya["train_network"], "sd",
          flags(photos, tmp_path / "run", *budget, "--early_stop", "--early_stop_batch_size", "3"))
    summary = json.loads((tmp_path / "run" / "dvar_summary.json").read_text())
    assert (summary["preset"], summary["default_rule"], summary["signal"]) == ("auto", True, "bands")
    assert (summary["max_train_steps"], summary["eval_every"]) == (60, 1)  # the stride from the budget, as auto's
    assert summary["outcome"] == "budget"  # the fake's loss is still settling at 60: twice its 80% time is later


@pytest.mark.parametrize("train_batch, items", [(3, 2), (4, 1)])
def test_the_default_watches_one_band_per_frozen_kohya_batch_when_there_are_fewer_than_three(fake_kohya, photos,
                                                                                              tmp_path, train_batch,
                                                                                              items):
    """kohya freezes whole batches and reports one timestep per batch: four examples or more, in batches of 3 or 4,
    are two batches or one, fewer than the default's three bands; the default watches that many instead of failing."""
    train(fake_kohya["train_network"], "sd",
          flags(photos, tmp_path / "run", "--max_train_steps", "30", "--train_batch_size", str(train_batch),
                "--early_stop", "--early_stop_batch_size", "4"))
    summary = json.loads((tmp_path / "run" / "dvar_summary.json").read_text())
    assert len(summary["frozen_batch"]["dataset_indices"]) == len(summary["bands"]) == items
    assert (summary["default_rule"], summary["signal"], summary["outcome"]) == (True, "bands", "budget")

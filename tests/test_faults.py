"""Fault injection for the trainers: how a run that goes wrong ends (issue 20).

A diverged run (NaN/inf training or frozen-batch loss) fails with exit 3 and keeps only finite weights;
SIGTERM saves like Ctrl-C and exits 143; an output folder that cannot be written is refused with exit 2
before the model loads; a Hub id trains from the local Hugging Face cache offline, and one missing from
it exits 2. Tiny random pipeline (16x16), a few steps per run.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvar.integrations import dreambooth, dreambooth_lora, textual_inversion, trainer
from dvar.integrations.run_end import EXIT_DIVERGED, EXIT_TERMINATED, EXIT_USAGE, Interrupted, SignalGuard

REPO = Path(__file__).resolve().parent.parent
EMBEDS = "learned_embeds.safetensors"
EVERY_STEP = ["--early-stop", "--early-stop-window", "6", "--early-stop-eval-every", "1"]


def summary(out):
    return json.loads((Path(out) / "dvar_summary.json").read_text())


@pytest.fixture
def cli(tiny_pipeline_dir, concept_dir, tmp_path):
    def make(module, *extra, out="out", steps=8):
        data = "--train_data_dir" if module is textual_inversion else "--instance_data_dir"
        token = ["--placeholder_token", "<thing>"] if module is textual_inversion else []
        return [
            "--pretrained_model_name_or_path", str(tiny_pipeline_dir), data, str(concept_dir), *token,
            "--output_dir", str(tmp_path / out), "--max_train_steps", str(steps), "--num_validation_images", "1",
            "--num_inference_steps", "2", "--checkpointing_steps", "1000", *extra,
        ]
    return make


# -- 1. divergence -------------------------------------------------------------------------


METHOD = {textual_inversion: textual_inversion.TextualInversion, dreambooth: dreambooth.DreamBooth,
          dreambooth_lora: dreambooth_lora.DreamBoothLoRA}


def nan_loss_from_call(n):
    """The training loss is NaN from the n-th call on (weights untouched)."""
    def fault(patch, module):
        calls = {"n": 0}
        original = METHOD[module].loss

        def loss(self, batch, parts, weight_dtype, args):
            calls["n"] += 1
            value = original(self, batch, parts, weight_dtype, args)
            return value * float("nan") if calls["n"] >= n else value

        patch.setattr(METHOD[module], "loss", loss)
    return fault


def nan_weights_at_step(n):
    """After optimizer step n the new token's embedding is NaN (what an fp16 overflow leaves)."""
    def fault(patch, module):
        calls = {"n": 0}
        original = module.TextualInversion.after_optimizer_step

        def after(self, parts, accelerator):
            original(self, parts, accelerator)
            calls["n"] += 1
            if calls["n"] == n:
                with torch.no_grad():
                    accelerator.unwrap_model(parts.text_encoder).get_input_embeddings().weight[self.token_ids] = float("nan")

        patch.setattr(module.TextualInversion, "after_optimizer_step", after)
    return fault


DIVERGENCE = [
    # id, module, flags, injected fault, diverged at step, weights kept from step, files, the message names
    ("ti-nan-training-loss", textual_inversion, [], nan_loss_from_call(4), 4, 2, [EMBEDS],
     "Saved the weights of step 2"),
    ("ti-early-stop-nan-weights", textual_inversion, EVERY_STEP, nan_weights_at_step(4), 4, 3, [EMBEDS],
     "frozen-batch loss became non-finite"),
    ("lora-early-stop-lr-1e6", dreambooth_lora, [*EVERY_STEP, "--learning_rate", "1e6"], None, 1, None, [],
     "no evaluation before it had a finite loss"),
    ("dreambooth-keeps-no-copy", dreambooth, ["--checkpointing_steps", "2"], nan_loss_from_call(4), 4, None, [],
     "the last checkpoint before the divergence is"),
]


@pytest.mark.parametrize("name, module, flags, fault, at_step, weights_step, files, message", DIVERGENCE,
                         ids=[d[0] for d in DIVERGENCE])
def test_divergence_fails_and_keeps_only_finite_weights(
    cli, tmp_path, capsys, name, module, flags, fault, at_step, weights_step, files, message
):
    with pytest.MonkeyPatch.context() as patch:
        if fault is not None:
            fault(patch, module)
        assert module.main(cli(module, *flags)) == EXIT_DIVERGED
    out = tmp_path / "out"
    result = summary(out)
    assert (result["outcome"], result["diverged"], result["diverged_at_step"]) == ("diverged", True, at_step)
    assert (result["weights_step"], result["saved_files"]) == (weights_step, files)
    assert result.get("stopped_early", False) is False and result.get("steps_saved", 0) == 0
    err = capsys.readouterr().err
    assert message in err and "--learning_rate" in err and result["error"] in err
    for name_ in files:
        assert all(torch.isfinite(t).all() for t in load_file(out / name_).values())
    assert not (out / "samples").exists()  # no samples of a failed run
    weights = {p.name for p in out.iterdir()} - {"dvar_summary.json", "dvar_history.csv", "dvar_history.png", "logs"}
    assert {w for w in weights if not w.startswith("checkpoint-")} == set(files)


def test_the_kept_weights_are_those_of_a_run_that_stopped_at_that_step(cli, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        nan_loss_from_call(4)(patch, textual_inversion)
        assert textual_inversion.main(cli(textual_inversion)) == EXIT_DIVERGED
    assert textual_inversion.main(cli(textual_inversion, out="two_steps", steps=2)) == 0
    assert (tmp_path / "out" / EMBEDS).read_bytes() == (tmp_path / "two_steps" / EMBEDS).read_bytes()


# -- 2. the output folder --------------------------------------------------------------------


def under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt" / "run", "cannot be created: {} is a file".format(tmp_path / "notes.txt")


def is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt", "is a file"


def read_only(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder, "cannot write in it"


UNWRITABLE = [
    pytest.param(under_a_file, id="under-a-regular-file"),
    pytest.param(is_a_file, id="is-a-file"),
    pytest.param(read_only, id="read-only", marks=pytest.mark.skipif(
        hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")),
]


@pytest.mark.parametrize("make", UNWRITABLE)
def test_an_unwritable_output_dir_exits_2_before_the_model_loads(cli, tmp_path, capsys, monkeypatch, make):
    out, message = make(tmp_path)
    monkeypatch.setattr(trainer, "load_components", lambda path: pytest.fail("the model was loaded"))
    args = cli(textual_inversion)
    args[args.index("--output_dir") + 1] = str(out)
    assert textual_inversion.main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output_dir {out}") and message in err and "Traceback" not in err
    if (tmp_path / "notes.txt").exists():
        assert (tmp_path / "notes.txt").read_text() == "mine"


# -- 3. signals ----------------------------------------------------------------------------


def send(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs at the next bytecode of the main thread


GUARD = [
    # id, phase, signals, raises at once, raised by check() afterwards
    ("first-signal-while-training-waits-for-the-step", "train", [signal.SIGTERM], False, True),
    ("second-signal-while-training-stops-at-once", "train", [signal.SIGTERM, signal.SIGINT], True, True),
    ("signals-while-saving-wait-for-the-save", "saving", [signal.SIGTERM, signal.SIGTERM, signal.SIGINT], False, True),
    ("first-signal-while-sampling-stops-at-once", "at_once", [signal.SIGTERM], True, True),
]


@pytest.mark.parametrize("name, phase, signals, at_once, later", GUARD, ids=[g[0] for g in GUARD])
def test_signal_guard(name, phase, signals, at_once, later):
    previous = {s: signal.getsignal(s) for s in SignalGuard.SIGNALS}
    with SignalGuard() as guard:
        phases = {"train": contextlib.nullcontext, "saving": guard.saving, "at_once": guard.at_once}
        with phases[phase]():
            raised = None
            try:
                for signum in signals:
                    send(signum)
            except Interrupted as error:
                raised = error
        assert (raised is not None) == at_once
        assert guard.received == signals[0]
        with pytest.raises(Interrupted) if later else contextlib.nullcontext():
            guard.check()
    assert {s: signal.getsignal(s) for s in SignalGuard.SIGNALS} == previous  # restored after the run


def test_sigterm_saves_the_weights_and_an_interrupted_summary(tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "integrations" / "textual_inversion.py"),
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(concept_dir),
        "--placeholder_token", "<thing>", "--output_dir", str(out), "--max_train_steps", "100000",
        "--checkpointing_steps", "2", "--num_validation_images", "0",
    ]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-2").is_dir():  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_TERMINATED, err[-3000:]
    assert "Traceback" not in err
    result = summary(out)
    assert (result["outcome"], result["signal"]) == ("interrupted", "SIGTERM")
    assert result["weights_step"] == result["final_step"] >= 2 and result["saved_files"] == [EMBEDS]
    (vector,) = load_file(out / EMBEDS).values()
    assert vector.shape[0] == 1 and torch.isfinite(vector).all()
    assert not list(out.glob(".dvar-saving-*")) and not list(out.glob("*.partial"))


# -- 4. Hugging Face Hub ids -----------------------------------------------------------------


def hub_cache(root, repo_id, model_dir):
    """``root`` laid out as a Hugging Face cache (HF_HOME) holding ``model_dir`` as ``repo_id``."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_a_hub_id_trains_offline_from_the_local_cache(tiny_pipeline_dir, concept_dir, tmp_path):
    home = hub_cache(tmp_path / "hf", "org/tiny-sd", tiny_pipeline_dir)
    command = [
        sys.executable, str(REPO / "integrations" / "textual_inversion.py"),
        "--pretrained_model_name_or_path", "org/tiny-sd", "--train_data_dir", str(concept_dir),
        "--placeholder_token", "<thing>", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
        "--num_validation_images", "0",
    ]
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = summary(tmp_path / "out")
    assert (result["outcome"], result["final_step"], result["saved_files"]) == ("budget", 2, [EMBEDS])


def test_a_hub_id_missing_from_the_cache_offline_exits_2_naming_it(cli, tmp_path, capsys):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1 before anything imports the Hub
    args = cli(textual_inversion)
    args[args.index("--pretrained_model_name_or_path") + 1] = "dvar-tests/not-a-model"
    assert textual_inversion.main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "dvar-tests/not-a-model" in err and "HF_HUB_OFFLINE=1" in err and "hf download" in err
    assert not (tmp_path / "out").exists()

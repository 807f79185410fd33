"""The shared trainer, through Textual Inversion on a tiny random SD pipeline: outputs that
diffusers loads, early stop, resume, Ctrl-C/errors, several processes, and bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvar import DVARConfig
from dvar.integrations import custom_diffusion, dreambooth, dreambooth_lora, textual_inversion
from dvar.integrations.data import load_image_folder, to_rgb

REPO = Path(__file__).resolve().parent.parent
SHARED_PHOTOS = REPO.parent / "shared" / "datasets" / "dreambooth" / "dog"


@pytest.fixture
def ti_args(tiny_pipeline_dir, concept_dir, tmp_path):
    def make(*extra, out="out", steps=20):
        return [
            "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(concept_dir),
            "--output_dir", str(tmp_path / out), "--max_train_steps", str(steps), "--placeholder_token", "<thing>",
            "--num_validation_images", "1", "--num_inference_steps", "2", "--checkpointing_steps", "1000", *extra,
        ]
    return make


EARLY = ["--early-stop", "--early-stop-window", "6", "--early-stop-threshold", "0.5"]
AUTO = ["--early-stop", "--early-stop-preset", "auto", "--early-stop-eval-every", "1", "--early-stop-threshold", "1.5"]
NORMALIZED = [*AUTO, "--early-stop-signal", "normalized", "--early-stop-min-steps", "40"]  # fires at 28, held to 40
BANDS = [*AUTO, "--early-stop-signal", "bands"]


def summary(path):
    return json.loads((Path(path) / "dvar_summary.json").read_text())


def test_full_budget_without_early_stop(ti_args, tmp_path):
    assert textual_inversion.main(ti_args(steps=8)) == 0
    result = summary(tmp_path / "out")
    assert result["outcome"] == "budget" and result["final_step"] == 8 and result["early_stop"] is False
    assert (tmp_path / "out" / "samples" / "00.png").exists()


def test_early_stop_writes_weights_history_and_summary(ti_args, tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert textual_inversion.main(ti_args(*EARLY, steps=60)) == 0
    out = tmp_path / "out"
    result = summary(out)
    assert result["outcome"] == "early_stop" and 6 <= result["stop_step"] < 60
    assert result["steps_saved"] == 60 - result["stop_step"] and result["reason"].startswith("plateau")
    for name in ("learned_embeds.safetensors", "dvar_history.csv", "dvar_history.png", "samples/00.png"):
        assert (out / name).exists(), name

    # plain diffusers loads the embedding and it changes the placeholder prompt's encoding
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_textual_inversion(out)
    ids = pipe.tokenizer("a photo of a <thing>", return_tensors="pt").input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(int(ids[0, 5])) == "<thing>"
    learned = pipe.text_encoder.get_input_embeddings().weight[ids[0, 5]]
    initial = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("star", add_special_tokens=False).input_ids[0]]
    assert not torch.allclose(learned, initial)


@pytest.mark.parametrize("rule", [EARLY, AUTO, NORMALIZED, BANDS], ids=["window", "auto", "normalized-with-floor", "bands"])
def test_resume_reaches_the_same_stop_step(ti_args, tiny_pipeline_dir, tmp_path, rule, ctrl_c_after_step):
    EARLY = rule
    assert textual_inversion.main(ti_args(*EARLY, out="full", steps=60)) == 0
    full = summary(tmp_path / "full")

    interrupted_at = full["stop_step"] - 3
    ctrl_c_after_step(textual_inversion.TextualInversion, interrupted_at)
    args = ti_args(*EARLY, "--checkpointing_steps", "2", out="resumed", steps=60)
    assert textual_inversion.main(args) == 130  # Ctrl-C: exit 130, weights saved
    partial = summary(tmp_path / "resumed")
    assert partial["outcome"] == "interrupted" and (tmp_path / "resumed" / "learned_embeds.safetensors").exists()

    checkpoints = sorted((tmp_path / "resumed").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    latest = checkpoints[-1]
    # a checkpoint holds the embedding and its rows of the optimizer state, not the text encoder (~250x on SD)
    assert "learned_embeds.safetensors" in {p.name for p in latest.iterdir()}
    assert not any(p.name.startswith("model") for p in latest.iterdir())
    assert (latest / "optimizer.bin").stat().st_size < token_table_bytes(tiny_pipeline_dir) / 100

    assert textual_inversion.main(ti_args(*EARLY, "--resume_from_checkpoint", "latest", out="resumed", steps=60)) == 0
    resumed = summary(tmp_path / "resumed")
    assert resumed["stop_step"] == full["stop_step"]
    history_full = (tmp_path / "full" / "dvar_history.csv").read_text()
    assert (tmp_path / "resumed" / "dvar_history.csv").read_text() == history_full
    assert (tmp_path / "resumed" / "learned_embeds.safetensors").read_bytes() == (
        tmp_path / "full" / "learned_embeds.safetensors").read_bytes()
    # wall time adds up: the resumed part, plus the time the checkpoint took to reach
    earlier = json.loads((latest / "dvar_trainer_state.json").read_text())["wall_time_s"]
    assert resumed["resumed_from_step"] == int(latest.name.split("-")[1])
    assert resumed["wall_time_s"] == pytest.approx(earlier + resumed["wall_time_s_this_run"], abs=0.02) and earlier > 0


def token_table_bytes(model_dir):
    """Bytes of the text encoder's fp32 token table: what a checkpoint must not copy."""
    config = json.loads((Path(model_dir) / "text_encoder" / "config.json").read_text())
    return config["vocab_size"] * config["hidden_size"] * 4


def test_an_error_after_training_started_still_saves_the_weights(ti_args, tmp_path, monkeypatch):
    original = textual_inversion.TextualInversion.loss

    def broken_loss(self, batch, parts, weight_dtype, args):
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 4:
            raise RuntimeError("the disk is on fire")
        return original(self, batch, parts, weight_dtype, args)

    monkeypatch.setattr(textual_inversion.TextualInversion, "loss", broken_loss)
    with pytest.raises(RuntimeError, match="the disk is on fire"):  # an unexpected error keeps its traceback
        textual_inversion.main(ti_args(steps=20))
    assert (tmp_path / "out" / "learned_embeds.safetensors").exists()
    result = summary(tmp_path / "out")
    assert (result["outcome"], result["final_step"], result["weights_step"]) == ("error", 3, 3)
    assert result["error"] == "RuntimeError: the disk is on fire"
    assert not (tmp_path / "out" / "samples").exists()


def test_two_processes_stop_together(ti_args, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "integrations" / "textual_inversion.py"), *ti_args(*EARLY, "--checkpointing_steps", "4", steps=60),
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ends = sorted(re.findall(r"\[rank \d\] training ended at step \d+ \(\w+\)", out.stdout))
    result = summary(tmp_path / "out")
    assert ends == [f"[rank {r}] training ended at step {result['stop_step']} (early_stop)" for r in (0, 1)]
    assert result["stop_step"] < 60 and (tmp_path / "out" / "learned_embeds.safetensors").exists()


# -- bad input ---------------------------------------------------------------------------


def write_images(folder, count=2, size=(20, 14)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def make_bad_folder(kind, tmp_path):
    folder = tmp_path / "data"
    if kind == "missing":
        return folder
    folder.mkdir()
    if kind == "not images":
        (folder / "notes.txt").write_text("hello")
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("not images", "has no readable images"),
    ],
)
def test_bad_data_folders(ti_args, tmp_path, capsys, kind, message):
    args = ti_args()
    args[args.index("--train_data_dir") + 1] = str(make_bad_folder(kind, tmp_path))
    assert textual_inversion.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "--train_data_dir" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--placeholder_token", "sks"], "'sks' is already in the tokenizer's vocabulary (id 48136)"),
        (["--placeholder_token", "dog"], "'dog' is already in the tokenizer's vocabulary (id 1929)"),
        (["--initializer_token", "a dog"], "--initializer_token 'a dog' is 2 tokens"),
        (["--initializer_token", "ktn"], "--initializer_token 'ktn' is 2 tokens"),
        (["--early-stop", "--early-stop-window", "30"], "--early-stop-window 30 is larger than --max_train_steps 20"),
        (["--early-stop", "--early-stop-preset", "textual_inversion"],
         "--early-stop-window 310 is larger than --max_train_steps 20"),  # the paper's preset
        (["--early-stop", "--early-stop-preset", "textual_inversion", "--early-stop-window", "5", "--early-stop-level",
          "0.9"],
         "the textual_inversion rule has no level"),
        (["--early-stop", "--early-stop-signal", "loss", "--early-stop-flat-bands", "skip"],
         "flat_bands='skip' says what a flat timestep band does"),
        (["--early-stop", "--early-stop-threshold", "0"], "threshold must be a finite number > 0"),
        (["--early-stop", "--early-stop-threshold", "-1"], "threshold must be a finite number > 0"),
        (["--early-stop", "--early-stop-window", "1"], "window must be an integer >= 2"),
        (["--early-stop", "--early-stop-min-steps", "30"], "--early-stop-min-steps 30 must be between 0 and --max_train_steps 20"),
        (["--early-stop", "--early-stop-preset", "auto", "--early-stop-window", "10"], "leave window out"),
        (["--early-stop", "--early-stop-preset", "auto", "--early-stop-threshold", "1.1"], "threshold of preset 'auto') must be finite with multiple * level > 1"),
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
        (["--resume_from_checkpoint", "latest"], "no such checkpoint"),
        (["--pretrained_model_name_or_path", "./no-such-model"], "--pretrained_model_name_or_path ./no-such-model does not exist"),
        (["--pretrained_model_name_or_path", "dvar-tests/no-such-model"], "is not in the local cache"),
        pytest.param(["--mixed_precision", "fp16"], "fp16 needs a GPU", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="fp16 runs on a GPU")),
    ],
)
def test_bad_settings_exit_2_and_write_nothing(ti_args, tmp_path, capsys, flags, message):
    assert textual_inversion.main(ti_args() + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "data, model, warns",
    [
        ("photos", "embedded", True),  # real photos cannot be learned by a 64x64 model of synthetic shapes
        ("bundled", "embedded", False),
        ("photos", "tiny", False),  # any other model: the user chose it
    ],
)
def test_own_photos_on_the_embedded_model_warn_what_it_is(tmp_path, tiny_pipeline_dir, concept_dir, caplog, data, model, warns):
    import argparse

    from dvar.integrations.cli import warn_photos_on_embedded_model
    from dvar.integrations.method import default_model_path

    folder = write_images(tmp_path / "photos") if data == "photos" else concept_dir
    path = default_model_path() if model == "embedded" else str(tiny_pipeline_dir)
    args = argparse.Namespace(train_data_dir=str(folder), pretrained_model_name_or_path=path)
    with caplog.at_level("WARNING", logger="dvar.integrations"):
        warn_photos_on_embedded_model(textual_inversion.TextualInversion(), args)
    said = " ".join(record.getMessage() for record in caplog.records)
    assert ("64x64 model trained on synthetic shapes" in said and "--pretrained_model_name_or_path" in said) == warns


def test_output_dir_holding_another_run_is_refused(ti_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    assert textual_inversion.main(ti_args(steps=2)) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert textual_inversion.main(ti_args("--overwrite_output_dir", steps=2)) == 0
    assert not (out / "model.safetensors").exists()


# -- real photos -----------------------------------------------------------------------


def photo_variants(folder):
    """One photo as every kind of file people hand over."""
    source = Image.open(sorted(SHARED_PHOTOS.glob("*.jpg"))[0]) if SHARED_PHOTOS.exists() else Image.new("RGB", (300, 200), "red")
    source = source.convert("RGB").resize((120, 90))
    folder.mkdir()
    source.save(folder / "a.jpg")
    source.save(folder / "b.webp")
    source.convert("L").save(folder / "c_gray.png")
    source.convert("RGBA").save(folder / "d_rgba.png")
    source.convert("P").save(folder / "e_palette.png")
    source.convert("CMYK").save(folder / "f_cmyk.jpg")
    exif = Image.Exif()
    exif[274] = 6  # rotated 90 degrees: the stored pixels are sideways
    source.save(folder / "g_exif.jpg", exif=exif)
    source.resize((37, 211)).save(folder / "h_tall.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.jpg").write_bytes((folder / "a.jpg").read_bytes()[:200])
    return folder


def test_real_photos_every_mode_and_size(tmp_path):
    with pytest.warns(UserWarning, match=r"Skipped 2 file\(s\).*notes.txt.*truncated.jpg"):
        loaded = load_image_folder(str(photo_variants(tmp_path / "photos")), "--train_data_dir")
    names = [item.path.name for item in loaded]
    assert names == ["a.jpg", "b.webp", "c_gray.png", "d_rgba.png", "e_palette.png", "f_cmyk.jpg", "g_exif.jpg", "h_tall.png"]
    assert all(item.image.mode == "RGB" for item in loaded)
    assert loaded[names.index("g_exif.jpg")].image.size == (90, 120)  # EXIF orientation applied


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "1", "CMYK", "F"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new("RGB", (8, 6), (200, 30, 30)).convert(mode)
    assert to_rgb(image).mode == "RGB" and to_rgb(image).size == (8, 6)


def test_trains_on_real_photos(ti_args, tmp_path):
    args = ti_args(steps=3)
    args[args.index("--train_data_dir") + 1] = str(photo_variants(tmp_path / "photos"))
    assert textual_inversion.main(args + ["--initializer_token", "dog"]) == 0
    assert (tmp_path / "out" / "learned_embeds.safetensors").exists()


def test_defaults_train_the_embedded_model_on_a_bundled_concept(tmp_path):
    """The README's main job, shortened: no model or data flags at all."""
    from diffusers import StableDiffusionPipeline

    from dvar.models import mini_sd

    out = tmp_path / "main"
    args = ["--output_dir", str(out), "--max_train_steps", "3", "--num_validation_images", "1", "--num_inference_steps", "2"]
    assert textual_inversion.main(args) == 0
    result = summary(out)
    assert result["final_step"] == 3 and result["outcome"] == "budget"
    pipe = StableDiffusionPipeline.from_pretrained(mini_sd(), safety_checker=None)
    pipe.load_textual_inversion(out)
    assert "<concept>" in pipe.tokenizer.get_added_vocab()


@pytest.mark.parametrize(
    "module, flags, preset, method_preset, signal",
    [
        ("textual_inversion", [], "default", "auto", "bands"),  # dvar's default per method
        ("dreambooth_lora", [], "default", "auto", "bands"),
        ("custom_diffusion", [], "default", "auto", "loss"),
        ("dreambooth", [], "default", "auto", "bands"),  # not benchmarked: the scale-free default
        ("dreambooth_lora", ["--early-stop-window", "300"], "dreambooth_lora", "dreambooth_lora", "loss"),
        ("custom_diffusion", ["--early-stop-threshold", "0.2"], "custom_diffusion", "custom_diffusion", "loss"),
        ("dreambooth_lora", ["--early-stop-preset", "auto"], "auto", "auto", "loss"),
        ("textual_inversion", ["--early-stop-signal", "loss"], "default", "auto", "loss"),
    ],
)
def test_the_trainers_rule_flags_resolve_to(module, flags, preset, method_preset, signal):
    """No rule flag: dvar's default for the method; a window or threshold alone: the paper preset it overrides."""
    from dvar.integrations.cli import build_parser, dvar_settings, resolve_defaults

    method = {m.name: m for m in (textual_inversion.TextualInversion, dreambooth.DreamBooth,
                                  dreambooth_lora.DreamBoothLoRA, custom_diffusion.CustomDiffusion)}[module]()
    args = build_parser(method).parse_args(["--early-stop", *flags])
    resolve_defaults(method, args)
    config = DVARConfig(**dvar_settings(args))
    assert (config.preset, config.rule_preset, config.signal) == (preset, method_preset, signal)


@pytest.mark.parametrize("environment, pinned", [
    ({}, True),  # glibc's dynamic thresholds pinned (docs/dreambooth-slowdown.md)
    ({"MALLOC_TRIM_THRESHOLD_": "1048576"}, False),  # the user's own setting wins
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}, False),
])
def test_malloc_thresholds_are_pinned_unless_the_user_set_them(monkeypatch, environment, pinned):
    from dvar.integrations.trainer import pin_malloc_thresholds

    if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        pytest.skip("glibc only")
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert pin_malloc_thresholds() is pinned

"""DreamBooth and DreamBooth-LoRA on the shared trainer, with a tiny random SD pipeline:
budget and early-stopped runs, outputs that plain diffusers loads (and that reproduce the
run's own samples), prior preservation with generated class images, checkpoints and resume,
bf16 mixed precision, and bad input refused before anything is written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dvar.integrations import dreambooth, dreambooth_lora
from dvar.integrations.data import ConceptDataset, PriorPreservationDataset

INSTANCE_PROMPT = "a photo of sks circle"  # the default for the bundled concept (class word "circle")
EARLY = ["--early-stop", "--early-stop-window", "5", "--early-stop-threshold", "0.3"]  # stops at ~8-10 of 30
LEARNING_RATE = {dreambooth: "1e-4", dreambooth_lora: "1e-3"}  # the mini-SD defaults: visible changes in a few steps
LORA = "pytorch_lora_weights.safetensors"
EMBEDS = "learned_embeds.safetensors"


@pytest.fixture
def cli(tiny_pipeline_dir, concept_dir, tmp_path):
    def make(*extra, out="out", steps=12):
        return [
            "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--instance_data_dir", str(concept_dir),
            "--output_dir", str(tmp_path / out), "--max_train_steps", str(steps), "--num_validation_images", "1",
            "--num_inference_steps", "2", "--checkpointing_steps", "1000", *extra,
        ]
    return make


def summary(out):
    return json.loads((Path(out) / "dvar_summary.json").read_text())


# -- what plain diffusers sees -------------------------------------------------------------


def load_plain(module, out, base_dir, token):
    """The trained model the way a user loads it: diffusers calls only."""
    from diffusers import StableDiffusionPipeline

    if module is dreambooth:
        return StableDiffusionPipeline.from_pretrained(out)
    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    if token:
        pipe.load_textual_inversion(out)
    pipe.load_lora_weights(out)
    return pipe


def unet_output(pipe):
    config = pipe.unet.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    hidden = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), hidden).sample


def text_output(pipe, prompt):
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def sample(pipe, prompt):
    """What the trainer's validation does (DPMSolver, seed 0, 2 steps, 16 px)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe([prompt], num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0), height=16, width=16)
    return np.asarray(image.images[0], dtype=np.int16)


# -- runs as a specification table ---------------------------------------------------------

TOKEN = ["--placeholder_token", "<thing>"]

RUNS = [
    # id, module, extra flags, early stop, saved files, text encoder trained, new token, prompt
    ("dreambooth-budget-text-encoder", dreambooth, ["--train_text_encoder", "--gradient_checkpointing"], False,
     ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"], True, None,
     INSTANCE_PROMPT),
    ("dreambooth-early-stop", dreambooth, [], True,
     ["model_index.json", "unet/diffusion_pytorch_model.safetensors"], False, None, INSTANCE_PROMPT),
    ("lora-budget", dreambooth_lora, ["--gradient_checkpointing"], False, [LORA], False, None, INSTANCE_PROMPT),
    ("lora-early-stop-token-text-encoder", dreambooth_lora, [*TOKEN, "--train_text_encoder", "--gradient_checkpointing"], True,
     [LORA, EMBEDS],
     True, "<thing>", "a photo of <thing>"),
]


@pytest.mark.parametrize("name, module, extra, early, files, text_encoder, token, prompt", RUNS, ids=[r[0] for r in RUNS])
def test_run_saves_what_plain_diffusers_loads(
    cli, tiny_pipeline_dir, tmp_path, name, module, extra, early, files, text_encoder, token, prompt
):
    from diffusers import StableDiffusionPipeline

    budget = 30 if early else 12
    rate = ["--learning_rate", LEARNING_RATE[module]]
    assert module.main(cli(*extra, *rate, *(EARLY if early else []), steps=budget)) == 0
    out = tmp_path / "out"
    result = summary(out)
    if early:
        assert result["outcome"] == "early_stop" and 6 <= result["stop_step"] < budget
        assert result["final_step"] == result["stop_step"] and result["reason"].startswith("plateau")
        history = np.genfromtxt(out / "dvar_history.csv", delimiter=",", names=True)
        assert len(history) == result["stop_step"] and np.ptp(history["eval_loss"]) > 0  # the frozen batch sees training
        assert (out / "dvar_history.png").exists()
    else:
        assert result["outcome"] == "budget" and result["final_step"] == budget and not result["early_stop"]
        assert not (out / "dvar_history.csv").exists()
    assert set(files) <= set(result["saved_files"]) and all((out / f).exists() for f in result["saved_files"])
    assert (out / "samples" / "prompt.txt").read_text().strip() == prompt

    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe = load_plain(module, out, tiny_pipeline_dir, token)
    assert not torch.allclose(unet_output(pipe), unet_output(base), atol=1e-6)
    assert torch.allclose(text_output(pipe, "a photo of a circle"), text_output(base, "a photo of a circle")) != text_encoder
    if module is dreambooth_lora:
        with safe_open(str(out / LORA), "pt") as handle:
            prefixes = {key.split(".")[0] for key in handle.keys()}
        assert prefixes == ({"unet", "text_encoder"} if text_encoder else {"unet"})
    if token:
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        learned = pipe.text_encoder.get_input_embeddings().weight[token_id]
        start = base.text_encoder.get_input_embeddings().weight[base.tokenizer("circle", add_special_tokens=False).input_ids[0]]
        assert torch.equal(learned, load_file(out / EMBEDS)[token][0]) and not torch.allclose(learned, start)
    # the loaded files reproduce the run's own validation sample: it used the trained weights, and nothing is missing
    own = np.asarray(Image.open(out / "samples" / "00.png"), dtype=np.int16)
    assert np.abs(sample(pipe, prompt) - own).max() <= 1
    assert np.abs(sample(base, prompt) - own).max() > 1


# -- prior preservation --------------------------------------------------------------------


def write_image(path, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)


PRIOR = [
    # id, class folder (None: the default <output_dir>/class_images), images already there, generated names
    ("explicit-folder-completed", "classes", ["mine.png"], ["00001-", "00002-"]),
    ("default-folder", None, [], ["00000-", "00001-", "00002-"]),
]


@pytest.mark.parametrize("name, folder, present, generated", PRIOR, ids=[p[0] for p in PRIOR])
def test_prior_preservation_generates_missing_class_images_and_trains(
    cli, tmp_path, monkeypatch, name, folder, present, generated
):
    class_dir = tmp_path / folder if folder else tmp_path / "out" / "class_images"
    for file in present:
        write_image(class_dir / file)
    datasets, batches = [], []  # what the method hands the trainer, and what its loss is called with
    build, loss = dreambooth.DreamBoothBase.build_datasets, dreambooth.diffusion_loss

    def spy_build(self, args, images, accelerator):
        datasets.append(build(self, args, images, accelerator))
        return datasets[-1]

    def spy_loss(batch, *args, **kwargs):
        batches.append((batch["prompt"], kwargs))
        return loss(batch, *args, **kwargs)

    monkeypatch.setattr(dreambooth.DreamBoothBase, "build_datasets", spy_build)
    monkeypatch.setattr(dreambooth, "diffusion_loss", spy_loss)

    flags = ["--with_prior_preservation", "--num_class_images", "3", "--prior_loss_weight", "0.5", *EARLY]
    flags += ["--class_data_dir", str(class_dir)] if folder else []
    assert dreambooth.main(cli(*flags, steps=30)) == 0
    assert summary(tmp_path / "out")["outcome"] == "early_stop"

    files = sorted(p.name for p in class_dir.iterdir())
    new = [f for f in files if f not in present]
    assert [f[:6] for f in new] == generated and all(f.endswith(".png") for f in new)
    assert all(Image.open(class_dir / f).size == (16, 16) for f in new)  # sampled by the base model
    train, frozen = datasets[0]
    assert isinstance(train, PriorPreservationDataset) and len(train) == 5  # max(5 photos, 3 class images)
    assert isinstance(frozen, ConceptDataset) and frozen.prompts == [INSTANCE_PROMPT]  # DVAR: instance examples only
    assert batches and all(p == [INSTANCE_PROMPT, "a photo of a circle"] for p, _ in batches)
    assert all(k == {"prior_loss_weight": 0.5} for _, k in batches)

    if folder is None:  # --overwrite_output_dir replaces the run, its class images included: same seed, same images
        assert dreambooth.main(cli(*flags, "--overwrite_output_dir", steps=30)) == 0
        assert sorted(p.name for p in class_dir.iterdir()) == files


# -- checkpoints ---------------------------------------------------------------------------


def dreambooth_checkpoint_loads(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")


def lora_checkpoint_loads(folder):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.lora_state_dict(str(folder))


CHECKPOINTS = [
    # id, module, flags, in checkpoint-4, final weight files, how diffusers reads a checkpoint (as its scripts')
    ("dreambooth", dreambooth, ["--train_text_encoder"], {"unet", "text_encoder"},
     ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"], dreambooth_checkpoint_loads),
    ("lora", dreambooth_lora, [*TOKEN, "--train_text_encoder"], {LORA, EMBEDS}, [LORA, EMBEDS], lora_checkpoint_loads),
]


@pytest.mark.parametrize("name, module, flags, saved, weights, loads", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_checkpoints_hold_the_trained_weights_and_resume_to_the_same_result(
    cli, tmp_path, name, module, flags, saved, weights, loads
):
    args = cli(*flags, "--checkpointing_steps", "4", steps=8)
    assert module.main(args) == 0
    out = tmp_path / "out"
    names = {p.name for p in (out / "checkpoint-4").iterdir()}
    assert saved <= names and not any(n.startswith("model") for n in names)  # not accelerate's model_N files
    loads(out / "checkpoint-4")
    uninterrupted = {(f, k): v for f in weights for k, v in load_file(out / f).items()}

    assert module.main([*args, "--resume_from_checkpoint", "checkpoint-4"]) == 0
    resumed = {(f, k): v for f in weights for k, v in load_file(out / f).items()}
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


# -- the frozen batch -----------------------------------------------------------------------


@pytest.mark.parametrize("asked, used", [(100, 5), (3, 3)])  # the bundled concept has 5 photos
def test_the_summary_records_the_frozen_batch_size_used(cli, tmp_path, caplog, asked, used):
    flags = ["--early-stop", "--early-stop-window", "2", "--early-stop-batch-size", str(asked), "--num_validation_images", "0"]
    with caplog.at_level("WARNING", logger="dvar.integrations"):
        assert dreambooth_lora.main(cli(*flags, steps=2)) == 0
    result = summary(tmp_path / "out")
    assert (result["early_stop_batch_size"], result["early_stop_batch_size_used"]) == (asked, used)
    cut = [r.getMessage() for r in caplog.records if "--early-stop-batch-size" in r.getMessage()]
    assert cut == ([f"warning: --early-stop-batch-size {asked} is more than the {used} instance examples: the frozen "
                    f"batch holds all {used} (dvar_summary.json: early_stop_batch_size_used)."] if used < asked else [])


@pytest.mark.parametrize("photos", [1, 2])
def test_the_default_rule_trains_on_one_or_two_photos(cli, concept_dir, tmp_path, photos):
    """Fewer photos than the default's three timestep bands: it watches one band per frozen example."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sorted(Path(concept_dir).glob("*.png"))[:photos]:
        shutil.copy(image, folder / image.name)
    args = cli("--early-stop", "--num_validation_images", "0", steps=4)
    args[args.index("--instance_data_dir") + 1] = str(folder)
    assert dreambooth_lora.main(args + ["--instance_prompt", "a photo of sks circle"]) == 0
    result = summary(tmp_path / "out")
    assert (result["default_rule"], result["signal"], result["early_stop_batch_size_used"]) == (True, "bands", photos)
    assert len(result["bands"]) == photos and result["outcome"] == "budget"


# -- mixed precision -----------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: start and leave this test clean."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


MIXED = [
    ("dreambooth-prior", dreambooth, ["--with_prior_preservation", "--num_class_images", "2"], "unet/diffusion_pytorch_model.safetensors"),
    ("lora-token-text-encoder", dreambooth_lora, [*TOKEN, "--train_text_encoder"], LORA),
]


@pytest.mark.parametrize("name, module, extra, weights", MIXED, ids=[m[0] for m in MIXED])
def test_bf16_mixed_precision_trains_samples_and_saves_fp32(cli, tmp_path, fresh_accelerate_state, name, module, extra, weights):
    assert module.main(cli("--mixed_precision", "bf16", *extra, steps=3)) == 0
    out = tmp_path / "out"
    assert summary(out)["outcome"] == "budget" and (out / "samples" / "00.png").exists()
    assert {tensor.dtype for tensor in load_file(out / weights).values()} == {torch.float32}


# -- bad input -----------------------------------------------------------------------------


def photos_without_metadata(tmp_path):
    folder = tmp_path / "my_photos"
    for i in range(2):
        write_image(folder / f"{i}.png")
    return str(folder)


BAD = [
    # id, module, flags, what the message must name
    ("token-already-a-word", dreambooth_lora, ["--placeholder_token", "sks"], "--placeholder_token 'sks'"),
    ("token-not-in-prompt", dreambooth_lora, [*TOKEN, "--instance_prompt", "a photo of sks circle"], "does not contain"),
    ("initializer-without-token", dreambooth_lora, ["--initializer_token", "dog"], "--initializer_token needs"),
    ("initializer-two-tokens", dreambooth_lora, [*TOKEN, "--initializer_token", "checkered circle"], "--initializer_token"),
    ("rank-zero", dreambooth_lora, ["--rank", "0"], "--rank"),
    ("no-instance-prompt-for-plain-photos", dreambooth, ["PHOTOS"], "--instance_prompt is required"),
    ("no-class-prompt-for-plain-photos", dreambooth,
     ["PHOTOS", "--instance_prompt", "a photo of sks dog", "--with_prior_preservation"], "--class_prompt"),
    ("class-folder-is-the-photos", dreambooth, ["--with_prior_preservation", "--class_data_dir", "CONCEPT"],
     "--class_data_dir is --instance_data_dir"),
    ("no-class-images", dreambooth, ["--with_prior_preservation", "--num_class_images", "0"], "--num_class_images"),
    # three timestep bands named, for two frozen examples: asked for, or all the photos there are (known only once
    # the data is read, after the model loads)
    ("bands-for-two-frozen-examples", dreambooth_lora,
     ["--early-stop", "--early-stop-preset", "auto", "--early-stop-signal", "bands", "--early-stop-batch-size", "2"],
     "--early-stop-preset auto: bands must be an integer from 1 to eval_batch_size (2)"),
    ("bands-for-two-photos", dreambooth_lora,
     ["PHOTOS", "--instance_prompt", "a photo of sks dog", "--early-stop", "--early-stop-preset", "auto",
      "--early-stop-signal", "bands"], "--early-stop: signal='bands' needs a finite timestep for each of at least 3"),
]


@pytest.mark.parametrize("name, module, flags, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_naming_the_flag_and_writes_nothing(cli, concept_dir, tmp_path, capsys, name, module, flags, message):
    args = cli(*flags)
    if "PHOTOS" in args:
        i = args.index("PHOTOS")
        args[i: i + 1] = []
        args[args.index("--instance_data_dir") + 1] = photos_without_metadata(tmp_path)
    args = [str(concept_dir) if a == "CONCEPT" else a for a in args]
    assert module.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

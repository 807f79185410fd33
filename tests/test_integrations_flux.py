"""DreamBooth-LoRA on a Flux model (a FluxPipeline folder), as diffusers' train_dreambooth_lora_flux.py
trains it, with DVAR early stopping: a LoRA that plain diffusers loads, DVAR scoring the loss the trainer
trains on, bit-exact resume, the same stop for the same seed, prior preservation, bf16, and the other
methods refusing Flux. Tiny random Flux pipelines (16x16 images), a few steps per run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dvar.callback import eval_mode
from dvar.integrations import custom_diffusion, dreambooth, dreambooth_lora, flux, textual_inversion, trainer
from dvar.integrations.trainer import TrainingObserver
from dvar.objectives import deterministic_loss

LORA = "pytorch_lora_weights.safetensors"
INSTANCE_PROMPT = "a photo of sks circle"  # the default for the bundled concept (class word "circle")
EARLY = ["--early-stop", "--early-stop-window", "3", "--early-stop-threshold", "0.5", "--early-stop-eval-every", "1"]


@pytest.fixture
def models(tiny_flux_pipeline_dir, unguided_flux_pipeline_dir):
    return {"guided": tiny_flux_pipeline_dir, "unguided": unguided_flux_pipeline_dir}


@pytest.fixture
def cli(models, concept_dir, tmp_path):
    def make(*extra, model="guided", out="out", steps=8, data="--instance_data_dir", lora=True):
        return [
            "--pretrained_model_name_or_path", str(models.get(model, model)), data, str(concept_dir),
            "--output_dir", str(tmp_path / out), "--max_train_steps", str(steps), "--resolution", "16",
            *(["--max_sequence_length", "16"] if lora else []), "--learning_rate", "1e-3", "--num_validation_images",
            "1", "--num_inference_steps", "2", "--checkpointing_steps", "1000", *extra,
        ]
    return make


def summary(out):
    return json.loads((Path(out) / "dvar_summary.json").read_text())


def transformer_output(pipe):
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, config.in_channels, generator=generator)  # 4x4 packed latents of a 16x16 image
    hidden = torch.randn(1, 8, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return pipe.transformer(
            hidden_states=latents, timestep=torch.tensor([0.5]), pooled_projections=pooled, encoder_hidden_states=hidden,
            txt_ids=torch.zeros(8, 3), img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
            guidance=torch.tensor([3.5]) if config.guidance_embeds else None, return_dict=False,
        )[0]


def sample(pipe, prompt, guided):
    """What the trainer's validation does: the pipeline's scheduler, seed 0, 2 steps, 16 px, 16 T5 tokens, and
    true classifier-free guidance for a transformer without a guidance embedding."""
    pipe.set_progress_bar_config(disable=True)
    cfg = {} if guided else {"negative_prompt": [""], "true_cfg_scale": 4.0}
    image = pipe([prompt], num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0), height=16, width=16,
                 max_sequence_length=16, **cfg)
    return np.asarray(image.images[0], dtype=np.int16)


# -- a run ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["guided", "unguided"])
def test_an_early_stopped_run_saves_a_transformer_lora_that_plain_diffusers_loads(cli, models, tmp_path, model):
    from diffusers import FluxPipeline

    assert dreambooth_lora.main(cli(*EARLY, model=model, steps=12)) == 0
    out = tmp_path / "out"
    result = summary(out)
    assert result["outcome"] == "early_stop" and 4 <= result["stop_step"] < 12
    assert result["saved_files"] == [LORA] and (out / "dvar_history.csv").exists()
    with safe_open(str(out / LORA), "pt") as handle:
        keys = list(handle.keys())
    assert {key.split(".")[0] for key in keys} == {"transformer"}
    trained = {t for t in flux.TRANSFORMER_TARGETS if any(f".{t}.lora_A." in key for key in keys)}
    assert trained == set(flux.TRANSFORMER_TARGETS)  # the script's default targets: attention and feed-forward

    base = FluxPipeline.from_pretrained(models[model])
    pipe = FluxPipeline.from_pretrained(models[model])
    pipe.load_lora_weights(out)
    assert not torch.allclose(transformer_output(pipe), transformer_output(base), atol=1e-6)
    # the loaded file reproduces the run's own sample: it used the trained transformer, with these settings
    own = np.asarray(Image.open(out / "samples" / "00.png"), dtype=np.int16)
    assert np.abs(sample(pipe, INSTANCE_PROMPT, model == "guided") - own).max() <= 1
    assert (out / "samples" / "prompt.txt").read_text().strip() == INSTANCE_PROMPT


def test_the_same_seed_stops_at_the_same_step(cli, tmp_path):
    runs = []
    for out in ("first", "second"):
        assert dreambooth_lora.main(cli(*EARLY, "--num_validation_images", "0", out=out, steps=12)) == 0
        runs.append((summary(tmp_path / out)["stop_step"], (tmp_path / out / "dvar_history.csv").read_text()))
    assert runs[0][0] is not None and runs[0] == runs[1]


# -- DVAR scores the trainer's own loss ------------------------------------------------------


class FrozenBatchLosses(TrainingObserver):
    """Before the first step: DVAR's frozen-batch loss, the trainer's loss lines (flux.flow_matching_loss, which
    its training loss calls) on the same latents, noise and timesteps, and dvar.objectives.deterministic_loss."""

    class Done(Exception):
        pass

    def on_train_begin(self, trainer):
        parts, args, frozen = trainer.parts, trainer.args, trainer.stopper.eval_batch.frozen
        models = {"transformer": parts.unet, "text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2}
        settings = dict(weighting_scheme=args.weighting_scheme, max_sequence_length=args.max_sequence_length)
        with torch.no_grad(), eval_mode(models.values()):
            own = flux.flow_matching_loss(
                parts, frozen.latents, frozen.noise, frozen.timesteps, frozen.sigmas, frozen.captions, args
            )
            plain = deterministic_loss(models, frozen, parts.noise_scheduler, parts.tokenizer, parts.tokenizer_2,
                                       guidance_scale=args.guidance_scale, **settings)
            other_guidance = deterministic_loss(models, frozen, parts.noise_scheduler, parts.tokenizer, parts.tokenizer_2,
                                                guidance_scale=3.5, **settings)
        self.losses = (trainer.stopper.evaluate(), own.item(), plain.item(), other_guidance.item())
        raise self.Done


@pytest.mark.parametrize("scheme, model", [("none", "guided"), ("sigma_sqrt", "guided"), ("logit_normal", "unguided")])
def test_dvar_scores_the_loss_the_trainer_trains_on(cli, scheme, model):
    observer = FrozenBatchLosses()
    flags = [*EARLY, "--weighting_scheme", scheme, "--guidance_scale", "1.5", "--early-stop-batch-size", "3"]
    with pytest.raises(FrozenBatchLosses.Done):
        trainer.main(dreambooth_lora.DreamBoothLoRA(), cli(*flags, model=model), callbacks=[observer])
    dvar, own, plain, other_guidance = observer.losses
    assert dvar == pytest.approx(own, rel=1e-6) and dvar == pytest.approx(plain, rel=1e-6)
    assert (other_guidance == pytest.approx(dvar, rel=1e-6)) == (model == "unguided")  # --guidance_scale reaches DVAR


# -- checkpoints and resume ------------------------------------------------------------------


def test_resume_from_latest_ends_bit_identical_to_an_uninterrupted_run(cli, tmp_path, ctrl_c_after_step):
    flags = [*EARLY, "--train_text_encoder", "--checkpointing_steps", "2", "--num_validation_images", "0"]
    assert dreambooth_lora.main(cli(*flags, out="full", steps=12)) == 0
    full = summary(tmp_path / "full")
    assert full["outcome"] == "early_stop" and full["stop_step"] >= 4

    ctrl_c_after_step(dreambooth_lora.DreamBoothLoRA, full["stop_step"] - 1)
    assert dreambooth_lora.main(cli(*flags, out="resumed", steps=12)) == 130
    latest = max((tmp_path / "resumed").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    names = {p.name for p in latest.iterdir()}
    assert LORA in names and not any(n.startswith("model") for n in names)  # the adapters, not the transformer

    assert dreambooth_lora.main(cli(*flags, "--resume_from_checkpoint", "latest", out="resumed", steps=12)) == 0
    resumed = summary(tmp_path / "resumed")
    assert resumed["resumed_from_step"] == int(latest.name.split("-")[1]) and resumed["stop_step"] == full["stop_step"]
    assert (tmp_path / "resumed" / "dvar_history.csv").read_text() == (tmp_path / "full" / "dvar_history.csv").read_text()
    weights, expected = load_file(tmp_path / "resumed" / LORA), load_file(tmp_path / "full" / LORA)
    assert {key.split(".")[0] for key in expected} == {"transformer", "text_encoder"}
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def test_learned_state_round_trips_the_adapters(cli):
    """What the benchmark snapshots along a run: the LoRA weights of the transformer, put back exactly."""
    class Snapshot(TrainingObserver):
        def on_step_end(self, trainer, global_step, loss):
            method, parts, accelerator = trainer.method, trainer.parts, trainer.accelerator
            if global_step == 1:
                self.first = method.learned_state(parts, accelerator)
            elif global_step == 3:
                self.third = method.learned_state(parts, accelerator)
                method.load_learned_state(self.first, parts, accelerator)
                self.restored = method.learned_state(parts, accelerator)

    observer = Snapshot()
    assert trainer.main(dreambooth_lora.DreamBoothLoRA(), cli("--num_validation_images", "0", steps=3),
                        callbacks=[observer]) == 0
    first, third, restored = observer.first, observer.third, observer.restored
    assert first and all(key.startswith("transformer.") and "lora_" in key for key in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)
    assert restored.keys() == first.keys() and all(torch.equal(restored[k], first[k]) for k in first)


# -- prior preservation and mixed precision --------------------------------------------------


def test_prior_preservation_samples_class_images_with_flux_and_adds_their_loss(cli, tmp_path, monkeypatch):
    calls = []
    original = dreambooth_lora.flux_loss

    def spy(batch, parts, weight_dtype, args, **kwargs):
        calls.append((batch["prompt"], kwargs["prior_loss_weight"]))
        return original(batch, parts, weight_dtype, args, **kwargs)

    monkeypatch.setattr(dreambooth_lora, "flux_loss", spy)
    flags = ["--with_prior_preservation", "--num_class_images", "2", "--prior_loss_weight", "0.5"]
    assert dreambooth_lora.main(cli(*flags, "--num_validation_images", "0", model="unguided", steps=2)) == 0
    class_images = sorted((tmp_path / "out" / "class_images").glob("*.png"))
    assert len(class_images) == 2 and all(Image.open(p).size == (16, 16) for p in class_images)
    assert calls == [([INSTANCE_PROMPT, "a photo of a circle"], 0.5)] * 2


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


def test_bf16_trains_a_bf16_transformer_and_saves_fp32_adapters(cli, tmp_path, fresh_accelerate_state):
    class Dtypes(TrainingObserver):
        def on_train_begin(self, trainer):
            params = list(trainer.parts.unet.parameters())
            self.frozen = {p.dtype for p in params if not p.requires_grad}
            self.trained = {p.dtype for p in params if p.requires_grad}

    observer = Dtypes()
    args = cli("--mixed_precision", "bf16", "--train_text_encoder", steps=2)
    assert trainer.main(dreambooth_lora.DreamBoothLoRA(), args, callbacks=[observer]) == 0
    assert (observer.frozen, observer.trained) == ({torch.bfloat16}, {torch.float32})
    out = tmp_path / "out"
    assert summary(out)["outcome"] == "budget" and (out / "samples" / "00.png").exists()
    assert {tensor.dtype for tensor in load_file(out / LORA).values()} == {torch.float32}


# -- bad input -------------------------------------------------------------------------------


OTHER_METHODS = [
    (textual_inversion, "Textual Inversion", "--train_data_dir"),
    (dreambooth, "DreamBooth", "--instance_data_dir"),
    (custom_diffusion, "Custom Diffusion", "--instance_data_dir"),
]


@pytest.mark.parametrize("module, title, data", OTHER_METHODS, ids=[m[0].__name__.split(".")[-1] for m in OTHER_METHODS])
def test_the_other_methods_refuse_flux_before_loading_it(cli, tmp_path, capsys, monkeypatch, module, title, data):
    monkeypatch.setattr(trainer, "load_components", lambda path: pytest.fail("the model was loaded"))
    assert module.main(cli(data=data, lora=False)) == 2
    err = capsys.readouterr().err
    assert f"error: {title} does not train Flux models" in err and "FluxPipeline" in err
    assert "DreamBooth-LoRA (integrations/dreambooth_lora.py) supports Flux" in err
    assert not (tmp_path / "out").exists()


BAD = [
    # id, flags, model, what the message must name
    ("placeholder-token", ["--placeholder_token", "<thing>"], "guided", "--placeholder_token is not supported with a Flux"),
    ("resolution-not-packable", ["--resolution", "18"], "guided", "--resolution 18: this Flux model needs a multiple of 4"),
    ("too-many-t5-tokens", ["--max_sequence_length", "513"], "guided", "--max_sequence_length must be between 1 and 512"),
    ("weighting-scheme-on-sd", ["--weighting_scheme", "logit_normal"], "sd", "--weighting_scheme logit_normal is for Flux"),
]


@pytest.mark.parametrize("name, flags, model, message", BAD, ids=[b[0] for b in BAD])
def test_bad_flux_settings_exit_2_naming_the_flag_and_write_nothing(
    cli, tiny_pipeline_dir, tmp_path, capsys, name, flags, model, message
):
    args = cli(*flags, model=str(tiny_pipeline_dir) if model == "sd" else model)
    assert dreambooth_lora.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""mini-flow, the bundled Flux-format model: its folder loads offline with the stock diffusers API
(weights read once per module), samples what the prompt asks for, and its pretraining script
resumes an interrupted run to the very same weights (at toy size)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dvar.models
import dvar_lab.models
from benchmarks.embedded import pretrain_mini_flow
from dvar_lab.models import MINI_FLOW_MAX_SEQUENCE_LENGTH, load_mini_flow_pipeline, mini_flow
from dvar_lab.world import AttributeClassifier, sample_scenes

BUNDLED = Path(dvar_lab.models.__file__).resolve().parent / "assets" / "mini-flow"
MAX_BYTES = 50_000_000
WEIGHTS = {
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


@pytest.fixture(scope="module")
def root() -> Path:
    if not BUNDLED.exists():  # only a missing folder skips; an incomplete one fails in mini_flow()
        pytest.skip(f"the mini-flow weights are not built in this checkout ({BUNDLED} is absent); build them "
                    "with `python benchmarks/embedded/pretrain_mini_flow.py` (see benchmarks/embedded/MINI_FLOW.md)")
    return mini_flow()


@pytest.fixture(scope="module")
def pipe(root):
    """The shipped weights, read once for the whole module."""
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(root, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def sample(pipe, prompts, steps=20, cfg=5.0, seed=0, **kwargs) -> np.ndarray:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=cfg, height=64, width=64,
                num_inference_steps=steps, generator=gens, output_type="np", **kwargs).images


def test_folder_layout_and_size(root):
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert {k: v[1] for k, v in index.items() if not k.startswith("_")} == {
        "transformer": "FluxTransformer2DModel", "scheduler": "FlowMatchEulerDiscreteScheduler",
        "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5TokenizerFast",  # a name transformers 4 and 5 load
    }
    weights = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors"))
    assert weights == sorted(WEIGHTS.values())
    assert all(v.dtype == torch.float16 for file in weights for v in load_file(root / file).values())
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "samples.png")
    assert total <= MAX_BYTES, total
    assert_t5_tokenizer_config_loads_in_transformers_4(root)


def assert_t5_tokenizer_config_loads_in_transformers_4(root: Path) -> None:
    """transformers 4 reads the fast class by this name, and fails on an empty "extra_special_tokens" list
    (transformers 5 writes one)."""
    config = json.loads((root / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5TokenizerFast" and config.get("extra_special_tokens", {"": ""}), config


def test_training_finished_and_recorded_its_cost(root, pipe):
    info = json.loads((root / "training_info.json").read_text())
    assert info["complete"] and info["steps_done"] == int(info["args"]["steps"])
    assert info["flow_cpu_s_all_invocations"] > 0 and info["flow_train_s_all_invocations"] > 0
    assert info["shift_factor"] == pipe.vae.config.shift_factor
    assert info["scaling_factor"] == pipe.vae.config.scaling_factor
    losses = [h["val_loss"] for h in info["history"]]
    assert losses[-1] < 0.8 * losses[0]  # held-out flow loss went down


def test_components_fit_together(pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    config = pipe.transformer.config
    assert config.in_channels == 4 * pipe.vae.config.latent_channels  # 2x2 packed latents
    assert config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert config.guidance_embeds is False  # true CFG, not guidance-distilled
    assert pipe.vae.config.shift_factor is not None and 0.05 < pipe.vae.config.scaling_factor < 5
    assert pipe.vae_scale_factor * 16 == 64
    for model in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert model.dtype == torch.float32  # the fp16 files load as float32 by default


@pytest.mark.parametrize("part", sorted(WEIGHTS))
def test_every_weight_comes_from_the_files(root, pipe, part):
    """The pipeline loader only warns about weights it leaves random: compare with the files."""
    model = getattr(pipe, part)
    file = {k.removeprefix("text_model.") if part == "text_encoder" else k: v
            for k, v in load_file(root / WEIGHTS[part]).items()}
    state = {k.removeprefix("text_model.") if part == "text_encoder" else k: v for k, v in model.state_dict().items()}
    if part == "text_encoder_2":  # T5 ties its embedding to shared.weight
        assert torch.equal(state.pop("encoder.embed_tokens.weight"), state["shared.weight"])
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert file.keys() == state.keys()
    assert all(torch.equal(state[k].half(), file[k]) for k in file)


@pytest.mark.parametrize("prompt, pieces", [
    ("a large red solid star in the center, on a gray background",
     ["▁a", "▁large", "▁red", "▁solid", "▁star", "▁in", "▁the", "▁center", ",", "▁on", "▁a", "▁gray",
      "▁background", "</s>"]),
    ("a photo of sks heart", ["▁a", "▁photo", "▁of", "▁sks", "▁heart", "</s>"]),
    ("Zoë", ["▁", "Z", "o", "<unk>", "</s>"]),  # unknown words fall back to characters
])
def test_t5_tokenizer_has_a_piece_per_world_word(pipe, prompt, pieces):
    ids = pipe.tokenizer_2(prompt).input_ids
    assert pipe.tokenizer_2.convert_ids_to_tokens(ids) == pieces
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer_2.eos_token_id == 1
    assert pipe.tokenizer("sks", add_special_tokens=False).input_ids == [48136]  # mini-SD's CLIP tokenizer


def test_samples_follow_the_prompt(pipe):
    """8 unseen scenes read back by the attribute classifier: shape and colour well above chance
    (12.5%), which random or untrained weights never reach."""
    from dvar_lab.world.scenes import FULL_TEMPLATES

    scenes = sample_scenes(8, seed=777)
    prompts = [s.caption(FULL_TEMPLATES[i % len(FULL_TEMPLATES)]) for i, s in enumerate(scenes)]
    images = sample(pipe, prompts, max_sequence_length=MINI_FLOW_MAX_SEQUENCE_LENGTH)
    scores = AttributeClassifier.load().caption_agreement(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1, scenes)
    assert scores["shape"] >= 5 / 8 and scores["color"] >= 4 / 8, scores


def test_loader_defaults_to_64_pixels_and_the_pipeline_default_length(pipe):
    loaded = load_mini_flow_pipeline(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                     text_encoder_2=pipe.text_encoder_2)  # no second read of the weights
    image = loaded("a large blue solid square in the center, on a beige background", negative_prompt="",
                   true_cfg_scale=5.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="np").images[0]  # max_sequence_length: FluxPipeline's 512
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.05


def test_the_lora_trainer_stops_early_on_mini_flow_and_diffusers_loads_its_lora(root, pipe, tmp_path, monkeypatch):
    """The DreamBooth-LoRA trainer on the shipped weights (64x64 and 32 T5 tokens by default for mini-flow): the
    settling-time rule stops it before its budget, it exits 0, and the module's pipeline loads the LoRA. The
    trainer gets copies of the module pipeline's models instead of reading the weights a second time."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    import dvar.integrations.flux
    from dvar.integrations import dreambooth_lora
    from dvar.integrations.method import Components
    from dvar_lab.world import list_concepts

    loads = []

    def from_the_module_pipeline(path):
        loads.append(path)
        return Components(
            tokenizer=pipe.tokenizer, text_encoder=copy.deepcopy(pipe.text_encoder), vae=copy.deepcopy(pipe.vae),
            unet=copy.deepcopy(pipe.transformer), model_path=path, family="flux",
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
            text_encoder_2=copy.deepcopy(pipe.text_encoder_2), tokenizer_2=pipe.tokenizer_2)

    monkeypatch.setattr(dvar.integrations.flux, "load_flux_components", from_the_module_pipeline)

    concept, out = list_concepts("dreambooth")[0], tmp_path / "lora"
    code = dreambooth_lora.main([
        "--pretrained_model_name_or_path", str(root), "--instance_data_dir", str(concept.path),
        "--instance_prompt", f"a photo of sks {concept.class_word}", "--output_dir", str(out),
        "--max_train_steps", "80", "--early-stop", "--early-stop-preset", "auto", "--num_validation_images", "0",
        "--checkpointing_steps", "1000",
    ])
    result = json.loads((out / "dvar_summary.json").read_text())
    assert loads == [str(root)]  # the trainer loaded its models once, from the module's pipeline
    assert code == 0 and result["outcome"] == "early_stop" and result["stop_step"] < 80, result
    assert result["reason"].startswith("settled")
    prompt = f"a photo of sks {concept.class_word}"
    before = sample(pipe, [prompt], steps=4, max_sequence_length=MINI_FLOW_MAX_SEQUENCE_LENGTH)
    pipe.load_lora_weights(out)
    try:
        after = sample(pipe, [prompt], steps=4, max_sequence_length=MINI_FLOW_MAX_SEQUENCE_LENGTH)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(after - before).max() > 1e-3  # the LoRA changes what the prompt draws


@pytest.mark.parametrize("mini_flow_fn", [dvar.models.mini_flow, dvar_lab.models.mini_flow])
def test_an_incomplete_folder_names_what_is_missing_and_the_fix(tmp_path, monkeypatch, mini_flow_fn):
    (tmp_path / "assets" / "mini-flow" / "transformer").mkdir(parents=True)
    monkeypatch.setattr(dvar_lab.models, "__file__", str(tmp_path / "models.py"))
    with pytest.raises(FileNotFoundError, match=r"missing: model_index.json, vae.*pretrain_mini_flow.py"):
        mini_flow_fn()


# --------------------------------------------------------------------------- the pretraining script

TOY = ["--n-images", "40", "--n-val", "8", "--steps", "4", "--batch", "4", "--long-every", "3", "--long-batch", "2",
       "--val-every", "2", "--warmup", "2", "--threads", "1", "--ckpt-minutes", "0"]


def pretrain(tmp_path: Path, name: str, *extra: str) -> Path:
    threads = torch.get_num_threads()  # the script sets its own; the rest of the suite keeps ours
    try:
        pretrain_mini_flow.main(["--work", str(tmp_path / f"{name}-work"), "--out", str(tmp_path / name), *TOY, *extra])
    finally:
        torch.set_num_threads(threads)
    return tmp_path / name


def test_pretraining_resumes_to_the_same_weights_and_exports_a_flux_folder(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    uninterrupted = pretrain(tmp_path, "uninterrupted")
    save = pretrain_mini_flow.StageCheckpoint.save

    def save_then_crash(self, state, force=False):
        save(self, state, force)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_mini_flow.StageCheckpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path, "resumed")
    assert not (tmp_path / "resumed").exists()  # nothing exported half-way
    monkeypatch.undo()
    resumed = pretrain(tmp_path, "resumed")
    for file in WEIGHTS.values():
        a, b = load_file(uninterrupted / file), load_file(resumed / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    info = json.loads((resumed / "training_info.json").read_text())
    assert info["complete"] and info["steps_done"] == 4 and len(info["history"]) == 2
    assert_t5_tokenizer_config_loads_in_transformers_4(resumed)
    pipe = FluxPipeline.from_pretrained(resumed, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("extra, message", [
    (["--export-only"], "no checkpoint"),
    (["--n-val", "40"], "leaves no training images"),
])
def test_pretraining_rejects_bad_input_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        pretrain(tmp_path, "bad", *extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad-work").exists()


@pytest.mark.parametrize("extra", [["--export-only"], ["--max-minutes", "5"]])
def test_an_unfinished_model_never_goes_to_the_bundled_folder(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exit_info:
        pretrain_mini_flow.main(["--work", str(tmp_path / "work"), "--out", str(BUNDLED), *extra])
    assert exit_info.value.code == 2 and "unfinished" in capsys.readouterr().err


def test_an_extended_run_is_one_command(tmp_path):
    """Training to 2 steps and rerunning with --steps 4 (a warm restart) gives the weights that one run with
    --steps 4 --extended-from 2 gives: the recipe of the bundled weights is a single command."""
    pretrain(tmp_path, "extended", "--steps", "2")
    two_then_four = pretrain(tmp_path, "extended", "--steps", "4")
    at_once = pretrain(tmp_path, "at-once", "--steps", "4", "--extended-from", "2")
    plain = pretrain(tmp_path, "plain", "--steps", "4")
    for file in WEIGHTS.values():
        a, b = load_file(two_then_four / file), load_file(at_once / file)
        assert all(torch.equal(a[k], b[k]) for k in a), file
    a, c = load_file(two_then_four / WEIGHTS["transformer"]), load_file(plain / WEIGHTS["transformer"])
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the schedule matters: a plain 4-step cosine differs

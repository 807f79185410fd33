"""Custom Diffusion trainer (integrations/custom_diffusion.py): what it trains, saves and refuses.

Runs in-process on the tiny random SD pipeline (16x16 images), a dozen steps each.
"""

import csv
import json
import shutil

import pytest
import torch

from dvar.integrations.custom_diffusion import CustomDiffusion, WEIGHT_NAME, custom_diffusion_processors, load_custom_diffusion, main

TINY = ["--max_train_steps", "12", "--num_validation_images", "1", "--num_inference_steps", "2"]
# On the tiny model the frozen-batch loss falls almost linearly over 12 steps, so
# var(last 5)/var(all) follows 24/(n^2-1): 0.69, 0.50, 0.38 at steps 6, 7, 8 -> stops at 8.
EARLY = ["--early-stop", "--early-stop-window", "5", "--early-stop-threshold", "0.45"]
PROMPT = "a photo of a <new1> circle"  # the default instance prompt for the bundled circle concept


def run(tmp_path, name, pipeline_dir, concept, *flags):
    out = tmp_path / name
    code = main([
        "--pretrained_model_name_or_path", str(pipeline_dir), "--instance_data_dir", str(concept),
        "--output_dir", str(out), *TINY, *flags,
    ])
    return code, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir, concept_dir):
    """One early-stopped run with a learning rate large enough to move the weights visibly."""
    code, out = run(tmp_path_factory.mktemp("cd"), "early", tiny_pipeline_dir, concept_dir, *EARLY, "--learning_rate", "1e-3")
    assert code == 0
    return out


def fresh_pipeline(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


# -- runs ---------------------------------------------------------------------------------


def test_without_early_stop_it_runs_to_the_budget(tmp_path, tiny_pipeline_dir, concept_dir):
    code, out = run(tmp_path, "budget", tiny_pipeline_dir, concept_dir)
    assert code == 0
    summary = json.loads((out / "dvar_summary.json").read_text())
    assert (summary["outcome"], summary["final_step"], summary["early_stop"]) == ("budget", 12, False)
    assert summary["saved_files"] == [WEIGHT_NAME, "<new1>.safetensors"]
    assert not (out / "dvar_history.csv").exists()
    assert (out / "samples" / "00.png").is_file()
    assert (out / "samples" / "prompt.txt").read_text().strip() == PROMPT


def test_with_early_stop_it_stops_and_reports(trained):
    summary = json.loads((trained / "dvar_summary.json").read_text())
    expected = {"outcome": "early_stop", "stopped_early": True, "final_step": 8, "stop_step": 8, "window": 5,
                "threshold": 0.45, "max_train_steps": 12, "steps_saved": 4}
    assert {k: summary[k] for k in expected} == expected
    assert summary["reason"].startswith("plateau: var(last 5)")
    with open(trained / "dvar_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert float(rows[-1]["statistic"]) < 0.45 <= float(rows[-2]["statistic"])
    assert (trained / "dvar_history.png").stat().st_size > 1000
    assert (trained / "samples" / "00.png").is_file()
    assert {p.name for p in trained.iterdir()} >= {WEIGHT_NAME, "<new1>.safetensors"}


def test_prior_preservation_generates_class_images_and_trains(tmp_path, tiny_pipeline_dir, concept_dir):
    classes = tmp_path / "classes"
    code, out = run(
        tmp_path, "prior", tiny_pipeline_dir, concept_dir, "--max_train_steps", "3", "--with_prior_preservation",
        "--class_data_dir", str(classes), "--num_class_images", "2", "--class_prompt", "a photo of a circle",
    )
    assert code == 0
    assert len(list(classes.glob("*.png"))) == 2
    summary = json.loads((out / "dvar_summary.json").read_text())
    assert (summary["outcome"], summary["final_step"]) == ("budget", 3)


# -- what is trained ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "freeze_model, trained_cross, trained_self",
    [
        ("crossattn_kv", {"to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight"}, set()),
        ("crossattn", {"to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight", "to_q_custom_diffusion.weight",
                       "to_out_custom_diffusion.0.weight", "to_out_custom_diffusion.0.bias"}, set()),
    ],
)
def test_processors_copy_each_cross_attention_layer(sd_parts, freeze_model, trained_cross, trained_self):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    unet = sd_parts["unet"]
    processors = custom_diffusion_processors(unet, train_q_out=freeze_model == "crossattn")
    assert set(processors) == set(unet.attn_processors)
    assert all(isinstance(p, CustomDiffusionAttnProcessor2_0) for p in processors.values())
    for name, processor in processors.items():
        attn = unet.get_submodule(name[: -len(".processor")])
        expected = trained_cross if attn.is_cross_attention else trained_self
        assert set(processor.state_dict()) == expected, name
        for key, value in processor.state_dict().items():  # initialised from the layer's own weights
            source = {"to_k": attn.to_k, "to_v": attn.to_v, "to_q": attn.to_q, "to_out": attn.to_out[0]}[key.split("_custom")[0]]
            assert torch.equal(value, getattr(source, key.rsplit(".", 1)[1]))
    # the mid block's cross-attention is 64 wide with 32-wide text: sizes come from each layer
    mid = processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert mid.to_k_custom_diffusion.weight.shape == (64, 32)


def test_the_validation_pipeline_uses_the_trained_processors_and_token(tiny_pipeline_dir):
    from accelerate import Accelerator

    from dvar.integrations.cli import load_components

    method, parts = CustomDiffusion(), load_components(str(tiny_pipeline_dir))
    args = method_args(method, tiny_pipeline_dir)
    trainable = method.setup(args, parts, Accelerator(cpu=True))
    pipe = method.pipeline(parts, Accelerator(cpu=True), torch.float32)
    assert pipe.unet is parts.unet and pipe.text_encoder is parts.text_encoder
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"CustomDiffusionAttnProcessor2_0"}
    assert "<new1>" in pipe.tokenizer.get_added_vocab()
    embedding = parts.text_encoder.get_input_embeddings().weight
    assert trainable[0] is embedding and all(p.requires_grad for p in trainable)
    # only the embedding and the cross-attention copies train: 4 layers x (k, v)
    assert sum(p.numel() for p in trainable[1:]) == sum(2 * 32 * w for w in (32, 32, 32, 64))
    assert not any(p.requires_grad for n, p in parts.unet.named_parameters() if "custom_diffusion" not in n)


def method_args(method, pipeline_dir):
    from dvar.integrations.data import load_image_folder
    from dvar.integrations.cli import build_parser

    args = build_parser(method).parse_args(["--pretrained_model_name_or_path", str(pipeline_dir), "--resolution", "16"])
    method.data_dir(args)  # the bundled custom_diffusion concept
    method.validate(args, _tokenizer(pipeline_dir))
    method.build_datasets(args, load_image_folder(args.instance_data_dir), accelerator=None)  # no prior: unused
    return args


def _tokenizer(pipeline_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")


# -- the saved files, loaded without dvar -------------------------------------------------


def test_saved_files_load_into_a_plain_diffusers_pipeline_and_change_it(trained, tiny_pipeline_dir):
    from safetensors.torch import load_file

    base, loaded = fresh_pipeline(tiny_pipeline_dir), fresh_pipeline(tiny_pipeline_dir)
    load_custom_diffusion(loaded, str(trained))

    state = load_file(trained / WEIGHT_NAME)
    assert len(state) == 2 * 4 and all("attn2.processor.to_" in k for k in state)
    for key, value in state.items():
        assert torch.equal(loaded.unet.get_parameter(key), value)
    token = load_file(trained / "<new1>.safetensors")
    assert list(token) == ["<new1>"] and token["<new1>"].shape == (1, 32)

    # the modifier-token prompt encodes differently from the untrained start (the initializer word)
    def embed(pipe, prompt):
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    assert not torch.allclose(embed(loaded, PROMPT), embed(base, "a photo of a circle circle"), atol=1e-4)
    assert torch.equal(embed(loaded, "a photo of a dog"), embed(base, "a photo of a dog"))  # other words untouched

    # and the UNet responds differently to the same inputs
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = embed(base, "a photo of a circle")
    with torch.no_grad():
        out_base = base.unet(latents, 500, hidden).sample
        out_loaded = loaded.unet(latents, 500, hidden).sample
    assert (out_base - out_loaded).abs().max() > 1e-4


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--modifier_token", "sks"], "already in the tokenizer's vocabulary"),
        (["--initializer_token", "two words"], "is 2 tokens"),
        (["--modifier_token", "<a>+<b>"], "one concept per run"),
        (["--instance_prompt", "a photo of a circle"], "does not contain the modifier token"),
        (["--freeze_model", "everything"], None),  # argparse: invalid choice
    ],
)
def test_bad_settings_exit_2_and_write_nothing(tmp_path, tiny_pipeline_dir, concept_dir, capsys, flags, message):
    try:
        code, out = run(tmp_path, "refused", tiny_pipeline_dir, concept_dir, *flags)
    except SystemExit as exit:  # argparse exits itself
        code, out = exit.code, tmp_path / "refused"
    assert code == 2
    assert not out.exists()
    if message:
        assert message in capsys.readouterr().err


# -- checkpoints ---------------------------------------------------------------------------


def test_checkpoints_hold_the_small_files_and_resume_to_the_same_stop(tmp_path, tiny_pipeline_dir, concept_dir):
    flags = [*EARLY, "--learning_rate", "1e-3", "--checkpointing_steps", "4", "--num_validation_images", "0"]
    code, full = run(tmp_path, "full", tiny_pipeline_dir, concept_dir, *flags)
    assert code == 0
    assert sorted(p.name for p in (full / "checkpoint-4").iterdir() if p.suffix == ".safetensors") == [
        "<new1>.safetensors", WEIGHT_NAME]  # not the whole UNet and text encoder

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    code, _ = run(tmp_path, "resumed", tiny_pipeline_dir, concept_dir, *flags, "--resume_from_checkpoint", "checkpoint-4")
    assert code == 0
    stop = json.loads((full / "dvar_summary.json").read_text())["stop_step"]
    assert stop is not None and stop > 4, "the uninterrupted run must stop after the checkpoint"
    assert json.loads((resumed / "dvar_summary.json").read_text())["stop_step"] == stop  # 8 or 9, by library versions
    assert (resumed / "dvar_history.csv").read_text() == (full / "dvar_history.csv").read_text()
    for name in (WEIGHT_NAME, "<new1>.safetensors"):
        assert (resumed / name).read_bytes() == (full / name).read_bytes(), name

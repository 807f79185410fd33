"""The DVAR lines docs/diffusers-scripts.md adds to diffusers' example scripts, run in loops of
the same shape (tests/upstream/) on tiny SD, SDXL and Flux pipelines: they stop early, announce
the stop, leave both loops, save, agree across two processes, exit non-zero without saving when
the loss diverges, compute the script's own loss on the frozen batch, and are the guide's lines
exactly."""

import importlib
import csv
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.check_guide import GUIDE

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 40
WINDOW, THRESHOLD = "5", "0.2"


def guide_snippets():
    """{loop path: (added lines, removed lines)} from the marked ```diff blocks of the guide."""
    text = GUIDE.read_text()
    blocks = re.findall(r"<!-- dvar-snippet: (\S+) upstream=\S+ -->\n```diff\n(.*?)\n```", text, re.S)
    snippets = {}
    for path, body in blocks:
        lines = body.splitlines()
        added = [line[1:].strip() for line in lines if line.startswith("+")]
        removed = [line[1:].strip() for line in lines if line.startswith("-")]
        snippets[path] = ([a for a in added if a], [r for r in removed if r])
    return snippets


LOOPS = {
    "tests/upstream/textual_inversion.py": "upstream.textual_inversion",
    "tests/upstream/train_dreambooth.py": "upstream.train_dreambooth",
    "tests/upstream/train_dreambooth_lora.py": "upstream.train_dreambooth_lora",
    "tests/upstream/train_custom_diffusion.py": "upstream.train_custom_diffusion",
    "tests/upstream/train_dreambooth_lora_sdxl.py": "upstream.train_dreambooth_lora_sdxl",
    "tests/upstream/train_dreambooth_lora_flux.py": "upstream.train_dreambooth_lora_flux",
}


def test_the_guide_has_a_snippet_for_each_script():
    assert sorted(guide_snippets()) == sorted(LOOPS)


@pytest.mark.parametrize("path", sorted(LOOPS))
def test_guide_lines_and_loop_lines_are_the_same(path):
    added, removed = guide_snippets()[path]
    source = (REPO / path).read_text().splitlines()
    stripped = {line.strip() for line in source}
    assert len(added) >= 10
    missing = [line for line in added if line not in stripped]
    assert not missing, f"guide lines not in {path}: {missing}"
    still_there = [line for line in removed if line in stripped]
    assert not still_there, f"lines the guide replaces are still in {path}: {still_there}"
    marked = [line.strip() for line in source if re.search(r"\s# DVAR(:.*)?$", line)]  # lines ending in "# DVAR..."
    assert marked and not [line for line in marked if line not in added], f"{path} has DVAR lines the guide lacks"


@pytest.fixture(scope="module")
def photo_dir(concept_dir):
    """A bundled concept folder as it is: the scripts read every file of the folder as an image."""
    return concept_dir


def flags(name, pipeline_dir, photos, out, *extra):
    common = [
        "--pretrained_model_name_or_path", str(pipeline_dir), "--output_dir", str(out), "--resolution", "16",
        "--train_batch_size", "1", "--max_train_steps", str(MAX_STEPS), "--lr_warmup_steps", "0",
        "--checkpointing_steps", "4", "--seed", "0", "--dvar_window", WINDOW, "--dvar_threshold", THRESHOLD,
    ]
    per_script = {
        "textual_inversion": ["--train_data_dir", str(photos), "--placeholder_token", "<cat-toy>",
                              "--initializer_token", "circle", "--repeats", "1", "--learning_rate", "5e-3"],
        "train_dreambooth": ["--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks circle",
                             "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2"],
        "train_dreambooth_lora": ["--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks circle",
                                  "--learning_rate", "1e-2"],
        "train_custom_diffusion": ["--instance_data_dir", str(photos), "--instance_prompt", "photo of a <new1> circle",
                                   "--modifier_token", "<new1>", "--initializer_token", "circle", "--learning_rate", "1e-3"],
        "train_dreambooth_lora_sdxl": ["--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks circle",
                                       "--learning_rate", "1e-2", "--random_flip"],
        "train_dreambooth_lora_flux": ["--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks circle",
                                       "--learning_rate", "1e-2", "--max_sequence_length", "16", "--random_flip"],
    }
    return common + per_script[name] + list(extra)


SAVED = {
    "textual_inversion": ["learned_embeds.safetensors"],
    "train_dreambooth": ["model_index.json", "unet/diffusion_pytorch_model.safetensors"],
    "train_dreambooth_lora": ["pytorch_lora_weights.safetensors"],
    "train_custom_diffusion": ["pytorch_custom_diffusion_weights.safetensors", "<new1>.safetensors"],
    "train_dreambooth_lora_sdxl": ["pytorch_lora_weights.safetensors"],
    "train_dreambooth_lora_flux": ["pytorch_lora_weights.safetensors"],
}
PIPELINE = {"train_dreambooth_lora_sdxl": "tiny_sdxl_pipeline_dir", "train_dreambooth_lora_flux": "tiny_flux_pipeline_dir"}


def stopper_state(checkpoint):
    """The DVAR state an accelerate checkpoint holds (the registered object with a history)."""
    for pkl in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(pkl, weights_only=False)
        if isinstance(state, dict) and "history" in state:
            return state
    raise AssertionError(f"no DVAR state in {checkpoint}")


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # each loop builds its own Accelerator, as a script would
    GradientState._reset_state()


@pytest.mark.parametrize("name", sorted(SAVED))
def test_loop_stops_early_leaves_both_loops_and_saves(name, photo_dir, tmp_path, request, caplog):
    reset_accelerate()
    module = importlib.import_module(f"upstream.{name}")
    out = tmp_path / name
    pipeline_dir = request.getfixturevalue(PIPELINE.get(name, "tiny_pipeline_dir"))
    with caplog.at_level(logging.INFO, logger="dvar"):
        result = module.main(module.parse_args(flags(name, pipeline_dir, photo_dir, out)))

    # stopped early, at the step the callback reports, and no optimizer step after it
    assert result["stop_step"] is not None and result["reason"].startswith(f"plateau: var(last {WINDOW})")
    assert result["global_step"] == result["stop_step"] < MAX_STEPS
    # epochs were left, none of them ran: without the outer break each would add a step
    assert result["epoch"] < result["num_train_epochs"] - 1
    # the stop announced itself, once: step, budget, reason
    stop = result["stop_step"]
    lines = [r.getMessage() for r in caplog.records if r.name == "dvar.callback"]
    assert lines == [f"DVAR stopped training at step {stop} of {MAX_STEPS} ({MAX_STEPS - stop} steps, "
                     f"{(MAX_STEPS - stop) / MAX_STEPS:.0%} of the budget, saved): {result['reason']}"]
    # the save after the loop ran, with the history (its stop row) and the summary next to the weights
    for file in SAVED[name]:
        assert (out / file).is_file(), file
    with open(out / "dvar_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == list(range(1, stop + 1))
    assert [row["stop_reason"] for row in rows] == [""] * (stop - 1) + [result["reason"]]
    summary = json.loads((out / "dvar_summary.json").read_text())
    assert (summary["stop_step"], summary["max_train_steps"], summary["steps_saved"]) == (stop, MAX_STEPS, MAX_STEPS - stop)
    assert summary["message"] == lines[0]
    # step() ran before the checkpointing: checkpoint-4 holds the state after step 4
    state = stopper_state(out / "checkpoint-4")
    assert [row["step"] for row in state["history"]] == [1, 2, 3, 4] and state["stop_step"] is None


@pytest.mark.parametrize("name, rule", [
    ("textual_inversion", "all_settled"),  # every band that fell has settled (flat_bands="skip")
    ("train_dreambooth_lora", "not_before"),  # every band has settled, not before half the budget
    ("train_dreambooth_lora_sdxl", "not_before"),
    ("train_dreambooth_lora_flux", "not_before"),
])
def test_without_the_dvar_flags_the_loop_runs_dvars_default_rule_for_its_method(name, rule, photo_dir, tmp_path,
                                                                                  request):
    reset_accelerate()
    module = importlib.import_module(f"upstream.{name}")
    out = tmp_path / name
    argv = flags(name, request.getfixturevalue(PIPELINE.get(name, "tiny_pipeline_dir")), photo_dir, out)
    argv = [a for i, a in enumerate(argv) if not ({a, argv[i - 1]} & {"--dvar_window", "--dvar_threshold"})]
    result = module.main(module.parse_args(argv))
    summary = json.loads((out / "dvar_summary.json").read_text())
    assert (summary["preset"], summary["default_rule"], summary["signal"]) == ("auto", True, "bands")
    assert summary["rule"] == rule and len(summary["bands"]) == 3
    assert result["global_step"] == (result["stop_step"] or MAX_STEPS)
    for file in SAVED[name]:
        assert (out / file).is_file(), file


@pytest.mark.parametrize("name", sorted(SAVED))
def test_a_diverged_run_exits_non_zero_and_saves_no_weights(name, photo_dir, tmp_path, request, caplog):
    """A learning rate of 1e6 makes the loss NaN within a few steps: the guide's lines end the script with
    a non-zero exit and the divergence message, before the save after the loop."""
    reset_accelerate()
    module = importlib.import_module(f"upstream.{name}")
    out = tmp_path / name
    pipeline_dir = request.getfixturevalue(PIPELINE.get(name, "tiny_pipeline_dir"))
    with caplog.at_level(logging.INFO, logger="dvar"), pytest.raises(SystemExit) as exit_info:
        module.main(module.parse_args(flags(name, pipeline_dir, photo_dir, out, "--learning_rate", "1e6")))

    message = exit_info.value.code
    assert isinstance(message, str) and "diverged" in message and "lower the learning rate" in message  # exit 1
    errors = [r.getMessage() for r in caplog.records if r.name == "dvar.callback" and r.levelno == logging.ERROR]
    assert errors == [message]
    for file in SAVED[name] + ["dvar_summary.json"]:
        assert not (out / file).exists(), f"{file} was saved after a divergence"


def test_two_processes_stop_at_the_same_step(tiny_pipeline_dir, photo_dir, tmp_path):
    script = REPO / "tests" / "upstream" / "textual_inversion.py"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        *flags("textual_inversion", tiny_pipeline_dir, photo_dir, tmp_path / "ddp", "--repeats", "2"),
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads((tmp_path / "ddp" / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    first, second = results
    assert first["stop_step"] is not None and first["stop_step"] < MAX_STEPS
    assert first["stop_step"] == second["stop_step"] == first["global_step"] == second["global_step"]
    assert first["eval_losses"] == second["eval_losses"]  # one batch split over both, all-reduced
    assert (tmp_path / "ddp" / "learned_embeds.safetensors").is_file()
    assert [row["step"] for row in stopper_state(tmp_path / "ddp" / "checkpoint-4")["history"]] == [1, 2, 3, 4]


def test_precomputed_text_embeddings_are_used_as_they_are(sd_parts):
    """train_dreambooth(_lora).py --pre_compute_text_embeddings puts prompt embeddings, not token
    ids, in instance_prompt_ids and drops the text encoder: DVAR gives the same loss as with the
    tokenized prompt and the text encoder."""
    from dvar import DVAREarlyStopping

    tokenizer, text_encoder = sd_parts["tokenizer"], sd_parts["text_encoder"]
    ids = tokenizer("a photo of sks dog", truncation=True, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pre_computed_encoder_hidden_states = text_encoder(ids)[0]  # [1, 77, 32], as the script computes it
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    common = dict(unet=sd_parts["unet"], vae=sd_parts["vae"], noise_scheduler=sd_parts["noise_scheduler"], window=5, threshold=0.1)

    tokenized = [{"instance_images": image, "instance_prompt_ids": ids} for image in images]
    reference = DVAREarlyStopping(text_encoder=text_encoder, tokenizer=tokenizer, train_dataset=tokenized, **common).evaluate()

    precomputed = [{"instance_images": image, "instance_prompt_ids": pre_computed_encoder_hidden_states} for image in images]
    stopper = DVAREarlyStopping(text_encoder=None, tokenizer=None, train_dataset=precomputed, **common)
    assert stopper.evaluate() == pytest.approx(reference, rel=1e-6)


def load_parts(pipeline_dir, text_encoder_2_cls):
    from transformers import AutoTokenizer, CLIPTextModel

    from diffusers import AutoencoderKL

    tokenizers = [AutoTokenizer.from_pretrained(pipeline_dir, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
    text_encoders = [
        CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder").requires_grad_(False),
        text_encoder_2_cls.from_pretrained(pipeline_dir, subfolder="text_encoder_2").requires_grad_(False),
    ]
    return tokenizers, text_encoders, AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 1.0])
def test_sdxl_frozen_batch_loss_is_the_scripts_loss(snr_gamma, prediction_type, tiny_sdxl_pipeline_dir, photo_dir, tmp_path):
    """DVAR's loss on the frozen batch = train_dreambooth_lora_sdxl.py's loss lines on the same latents,
    noise and timesteps: both encoders, pooled embeddings, the dataset's size/crop time ids, min-SNR."""
    from transformers import CLIPTextModelWithProjection

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from dvar import DVAREarlyStopping, LossConfig

    module = importlib.import_module("upstream.train_dreambooth_lora_sdxl")
    extra = [] if snr_gamma is None else ["--snr_gamma", str(snr_gamma)]
    args = module.parse_args(flags("train_dreambooth_lora_sdxl", tiny_sdxl_pipeline_dir, photo_dir, tmp_path, *extra))
    (tok1, tok2), (te1, te2), vae = load_parts(tiny_sdxl_pipeline_dir, CLIPTextModelWithProjection)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_pipeline_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(tiny_sdxl_pipeline_dir, subfolder="scheduler", prediction_type=prediction_type)
    torch.manual_seed(3)  # the dataset draws each image's crop once
    dataset = module.DreamBoothDataset(args, args.instance_data_dir, args.instance_prompt, None, size=24)  # crops vary
    args.resolution = 16
    stopper = DVAREarlyStopping(
        unet=unet, vae=vae, text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
        noise_scheduler=scheduler, train_dataset=dataset, preset="dreambooth_lora", loss=LossConfig.from_args(args),
    )
    batch = stopper.eval_batch.frozen
    with torch.no_grad():
        prompt_embeds, pooled = module.encode_prompt([te1, te2], [tok1, tok2], args.instance_prompt)
        items = [dataset[i] for i in batch.indices]
        time_ids = torch.cat([
            module.compute_time_ids(item["original_size"], item["crop_top_left"], args.resolution, "cpu", torch.float32)
            for item in items
        ])
        expected = module.denoising_loss(
            args, scheduler, unet, batch.latents, batch.noise, batch.timesteps, prompt_embeds, pooled, time_ids, len(batch)
        )
    assert {tuple(t[:2].tolist()) for t in time_ids} == {(64.0, 64.0)} and len({tuple(t[2:4].tolist()) for t in time_ids}) > 1
    assert stopper.evaluate() == pytest.approx(expected.item(), rel=1e-6)


FLUX_CASES = [("none", True), ("none", False), ("sigma_sqrt", True), ("cosmap", True), ("logit_normal", True), ("mode", True)]


@pytest.mark.parametrize("weighting_scheme, guidance_embeds", FLUX_CASES)
def test_flux_frozen_batch_loss_is_the_scripts_loss(weighting_scheme, guidance_embeds, tiny_flux_pipeline_dir, photo_dir,
                                                    tmp_path):
    """DVAR's loss on the frozen batch = train_dreambooth_lora_flux.py's loss lines on the same latents,
    noise and timesteps: CLIP pooled + T5, packed latents, guidance embedding, the weighting scheme."""
    import copy

    from transformers import T5EncoderModel

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from dvar import DVAREarlyStopping, LossConfig
    from dvar_lab.tiny import tiny_flux

    module = importlib.import_module("upstream.train_dreambooth_lora_flux")
    extra = ["--weighting_scheme", weighting_scheme, "--guidance_scale", "2.5"]
    args = module.parse_args(flags("train_dreambooth_lora_flux", tiny_flux_pipeline_dir, photo_dir, tmp_path, *extra))
    (tok1, tok2), (te1, te2), vae = load_parts(tiny_flux_pipeline_dir, T5EncoderModel)
    if guidance_embeds:  # FLUX.1-dev style
        transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_pipeline_dir, subfolder="transformer")
    else:  # FLUX.1-schnell style
        transformer = tiny_flux(seed=1, guidance_embeds=False)["transformer"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_pipeline_dir, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(scheduler)
    dataset = module.DreamBoothDataset(args, args.instance_data_dir, args.instance_prompt, None, size=args.resolution)
    stopper = DVAREarlyStopping(
        transformer=transformer, vae=vae, text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
        noise_scheduler=noise_scheduler_copy, train_dataset=dataset, preset="dreambooth_lora",
        loss=LossConfig.from_args(args),
    )
    assert sorted(stopper.models) == ["transformer"]  # the frozen encoders' output is cached; they can be freed
    batch = stopper.eval_batch.frozen
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = module.encode_prompt(
            [te1, te2], [tok1, tok2], [args.instance_prompt] * len(batch), args.max_sequence_length, device="cpu"
        )
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        expected = module.flow_matching_loss(
            args, transformer, guidance_embeds, noise_scheduler_copy, batch.latents, batch.noise, batch.timesteps,
            prompt_embeds, pooled, text_ids, vae_scale_factor, torch.float32, "cpu",
        )
    assert stopper.evaluate() == pytest.approx(expected.item(), rel=1e-6)


def test_flux_guidance_scale_is_required_by_a_guidance_transformer(toy_dataset):
    from dvar import DVAREarlyStopping
    from dvar_lab.tiny import tiny_flux

    parts = tiny_flux()
    with pytest.raises(ValueError, match=r"pass loss=LossConfig.from_args\(args\)"):
        DVAREarlyStopping(
            transformer=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"], noise_scheduler=parts["noise_scheduler"],
            train_dataset=toy_dataset, window=5, threshold=0.1,
        ).evaluate()

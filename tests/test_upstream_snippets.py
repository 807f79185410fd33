"""The DVAR lines integrations/README.md adds to diffusers' example scripts, run in loops of
the same shape (tests/upstream/): they stop early, leave both loops, save, agree across two
processes, and are the README's lines exactly."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "integrations" / "README.md"
MAX_STEPS = 40
WINDOW, THRESHOLD = "5", "0.2"


def readme_snippets():
    """{loop path: (added lines, removed lines)} from the marked ```diff blocks of the README."""
    text = README.read_text()
    blocks = re.findall(r"<!-- dvar-snippet: (\S+) -->\n```diff\n(.*?)\n```", text, re.S)
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
}


def test_readme_has_a_snippet_for_each_script():
    assert sorted(readme_snippets()) == sorted(LOOPS)


@pytest.mark.parametrize("path", sorted(LOOPS))
def test_readme_lines_and_loop_lines_are_the_same(path):
    added, removed = readme_snippets()[path]
    source = (REPO / path).read_text().splitlines()
    stripped = {line.strip() for line in source}
    assert len(added) >= 10
    missing = [line for line in added if line not in stripped]
    assert not missing, f"README lines not in {path}: {missing}"
    still_there = [line for line in removed if line in stripped]
    assert not still_there, f"lines the README replaces are still in {path}: {still_there}"
    marked = [line.strip() for line in source if re.search(r"\s# DVAR(:.*)?$", line)]  # lines ending in "# DVAR..."
    assert marked and not [line for line in marked if line not in added], f"{path} has DVAR lines the README lacks"


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, concept_dir):
    """The concept's photos alone: the scripts read every file of the folder as an image."""
    folder = tmp_path_factory.mktemp("photos")
    for png in sorted(Path(concept_dir).glob("*.png")):
        shutil.copy(png, folder / png.name)
    return folder


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
    }
    return common + per_script[name] + list(extra)


SAVED = {
    "textual_inversion": ["learned_embeds.safetensors"],
    "train_dreambooth": ["model_index.json", "unet/diffusion_pytorch_model.safetensors"],
    "train_dreambooth_lora": ["pytorch_lora_weights.safetensors"],
    "train_custom_diffusion": ["pytorch_custom_diffusion_weights.safetensors", "<new1>.safetensors"],
}


def stopper_state(checkpoint):
    """The DVAR state an accelerate checkpoint holds (the registered object with a history)."""
    for pkl in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(pkl, weights_only=False)
        if isinstance(state, dict) and "history" in state:
            return state
    raise AssertionError(f"no DVAR state in {checkpoint}")


@pytest.mark.parametrize("name", sorted(SAVED))
def test_loop_stops_early_leaves_both_loops_and_saves(name, tiny_pipeline_dir, photo_dir, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # each loop builds its own Accelerator, as a script would
    GradientState._reset_state()
    module = importlib.import_module(f"upstream.{name}")
    out = tmp_path / name
    result = module.main(module.parse_args(flags(name, tiny_pipeline_dir, photo_dir, out)))

    # stopped early, at the step the callback reports, and no optimizer step after it
    assert result["stop_step"] is not None and result["reason"].startswith(f"plateau: var(last {WINDOW})")
    assert result["global_step"] == result["stop_step"] < MAX_STEPS
    # epochs were left, none of them ran: without the outer break each would add a step
    assert result["epoch"] < result["num_train_epochs"] - 1
    # the save after the loop ran
    for file in SAVED[name]:
        assert (out / file).is_file(), file
    history = (out / "dvar_history.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == list(range(1, result["stop_step"] + 1))
    # step() ran before the checkpointing: checkpoint-4 holds the state after step 4
    state = stopper_state(out / "checkpoint-4")
    assert [row["step"] for row in state["history"]] == [1, 2, 3, 4] and state["stop_step"] is None


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

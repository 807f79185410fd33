"""The mini-SD pretraining script, at toy size: it exports a folder that diffusers loads, an
interrupted run resumes to the very same weights, and ``--init-from`` continues a model."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from benchmarks.embedded import pretrain_mini_sd

TOY = ["--n-images", "280", "--vae-steps", "3", "--vae-batch", "4", "--unet-steps", "4",
       "--decoder-steps", "2", "--batch", "4", "--warmup", "2", "--threads", "1", "--ckpt-minutes", "0"]
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


def pretrain(tmp_path, name: str, *extra: str):
    threads = torch.get_num_threads()  # the script sets its own; the rest of the suite keeps ours
    try:
        pretrain_mini_sd.main(["--work", str(tmp_path / f"{name}-work"),
                               "--out", str(tmp_path / name), *TOY, *extra])
    finally:
        torch.set_num_threads(threads)
    return tmp_path / name


def same_weights(a, b) -> bool:
    for file in WEIGHTS:
        wa, wb = load_file(a / file), load_file(b / file)
        if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pretrain"), "uninterrupted")


def test_export_loads_in_diffusers(uninterrupted):
    pipe = StableDiffusionPipeline.from_pretrained(uninterrupted, local_files_only=True)
    assert pipe.tokenizer("sks").input_ids == [49406, 48136, 49407]  # the bundled SD tokenizer
    image = pipe("a red star", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    info = json.loads((uninterrupted / "training_info.json").read_text())
    assert info["args"]["unet_steps"] == "4" and info["init_from_training_info"] is None
    assert info["diffusion_train_s_all_invocations"] > 0


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, uninterrupted, monkeypatch):
    save = pretrain_mini_sd.StageCheckpoint.save

    def save_then_crash(self, state, force=False):
        save(self, state, force)
        if self.path.name == "diffusion_ckpt.pt" and state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_mini_sd.StageCheckpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path, "resumed")
    assert not (tmp_path / "resumed").exists()  # nothing exported half-way
    checkpoint = torch.load(tmp_path / "resumed-work" / "diffusion_ckpt.pt", weights_only=False)
    assert checkpoint["step"] == 2
    monkeypatch.undo()

    resumed = pretrain(tmp_path, "resumed")
    assert same_weights(resumed, uninterrupted)
    info = json.loads((resumed / "training_info.json").read_text())
    assert info["diffusion_train_s_all_invocations"] > checkpoint["elapsed_s"] > 0  # both runs count


def test_init_from_continues_an_exported_model(tmp_path, uninterrupted):
    continued = pretrain(tmp_path, "continued", "--init-from", str(uninterrupted),
                         "--loss-weighting", "min-snr-v")
    info = json.loads((continued / "training_info.json").read_text())
    assert info["init_from_training_info"]["args"]["loss_weighting"] == "min-snr-then-v"
    assert not same_weights(continued, uninterrupted)
    encoder = "vae/diffusion_pytorch_model.safetensors"  # decoder-only: the latent space stays
    before, after = load_file(uninterrupted / encoder), load_file(continued / encoder)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))

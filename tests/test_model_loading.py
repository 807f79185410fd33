"""Every bundled weight loads exactly, under each transformers/diffusers version the project
declares (``benchmarks/check_lowest_deps.sh`` runs this file with the lowest ones), and a model
whose weights do not all load fails loudly instead of running with random weights."""

import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dvar.models import IncompleteWeightsError, load_exactly, mini_sd
from dvar_lab.models import load_mini_sd_pipeline

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
PROMPTS = ["a photo of a red dotted star", "a large blue solid ring on the left, on a gray background"]
# measured with transformers 5.24.0 / torch 2.13.0 (CPU) on the bundled weights
REFERENCE_POOLED = [
    [-1.5963714122772217, 1.0313189029693604, -2.0362133979797363, -0.47370997071266174, 0.7256587743759155, -0.8065330386161804],
    [0.3666614592075348, -0.3506891429424286, 0.8130611181259155, 0.6807271242141724, -0.4908122718334198, 0.14580340683460236],
]
REFERENCE_HIDDEN_ABS_SUM = 13033.4609375


def text_encoder_files():
    return load_file(mini_sd() / "text_encoder" / "model.safetensors")


@pytest.fixture(scope="module")
def text_encoder():
    from transformers import CLIPTextModel

    return load_exactly(CLIPTextModel, mini_sd(), "text_encoder")


def test_the_bundled_text_encoder_is_stored_in_the_form_every_version_reads():
    """transformers 4 needs the ``text_model.`` prefix; transformers 5 reads it too (it writes none)."""
    keys = list(text_encoder_files())
    assert len(keys) == 68 and all(key.startswith("text_model.") for key in keys)


def test_every_parameter_of_the_text_encoder_is_the_files_tensor(text_encoder):
    stored = text_encoder_files()
    # transformers 4 names the parameters "text_model.*", transformers 5 without the prefix
    params = {
        name if name.startswith("text_model.") else f"text_model.{name}": value
        for name, value in text_encoder.state_dict().items() if "position_ids" not in name
    }
    assert sorted(params) == sorted(stored)
    for name, value in params.items():
        assert torch.equal(value, stored[name].float()), name


def test_text_encoder_output_is_the_reference_one(text_encoder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(mini_sd(), subfolder="tokenizer")
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = text_encoder(ids)
    assert torch.allclose(out.pooler_output[:, :6], torch.tensor(REFERENCE_POOLED), atol=1e-4, rtol=0)
    assert float(out.last_hidden_state.abs().sum()) == pytest.approx(REFERENCE_HIDDEN_ABS_SUM, rel=1e-5)


@pytest.mark.parametrize("name, cls", [("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")])
def test_the_bundled_unet_and_vae_load_exactly(name, cls):
    import diffusers

    model = load_exactly(getattr(diffusers, cls), mini_sd(), name)
    stored = load_file(mini_sd() / name / "diffusion_pytorch_model.safetensors")
    assert sorted(model.state_dict()) == sorted(stored)
    assert all(torch.equal(value, stored[key].float()) for key, value in model.state_dict().items())


def test_load_mini_sd_pipeline_uses_the_exactly_loaded_weights(text_encoder):
    pipe = load_mini_sd_pipeline()
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.state_dict().values(), text_encoder.state_dict().values()))


def copy_text_encoder(tmp_path, rename=lambda key: key, drop=0, extra=None):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(mini_sd() / "text_encoder" / "config.json", folder / "config.json")
    stored = text_encoder_files()
    tensors = {rename(key): value for key, value in sorted(stored.items())[drop:]}
    tensors.update(extra or {})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def strip_prefix(key):
    return key[len("text_model."):]


@pytest.mark.parametrize(
    "rename, drop, message",
    [
        (lambda key: "encoder." + key, 0, r"68 weight\(s\) of the model are not in the file .* 68 weight\(s\) of the file fit no"),
        (lambda key: key, 1, r"1 weight\(s\) of the model are not in the file \(e.g. \['.*embeddings.position_embedding.weight'\]\)"),
    ],
)
def test_a_text_encoder_whose_weights_do_not_all_load_fails_loudly(tmp_path, rename, drop, message):
    from transformers import CLIPTextModel

    root = copy_text_encoder(tmp_path, rename, drop)
    with pytest.raises(IncompleteWeightsError, match=message):
        load_exactly(CLIPTextModel, root, "text_encoder")
    with pytest.raises(IncompleteWeightsError, match="randomly initialised weights"):
        load_mini_sd_pipeline(path=_pipeline_with(root, "text_encoder"))


def _pipeline_with(root, part):
    """A copy of mini-SD whose ``part`` is the folder under ``root``."""
    folder = root / "pipeline"
    shutil.copytree(mini_sd(), folder, ignore=shutil.ignore_patterns(part, "samples.png"))
    shutil.copytree(root / part, folder / part)
    return folder


def test_the_transformers_5_form_loads_exactly_only_under_transformers_5(tmp_path):
    """Keys without ``text_model.`` (what transformers 5 writes): transformers 4 would silently
    leave every weight random; here that is an error."""
    from transformers import CLIPTextModel

    root = copy_text_encoder(tmp_path, strip_prefix)
    if TRANSFORMERS_5:
        load_exactly(CLIPTextModel, root, "text_encoder")
    else:
        with pytest.raises(IncompleteWeightsError, match="are not in the file"):
            load_exactly(CLIPTextModel, root, "text_encoder")


def test_an_old_checkpoints_position_ids_buffer_is_no_false_alarm(tmp_path):
    """SD 1.x text encoders saved by transformers < 4.31 carry a ``position_ids`` buffer."""
    from transformers import CLIPTextModel

    root = copy_text_encoder(tmp_path, extra={"text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0)})
    load_exactly(CLIPTextModel, root, "text_encoder")


def test_a_unet_missing_a_weight_fails_loudly(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(mini_sd() / "unet" / "config.json", folder / "config.json")
    stored = load_file(mini_sd() / "unet" / "diffusion_pytorch_model.safetensors")
    stored.pop("conv_out.bias")
    save_file(stored, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises((IncompleteWeightsError, ValueError), match="conv_out.bias"):
        load_exactly(UNet2DConditionModel, tmp_path, "unet")

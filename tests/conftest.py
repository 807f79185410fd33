import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def sd_parts():
    from dvar_lab.tiny import tiny_sd

    return tiny_sd(seed=0)


@pytest.fixture
def toy_dataset():
    from dvar_lab.tiny import ToyConceptDataset

    return ToyConceptDataset(num_images=6, resolution=16)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A randomly initialised SD-format pipeline folder (16x16 images), saved with save_pretrained."""
    from dvar_lab.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def concept_dir():
    """A bundled synthetic concept folder (5 PNGs only; its metadata is <name>.json beside it)."""
    from dvar_lab.world import list_concepts

    return list_concepts("textual_inversion")[0].path


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """A randomly initialised SDXL pipeline folder (16x16 images; two CLIP encoders, text_time UNet)."""
    from dvar_lab.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(tmp_path_factory):
    """A randomly initialised Flux pipeline folder (16x16 images; CLIP + T5, guidance-embedding transformer)."""
    from dvar_lab.tiny import save_tiny_pipeline

    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny-flux"), guidance_embeds=True)


@pytest.fixture(scope="session")
def unguided_flux_pipeline_dir(tmp_path_factory):
    """A tiny random Flux pipeline whose transformer has no guidance embedding (FLUX.1-schnell, mini-flow)."""
    from dvar_lab.tiny import save_tiny_pipeline

    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny-flux-unguided"), guidance_embeds=False)


@pytest.fixture
def ctrl_c_after_step(monkeypatch):
    """Press Ctrl-C (raise KeyboardInterrupt) once, right after a method's ``step``-th optimizer step.

    ``ctrl_c_after_step(textual_inversion.TextualInversion, 5)`` makes the next run of that method stop as a user's
    Ctrl-C would, after its weights were updated 5 times, so that resume tests interrupt a run at a known step; later
    runs in the test (the resumed one) go on undisturbed.
    """
    def patch(method_class: type, step: int) -> None:
        calls = 0
        original = method_class.after_optimizer_step

        def interrupt(self, parts, accelerator):
            nonlocal calls
            original(self, parts, accelerator)
            calls += 1
            if calls == step:
                raise KeyboardInterrupt

        monkeypatch.setattr(method_class, "after_optimizer_step", interrupt)

    return patch

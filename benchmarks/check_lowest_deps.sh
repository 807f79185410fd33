#!/usr/bin/env bash
# Install the lowest versions pyproject.toml declares of the Hugging Face stack (transformers,
# diffusers, peft, accelerate: the packages whose versions must agree; the `train` extra), with
# torch 2.13.0, dvar[test] and the lab (./lab) resolved around them, in a second virtual
# environment, and run the model-loading tests (they fail if any bundled weight does not load
# exactly) and the resume tests (a run resumed from a checkpoint must stop at the same step with
# the same history and weights). Exits non-zero if any install or test fails.
#
#   benchmarks/check_lowest_deps.sh                          # venv in /tmp/dvar-lowest-deps
#   VENV=/path/to/venv benchmarks/check_lowest_deps.sh
#   benchmarks/check_lowest_deps.sh tests/test_callback.py   # other tests instead of the default ones
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-/tmp/dvar-lowest-deps}"
if [ "$#" -gt 0 ]; then
    TESTS=("$@")
else
    TESTS=(
        tests/test_model_loading.py
        tests/test_mini_sd.py
        tests/test_callback.py::test_resume_from_accelerate_checkpoint_stops_at_the_same_step
        tests/test_trainer.py::test_resume_reaches_the_same_stop_step
        "tests/test_integrations_dreambooth.py::test_checkpoints_hold_the_trained_weights_and_resume_to_the_same_result[dreambooth]"
        tests/test_integrations_custom_diffusion.py::test_checkpoints_hold_the_small_files_and_resume_to_the_same_stop
        # Not here, though its resume is exact at the lowest versions too: the [lora] case first reads the
        # checkpoint with lora_state_dict(folder), which diffusers 0.30 refuses offline without a weight_name.
    )
fi

lowest() {  # the ">=" bound of a dependency in pyproject.toml: the `train` extra, else the core dependencies
    python3 - "$1" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project.get("optional-dependencies", {}).get("train", []) + project["dependencies"]
name = sys.argv[1]
spec = next((d for d in deps if re.match(rf"{re.escape(name)}\s*(\[|[<>=!~;]|$)", d)), None)
if spec is None or not re.search(r">=\s*([^,;\s]+)", spec):
    sys.exit(f"check_lowest_deps: no '{name}>=' bound in pyproject.toml")
print(re.search(r">=\s*([^,;\s]+)", spec).group(1))
PY
}
PINS=()
for name in transformers diffusers peft accelerate; do
    version="$(lowest "$name")"  # a plain assignment: a failed lookup stops the script (set -e)
    PINS+=("$name==$version")
done
echo "lowest declared: ${PINS[*]}"

python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]" -e ./lab "${PINS[@]}"
python -m pip check || echo "warning: pip check reports conflicts (above); the tests decide" >&2
python -m pip list 2>/dev/null | grep -E -i "^(torch|transformers|diffusers|tokenizers|huggingface.hub|accelerate|peft|numpy) "
python - "${PINS[@]}" <<'PY'  # exactly the declared lower ends are installed, or stop
import importlib.metadata, sys
from packaging.version import Version
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    if Version(importlib.metadata.version(name)) != Version(wanted):
        sys.exit(f"check_lowest_deps: {name} {importlib.metadata.version(name)} installed, not {wanted}")
PY
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
python -m pytest -q -p no:cacheprovider "${TESTS[@]}"

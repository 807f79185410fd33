#!/usr/bin/env bash
# Install the lowest versions pyproject.toml declares of the Hugging Face stack (transformers,
# diffusers, peft, accelerate: the packages whose versions must agree), with torch 2.13.0 and
# the rest of the project resolved around them, in a second virtual environment, and run the
# model-loading tests there: they fail if any bundled weight does not load exactly.
#
#   benchmarks/check_lowest_deps.sh                          # venv in /tmp/dvar-lowest-deps
#   VENV=/path/to/venv benchmarks/check_lowest_deps.sh
#   benchmarks/check_lowest_deps.sh tests/test_callback.py   # other tests instead of the loading ones
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-/tmp/dvar-lowest-deps}"
if [ "$#" -gt 0 ]; then TESTS=("$@"); else TESTS=(tests/test_model_loading.py tests/test_mini_sd.py); fi

lowest() {  # the ">=" bound of a dependency in pyproject.toml
    python3 - "$1" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
name = sys.argv[1]
spec = next(d for d in deps if re.match(rf"{re.escape(name)}\b", d))
print(re.search(r">=\s*([^,;\s]+)", spec).group(1))
PY
}
PINS=()
for name in transformers diffusers peft accelerate; do PINS+=("$name==$(lowest "$name")"); done
echo "lowest declared: ${PINS[*]}"

python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]" "${PINS[@]}"
python -m pip list 2>/dev/null | grep -E -i "^(torch|transformers|diffusers|tokenizers|huggingface.hub|accelerate|peft|numpy) "
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
python -m pytest -q -p no:cacheprovider "${TESTS[@]}"

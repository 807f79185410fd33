#!/usr/bin/env bash
# What adding dvar to a kohya sd-scripts environment costs (issue 21): in a fresh venv holding torch
# 2.13.0 and kohya's pins, `pip install CHECKOUT` (non-editable: the core only) must
#   1. change no version already installed (pip freeze before/after),
#   2. pull in neither scipy nor efficientnet,
#   3. put <= 2 MB in site-packages/dvar, and add <= 100 MB in all,
#   4. give `from dvar import DVAREarlyStopping`, `python -m dvar.integrations.kohya --help` and a bad
#      --early_stop flag refused in dvar's words (no sd-scripts needed), also when run from a folder
#      holding a dvar clone (a folder named dvar with the repository inside),
#   5. import every module of the core and of the kohya plugin (the trainers need dvar[train]: listed only).
#
#   bash benchmarks/check_plugin_install.sh [VENV] [CHECKOUT]
#
# VENV (default /tmp/kohya_env) is deleted and made again with $PYTHON (default python3). PINS overrides
# the pins; SD_SCRIPTS=PATH installs that checkout's requirements.txt too (without bitsandbytes and
# `-e .`). DVAR_MAX_KB / ADDED_MAX_MB override the two size limits (to watch the check fail).
# Exit 0 when every condition holds, 1 when one fails; the report is VENV.report.txt.
set -uo pipefail
venv=${1:-/tmp/kohya_env}
checkout=$(cd "${2:-$(dirname "$0")/..}" && pwd) || exit 2
py=${PYTHON:-python3}
pins=${PINS:-"torch==2.13.0 accelerate==1.6.0 transformers==4.54.1 diffusers==0.32.1 safetensors==0.4.5 huggingface-hub==0.34.3"}
dvar_max_kb=${DVAR_MAX_KB:-2048}
added_max_mb=${ADDED_MAX_MB:-100}
report=$venv.report.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rm -rf "$venv" && "$py" -m venv "$venv" || exit 2
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install $pins || { echo "installing the pins failed: $pins" >&2; exit 2; }
if [ -n "${SD_SCRIPTS:-}" ]; then
  grep -v -E '^\s*(bitsandbytes|-e )' "$SD_SCRIPTS/requirements.txt" > "$work/requirements.txt"
  "${pip[@]}" install -r "$work/requirements.txt" $pins || { echo "installing $SD_SCRIPTS/requirements.txt failed" >&2; exit 2; }
fi
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"${pip[@]}" freeze | sort > "$work/before.txt"
before_kb=$(du -sk "$site" | cut -f1)

"${pip[@]}" install "$checkout" || { echo "pip install $checkout failed" >&2; exit 1; }
"${pip[@]}" freeze | sort > "$work/after.txt"
after_kb=$(du -sk "$site" | cut -f1)

: > "$report"
failed=0
check() {  # name, 0/1 (passed), detail
  local verdict=PASS; [ "$2" -eq 0 ] || { verdict=FAIL; failed=1; }
  echo "$verdict $1: $3" | tee -a "$report"
}
versions() { "$venv/bin/python" -c "
import importlib.metadata as m
print(', '.join(f'{n} {m.version(n)}' for n in ('torch', 'numpy', 'accelerate', 'transformers', 'diffusers', 'safetensors', 'huggingface-hub')))"; }
echo "checkout $checkout ($(git -C "$checkout" rev-parse --short HEAD 2>/dev/null || echo 'no git')$(git -C "$checkout" diff --quiet HEAD 2>/dev/null || echo ', uncommitted changes')); $($venv/bin/python --version); $(versions)" | tee -a "$report"

changed=$(comm -23 "$work/before.txt" "$work/after.txt")
added=$(comm -13 "$work/before.txt" "$work/after.txt" | tr '\n' ' ')
check "no installed version changed" "$([ -z "$changed" ]; echo $?)" "${changed:-none of $(wc -l < "$work/before.txt") packages}; added: ${added:-nothing}"
heavy=$(grep -i -E '^(scipy|efficientnet)' "$work/after.txt" | tr '\n' ' ')
check "no scipy or efficientnet" "$([ -z "$heavy" ]; echo $?)" "${heavy:-neither installed}"
dvar_kb=$(du -sk "$site/dvar" | cut -f1)
check "site-packages/dvar <= $dvar_max_kb KB" "$([ "$dvar_kb" -le "$dvar_max_kb" ]; echo $?)" "$dvar_kb KB"
added_kb=$((after_kb - before_kb))
check "added <= $added_max_mb MB in all" "$([ "$added_kb" -le $((added_max_mb * 1024)) ]; echo $?)" "$((added_kb / 1024)) MB ($added_kb KB)"

mkdir -p "$work/plain" "$work/holding-a-clone"
git clone -q "$checkout" "$work/holding-a-clone/dvar" 2>/dev/null || cp -r "$checkout" "$work/holding-a-clone/dvar"
for folder in plain holding-a-clone; do
  cd "$work/$folder" || exit 2
  out=$(HF_HUB_OFFLINE=1 "$venv/bin/python" -c "
import dvar
from dvar import DVAREarlyStopping
assert dvar.__file__.startswith('$site'), dvar.__file__
print(DVAREarlyStopping.__name__, 'from', dvar.__file__)" 2>&1)
  check "from dvar import DVAREarlyStopping (in a folder $folder)" $? "$(tail -1 <<< "$out")"
  out=$("$venv/bin/python" -m dvar.integrations.kohya --help 2>&1)
  rc=$?; grep -q "^usage: python -m dvar.integrations.kohya" <<< "$out" || rc=1
  check "python -m dvar.integrations.kohya --help (in a folder $folder)" $rc "exit $rc: $(head -c 80 <<< "$out")..."
  out=$("$venv/bin/python" -m dvar.integrations.kohya train_network --early_stop --early_stop_eval_every abc 2>&1)
  rc=$?; [ $rc -eq 2 ] && grep -q "is not a stride" <<< "$out"
  check "a bad flag is refused in dvar's words before sd-scripts is looked for (in a folder $folder)" $? "exit $rc: $out"
done
cd "$work" || exit 2

out=$(HF_HUB_OFFLINE=1 "$venv/bin/python" - <<'PY' 2>&1
import importlib, pkgutil
import dvar

trainers, failed, count = [], [], 0
for module in pkgutil.walk_packages(dvar.__path__, "dvar."):
    name = module.name
    if name.endswith(".__main__"):  # runs the launcher
        continue
    try:
        importlib.import_module(name)
        count += 1
    except ImportError as error:
        core = not name.startswith("dvar.integrations.") or name.startswith("dvar.integrations.kohya")
        (failed if core else trainers).append(f"{name} ({error})")
print(f"{count} modules import; trainers needing dvar[train]: {'; '.join(trainers) or 'none'}")
if failed:
    print("FAILED: " + "; ".join(failed))
    raise SystemExit(1)
PY
)
check "every module of the core and the kohya plugin imports" $? "$out"

[ $failed -eq 0 ] && echo "plugin install check passed ($report)" || echo "plugin install check FAILED ($report)"
exit $failed

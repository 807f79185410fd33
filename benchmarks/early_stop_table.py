"""Per method: the full step budget versus ``--early-stop``, on one bundled concept.

Runs each trainer in ``integrations/`` twice on the embedded mini-SD (defaults: its bundled
concept, budget and preset) and prints one markdown table of steps and wall time.

    python benchmarks/early_stop_table.py --out outputs/early_stop_table
    python benchmarks/early_stop_table.py --methods textual_inversion --extra --learning_rate 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("textual_inversion", "dreambooth", "dreambooth_lora", "custom_diffusion")
REPO = Path(__file__).resolve().parent.parent


def run(method: str, out: Path, early_stop: bool, extra: list) -> dict:
    folder = out / f"{method}-{'dvar' if early_stop else 'budget'}"
    command = [sys.executable, str(REPO / "integrations" / f"{method}.py"), "--output_dir", str(folder),
               "--overwrite_output_dir", "--num_validation_images", "0", *extra]
    if early_stop:
        command.append("--early-stop")
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((folder / "dvar_summary.json").read_text())
    summary["process_wall_s"] = time.perf_counter() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/early_stop_table"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every trainer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for method in args.methods:
        budget = run(method, args.out, False, args.extra)
        dvar = run(method, args.out, True, args.extra)
        rows.append((method, budget, dvar))
        print(f"{method}: budget {budget['final_step']} steps {budget['wall_time_s']:.0f}s; "
              f"DVAR {dvar['final_step']} steps {dvar['wall_time_s']:.0f}s ({dvar.get('reason')})", flush=True)

    print(f"\nmachine: {os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| method | budget steps | budget wall (s) | DVAR stop step | DVAR wall (s) | steps saved | time saved | DVAR eval share of its run |")
    print("|---|---|---|---|---|---|---|---|")
    for method, budget, dvar in rows:
        saved = 1 - dvar["wall_time_s"] / budget["wall_time_s"]
        share = dvar["eval_seconds"] / dvar["wall_time_s"]
        stop = dvar["stop_step"] if dvar["stopped_early"] else f"none ({dvar['final_step']})"
        print(f"| {method} | {budget['final_step']} | {budget['wall_time_s']:.0f} | {stop} | {dvar['wall_time_s']:.0f} | "
              f"{budget['final_step'] - dvar['final_step']} | {saved:.0%} | {share:.0%} |")
    (args.out / "table.json").write_text(json.dumps([{"method": m, "budget": b, "dvar": d} for m, b, d in rows], indent=2))


if __name__ == "__main__":
    main()

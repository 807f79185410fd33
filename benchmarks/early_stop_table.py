"""Per method: the full step budget versus ``--early-stop``, on one bundled concept.

Runs each trainer in ``integrations/`` twice on the embedded mini-SD (defaults: its bundled
concept, budget and preset) and prints one markdown table of steps and wall time.

    python benchmarks/early_stop_table.py --out outputs/early_stop_table
    python benchmarks/early_stop_table.py --methods textual_inversion --extra --learning_rate 1e-3
    python benchmarks/early_stop_table.py --methods dreambooth --threads 1 --repeats 3
    python benchmarks/early_stop_table.py --paper-presets   # each method's paper preset, not dvar's default

On a shared machine give ``--threads 1`` (torch's default is one thread per core, and threads that
wait for a busy core make the step time swing between runs of the same settings) and ``--repeats N``:
budget and DVAR runs alternate (budget, DVAR, budget, DVAR, ...), the table shows each column's
median over the repeats, and every run's wall and CPU time is printed and kept in ``table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("textual_inversion", "dreambooth", "dreambooth_lora", "custom_diffusion")
REPO = Path(__file__).resolve().parent.parent


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(method: str, out: Path, early_stop: bool, extra: list, env: dict, paper_preset: bool = False) -> dict:
    folder = out / f"{method}-{'dvar' if early_stop else 'budget'}"
    command = [sys.executable, str(REPO / "integrations" / f"{method}.py"), "--output_dir", str(folder),
               "--overwrite_output_dir", "--num_validation_images", "0", *extra]
    if early_stop:
        command += ["--early-stop", *(["--early-stop-preset", method] if paper_preset else [])]
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    summary = json.loads((folder / "dvar_summary.json").read_text())
    summary["process_wall_s"] = time.perf_counter() - started
    summary["process_cpu_s"] = children_cpu_seconds() - cpu_started  # user + system, all its threads
    return summary


def median(runs: list, key: str) -> float:
    return statistics.median(summary[key] for summary in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/early_stop_table"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each run (OMP_NUM_THREADS / MKL_NUM_THREADS; default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=1, help="budget/DVAR pairs per method, run alternately")
    parser.add_argument("--paper-presets", action="store_true",
                        help="stop with each method's paper preset (--early-stop-preset METHOD), not dvar's default")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every trainer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads is not None:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    rows = []
    for method in args.methods:
        budgets, dvars = [], []
        for repeat in range(args.repeats):
            for early_stop, runs in ((False, budgets), (True, dvars)):
                summary = run(method, args.out, early_stop, args.extra, env, args.paper_presets)
                runs.append(summary)
                print(f"{method} {'DVAR' if early_stop else 'budget'} #{repeat + 1}: {summary['final_step']} steps, "
                      f"wall {summary['wall_time_s']:.1f}s (process {summary['process_wall_s']:.1f}s, CPU "
                      f"{summary['process_cpu_s']:.1f}s), step median {summary['median_step_s']:.4f}s"
                      + (f", evaluations {summary['eval_seconds']:.1f}s ({summary.get('reason')})" if early_stop else ""),
                      flush=True)
        rows.append((method, budgets, dvars))

    threads = env.get("OMP_NUM_THREADS", "default")
    print(f"\nmachine: {os.cpu_count()} CPUs, torch threads {threads}; medians over {args.repeats} alternating pair(s)\n")
    print("| method | budget steps | budget wall (s) | DVAR stop step | DVAR wall (s) | steps saved | time saved | DVAR eval share of its run |")
    print("|---|---|---|---|---|---|---|---|")
    for method, budgets, dvars in rows:
        budget_wall, dvar_wall = median(budgets, "wall_time_s"), median(dvars, "wall_time_s")
        dvar = dvars[0]  # the stop step is the same in every repeat (deterministic); checked below
        stop = dvar["stop_step"] if dvar["stopped_early"] else f"none ({dvar['final_step']})"
        share = median(dvars, "eval_seconds") / dvar_wall
        print(f"| {method} | {budgets[0]['final_step']} | {budget_wall:.0f} | {stop} | {dvar_wall:.0f} | "
              f"{budgets[0]['final_step'] - dvar['final_step']} | {1 - dvar_wall / budget_wall:.0%} | {share:.0%} |")
    print("\n| method | budget step median (s) | DVAR step median (s) | budget CPU (s) | DVAR CPU (s) |")
    print("|---|---|---|---|---|")
    for method, budgets, dvars in rows:
        print(f"| {method} | {median(budgets, 'median_step_s'):.4f} | {median(dvars, 'median_step_s'):.4f} | "
              f"{median(budgets, 'process_cpu_s'):.0f} | {median(dvars, 'process_cpu_s'):.0f} |")
        if len({summary["final_step"] for summary in dvars}) > 1:
            print(f"warning: {method}'s DVAR runs stopped at different steps: "
                  f"{[summary['final_step'] for summary in dvars]}", file=sys.stderr)
    (args.out / "table.json").write_text(json.dumps(
        [{"method": m, "threads": threads, "budget": b, "dvar": d} for m, b, d in rows], indent=2))


if __name__ == "__main__":
    main()

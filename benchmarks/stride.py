"""The stride study: how far DVAR's stop moves when it evaluates every k steps instead of every step.

Replays the every-step frozen-batch losses a benchmark recorded (``traces/<method>/<concept>.json``,
key ``"dvar"``) as :class:`~dvar.DVAREarlyStopping` with ``eval_every=k`` would see them: the
values at steps k, 2k, ..., a window of ``round(N / k)`` evaluations
(:func:`dvar.stride.strided_stop_step`). Attaching DVAR does not change training, so this is
the stop that run would have made. Per method and k it prints the median and maximum
|stop(k) - stop(1)|, the share of concepts whose stop moves by more than 1% of the window,
and how many stops appear or vanish inside the budget.

A benchmark trace ends where the benchmark stopped recording it (at its own every-step stop,
unless the concept was traced to the budget). When the strided rule has not fired by then, its
stop is unknown ("later than the trace", counted apart; never guessed). ``--record`` makes
traces without that limit: the benchmark's own ``full`` setup (same concepts, trainer flags,
budgets and seed) on the current weights, DVAR evaluated at every step to the end of the budget.

    python benchmarks/stride.py                                  # the committed full run (mini-SD v1)
    python benchmarks/stride.py runs/full --k 1 5 10 20 --markdown out.md
    python benchmarks/stride.py --record runs/stride --concepts-per-method 8 --threads 1   # then analyses it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from dvar.stride import AUTO_EVALS_PER_WINDOW, evaluations_in_window, resolve_eval_every, strided_stop_step

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO / "benchmarks" / "results" / "full" / "raw.tar.xz"
METHODS = ("textual_inversion", "dreambooth_lora", "custom_diffusion", "dreambooth")


@dataclass
class Trace:
    """One concept's every-step frozen-batch losses (``losses[i]`` after step ``i + 1``)."""

    method: str
    concept: str
    losses: List[float]
    window: int
    threshold: float
    budget: int
    recorded_stop: Optional[int]
    variants: Dict[str, dict]

    @property
    def full(self) -> bool:
        """Recorded to the end of the budget (else it ends at its own stop)."""
        return len(self.losses) >= self.budget


@dataclass
class Outcome:
    """stop(k) of one trace against stop(1)."""

    stop1: Optional[int]
    stopk: Optional[int]
    censored: bool  # the strided rule had not fired when the trace ends (and the trace ends before the budget)

    @property
    def delta(self) -> Optional[int]:
        """stop(k) - stop(1) when both are known (positive: the stride stops later)."""
        return None if self.censored or self.stop1 is None or self.stopk is None else self.stopk - self.stop1

    @property
    def shift(self) -> Optional[int]:
        return None if self.delta is None else abs(self.delta)


def load_traces(folder: Path) -> List[Trace]:
    """Every trace under ``folder/traces`` evaluated at every step, steps 1, 2, ... without gaps."""
    traces = []
    for path in sorted(folder.glob("traces/*/*.json")):
        data = json.loads(path.read_text())
        # v1 runs evaluated the "dvar" watch every step; later ones keep it at the default stride and record
        # the paper's every-step setting as the variant "dvar_every1"
        dvar = next((w for w in [data.get("dvar"), *data.get("dvar_variants", {}).values()]
                     if w and w.get("eval_every") == 1), None)
        if dvar is None:
            continue
        steps = dvar["steps"]
        if steps != list(range(1, len(steps) + 1)):
            raise ValueError(f"{path}: the DVAR steps are not 1, 2, ..., {len(steps)}; cannot replay strides.")
        traces.append(Trace(data["method"], data["concept"], dvar["eval_loss"], dvar["window"], dvar["threshold"],
                            data["max_train_steps"], dvar["stop_step"], data.get("dvar_variants", {})))
    if not traces:
        raise SystemExit(f"error: no every-step DVAR traces under {folder}/traces/<method>/<concept>.json")
    return traces


def outcome(trace: Trace, k: int) -> Outcome:
    stop1 = strided_stop_step(trace.losses, trace.window, trace.threshold, 1)
    stopk = strided_stop_step(trace.losses, trace.window, trace.threshold, k)
    return Outcome(stop1, stopk, censored=stopk is None and not trace.full)


def check_replay(traces: Sequence[Trace]) -> List[str]:
    """The replay against what the benchmark's own stoppers decided: stop(1), and every recorded
    ``dvar_every<k>`` variant (its values must be the trace's at its steps, its stop the replay's)."""
    problems, checked = [], 0
    for trace in traces:
        stop1 = strided_stop_step(trace.losses, trace.window, trace.threshold, 1)
        if stop1 != trace.recorded_stop:
            problems.append(f"{trace.method}/{trace.concept}: replayed stop {stop1}, recorded {trace.recorded_stop}")
        checked += 1
        for name, variant in trace.variants.items():
            k = variant.get("eval_every")
            if not k or variant.get("window") != trace.window:
                continue
            seen = [(s, v) for s, v in zip(variant["steps"], variant["eval_loss"]) if s <= len(trace.losses)]
            if any(trace.losses[s - 1] != v for s, v in seen):
                problems.append(f"{trace.method}/{trace.concept}: {name} losses differ from the every-step trace")
            replay = strided_stop_step(trace.losses, trace.window, trace.threshold, k)
            recorded = variant["stop_step"]
            if replay is not None or trace.full:  # else the trace ends first: nothing to compare
                if replay != recorded:
                    problems.append(f"{trace.method}/{trace.concept}: {name} replayed {replay}, recorded {recorded}")
                checked += 1
    return [f"replay check: {checked} recorded stops compared, {len(problems)} differ"] + problems


def method_rows(traces: Sequence[Trace], ks: Iterable[int]) -> List[Dict[str, object]]:
    window = traces[0].window
    rows = []
    for k in ks:
        outcomes = [outcome(t, k) for t in traces]
        shifts = [o.shift for o in outcomes if o.shift is not None]
        deltas = [o.delta for o in outcomes if o.delta is not None]
        rows.append({
            "k": k,
            "evaluations": evaluations_in_window(window, k),
            "resolved": len(shifts),
            "median": statistics.median(shifts) if shifts else None,
            "max": max(shifts) if shifts else None,
            "range": (min(deltas), max(deltas)) if deltas else None,
            "moved": sum(s > 0.01 * window for s in shifts),
            "later": sum(o.censored for o in outcomes),
            "appear": sum(o.stop1 is None and o.stopk is not None for o in outcomes),
            "vanish": sum(o.stop1 is not None and o.stopk is None and not o.censored for o in outcomes),
        })
    return rows


def table(method: str, traces: Sequence[Trace], rows: Sequence[Dict[str, object]]) -> str:
    window, threshold = traces[0].window, traces[0].threshold
    auto = resolve_eval_every("auto", window)
    full = sum(t.full for t in traces)
    lines = [
        f"### {method}: window {window} steps, threshold {threshold:g}, {len(traces)} concepts "
        f"({full} recorded to the budget), auto stride k = {auto}",
        "",
        "| k | evaluations per window | both fire in the trace | median \\|Δ\\| | max \\|Δ\\| | Δ from .. to "
        "| moved > 1% of window | stop(k) later than the trace | appear | vanish |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['moved']}/{r['resolved']} ({r['moved'] / r['resolved']:.0%})" if r["resolved"] else "-"
        median = "-" if r["median"] is None else f"{r['median']:g}"
        mark = " (auto)" if r["k"] == auto else ""
        span = "-" if r["range"] is None else f"{r['range'][0]:+d} .. {r['range'][1]:+d}"
        lines.append(f"| {r['k']}{mark} | {r['evaluations']} | {r['resolved']} | {median} | "
                     f"{'-' if r['max'] is None else r['max']} | {span} | {share} | {r['later']} | {r['appear']} | {r['vanish']} |")
    return "\n".join(lines)


def report(folder: Path, ks: Sequence[int], source: str) -> str:
    traces = load_traces(folder)
    by_method: Dict[str, List[Trace]] = {}
    for trace in traces:
        by_method.setdefault(trace.method, []).append(trace)
    parts = [
        f"# Stride study: {source}",
        "",
        "`python benchmarks/stride.py` replays each recorded every-step DVAR trace as the callback with "
        "`eval_every=k` would see it (values at steps k, 2k, ...; window round(N/k) evaluations). "
        "|Δ| = |stop(k) - stop(1)| in optimizer steps, over the concepts where both fire inside the recorded "
        "trace (Δ from .. to: the earliest and the latest stop(k) - stop(1), signed); \"later than the trace\": stop(k) comes after the trace ends (it was recorded only up to "
        "its every-step stop), so by how much is unknown; appear / vanish: a stop inside the budget with k "
        f"but not every step / the reverse (only decidable on traces recorded to the budget). "
        f"Auto stride: k = max(1, window // {AUTO_EVALS_PER_WINDOW}).",
        "",
        *check_replay(traces),
    ]
    for method in sorted(by_method, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS)):
        parts += ["", table(method, by_method[method], method_rows(by_method[method], ks))]
    return "\n".join(parts) + "\n"


def record(out: Path, methods: Sequence[str], per_method: int, threads: Optional[int]) -> None:
    """Every-step DVAR traces to the budget, in the benchmark's layout (resumable: done traces are kept)."""
    import torch

    sys.path.insert(0, str(REPO))  # run as a script: the benchmarks package is in the repository
    from benchmarks.personalization.config import preset
    from benchmarks.personalization.run import concept_arguments, method_instance, quiet_libraries
    from benchmarks.personalization.scoring import bundled_concepts
    from dvar.rules import first_stop_step, resolve_preset
    from dvar.integrations.trainer import main as train_main

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    quiet_libraries()
    concepts = bundled_concepts()
    # spread over the list (it is ordered by group: TI's 9, CD's 9, DreamBooth's 30)
    chosen = [concepts[round(i * len(concepts) / per_method)] for i in range(per_method)]
    for settings in preset("full").methods:
        if settings.method not in methods:
            continue
        default = resolve_preset(method_instance(settings.method).preset)
        window = settings.dvar_window or default.window
        threshold = settings.dvar_threshold or default.threshold
        for concept in chosen:
            path = out / "traces" / settings.method / f"{concept.name}.json"
            if path.exists():
                continue
            work = out / "work" / settings.method / concept.name
            _, data_args = concept_arguments(settings.method, concept)
            argv = data_args + settings.trainer_args() + [
                "--output_dir", str(work), "--overwrite_output_dir", "--seed", "0", "--num_validation_images", "0",
                "--checkpointing_steps", str(settings.max_train_steps + 1), "--early-stop",
                "--early-stop-eval-every", "1", "--early-stop-threshold", "1e-12",  # evaluates every step, never fires
            ]
            started = time.perf_counter()
            if train_main(method_instance(settings.method), argv) != 0:
                raise SystemExit(f"error: {settings.method} on {concept.name} failed")
            rows = (work / "dvar_history.csv").read_text().splitlines()[1:]
            steps = [int(row.split(",")[0]) for row in rows]
            losses = [float(row.split(",")[1]) for row in rows]
            trace = {
                "concept": concept.name, "method": settings.method, "max_train_steps": settings.max_train_steps,
                "seed": 0, "recorded_by": "benchmarks/stride.py --record",
                "dvar": {"steps": steps, "eval_loss": losses, "eval_every": 1, "window": window, "threshold": threshold,
                         "stop_step": first_stop_step(losses, window, threshold)},
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(trace))
            summary = json.loads((work / "dvar_summary.json").read_text())
            print(f"recorded {settings.method}/{concept.name}: {len(steps)} steps, every-step stop "
                  f"{trace['dvar']['stop_step']}, {time.perf_counter() - started:.0f} s "
                  f"(eval share {summary['eval_seconds'] / summary['wall_time_s']:.0%})", flush=True)
            shutil.rmtree(work)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", type=Path, default=[DEFAULT_SOURCE],
                        help="benchmark output folders, or their raw.tar.xz (default: the committed full run)")
    parser.add_argument("--k", type=int, nargs="+", default=list(range(1, 51)), help="strides to replay (default 1..50)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--record", type=Path, default=None,
                        help="first record every-step traces to the budget into this folder, then analyse it")
    parser.add_argument("--concepts-per-method", type=int, default=8, help="with --record: concepts per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS, help="with --record")
    parser.add_argument("--threads", type=int, default=None, help="with --record: torch CPU threads")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.k):
        parser.error("--k: strides must be >= 1")
    if args.record:
        record(args.record, args.methods, args.concepts_per_method, args.threads)
        args.sources = [args.record]
    texts = []
    for source in args.sources:
        if not source.exists():
            parser.error(f"{source} does not exist; pass a benchmark folder or its raw.tar.xz")
        try:
            label = str(source.resolve().relative_to(REPO))
        except ValueError:
            label = str(source)
        with tempfile.TemporaryDirectory() as tmp:
            folder = source
            if source.is_file():
                with tarfile.open(source) as archive:
                    archive.extractall(tmp, filter="data")
                folder = Path(tmp)
            texts.append(report(folder, sorted(set(args.k)), label))
    text = "\n".join(texts)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

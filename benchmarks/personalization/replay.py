"""Replay stopping rules on recorded trajectories: no training, the live callback's stop.

A trajectory records the frozen-batch loss the every-step DVAR watch computed at every step (and, from
benchmark format 2 on, each frozen example's loss and timestep). A rule is any object with
``update(value) -> bool`` and ``stop_step`` (the library's :class:`~dvar.DVARCriterion`,
:class:`~dvar.SettlingTimeCriterion`, a candidate): replaying it at stride k feeds it the values at steps
k, 2k, ... exactly as :class:`~dvar.DVAREarlyStopping` evaluating every k steps would, because every watch
of a run evaluates the same frozen batch on the same weights.

    # check that replaying each live rule (dvar, dvar_every1, auto, CLIP-s) gives the stop it had in the run
    python -m benchmarks.personalization.replay runs/full
    # where other rules would have stopped, one row per trajectory
    python -m benchmarks.personalization.replay runs/full --rule preset=auto --rule window=200,threshold=0.1 --csv stops.csv

Example:
    >>> from dvar import DVARCriterion
    >>> replay(DVARCriterion(window=3, threshold=0.2), [5.0, 4.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0], eval_every=2)
    8
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.personalization"

from .baselines import PatienceCriterion  # noqa: E402

SIGNALS = ("loss", "per_example_mean", "train_loss")
#: The live watches a trajectory records, by the variant they stop.
LIVE_WATCHES = ("dvar", "dvar_every1", "auto")


def replay(rule: Any, values: Sequence[float], eval_every: int = 1) -> Optional[int]:
    """Feed ``rule`` the every-step ``values`` (``values[i]``: after step ``i + 1``) at steps k, 2k, ...; its stop
    in optimizer steps, or None when it does not fire within them."""
    for count, value in enumerate(list(values)[eval_every - 1 :: eval_every], 1):
        if rule.update(value):
            return count * eval_every
    return None


def every_step_watch(trace: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The trace's DVAR watch that evaluated every step up to the budget, or None."""
    budget = trace["max_train_steps"]
    for watch in (trace.get("dvar"), *(trace.get("dvar_variants") or {}).values()):
        if watch and watch.get("eval_every") == 1 and len(watch.get("eval_loss", ())) >= budget:
            return watch
    return None


def signal(trace: Dict[str, Any], name: str = "loss") -> List[float]:
    """One value per step up to the budget: ``loss`` (the frozen-batch loss the callback computed),
    ``per_example_mean`` (the mean of the recorded per-example losses: the same up to float rounding) or
    ``train_loss``."""
    budget = trace["max_train_steps"]
    if name == "train_loss":
        return list(trace["train_loss"][:budget])
    watch = every_step_watch(trace)
    if watch is None:
        raise ValueError(f"{trace['method']} {trace['concept']}: no every-step frozen-batch loss to the budget")
    if name == "loss":
        return list(watch["eval_loss"][:budget])
    if name == "per_example_mean":
        per_example = (watch.get("per_example") or {}).get("losses")
        if not per_example:
            raise ValueError(f"{trace['method']} {trace['concept']}: no per-example losses (a format-1 trace)")
        return [float(np.mean(row)) for row in per_example[:budget]]
    raise ValueError(f"unknown signal {name!r}; choose one of {SIGNALS}")


def per_example_losses(trace: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """(losses, shape [steps, examples]; timesteps, shape [examples]) of the frozen batch, every step."""
    watch = every_step_watch(trace)
    data = (watch or {}).get("per_example") or {}
    if not data.get("losses"):
        raise ValueError(f"{trace['method']} {trace['concept']}: no per-example losses (a format-1 trace)")
    return np.asarray(data["losses"], dtype=np.float64), np.asarray(data["timesteps"], dtype=np.float64)


def rule_from_settings(settings: Dict[str, Any], budget: int) -> Tuple[Any, int]:
    """(a fresh rule, its stride) from ``DVARConfig`` fields (``preset``, ``window``, ``threshold``, ``eval_every``),
    built exactly as the callback builds it for a run of ``budget`` steps.

    >>> rule, every = rule_from_settings({"preset": "textual_inversion"}, 500)
    >>> type(rule).__name__, every
    ('DVARCriterion', 10)
    """
    from dvar import DVARConfig

    fields = {key: settings[key] for key in ("preset", "window", "threshold", "eval_every") if settings.get(key) is not None}
    config = DVARConfig(max_train_steps=budget, **fields)
    every = config.resolved_eval_every()
    if every is None:
        raise ValueError(f"{settings}: a timed stride ('5%') depends on the machine and cannot be replayed; give eval_every")
    return config.make_rule(every), every


def live_rule(watch: Dict[str, Any], budget: int) -> Tuple[Any, int]:
    """A fresh copy of the rule a recorded watch ran, and its stride."""
    if watch.get("window") is None:  # the window-free rule
        return rule_from_settings({"preset": "auto", "threshold": watch["threshold"], "eval_every": watch["eval_every"]},
                                  budget)
    return rule_from_settings({"window": watch["window"], "threshold": watch["threshold"],
                               "eval_every": watch["eval_every"]}, budget)


def replay_clip_s(trace: Dict[str, Any]) -> Optional[int]:
    """CLIP-s replayed on its recorded scores (format 2: ``clip_s_checks``); the step it stops at, or None."""
    checks = trace.get("clip_s_checks")
    if not checks:
        return None
    rule = PatienceCriterion(checks["eps"], checks["patience"])
    for step, score in zip(checks["steps"], checks["score"]):
        if rule.update(score):
            return step
    return None


def check_live_stops(trace: Dict[str, Any], signal_name: str = "loss") -> List[Dict[str, Any]]:
    """Per live rule of a trajectory: its recorded stop and the stop replayed on the recorded signal."""
    budget, values = trace["max_train_steps"], signal(trace, signal_name)
    watches = {"dvar": trace.get("dvar"), **(trace.get("dvar_variants") or {})}
    rows = []
    for name in LIVE_WATCHES:
        watch = watches.get(name)
        if not watch:
            continue
        rule, every = live_rule(watch, budget)
        replayed = replay(rule, values, every)
        rows.append({"method": trace["method"], "concept": trace["concept"], "rule": name, "signal": signal_name,
                     "live": watch["stop_step"], "replayed": replayed, "match": replayed == watch["stop_step"]})
    if trace.get("clip_s_checks"):
        live = trace["clip_s_checks"]["stop_step"]
        replayed = replay_clip_s(trace)
        rows.append({"method": trace["method"], "concept": trace["concept"], "rule": "clip_s", "signal": "clip_s scores",
                     "live": live, "replayed": replayed, "match": replayed == live})
    return rows


def parse_rule(text: str) -> Dict[str, Any]:
    """``preset=auto`` or ``window=200,threshold=0.1,eval_every=5`` as DVARConfig fields.

    >>> parse_rule("window=200,threshold=0.1,eval_every=5")
    {'window': 200, 'threshold': 0.1, 'eval_every': 5}
    """
    settings: Dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in ("preset", "window", "threshold", "eval_every") or not value:
            raise ValueError(f"--rule {text!r}: expected key=value pairs of preset, window, threshold, eval_every")
        settings[key] = value if key == "preset" else (float(value) if key == "threshold" else int(value))
    return settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .report import load_traces

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="Benchmark results folders (with traces/).")
    parser.add_argument("--rule", action="append", default=[],
                        help="A rule to replay, as DVARConfig fields: preset=auto, or window=N,threshold=A[,eval_every=K]. "
                             "Without --rule: check that each live rule's replay gives its recorded stop.")
    parser.add_argument("--signal", choices=SIGNALS, default="loss", help="What the rules read (default: loss).")
    parser.add_argument("--csv", type=Path, default=None, help="Write one row per trajectory and rule here.")
    args = parser.parse_args(argv)
    try:
        rules = [(text, parse_rule(text)) for text in args.rule]
        traces = [t for folder in args.folders for t in load_traces(folder) if every_step_watch(t) is not None]
        if not traces:
            raise ValueError(f"no trajectory with an every-step frozen-batch loss under {[str(f) for f in args.folders]}")
        rows: List[Dict[str, Any]] = []
        for trace in traces:
            if not rules:
                rows += check_live_stops(trace, args.signal)
                continue
            values = signal(trace, args.signal)
            for text, settings in rules:
                rule, every = rule_from_settings(settings, trace["max_train_steps"])
                rows.append({"method": trace["method"], "concept": trace["concept"], "rule": text,
                             "signal": args.signal, "stop": replay(rule, values, every), "reason": rule.reason})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if rules:
        for text, _ in rules:
            stops = [r["stop"] for r in rows if r["rule"] == text]
            fired = [s for s in stops if s is not None]
            print(f"{text}: fired on {len(fired)} of {len(stops)} trajectories"
                  + (f", median stop {float(np.median(fired)):.0f}" if fired else ""))
        return 0
    mismatches = [r for r in rows if not r["match"]]
    for name in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == name]
        print(f"{name}: replay gives the live stop on {sum(r['match'] for r in mine)} of {len(mine)} trajectories")
    for r in mismatches[:20]:
        print(f"  MISMATCH {r['method']} {r['concept']} {r['rule']}: live {r['live']}, replayed {r['replayed']}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

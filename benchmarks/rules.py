"""Which stopping rule transfers? Replay candidate rules on recorded trajectories, judged by each concept's
own saturation step (issue 12).

Every trajectory of a benchmark run with ``loss_to_budget`` and ``checks_to_budget`` (the ``full`` preset;
``--lr-scale`` runs for the learning-rate axis) holds the every-step frozen-batch loss and the identity
checks from step 0 to the budget. Attaching a stopper does not change training, so replaying a rule on the
loss gives the step that rule would have stopped at, and the checks say what identity the weights had there
(interpolated between checks) and where the concept saturated
(:func:`benchmarks.personalization.saturation.oracle_saturation`).

Per candidate x method x learning-rate scale it reports: median and IQR of stop / saturation (still-rising
concepts censored at the budget, flat ones left out: ``saturation.CENSORING_RULE``), the share of the oracle
saving captured, identity regret at the stop (plateau minus identity), the shares stopped before saturation
(too early) and after twice it (too late), the step speedup (budget / stop) and the wall-clock speedup over the
budget (the run's own step and evaluation times), and whether the rule keeps quality: the mean paired identity
change against the budget (check identity at the stop minus at the budget) with its 95% paired bootstrap CI and
the non-inferiority decision at the margin (``personalization.noninferiority``), the median and Wilcoxon p kept
as secondary columns.

Concepts are split by their position in the run's concept list: even positions choose the candidate
(``selection``), odd positions report it (``held_out``), so the reported numbers are not tuned on
themselves.

    python benchmarks/rules.py runs/full runs/full-lr0.5 runs/full-lr2 --markdown benchmarks/results/rules.md
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.candidates import replay_stop_step, settled_stop_step  # noqa: E402
from benchmarks.personalization.config import METHOD_ORDER  # noqa: E402
from benchmarks.personalization.noninferiority import MARGIN, noninferiority_row  # noqa: E402
from benchmarks.personalization.report import load_meta, load_records, load_traces  # noqa: E402
from benchmarks.personalization.saturation import (  # noqa: E402
    Saturation,
    censored_saturation,
    check_noise_sd,
    oracle_saturation,
    saving_captured,
)
from benchmarks.personalization.stats import median, median_iqr  # noqa: E402
from dvar.rules import SettlingTimeCriterion, resolve_preset  # noqa: E402
from dvar.stride import budget_stride, resolve_eval_every, strided_stop_step  # noqa: E402

HALVES = ("selection", "held_out")


@dataclass
class Trajectory:
    """One recorded run: its every-step frozen-batch loss, identity checks and timings."""

    method: str
    concept: str
    half: str
    lr_scale: float
    budget: int
    losses: List[float]  # losses[i]: after step i + 1
    check_steps: List[int]
    check_identity: List[float]
    saturation: Saturation
    train_step_s: List[float]
    eval_s: float  # one frozen-batch evaluation (median over the run)

    def identity_at(self, step: int) -> float:
        """Check identity at ``step``, linear between the checks around it."""
        return float(np.interp(step, self.check_steps, self.check_identity))

    def seconds_to(self, step: int, evaluations: int) -> float:
        return float(sum(self.train_step_s[:step])) + evaluations * self.eval_s


def _every_step_watch(trace: dict) -> Optional[dict]:
    for watch in [trace.get("dvar"), *trace.get("dvar_variants", {}).values()]:
        if watch and watch.get("eval_every") == 1:
            return watch
    return None


def load_trajectories(folder: Path) -> List[Trajectory]:
    """The trajectories of one benchmark folder that can be replayed and judged (loss and checks to the budget)."""
    meta, traces, records = load_meta(folder), load_traces(folder), load_records(folder)
    lr_scale = float(meta.get("lr_scale", 1.0))
    noise = check_noise_sd(records, traces)
    if set(noise) != {t["method"] for t in traces}:  # a method with under 2 retests: the methods' pooled noise
        pooled = check_noise_sd([{**r, "method": "all"} for r in records], [{**t, "method": "all"} for t in traces])
        noise = {t["method"]: noise.get(t["method"], pooled.get("all")) for t in traces}
    order = {m: names for m, names in meta.get("concepts", {}).items()}
    out = []
    for trace in traces:
        method, watch, checks = trace["method"], _every_step_watch(trace), trace["identity_checks"]
        budget, steps = trace["max_train_steps"], checks.get("steps") or []
        if watch is None or len(watch["eval_loss"]) < budget or not steps or steps[0] != 0 or steps[-1] < budget:
            continue
        if not noise.get(method):
            continue
        names = order.get(method, [])
        position = names.index(trace["concept"]) if trace["concept"] in names else 0
        out.append(Trajectory(
            method, trace["concept"], HALVES[position % 2], lr_scale, budget, watch["eval_loss"][:budget],
            steps, checks["identity"], oracle_saturation(steps, checks["identity"], noise[method]),
            trace["train_step_s"], float(np.median(watch["eval_s"])),
        ))
    return out


# ------------------------------------------------------------------------------------------ candidates

Rule = Callable[[Trajectory], "tuple[Optional[int], int]"]  # -> (stop step or None, evaluations until it)


def paper_preset(t: Trajectory) -> tuple:
    """The paper's window and threshold for the method, at the default stride (window // 30)."""
    preset = resolve_preset(t.method)
    k = resolve_eval_every("auto", preset.window)
    stop = strided_stop_step(t.losses, preset.window, preset.threshold, k)
    return stop, (stop or t.budget) // k


def settled(tolerance: float, fraction: float = 0.5, min_evaluations: int = 20, z: float = 2.0) -> Rule:
    """The slope rule (:class:`benchmarks.candidates.SettledCriterion`, ``auto`` before issue 12) at the budget's
    stride (budget // 100)."""

    def rule(t: Trajectory) -> tuple:
        k = budget_stride(t.budget)
        stop = settled_stop_step(t.losses, k, tolerance=tolerance, fraction=fraction,
                                 min_evaluations=min_evaluations, z=z)
        return stop, (stop or t.budget) // k

    return rule


def fraction_window(fraction: float, threshold: float, floor: int = 10) -> Rule:
    """DVAR with a window that is a fixed share of the evaluations so far: var(last f*n) / var(all) < alpha."""

    def rule(t: Trajectory) -> tuple:
        k = budget_stride(t.budget)
        y = np.asarray(t.losses[k - 1::k], dtype=np.float64)
        y = y - y[0]
        s1, s2 = np.concatenate([[0.0], np.cumsum(y)]), np.concatenate([[0.0], np.cumsum(y * y)])
        for n in range(2 * floor, y.size + 1):
            w = max(floor, math.ceil(fraction * n))
            total = s2[n] / n - (s1[n] / n) ** 2
            recent = (s2[n] - s2[n - w]) / w - ((s1[n] - s1[n - w]) / w) ** 2
            if total > 0 and recent / total < threshold:
                return n * k, n
        return None, y.size

    return rule


def settling_time(multiple: float, level: float = 0.9, smooth: int = 5, min_evaluations: int = 20) -> Rule:
    """:class:`dvar.rules.SettlingTimeCriterion` (a window from the loss's own settling time) at the budget's
    stride: stop once the run is ``multiple`` times as long as its smoothed loss took to cover ``level`` of its drop."""

    def rule(t: Trajectory) -> tuple:
        k = budget_stride(t.budget)
        rule = SettlingTimeCriterion(multiple=multiple, level=level, smooth=smooth, min_evaluations=min_evaluations)
        stop = replay_stop_step(rule, t.losses, k)
        return stop, (stop or t.budget) // k

    return rule


def candidates() -> Dict[str, Rule]:
    """The paper's presets, the shipped ``auto`` and its neighbours, fraction-of-the-run windows and windows from
    the loss's settling time."""
    rules: Dict[str, Rule] = {"paper": paper_preset}
    for tolerance in (0.05, 0.1, 0.2, 0.3):
        for fraction in (1 / 3, 0.5):
            for z in (0.0, 2.0):
                rules[f"settled tol={tolerance:g} f={fraction:.2g} z={z:g}"] = settled(tolerance, fraction, z=z)
    for fraction in (0.25, 0.5):
        for threshold in (0.1, 0.2, 0.4):
            rules[f"fraction-window f={fraction:g} alpha={threshold:g}"] = fraction_window(fraction, threshold)
    for level in (0.8, 0.9):
        for multiple in (1.5, 2.0, 3.0):
            rules[f"settling-time level={level:g} x{multiple:g}"] = settling_time(multiple, level)
    return rules


AUTO = "settling-time level=0.8 x2"  # what preset="auto" ships (dvar.rules.AUTO_LEVEL / AUTO_MULTIPLE)


# ------------------------------------------------------------------------------------------ judging


def judge(t: Trajectory, rule: Rule) -> dict:
    stop, evaluations = rule(t)
    at = stop if stop is not None else t.budget
    sat = t.saturation
    judged_at = censored_saturation(sat, t.budget)
    return {
        "method": t.method, "concept": t.concept, "half": t.half, "lr_scale": t.lr_scale, "budget": t.budget,
        "stop": stop, "saturation_step": sat.step, "saturation_status": sat.status,
        "ratio": at / judged_at if judged_at else None,
        "saving_captured": saving_captured(at, judged_at, t.budget),
        "regret": sat.plateau - t.identity_at(at) if sat.plateau is not None else None,
        "identity_change": t.identity_at(at) - t.identity_at(t.budget),
        "step_speedup": t.budget / at,
        "speedup": t.seconds_to(t.budget, 0) / t.seconds_to(at, evaluations),
    }


def summarize(rows: List[dict], margin: float = MARGIN) -> dict:
    """One cell of the comparison (rows of one candidate, method, learning rate and half)."""
    judged = [r for r in rows if r["ratio"] is not None]
    ratios = [r["ratio"] for r in judged]
    ratio_median, ratio_iqr = median_iqr(ratios)
    decision = noninferiority_row(rows[0]["method"], "", [r["identity_change"] for r in rows], margin)
    return {
        "n": len(rows), "saturated": len(ratios), "ratio_median": ratio_median, "ratio_iqr": ratio_iqr,
        "abs_error_median": median(abs(x - 1) for x in ratios),
        "saving_captured_median": median(r["saving_captured"] for r in judged),
        "regret_median": median(r["regret"] for r in rows),
        "too_early": sum(x < 1 for x in ratios) / len(ratios) if ratios else None,
        "too_late": sum(x > 2 for x in ratios) / len(ratios) if ratios else None,
        "step_speedup_median": median(r["step_speedup"] for r in rows),
        "speedup_median": median(r["speedup"] for r in rows),
        "mean_delta": decision["mean_delta"], "ci_low": decision["ci_low"], "ci_high": decision["ci_high"],
        "margin": margin, "noninferior": decision["noninferior"],
        "identity_change_median": decision["median_delta"], "identity_p": decision["wilcoxon_p"],
    }


def compare(trajectories: Sequence[Trajectory], rules: Dict[str, Rule]) -> List[dict]:
    """Per candidate x method x learning-rate scale x half: :func:`summarize` of its judged stops."""
    judged = {name: [judge(t, rule) for t in trajectories] for name, rule in rules.items()}
    cells = []
    for name, rows in judged.items():
        keys = sorted({(r["method"], r["lr_scale"], r["half"]) for r in rows},
                      key=lambda key: (METHOD_ORDER.index(key[0]) if key[0] in METHOD_ORDER else 99, key[1], key[2]))
        for method, scale, half in keys:
            mine = [r for r in rows if (r["method"], r["lr_scale"], r["half"]) == (method, scale, half)]
            cells.append({"rule": name, "method": method, "lr_scale": scale, "half": half, **summarize(mine)})
    return cells


def choose(cells: List[dict], half: str = "selection") -> Optional[str]:
    """The candidate with the lowest median |stop / saturation - 1| over the half's cells, among those that are
    non-inferior to the budget in every one of them (the paper presets are the reference, not a candidate)."""
    scores = {}
    for name in {c["rule"] for c in cells if c["rule"] != "paper"}:
        mine = [c for c in cells if c["rule"] == name and c["half"] == half]
        errors = [c["abs_error_median"] for c in mine if c["abs_error_median"] is not None]
        if mine and errors and all(c["noninferior"] == "yes" for c in mine):
            scores[name] = float(np.median(errors))
    return min(scores, key=scores.get) if scores else None


def meets_target(cell: dict) -> bool:
    """Issue 12's bar for ``auto`` in one cell: median stop / saturation in [0.8, 1.5], non-inferior to the budget."""
    return (cell["ratio_median"] is not None and 0.8 <= cell["ratio_median"] <= 1.5
            and cell["noninferior"] == "yes")


# ------------------------------------------------------------------------------------------ output

COLUMNS = ("rule", "method", "lr_scale", "half", "n", "saturated", "ratio_median", "ratio_iqr", "abs_error_median",
           "saving_captured_median", "regret_median", "too_early", "too_late", "step_speedup_median", "speedup_median",
           "mean_delta", "ci_low", "ci_high", "margin", "noninferior", "identity_change_median", "identity_p")


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(cells: List[dict], chosen: Optional[str], trajectories: Sequence[Trajectory]) -> str:
    lines = [f"{len(trajectories)} trajectories: " + ", ".join(
        f"{m} x{s:g}: {sum(t.method == m and t.lr_scale == s for t in trajectories)}"
        for m, s in sorted({(t.method, t.lr_scale) for t in trajectories}))]
    lines.append(f"\nChosen on the selection half (even positions): **{chosen or 'none qualifies'}**; "
                 f"shipped as preset='auto': `{AUTO}`.\n")
    head = ("| rule | method | lr x | n (judged) | stop / saturation, median (IQR) | saving captured | regret | "
            "too early | too late | step speedup | speedup | mean Δ identity [95% CI] | non-inferior |")
    for half in HALVES:
        shown = [c for c in cells if c["half"] == half and (half == "selection" or c["rule"] in {"paper", AUTO, chosen})]
        lines += [f"\n### {half.replace('_', '-')} half\n", head, "|" + "---|" * 13]
        for c in shown:
            lines.append(
                f"| {c['rule']} | {c['method']} | {c['lr_scale']:g} | {c['n']} ({c['saturated']}) | "
                f"{_fmt(c['ratio_median'])} ({_fmt(c['ratio_iqr'])}) | {_fmt(c['saving_captured_median'])} | "
                f"{_fmt(c['regret_median'])} | {_fmt(c['too_early'])} | {_fmt(c['too_late'])} | "
                f"{_fmt(c['step_speedup_median'])} | {_fmt(c['speedup_median'])} | "
                f"{_fmt(c['mean_delta'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] | {c['noninferior']} |")
    held = [c for c in cells if c["half"] == "held_out"]
    for name in dict.fromkeys([AUTO, chosen, "paper"]):
        mine = [c for c in held if c["rule"] == name]
        if name and mine:
            errors = [c["abs_error_median"] for c in mine if c["abs_error_median"] is not None]
            lines.append(f"\nheld-out, {name}: target met in {sum(map(meets_target, mine))} of {len(mine)} cells; "
                         f"median over cells of median |stop / saturation - 1|: {_fmt(median(errors))}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="Benchmark result folders (full, --lr-scale runs).")
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the tables here.")
    parser.add_argument("--csv", type=Path, default=None, help="Write every cell here.")
    args = parser.parse_args(argv)
    trajectories = [t for folder in args.folders for t in load_trajectories(folder)]
    if not trajectories:
        print("error: no trajectory with its every-step loss and identity checks up to the budget under "
              f"{[str(f) for f in args.folders]} (run the benchmark's full preset first)", file=sys.stderr)
        return 2
    cells = compare(trajectories, candidates())
    chosen = choose(cells)
    text = markdown(cells, chosen, trajectories)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: c[k] for k in COLUMNS} for c in cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())

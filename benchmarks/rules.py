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
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.candidates import PflugCriterion, replay_stop_step, settled_stop_step  # noqa: E402
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
from dvar.rules import AllSettled, SettlingTimeCriterion, resolve_preset, timestep_bands  # noqa: E402
from dvar.stride import budget_stride, resolve_eval_every, strided_stop_step  # noqa: E402

HALVES = ("selection", "held_out")
#: ``--pooled``: every concept in one set (the design set of all 48, or a fresh confirmation set)
POOLED = "all"


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
    model: str = "mini-sd"
    #: format 3: each frozen example's loss every step ([budget, examples]) and its timestep ([examples])
    per_example: Optional[np.ndarray] = field(default=None, repr=False)
    timesteps: Optional[np.ndarray] = field(default=None, repr=False)
    #: format 3: per step, u_t . u_(t-1) of the trained weights' updates (None at step 1) and |w_t - w_0|^2
    dot_previous: Optional[List[Optional[float]]] = field(default=None, repr=False)
    displacement_sq: Optional[List[float]] = field(default=None, repr=False)

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


def model_name(meta: dict) -> str:
    """``mini-sd`` / ``mini-flow`` for the embedded models, else the model as the run recorded it."""
    recorded = str(meta.get("model", "mini-SD (embedded)"))
    for name in ("mini-sd", "mini-flow"):
        if recorded.lower().startswith(name):
            return name
    return recorded


def rescoring_folder(folder: Path, name: str) -> Path:
    """Where ``benchmarks.personalization.rescore --name NAME`` wrote a benchmark folder's rescoring."""
    return Path(folder) / "rescored" / name


def pooled_checks(folder: Path, trace: dict, check_per_prompt: int, rescored: Sequence[str]) -> tuple:
    """(identity per check, image factor): each check's identity pooled, image for image, with the same weights'
    identity in each rescoring ``folder/rescored/NAME`` (``benchmarks.personalization.rescore``, another sampling
    seed); the factor is the pooled images over the check's own, so the check noise falls by its square root.

    A rescoring that lacks this trajectory or one of its checks is an error: a concept judged on fewer images
    than the others would weigh differently without saying so."""
    steps, identity = trace["identity_checks"]["steps"], list(trace["identity_checks"]["identity"])
    total = float(check_per_prompt)
    sums = [value * check_per_prompt for value in identity]
    for name in rescored:
        path = rescoring_folder(folder, name) / trace["method"] / f"{trace['concept']}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: rescoring {name!r} has not scored {trace['method']} {trace['concept']} "
                                    f"yet (python -m benchmarks.personalization.rescore {folder} --name {name} ...)")
        data = json.loads(path.read_text())
        per_prompt = int(data["settings"]["images_per_prompt"])
        missing = [s for s in steps if str(s) not in data["steps"]]
        if missing:
            raise ValueError(f"{path}: no score for the checks at steps {missing[:5]} (rescore with --steps checks)")
        sums = [acc + data["steps"][str(s)]["identity"] * per_prompt for acc, s in zip(sums, steps)]
        total += per_prompt
    return [acc / total for acc in sums], total / check_per_prompt


def load_trajectories(folder: Path, rescored: Sequence[str] = ()) -> List[Trajectory]:
    """The trajectories of one benchmark folder that can be replayed and judged (loss and checks to the budget),
    their checks pooled with the rescorings named in ``rescored`` (:func:`pooled_checks`)."""
    meta, traces, records = load_meta(folder), load_traces(folder), load_records(folder)
    check_per_prompt = int(meta.get("config", {}).get("sampling", {}).get("check_images_per_prompt", 8))
    lr_scale, model = float(meta.get("lr_scale", 1.0)), model_name(meta)
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
        per_example = watch.get("per_example") or {}
        updates = trace.get("updates") or {}
        identity, factor = pooled_checks(folder, trace, check_per_prompt, rescored)
        out.append(Trajectory(
            method, trace["concept"], HALVES[position % 2], lr_scale, budget, watch["eval_loss"][:budget],
            steps, identity, oracle_saturation(steps, identity, noise[method] / math.sqrt(factor)),
            trace["train_step_s"], float(np.median(watch["eval_s"])), model,
            np.asarray(per_example["losses"][:budget], dtype=np.float64) if per_example.get("losses") else None,
            np.asarray(per_example["timesteps"], dtype=np.float64) if per_example.get("timesteps") else None,
            updates.get("dot_previous", [])[:budget] or None, updates.get("displacement_sq", [])[:budget] or None,
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


class MissingSignal(ValueError):
    """A candidate needs a signal this trajectory did not record."""


def _require(t: Trajectory, name: str) -> np.ndarray:
    value = getattr(t, name)
    if value is None:
        if name in ("dot_previous", "displacement_sq") and t.per_example is not None:
            why = ("a format-3 trace whose run skipped the update statistics (--no-update-statistics, or more trained "
                   "parameters than monitors.UPDATE_STATISTICS_MAX_PARAMETERS)")
        else:
            why = "a trace before format 3; rerun the benchmark to replay this candidate"
        raise MissingSignal(f"{t.method} {t.concept}: the trace has no {name} ({why})")
    return value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float64)


def normalized_examples(t: Trajectory, k: int) -> np.ndarray:
    """Each frozen example's loss at steps k, 2k, ... divided by its own first value there ([evaluations, examples])."""
    seen = _require(t, "per_example")[k - 1::k]
    return seen / seen[0]


def normalized_settling(multiple: float, level: float) -> Rule:
    """N: the settling-time rule on the mean over examples of each one's loss / its first value, so that the mid
    and high-noise examples (small losses that move little in absolute terms) weigh as much as the low-noise ones."""

    def rule(t: Trajectory) -> tuple:
        k = budget_stride(t.budget)
        values = normalized_examples(t, k).mean(axis=1)
        stop = replay_stop_step(SettlingTimeCriterion(multiple=multiple, level=level), values, 1)
        return (None if stop is None else stop * k), stop or values.size

    return rule


def band_settling(multiple: float, level: float, bands: int = 3, flat_bands: str = "hold") -> Rule:
    """B: the frozen examples in ``bands`` timestep bands, each normalised as N; the settling-time rule on each,
    stopping once every band has settled. Bf (``flat_bands="skip"``): a band that has not fallen beyond its noise does
    not hold the stop once another has settled (``DVARConfig(signal="bands", flat_bands="skip")``)."""

    def rule(t: Trajectory) -> tuple:
        k = budget_stride(t.budget)
        normalized = normalized_examples(t, k)
        groups = [g for g in timestep_bands(_require(t, "timesteps").tolist(), bands) if g]
        signals = np.stack([normalized[:, g].mean(axis=1) for g in groups], axis=1)
        watcher = AllSettled([SettlingTimeCriterion(multiple=multiple, level=level) for _ in groups],
                             flat_holds=flat_bands != "skip")
        stop = replay_stop_step(watcher, list(signals), 1)
        return (None if stop is None else stop * k), stop or signals.shape[0]

    return rule


def pflug(burn_in_share: float, min_steps: int) -> Rule:
    """F: Pflug's diagnostic (:class:`benchmarks.candidates.PflugCriterion`) on every step's update; no forward pass."""

    def rule(t: Trajectory) -> tuple:
        dots = t.dot_previous if t.dot_previous is not None else _require(t, "dot_previous")
        criterion = PflugCriterion(max(1, round(burn_in_share * t.budget)), min_steps)
        return replay_stop_step(criterion, dots, 1), 0

    return rule


def displacement_settling(multiple: float, level: float) -> Rule:
    """D: the settling-time rule on minus the squared distance the trained weights travelled from the start (it
    rises, the rule watches falls), at the budget's stride; no forward pass."""

    def rule(t: Trajectory) -> tuple:
        k = budget_stride(t.budget)
        values = -_require(t, "displacement_sq")
        stop = replay_stop_step(SettlingTimeCriterion(multiple=multiple, level=level), values, k)
        return stop, 0

    return rule


def displacement_exponent(below: float, min_evaluations: int = 20) -> Rule:
    """E: the growth exponent of the distance travelled, ``log2(D(t) / D(t/2))`` with ``D = |w_t - w_0|^2``, at the
    budget's stride: 2 while the weights move in one direction, 1 once they diffuse, 0 once confined. Stop at the
    first evaluation (from ``min_evaluations`` on) where it is below ``below``; no forward pass.

    >>> from types import SimpleNamespace as NS
    >>> steps = np.arange(1, 1001, dtype=float)
    >>> directed_then_diffusing = np.where(steps < 300, steps**2, 300.0**2 + 300.0 * (steps - 300))
    >>> displacement_exponent(1.5)(NS(budget=1000, displacement_sq=directed_then_diffusing))[0]
    440
    >>> displacement_exponent(1.5)(NS(budget=1000, displacement_sq=steps**2))[0] is None  # directed to the end
    True
    """

    def rule(t: Trajectory) -> tuple:
        k = budget_stride(t.budget)
        seen = _require(t, "displacement_sq")[k - 1::k]  # D after steps k, 2k, ...
        for i in range(max(min_evaluations, 2), seen.size + 1):  # evaluation i is step i * k
            now, half = seen[i - 1], seen[i // 2 - 1]
            if half > 0 and now > 0 and math.log2(now / half) < below:
                return i * k, 0
        return None, 0

    return rule


def guarded(main: Rule, guard: Rule) -> Rule:
    """G: ``main``'s stop, but not before ``guard`` has fired; never when either never fires. The guard's
    evaluations come from the same forward passes (B) or none (F), so the count is ``main``'s."""

    def rule(t: Trajectory) -> tuple:
        (stop, evaluations), (guard_stop, _) = main(t), guard(t)
        if stop is None or guard_stop is None:
            return None, evaluations
        final = max(stop, guard_stop)
        return final, final // budget_stride(t.budget)

    return rule


def not_before(rule: Rule, share: float) -> Rule:
    """H: ``rule``'s stop, but not before ``share`` of the budget (a run that fires earlier goes on to the first
    evaluation at or after that step, at the same stride); never when ``rule`` never fires. This is
    ``DVARConfig(min_steps=ceil(share * budget))`` (:class:`dvar.rules.NotBefore`) in the callback.

    >>> from types import SimpleNamespace as NS
    >>> not_before(lambda t: (100, 10), 0.4)(NS(budget=1000))
    (400, 40)
    """

    def guarded_rule(t: Trajectory) -> tuple:
        stop, evaluations = rule(t)
        if stop is None:
            return None, evaluations
        k = budget_stride(t.budget)
        floor = k * math.ceil(math.ceil(share * t.budget) / k)
        final = max(stop, floor)
        return final, (evaluations * final) // stop if stop else evaluations

    return guarded_rule


def oracle_multiple(multiple: float) -> Rule:
    """A reference, not a candidate: stop at ``multiple`` times the concept's own saturation step, which no rule can
    know while training (never on a flat or still-rising concept). It shows what a rule that tracked saturation
    exactly would keep and save. Its identity is read from the checks that placed the saturation step, so it is
    an optimistic frontier unless those checks are precise (``--rescored``).

    >>> from types import SimpleNamespace as NS
    >>> oracle_multiple(1.5)(NS(budget=500, saturation=NS(step=100, status="saturated")))
    (150, 0)
    """

    def rule(t: Trajectory) -> tuple:
        if t.saturation.status != "saturated" or t.saturation.step is None:
            return None, 0
        return min(t.budget, max(1, math.ceil(multiple * t.saturation.step))), 0

    return rule


#: The rows that are not candidates: the paper presets and the saturation oracles (``oracle_multiple``).
ORACLE_MULTIPLES = (1.25, 1.5, 2.0)
REFERENCES = ("paper", *(f"oracle x{m:g}" for m in ORACLE_MULTIPLES))


def default_candidates() -> Dict[str, Rule]:
    """Issue 23's candidates for the default rule, as written down before any replay
    (``benchmarks/results/rules/default-candidates.md``), and the references (``REFERENCES``): the paper presets
    and stops at a multiple of each concept's own saturation step."""
    rules: Dict[str, Rule] = {"paper": paper_preset}
    for multiple in ORACLE_MULTIPLES:
        rules[f"oracle x{multiple:g}"] = oracle_multiple(multiple)
    for level in (0.8, 0.9):
        for multiple in (1.5, 2.0, 3.0):
            rules[f"S level={level:g} x{multiple:g}"] = settling_time(multiple, level)
    for level in (0.8, 0.9):
        for multiple in (1.5, 2.0):
            rules[f"N level={level:g} x{multiple:g}"] = normalized_settling(multiple, level)
    for multiple in (1.5, 2.0):
        rules[f"B level=0.8 x{multiple:g}"] = band_settling(multiple, 0.8)
    for share in (0.05, 0.1):
        for steps in (10, 50):
            rules[f"F b={share:.0%} m={steps}"] = pflug(share, steps)
    for level in (0.8, 0.9):
        for multiple in (1.5, 2.0):
            rules[f"D level={level:g} x{multiple:g}"] = displacement_settling(multiple, level)
    for multiple in (1.5, 2.0):
        main = settling_time(multiple, 0.8)
        rules[f"G S x{multiple:g} guard F"] = guarded(main, pflug(0.1, 10))
        rules[f"G S x{multiple:g} guard B"] = guarded(main, band_settling(1.5, 0.8))
    for share in (0.3, 0.4):  # added 2026-12-07: default-candidates.md, "Added later"
        rules[f"H N level=0.8 x2 from {share:.0%}"] = not_before(normalized_settling(2.0, 0.8), share)
        rules[f"H S level=0.8 x1.5 from {share:.0%}"] = not_before(settling_time(1.5, 0.8), share)
    for share in (0.3, 0.4, 0.5):  # added 2026-12-07 (sixth session): default-candidates.md, "Added later"
        rules[f"H B level=0.8 x1.5 from {share:.0%}"] = not_before(band_settling(1.5, 0.8), share)
    for below in (1.5, 1.0):  # added 2026-12-07 (sixth session), before its first replay
        rules[f"E a={below:g}"] = displacement_exponent(below)
    rules["G B x1.5 guard E a=1.5"] = guarded(band_settling(1.5, 0.8), displacement_exponent(1.5))
    rules["B level=0.8 x1.75"] = band_settling(1.75, 0.8)  # added 2026-12-07 (seventh session), before its replay
    rules["B level=0.9 x1.5"] = band_settling(1.5, 0.9)
    # added 2026-12-08 (ninth session), for the choice on all 48 concepts confirmed on a fresh set
    for multiple in (2.5, 3.0, 4.0):
        rules[f"B level=0.8 x{multiple:g}"] = band_settling(multiple, 0.8)
        rules[f"N level=0.8 x{multiple:g}"] = normalized_settling(multiple, 0.8)
    for share in (0.3, 0.4, 0.5):
        rules[f"H B level=0.8 x2 from {share:.0%}"] = not_before(band_settling(2.0, 0.8), share)
        rules[f"H S level=0.8 x2 from {share:.0%}"] = not_before(settling_time(2.0, 0.8), share)
        rules[f"H paper from {share:.0%}"] = not_before(paper_preset, share)
    for multiple in (1.5, 1.75, 2.0):
        skipping = band_settling(multiple, 0.8, flat_bands="skip")
        rules[f"Bf level=0.8 x{multiple:g}"] = skipping
        rules[f"H Bf level=0.8 x{multiple:g} from 40%"] = not_before(skipping, 0.4)
    return rules


def issue12_candidates() -> Dict[str, Rule]:
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


CANDIDATE_LISTS = {"default": default_candidates, "issue12": issue12_candidates}
AUTO = "settling-time level=0.8 x2"  # what preset="auto" ships (dvar.rules.AUTO_LEVEL / AUTO_MULTIPLE)


# ------------------------------------------------------------------------------------------ judging


def judge(t: Trajectory, rule: Rule) -> dict:
    stop, evaluations = rule(t)
    at = stop if stop is not None else t.budget
    sat = t.saturation
    judged_at = censored_saturation(sat, t.budget)
    return {
        "model": t.model, "method": t.method, "concept": t.concept, "half": t.half, "lr_scale": t.lr_scale,
        "budget": t.budget,
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
        "saving_captured_mean": float(np.mean([r["saving_captured"] for r in judged])) if judged else None,
        "regret_median": median(r["regret"] for r in rows),
        "too_early": sum(x < 1 for x in ratios) / len(ratios) if ratios else None,
        "too_late": sum(x > 2 for x in ratios) / len(ratios) if ratios else None,
        "step_speedup_median": median(r["step_speedup"] for r in rows),
        "speedup_median": median(r["speedup"] for r in rows),
        "mean_delta": decision["mean_delta"], "ci_low": decision["ci_low"], "ci_high": decision["ci_high"],
        "margin": margin, "noninferior": decision["noninferior"],
        "identity_change_median": decision["median_delta"], "identity_p": decision["wilcoxon_p"],
    }


def compare(trajectories: Sequence[Trajectory], rules: Dict[str, Rule],
            skipped: Optional[Dict[str, List[str]]] = None) -> List[dict]:
    """Per candidate x method x learning-rate scale x half: :func:`summarize` of its judged stops. A trajectory
    without the signal a candidate needs (:class:`MissingSignal`) is left out of that candidate's cells and listed
    in ``skipped[candidate]`` (its message)."""
    judged: Dict[str, List[dict]] = {}
    for name, rule in rules.items():
        judged[name] = []
        for t in trajectories:
            try:
                judged[name].append(judge(t, rule))
            except MissingSignal as missing:
                if skipped is not None:
                    skipped.setdefault(name, []).append(str(missing))
    cells = []
    for name, rows in judged.items():
        keys = sorted({(r["model"], r["method"], r["lr_scale"], r["half"]) for r in rows},
                      key=lambda key: (key[0], METHOD_ORDER.index(key[1]) if key[1] in METHOD_ORDER else 99, *key[2:]))
        for model, method, scale, half in keys:
            mine = [r for r in rows if (r["model"], r["method"], r["lr_scale"], r["half"]) == (model, method, scale, half)]
            cells.append({"rule": name, "model": model, "method": method, "lr_scale": scale, "half": half,
                          **summarize(mine)})
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


#: The prefix of the method-aware candidate's name (M in default-candidates.md).
METHOD_AWARE = "M"


def choose_default(cells: List[dict], half: str = "selection", reference: Sequence[str] = REFERENCES) -> Optional[str]:
    """Issue 23's pre-registered choice on ``half``: among the candidates non-inferior in every method x learning
    rate cell, the highest smallest-over-methods median saving captured at 1x (then mean saving); if none is, the
    method-aware candidate M (:func:`method_aware_cells`, when ``cells`` hold it) if it is non-inferior in every
    cell; else the one whose worst cell's CI low is highest (nearest to non-inferior), then by saving; ties go to
    the earlier, simpler, candidate. When single candidates are non-inferior everywhere but none meets the bar
    (:func:`meets_default_bar`), M competes with them on saving: the issue allows a method-aware default "only if
    one rule cannot do it", and a single rule that hardly stops cannot (amendment of 2026-12-08). ``reference``
    (the paper presets, the saturation oracles) are not candidates,
    and neither is a rule that never stops before the budget for some method at 1x (mean saving captured 0): it is
    trivially non-inferior, and a default that does not stop is no stopping rule. A rule that stops on few
    concepts (median saving 0, mean above 0) is a candidate: the issue's fallback is the best rule non-inferior in
    every cell. (Amendments of 2026-12-07, default-candidates.md.) None when no candidate is left.

    >>> cells = [{"rule": r, "half": "selection", "method": m, "lr_scale": 1.0, "noninferior": ok,
    ...           "saving_captured_median": s, "saving_captured_mean": s}
    ...          for r, m, ok, s in [("a", "ti", "yes", 0.5), ("a", "cd", "yes", 0.7),
    ...          ("b", "ti", "yes", 0.9), ("b", "cd", "no", 0.9), ("c", "ti", "yes", 0.6), ("c", "cd", "yes", 0.6)]]
    >>> choose_default(cells)
    'c'
    >>> choose_default(cells + [{**c, "rule": "never", "noninferior": "yes", "saving_captured_median": 0.0,
    ...                          "saving_captured_mean": 0.0} for c in cells if c["rule"] == "a"])
    'c'

    No single rule meets the bar (0.6 at 1x): the method-aware one that saves more is taken.

    >>> slow = [{**c, "saving_captured_median": 0.1, "saving_captured_mean": 0.1} for c in cells if c["rule"] == "c"]
    >>> aware = [{**c, "rule": "M ti: x; cd: y", "saving_captured_median": 0.5} for c in slow]
    >>> choose_default(slow + aware)
    'M ti: x; cd: y'
    """
    names = list(dict.fromkeys(c["rule"] for c in cells if c["rule"] not in reference and c["half"] == half))

    def lowest(values: List[Optional[float]]) -> float:  # a missing or non-finite value counts as the worst
        return min((x if x is not None and math.isfinite(x) else -math.inf) for x in values) if values else -math.inf

    def worst(name: str, key: str) -> float:
        return lowest([c.get(key) for c in cells if c["rule"] == name and c["half"] == half and c["lr_scale"] == 1.0])

    def saving(name: str) -> tuple:
        return worst(name, "saving_captured_median"), worst(name, "saving_captured_mean")

    names = [name for name in names if worst(name, "saving_captured_mean") > 0]
    if not names:
        return None

    def cells_of(name: str) -> List[dict]:
        return [c for c in cells if c["rule"] == name and c["half"] == half]

    def everywhere(candidates: List[str]) -> List[str]:
        return [name for name in candidates if all(c["noninferior"] == "yes" for c in cells_of(name))]

    single = everywhere([name for name in names if not name.startswith(f"{METHOD_AWARE} ")])
    method_aware = everywhere([name for name in names if name.startswith(f"{METHOD_AWARE} ")])
    # no single rule meets the bar: M competes with the safe ones on saving (amendment of 2026-12-08)
    contenders = single if any(meets_default_bar(cells_of(name), half) for name in single) else single + method_aware
    if contenders:
        return max(contenders, key=lambda name: (*saving(name), -names.index(name)))

    def closest(name: str) -> tuple:  # the worst cell's CI low nearest the margin, then the saving
        return lowest([c["ci_low"] for c in cells_of(name)]), *saving(name), -names.index(name)

    return max(names, key=closest)


def method_aware_cells(cells: List[dict], half: str = "selection", reference: Sequence[str] = REFERENCES,
                       excluded: Optional[Dict[str, Sequence[str]]] = None) -> List[dict]:
    """Candidate M of default-candidates.md, built from the others' cells: for each method, the candidate that
    :func:`choose_default` picks on that method's ``half`` cells alone, with the paper preset among the candidates
    there (so the paper preset where it is non-inferior in every cell of the method and no other such candidate saves
    more; amendment of the sixth session). Its cells (both halves) are those rules' cells, named
    ``"M textual_inversion: paper; dreambooth_lora: B level=0.8 x2; ..."``; none when a method has no candidate
    left. ``excluded[method]``: that method's candidates that failed a check outside the benchmark (the main job
    did not stop), left out for it (``--exclude``).

    >>> cells = [{"rule": r, "half": "selection", "method": m, "lr_scale": 1.0, "noninferior": ok,
    ...           "saving_captured_median": s, "saving_captured_mean": s}
    ...          for r, m, ok, s in [("paper", "ti", "yes", 0.5), ("paper", "cd", "no", 0.5), ("a", "ti", "no", 0.5),
    ...                              ("a", "cd", "yes", 0.5), ("b", "ti", "yes", 0.3), ("b", "cd", "yes", 0.6)]]
    >>> sorted({c["rule"] for c in method_aware_cells(cells)})
    ['M ti: paper; cd: b']
    >>> sorted({c["rule"] for c in method_aware_cells(cells, excluded={"ti": ["paper"]})})
    ['M ti: b; cd: b']
    """
    methods = list(dict.fromkeys(c["method"] for c in cells))
    candidates_here = tuple(name for name in reference if name != "paper")
    parts: Dict[str, str] = {}
    for method in methods:
        left_out = (excluded or {}).get(method, ())
        mine = [c for c in cells if c["method"] == method and not c["rule"].startswith(f"{METHOD_AWARE} ")
                and c["rule"] not in left_out]
        chosen = choose_default(mine, half, candidates_here)
        if chosen is None:
            return []
        parts[method] = chosen
    return compose_method_aware(cells, parts)


def compose_method_aware(cells: List[dict], parts: Dict[str, str]) -> List[dict]:
    """The cells of the method-aware rule that uses ``parts[method]`` for each method (methods without a part are
    left out), under its name."""
    name = f"{METHOD_AWARE} " + "; ".join(f"{method}: {rule}" for method, rule in parts.items())
    return [{**c, "rule": name} for c in cells if c["method"] in parts and c["rule"] == parts[c["method"]]]


def parse_method_aware(name: str) -> Dict[str, str]:
    """The parts of a method-aware rule's name.

    >>> parse_method_aware("M textual_inversion: paper; dreambooth_lora: B level=0.8 x2")
    {'textual_inversion': 'paper', 'dreambooth_lora': 'B level=0.8 x2'}
    """
    body = name[len(METHOD_AWARE) + 1:] if name.startswith(f"{METHOD_AWARE} ") else ""
    parts = dict(part.split(": ", 1) for part in body.split("; ") if ": " in part)
    if not parts:
        raise ValueError(f"{name!r} is not a method-aware rule ('M method: rule; method: rule')")
    return parts


def meets_target(cell: dict) -> bool:
    """Issue 12's bar for ``auto`` in one cell: median stop / saturation in [0.8, 1.5], non-inferior to the budget."""
    return (cell["ratio_median"] is not None and 0.8 <= cell["ratio_median"] <= 1.5
            and cell["noninferior"] == "yes")


#: Issue 23's bar at 1x: the median share of the oracle saving captured, per method.
SAVING_BAR = 0.6


def meets_default_bar(cells: List[dict], half: str = "held_out") -> bool:
    """Issue 23's bar for one rule on ``half``: non-inferior in every cell, median saving captured >= 0.6 at 1x."""
    mine = [c for c in cells if c["half"] == half]
    return bool(mine) and all(c["noninferior"] == "yes" for c in mine) and all(
        c["saving_captured_median"] is not None and c["saving_captured_median"] >= SAVING_BAR
        for c in mine if c["lr_scale"] == 1.0)


DEFAULT_COLUMNS = ("model", "method", "lr_scale", "half", "n", "mean_delta", "ci_low", "ci_high", "margin",
                   "saving_captured", "stop_over_saturation")


def default_rows(cells: List[dict], rule: str) -> List[dict]:
    """``default.csv``: the chosen rule's cells, both halves."""
    return [{**{k: c[k] for k in DEFAULT_COLUMNS if k in c}, "saving_captured": c["saving_captured_median"],
             "stop_over_saturation": c["ratio_median"]} for c in cells if c["rule"] == rule]


# ------------------------------------------------------------------------------------------ output

COLUMNS = ("rule", "model", "method", "lr_scale", "half", "n", "saturated", "ratio_median", "ratio_iqr", "abs_error_median",
           "saving_captured_median", "saving_captured_mean", "regret_median", "too_early", "too_late", "step_speedup_median", "speedup_median",
           "mean_delta", "ci_low", "ci_high", "margin", "noninferior", "identity_change_median", "identity_p")


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(cells: List[dict], chosen: Optional[str], trajectories: Sequence[Trajectory], how: str = "") -> str:
    lines = [f"{len(trajectories)} trajectories: " + ", ".join(
        f"{model} {m} x{s:g}: {sum((t.model, t.method, t.lr_scale) == (model, m, s) for t in trajectories)}"
        for model, m, s in sorted({(t.model, t.method, t.lr_scale) for t in trajectories}))]
    lines.append(f"\n{how or 'Chosen on the selection half (even positions)'}: **{chosen or 'none qualifies'}**; "
                 f"(`preset='auto'` ships `{AUTO}`).\n")
    head = ("| rule | model | method | lr x | n (judged) | stop / saturation, median (IQR) | saving captured | regret | "
            "too early | too late | step speedup | speedup | mean Δ identity [95% CI] | non-inferior |")
    for half in [h for h in (*HALVES, POOLED) if any(c["half"] == h for c in cells)]:
        shown = [c for c in cells if c["half"] == half and (half != "held_out" or c["rule"] in {"paper", AUTO, chosen})]
        title = "all concepts, one set" if half == POOLED else f"{half.replace('_', '-')} half"
        lines += [f"\n### {title}\n", head, "|" + "---|" * 14]
        for c in shown:
            lines.append(
                f"| {c['rule']}{' (reference)' if c['rule'] in REFERENCES else ''} | {c['model']} | {c['method']} | "
                f"{c['lr_scale']:g} | {c['n']} ({c['saturated']}) | "
                f"{_fmt(c['ratio_median'])} ({_fmt(c['ratio_iqr'])}) | {_fmt(c['saving_captured_median'])} | "
                f"{_fmt(c['regret_median'])} | {_fmt(c['too_early'])} | {_fmt(c['too_late'])} | "
                f"{_fmt(c['step_speedup_median'])} | {_fmt(c['speedup_median'])} | "
                f"{_fmt(c['mean_delta'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] | {c['noninferior']} |")
    reported = "held_out" if any(c["half"] == "held_out" for c in cells) else POOLED
    held = [c for c in cells if c["half"] == reported]
    for name in dict.fromkeys([AUTO, chosen, "paper"]):
        mine = [c for c in held if c["rule"] == name]
        if name and mine:
            errors = [c["abs_error_median"] for c in mine if c["abs_error_median"] is not None]
            where = "held-out" if reported == "held_out" else "all concepts"
            lines.append(f"\n{where}, {name}: non-inferior in {sum(c['noninferior'] == 'yes' for c in mine)} of "
                         f"{len(mine)} cells; issue 12's target (stop / saturation in [0.8, 1.5] and non-inferior) met "
                         f"in {sum(map(meets_target, mine))}; issue 23's bar (non-inferior everywhere, saving captured "
                         f">= {SAVING_BAR:g} at 1x): {'met' if meets_default_bar(mine, reported) else 'not met'}; "
                         f"median over cells of median |stop / saturation - 1|: {_fmt(median(errors))}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="Benchmark result folders (full, --lr-scale runs).")
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the tables here.")
    parser.add_argument("--csv", type=Path, default=None, help="Write every cell here.")
    parser.add_argument("--rescored", nargs="*", default=[], metavar="NAME",
                        help="Pool each identity check with these rescorings of its weights (OUT/rescored/NAME, "
                             "another seed): less check noise, narrower intervals. A folder without OUT/rescored/NAME "
                             "is judged on its own checks (a note says so); one that has it must hold every "
                             "trajectory.")
    parser.add_argument("--candidates", choices=sorted(CANDIDATE_LISTS), default="default",
                        help="default: issue 23's pre-registered list (default-candidates.md); issue12: issue 12's.")
    parser.add_argument("--rule", default=None,
                        help="Report this candidate as the chosen one instead of choosing (a held-out model or axis).")
    parser.add_argument("--default-csv", type=Path, default=None,
                        help="Write the chosen rule's cells here (issue 23's default.csv columns).")
    parser.add_argument("--exclude", action="append", default=[], metavar="METHOD=RULE",
                        help="Leave RULE out of METHOD's part of the method-aware candidate, and out of the single "
                             "candidates: it failed a check outside the benchmark (e.g. the README's main job did not "
                             "stop). Repeatable.")
    parser.add_argument("--selection-only", action="store_true",
                        help="Replay the selection half's trajectories only, leaving the held-out ones unread: make "
                             "the choice before any held-out number exists.")
    parser.add_argument("--pooled", action="store_true",
                        help="Judge every concept as one set (half 'all') instead of splitting by position: choose on "
                             "all of them (the design set), or report a fresh set with --rule.")
    args = parser.parse_args(argv)
    if args.selection_only and args.pooled:
        parser.error("--selection-only and --pooled: pick one (the selection half, or every concept as one set)")
    if args.selection_only and args.default_csv:
        parser.error("--default-csv reports the held-out half: leave out --selection-only")
    excluded: Dict[str, List[str]] = {}
    for item in args.exclude:
        method, _, rule = item.partition("=")
        if not method or not rule:
            parser.error(f"--exclude {item!r}: give METHOD=RULE, e.g. 'textual_inversion=H B level=0.8 x1.5 from 40%'")
        excluded.setdefault(method, []).append(rule)
    left_out = {rule for rules_out in excluded.values() for rule in rules_out}
    rescored_in = {folder: [n for n in args.rescored if rescoring_folder(folder, n).is_dir()] for folder in args.folders}
    for folder, names in rescored_in.items():
        for name in args.rescored:
            if name not in names:
                print(f"note: {folder} has no rescoring {name!r}: its trajectories are judged on their own checks",
                      file=sys.stderr)
    try:
        trajectories = [t for folder in args.folders for t in load_trajectories(folder, rescored_in[folder])
                        if not args.selection_only or t.half == HALVES[0]]
        if args.pooled:
            trajectories = [dataclasses.replace(t, half=POOLED) for t in trajectories]
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not trajectories:
        print("error: no trajectory with its every-step loss and identity checks up to the budget under "
              f"{[str(f) for f in args.folders]} (run the benchmark's full preset first)", file=sys.stderr)
        return 2
    rules = CANDIDATE_LISTS[args.candidates]()
    try:
        parts = (parse_method_aware(args.rule) if args.rule is not None and args.rule.startswith(f"{METHOD_AWARE} ")
                 else None)
    except ValueError as error:
        print(f"error: --rule: {error}", file=sys.stderr)
        return 2
    named = list(parts.values()) if parts else [args.rule] if args.rule is not None else []
    named += sorted(left_out)
    unknown = [rule for rule in named if rule not in rules]
    if unknown:
        print(f"error: {unknown[0]!r} (--rule, --exclude) is not one of the {args.candidates} candidates: {sorted(rules)}",
              file=sys.stderr)
        return 2
    skipped: Dict[str, List[str]] = {}
    cells = compare(trajectories, rules, skipped)
    for name, messages in skipped.items():
        print(f"note: {name} left out {len(messages)} trajectories without its signal, e.g. {messages[0]}",
              file=sys.stderr)
    if args.rule is not None:
        chosen, how = args.rule, "Given (--rule, not chosen on this data)"
        if parts:  # a method-aware rule: its parts for the methods these trajectories have
            composed = compose_method_aware(cells, {m: r for m, r in parts.items() if any(c["method"] == m for c in cells)})
            cells += composed
            chosen = composed[0]["rule"] if composed else chosen
    else:
        design = POOLED if args.pooled else HALVES[0]
        if args.candidates == "default":
            cells += method_aware_cells(cells, design, excluded=excluded)
            chosen = choose_default([c for c in cells if c["rule"] not in left_out], design)
        else:
            chosen = choose(cells, design)
        how = ("Chosen on all concepts (--pooled)" if args.pooled else "Chosen on the selection half (even positions)") + "".join(
            f"; left out for {method} (failed outside the benchmark): {', '.join(rules_out)}"
            for method, rules_out in excluded.items())
    text = markdown(cells, chosen, trajectories, how)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: c[k] for k in COLUMNS} for c in cells)
    if args.default_csv and not chosen:
        print(f"error: no candidate qualifies as the default, so {args.default_csv} was not written", file=sys.stderr)
        return 1
    if args.default_csv:
        with open(args.default_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=DEFAULT_COLUMNS)
            writer.writeheader()
            writer.writerows(default_rows(cells, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())

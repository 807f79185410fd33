"""The report's plots (matplotlib, Agg): per-concept curves, speedup against quality, informativeness, ablation."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import METHOD_ORDER, VARIANTS
from .stats import finite, ordered
from .tables import ABLATION_SETTINGS, every_step_loss, paired_changes

MAX_CURVE_CONCEPTS = 6


VARIANT_COLORS = {"baseline": "tab:gray", "clip_s": "tab:orange", "few_iters": "tab:green", "dvar": "tab:blue",
                  "dvar_every1": "tab:purple", "early25": "tab:brown", "early10": "tab:red", "step0": "black"}
METHOD_MARKERS = {"textual_inversion": "o", "dreambooth_lora": "s", "custom_diffusion": "^", "dreambooth": "D"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _trailing_means(values: Sequence[float], window: int) -> np.ndarray:
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def _normalised(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    span = np.nanmax(values) - np.nanmin(values)
    return (values - np.nanmin(values)) / span if span > 0 else np.zeros_like(values)


def plot_curves(path: Path, traces: list[dict], stops: dict[tuple[str, str], dict[str, int]]) -> None:
    """Per concept: DVAR loss and identity (top), smoothed training loss (bottom), each variant's stop step."""
    plt = _pyplot()
    traces = traces[:MAX_CURVE_CONCEPTS]
    columns = min(3, len(traces))
    rows = math.ceil(len(traces) / columns)
    figure = plt.figure(figsize=(5 * columns, 5 * rows), constrained_layout=True)
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=[2, 1] * rows)
    for index, trace in enumerate(traces):
        row, column = divmod(index, columns)
        top = figure.add_subplot(grid[2 * row, column])
        bottom = figure.add_subplot(grid[2 * row + 1, column], sharex=top)
        dvar, checks = every_step_loss(trace) or trace.get("dvar") or {}, trace.get("identity_checks") or {}
        if dvar.get("steps"):
            top.plot(dvar["steps"], dvar["eval_loss"], color="tab:blue", label="DVAR loss (frozen batch)")
        top.set_ylabel("DVAR loss")
        top.set_title(trace["concept"])
        if checks.get("steps"):
            identity_axis = top.twinx()
            identity_axis.plot(checks["steps"], checks["identity"], "o-", color="tab:red", markersize=3,
                               label="identity")
            identity_axis.set_ylabel("identity")
        if trace.get("train_loss"):
            window = int(checks.get("every") or max(1, len(trace["train_loss"]) // 50))
            steps = np.arange(1, len(trace["train_loss"]) + 1)
            bottom.plot(steps, _trailing_means(trace["train_loss"], window), color="tab:purple")
        bottom.set_ylabel("train loss (smoothed)")
        bottom.set_xlabel("step")
        for variant, step in stops.get((trace["method"], trace["concept"]), {}).items():
            for axis in (top, bottom):
                axis.axvline(step, color=VARIANT_COLORS.get(variant, "black"), linestyle="--", linewidth=1,
                             label=f"{variant} stop" if axis is top else None)
        if index == 0:
            handles, labels = top.get_legend_handles_labels()
            if checks.get("steps"):
                extra_handles, extra_labels = identity_axis.get_legend_handles_labels()
                handles, labels = handles + extra_handles, labels + extra_labels
            top.legend(handles, labels, fontsize="small", loc="center right")
    figure.suptitle(traces[0]["method"])
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_speedup_vs_quality(path: Path, changes: list[dict]) -> None:
    """Identity change against speedup over the baseline, coloured by variant, marker by method."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 5), constrained_layout=True)
    # step 0's "speedup" (setup and save only) would squash every other point into the left edge
    points = [c for c in changes if c["speedup"] is not None and c["identity_change"] is not None
              and c["variant"] != "step0"]
    for change in points:
        axis.scatter(change["speedup"], change["identity_change"], color=VARIANT_COLORS.get(change["variant"], "black"),
                     marker=METHOD_MARKERS.get(change["method"], "x"), alpha=0.8)
    axis.axvline(1, color="gray", linewidth=0.8)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xlabel("speedup over the full budget (x)")
    axis.set_ylabel("identity change vs the full budget")
    variants = ordered({c["variant"] for c in points}, VARIANTS)
    methods = ordered({c["method"] for c in points}, METHOD_ORDER)
    colour_legend = axis.legend(
        [plt.Line2D([], [], color=VARIANT_COLORS.get(v, "black"), marker="o", linestyle="") for v in variants],
        variants, title="variant", loc="upper left", fontsize="small")
    axis.add_artist(colour_legend)
    axis.legend([plt.Line2D([], [], color="black", marker=METHOD_MARKERS.get(m, "x"), linestyle="") for m in methods],
                methods, title="method", loc="lower left", fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_informativeness(path: Path, rows: list[dict]) -> None:
    """Box and strip plot of rho per method for the DVAR loss, the training loss and its smoothed version."""
    plt = _pyplot()
    methods = ordered({row["method"] for row in rows}, METHOD_ORDER)
    losses = {"rho_eval_loss": ("DVAR loss", "tab:blue"), "rho_train_loss": ("train loss", "tab:gray"),
              "rho_train_loss_smoothed": ("smoothed train loss", "tab:purple")}
    figure, axis = plt.subplots(figsize=(2.5 + 2 * len(methods), 4.5), constrained_layout=True)
    width = 0.25
    for offset, (column, (label, colour)) in zip((-width, 0, width), losses.items()):
        for position, method in enumerate(methods):
            values = finite(row[column] for row in rows if row["method"] == method)
            if not values.size:
                continue
            x = position + offset
            box = axis.boxplot(values, positions=[x], widths=width * 0.8, patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(colour)
                patch.set_alpha(0.35)
            axis.scatter(np.full(values.size, x), values, color=colour, s=12, zorder=3,
                         label=label if position == 0 else None)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xticks(range(len(methods)), methods)
    axis.set_ylim(-1.05, 1.05)
    axis.set_ylabel("Spearman rho with identity")
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_ablation(path: Path, trace: dict) -> None:
    """One concept's eval-loss curve per frozen-batch setting, normalised to [0, 1], identity overlaid."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ablation = trace["ablation"]
    for setting in ordered(ablation, ABLATION_SETTINGS):
        curve = ablation[setting]
        if not curve.get("steps"):
            continue
        label = "fully frozen" if setting == "none" else f"{setting} redrawn"
        (line,) = axis.plot(curve["steps"], _normalised(curve["eval_loss"]), linewidth=1, label=label)
        if curve.get("stop_step") is not None:
            axis.axvline(curve["stop_step"], color=line.get_color(), linestyle=":", linewidth=1)
    checks = trace.get("identity_checks") or {}
    if checks.get("steps"):
        axis.plot(checks["steps"], _normalised(checks["identity"]), "k--o", markersize=3, label="identity")
    axis.set_xlabel("step")
    axis.set_ylabel("normalised to [0, 1]")
    axis.set_title(f"{trace['method']} / {trace['concept']}: frozen-batch ablation")
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_plots(folder: Path, records: list[dict], traces: list[dict], info: list[dict]) -> list[Path]:
    """Write every plot the data allow and return their paths."""
    stops: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for record in records:
        if record.get("steps") is not None:
            stops[record["method"], record["concept"]][record["variant"]] = record["steps"]
    for key in stops:
        stops[key] = {v: stops[key][v] for v in ordered(stops[key], VARIANTS)}

    written = []
    for method in ordered({t["method"] for t in traces}, METHOD_ORDER):
        path = folder / f"curves_{method}.png"
        # Traced concepts first: their identity is checked up to the budget, not only up to the CLIP-s stop.
        traced_first = sorted((t for t in traces if t["method"] == method), key=lambda t: not t.get("informative"))
        plot_curves(path, traced_first, stops)
        written.append(path)
    changes = paired_changes(records)
    if any(c["speedup"] is not None and c["identity_change"] is not None for c in changes):
        written.append(folder / "speedup_vs_quality.png")
        plot_speedup_vs_quality(written[-1], changes)
    if info:
        written.append(folder / "informativeness.png")
        plot_informativeness(written[-1], info)
    with_ablation = [t for t in traces if t.get("ablation")]
    if with_ablation:
        written.append(folder / "ablation.png")
        plot_ablation(written[-1], max(with_ablation, key=lambda t: bool(t.get("informative"))))
    return written

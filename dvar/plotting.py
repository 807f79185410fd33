"""Plots of the DVAR history (matplotlib, headless)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence, Union


def plot_history(
    history: Sequence[Any], threshold: float, stop_step: Optional[int], path: Union[str, Path],
    statistic_name: str = "var(last N) / var(all)", stops_when: str = "below",
) -> Path:
    """Eval loss (or, with ``signal="normalized"``, the value the rule watched) and training loss over steps
    above the rule's statistic, with its threshold and the stop marked; ``history`` rows have
    step/eval_loss/statistic/train_loss (and signal).

    Example:
        >>> from dvar.reporting import HistoryRow
        >>> rows = [HistoryRow(s, 1 / s, 0.5 / s, float("nan")) for s in range(1, 20)]
        >>> import tempfile; plot_history(rows, 0.1, 10, Path(tempfile.mkdtemp()) / "h.png").suffix
        '.png'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [row.step for row in history]
    fig, (ax_loss, ax_var) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, constrained_layout=True)
    train = [row.train_loss for row in history]
    handles = []
    if any(not math.isnan(v) for v in train):
        # Its own axis: the training loss is often 10x noisier than the frozen-batch loss.
        ax_train = ax_loss.twinx()
        handles += ax_train.plot(steps, train, color="0.8", linewidth=0.6, label="training loss (right axis)")
        ax_train.set_ylabel("training loss", color="0.5")
        ax_loss.set_zorder(ax_train.get_zorder() + 1)
        ax_loss.patch.set_visible(False)
    signal = [getattr(row, "signal", math.nan) for row in history]
    if any(not math.isnan(v) and v != row.eval_loss for v, row in zip(signal, history)):  # signal="normalized"
        handles += ax_loss.plot(steps, signal, color="C0", label="mean of each frozen example's loss / its first (DVAR)")
        ax_loss.set_ylabel("normalized frozen-batch loss")
    else:
        handles += ax_loss.plot(steps, [row.eval_loss for row in history], color="C0", label="frozen-batch loss (DVAR)")
        ax_loss.set_ylabel("frozen-batch loss")
    ax_var.plot(steps, [row.statistic for row in history], color="C1", label=statistic_name)
    ax_var.axhline(threshold, color="C3", linestyle="--", linewidth=1,
                   label=f"threshold {threshold:g} (stops {'below' if stops_when == 'below' else 'at or above'} it)")
    ax_var.set_ylabel(textwrap.fill(statistic_name, 34), fontsize=9)  # a long name would run into the panel above
    ax_var.set_xlabel("optimizer step")
    ax_var.set_ylim(bottom=0)
    for ax in (ax_loss, ax_var):
        if stop_step is not None:
            line = ax.axvline(stop_step, color="C2", linewidth=1.2, label=f"stop at step {stop_step}")
            if ax is ax_loss:
                handles.append(line)
        ax.grid(alpha=0.3)
    ax_loss.legend(handles=handles, loc="upper right", fontsize=8)
    ax_var.legend(loc="upper right", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

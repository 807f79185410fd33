"""Plots of the DVAR history (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union


def plot_history(
    history: Sequence[Any], threshold: float, stop_step: Optional[int], path: Union[str, Path]
) -> Path:
    """Eval loss (and training loss) over steps above the normalized variance, with the
    threshold and the stop marked; ``history`` rows have step/eval_loss/normalized_variance/train_loss."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [row.step for row in history]
    fig, (ax_loss, ax_var) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, constrained_layout=True)
    train = [row.train_loss for row in history]
    if any(not math.isnan(v) for v in train):
        ax_loss.plot(steps, train, color="0.75", linewidth=0.8, label="training loss")
    ax_loss.plot(steps, [row.eval_loss for row in history], color="C0", label="frozen-batch loss (DVAR)")
    ax_loss.set_ylabel("loss")
    ax_var.plot(steps, [row.normalized_variance for row in history], color="C1", label="var(last N) / var(all)")
    ax_var.axhline(threshold, color="C3", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax_var.set_ylabel("normalized variance")
    ax_var.set_xlabel("optimizer step")
    ax_var.set_ylim(bottom=0)
    for ax in (ax_loss, ax_var):
        if stop_step is not None:
            ax.axvline(stop_step, color="C2", linewidth=1.2, label=f"stop at step {stop_step}")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

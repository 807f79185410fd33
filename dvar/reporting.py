"""What a stopper tells its user: the stop line, the history (CSV and plot) and ``dvar_summary.json``."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

HISTORY_COLUMNS = ("step", "eval_loss", "statistic", "train_loss", "signal")
SUMMARY_FILE = "dvar_summary.json"
DIVERGED_ADVICE = "lower the learning rate, or train in fp32/bf16 instead of fp16"

logger = logging.getLogger("dvar.callback")


@dataclass
class HistoryRow:
    """One evaluation: its step, the frozen-batch loss, the rule's statistic, the training loss and the value
    the rule was fed (the loss itself, or with ``signal="normalized"`` the mean of each example's loss over its
    first)."""

    step: int
    eval_loss: float
    statistic: float
    train_loss: float
    signal: float = math.nan


def stop_message(stop_step: int, max_train_steps: Optional[int], reason: Optional[str], diverged: bool = False) -> str:
    """The one line that announces a stop (the callback's and the trainers').

    Example:
        >>> stop_message(346, 600, "plateau: var(last 310) / var(all 346) = 0.1497 < 0.15")
        'DVAR stopped training at step 346 of 600 (254 steps, 42% of the budget, saved): plateau: var(last 310) / var(all 346) = 0.1497 < 0.15'
        >>> stop_message(12, 600, "non-finite: loss became nan at value 12", diverged=True)
        'DVAR ended training at step 12 of 600 because it diverged (non-finite: loss became nan at value 12): lower the learning rate, or train in fp32/bf16 instead of fp16'
    """
    if diverged:
        budget = f" of {max_train_steps}" if max_train_steps else ""
        return f"DVAR ended training at step {stop_step}{budget} because it diverged ({reason}): {DIVERGED_ADVICE}"
    if not max_train_steps:
        return f"DVAR stopped training at step {stop_step}: {reason}"
    saved = max_train_steps - stop_step
    return (
        f"DVAR stopped training at step {stop_step} of {max_train_steps} "
        f"({saved} steps, {saved / max_train_steps:.0%} of the budget, saved): {reason}"
    )


def write_atomically(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a reader (or an
    interrupted run) sees the old file or the new one, never half of one.

    >>> import tempfile
    >>> path = write_atomically(Path(tempfile.mkdtemp()) / "a.txt", "hello")
    >>> path.read_text(), oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    ('hello', True)
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as out:
            out.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it owner-only; a plain open() would not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def history_csv(history: Sequence[HistoryRow], eval_every: Optional[int], stop_step: Optional[int],
                reason: Optional[str]) -> str:
    """The history as CSV text; the stop row carries its ``stop_reason``."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow((*HISTORY_COLUMNS, "eval_every", "stop_reason"))
    for row in history:
        writer.writerow([row.step, repr(row.eval_loss), repr(row.statistic), repr(row.train_loss), repr(row.signal), eval_every,
                         reason if row.step == stop_step else ""])
    return buffer.getvalue()


def summary_json(summary: Dict[str, Any]) -> str:
    return json.dumps(summary, indent=2) + "\n"


def plot_or_explain(history: Sequence[HistoryRow], rule: Any, stop_step: Optional[int], path: Path) -> Optional[Path]:
    """The history plot, or None with a warning that says how to get it when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        logger.warning("dvar: matplotlib is not installed, so %s was not drawn (the CSV beside it has the same "
                       "numbers); `pip install matplotlib` (or dvar[plot]) to get it.", path.name)
        return None
    from .plotting import plot_history

    return plot_history(history, rule.threshold, stop_step, path, statistic_name=rule.statistic_name,
                        stops_when=rule.stops_when)


def format_statistic(value: float) -> str:
    """``"n/a"`` for nan, else four significant digits.

    >>> format_statistic(float("nan")), format_statistic(0.123456)
    ('n/a', '0.1235')
    """
    return "n/a" if math.isnan(value) else f"{value:.4g}"

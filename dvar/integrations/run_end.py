"""How a run ends: a divergence (a failure), a signal (SIGINT/SIGTERM, deferred while saving), the last
finite weights, and results moved into the output folder whole."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch


from .method import Components, Method

logger = logging.getLogger("dvar.integrations")

EXIT_USAGE = 2  # bad input: nothing was trained or written
EXIT_DIVERGED = 3  # the loss became NaN/inf: the run failed (the last finite weights are kept)
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what timeout, docker stop, SLURM and Kubernetes send
TRAINER_STATE = "dvar_trainer_state.json"  # in each checkpoint: the wall time spent up to it

DIVERGED_FIX = (
    "lower --learning_rate (it was {lr:g}), train in fp32 or bf16 instead of fp16 (--mixed_precision no|bf16), "
    "or clip the gradients harder (--max_grad_norm, it was {clip})"
)


# -- how a run ends ----------------------------------------------------------------------


class Diverged(Exception):
    """A loss (or the trained weights) became NaN/inf at ``step``: the run failed."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM during training; a ``KeyboardInterrupt``, so code that handles Ctrl-C handles both."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _say(text: str) -> None:
    """A line on stderr from a signal handler: os.write, since print() may be in the middle of a write there."""
    try:
        os.write(sys.stderr.fileno(), f"\n{text}\n".encode())
    except (OSError, ValueError, AttributeError):  # no real stderr (e.g. captured by a test runner)
        pass


class SignalGuard:
    """SIGINT and SIGTERM for the length of a run (the previous handlers come back after it).

    While training, the first signal ends the run after the current step (:meth:`check` raises
    :class:`Interrupted` there, so the saved weights are those of a whole step), a second one at once.
    While :meth:`saving`, signals are only noted: the weights and ``dvar_summary.json`` are written whole.
    Within :meth:`at_once` (the samples after a finished run) the first signal stops at once.

    Example:
        >>> with SignalGuard() as guard:  # doctest: +SKIP
        ...     for step in range(100):
        ...         train_one_step()
        ...         guard.check()
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._saving = False
        self._at_once = False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set them
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._saving:
            self.received = self.received or signum
            _say(f"{name} received while saving: the weights and dvar_summary.json are written first.")
            return
        if self.received is None and not self._at_once:
            self.received = signum
            _say(f"{name} received: stopping after this step and saving the weights (send it again to stop at once).")
            return
        self.received = self.received or signum
        self._saving = True  # from here on the run is saving: later signals must not cut that short
        raise Interrupted(signum)

    def check(self, accelerator: Any = None) -> None:
        """At a step boundary: raise :class:`Interrupted` if a signal came (to any process of the run, so
        that all stop at the same step: one that trained on would wait forever for the others)."""
        if accelerator is not None and accelerator.num_processes > 1:
            counts = torch.tensor([float(self.received == s) for s in self.SIGNALS], device=accelerator.device)
            counts = accelerator.reduce(counts, reduction="sum").tolist()
            if self.received is None and any(counts):
                self.received = next(s for s, n in zip(self.SIGNALS, counts) if n)
        if self.received is not None:
            self._saving = True
            raise Interrupted(self.received)

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        """Within, the first signal raises :class:`Interrupted` at once (work that may be cut, e.g. samples)."""
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = False

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Signals only noted within (and after, once an interruption is being handled)."""
        before, self._saving = self._saving, True
        try:
            yield
        finally:
            self._saving = before


def all_finite(tensors: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class LastFiniteWeights:
    """A CPU copy of the learned state at the last step known to be good, saved instead of NaN/inf weights.

    With ``--early-stop``: :meth:`keep` at each evaluation whose frozen-batch loss was finite (the weights it
    evaluated). Without: :meth:`propose` after each step, :meth:`confirm` once the next training loss,
    computed with those weights, is finite. Off (``enabled=False``) where the learned state is the whole
    model (full DreamBooth), which would cost a second copy of it.
    """

    def __init__(self, method: Method, parts: Components, accelerator: Any, enabled: bool) -> None:
        self.method, self.parts, self.accelerator, self.enabled = method, parts, accelerator, enabled
        self.step: Optional[int] = None
        self.state: Optional[Dict[str, torch.Tensor]] = None
        self._pending: Optional[tuple] = None

    def _capture(self) -> Optional[Dict[str, torch.Tensor]]:
        state = {k: v.detach().cpu() for k, v in self.method.learned_state(self.parts, self.accelerator).items()}
        return state if all_finite(state.values()) else None

    def keep(self, step: int) -> None:
        if self.enabled:
            state = self._capture()
            if state is not None:
                self.step, self.state, self._pending = step, state, None

    def propose(self, step: int) -> None:
        if self.enabled:
            self._pending = (step, self._capture())

    def confirm(self) -> None:
        if self._pending is not None:
            (step, state), self._pending = self._pending, None
            if state is not None:
                self.step, self.state = step, state


@dataclass
class RunEnd:
    """How the training loop ended."""

    outcome: str  # budget | early_stop | interrupted | diverged | error
    exit_code: int = 0
    signum: Optional[int] = None
    diverged: Optional[Diverged] = None
    error: Optional[BaseException] = None


# -- output files ------------------------------------------------------------------------


@contextlib.contextmanager
def staged_files(output_dir: str) -> Iterator[Path]:
    """A temporary folder inside ``output_dir``; when the block succeeds each file written in it replaces its
    namesake in ``output_dir`` (``os.replace``), so no result is ever half written. Nothing moves on an error.

    Example:
        >>> out = tempfile.mkdtemp()
        >>> with staged_files(out) as stage:
        ...     _ = (stage / "a.txt").write_text("whole")
        >>> (Path(out) / "a.txt").read_text(), sorted(p.name for p in Path(out).iterdir())
        ('whole', ['a.txt'])
    """
    stage = Path(tempfile.mkdtemp(dir=output_dir, prefix=".dvar-saving-"))
    try:
        yield stage
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                target = Path(output_dir) / path.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def empty_folder(folder: Path) -> None:
    """Remove what ``folder`` holds, not the folder (it may be a mount point, or in a folder we cannot write)."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def checkpoint_step(path: Path) -> Optional[int]:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None

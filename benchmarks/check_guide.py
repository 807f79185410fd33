"""Apply the upstream-script guide ``docs/diffusers-scripts.md`` to a diffusers checkout.

Each ```diff block of the guide is marked ``<!-- dvar-snippet: LOCAL_COPY upstream=PATH -->``.
Its hunks (``@@ ... @@``) hold the script's own lines (leading space), the added lines
(``+``) and the replaced ones (``-``). A hunk applies where its context and replaced lines
appear, in order and contiguous, after the previous hunk's place, as ``patch`` would do; this
script reports every hunk whose context no longer matches (exit code 1), so that upstream
drift is caught by one command:

    python benchmarks/check_guide.py ~/src/diffusers
    python benchmarks/check_guide.py ~/src/diffusers --write /tmp/patched   # also write the patched scripts

``--reverse`` removes the guide's lines instead; ``tests/test_check_guide.py`` uses it to check
the hunks against the cut-down copies the project keeps in ``tests/upstream/``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "diffusers-scripts.md"
MARKER = re.compile(r"<!-- dvar-snippet: (\S+) upstream=(\S+) -->\n```diff\n(.*?)\n```", re.S)


@dataclass
class Hunk:
    """One ``@@ title @@`` hunk: (op, text) lines, op in ``" +-"``."""

    title: str
    lines: List[Tuple[str, str]] = field(default_factory=list)

    def before(self) -> List[str]:
        return [text for op, text in self.lines if op in " -"]

    def after(self) -> List[str]:
        return [text for op, text in self.lines if op in " +"]

    def count(self, op: str) -> int:
        return sum(line_op == op for line_op, _ in self.lines)


@dataclass
class Snippet:
    """The guide's diff for one upstream script."""

    local: str  # the cut-down copy in this repository (tests/upstream/...)
    upstream: str  # the script's path in a diffusers checkout (examples/...)
    hunks: List[Hunk]

    @property
    def added(self) -> int:
        """Lines the guide adds to the script (``+``, blank ones included, as ``diff`` counts them)."""
        return sum(hunk.count("+") for hunk in self.hunks)

    @property
    def replaced(self) -> int:
        """Script lines the guide replaces (``-``)."""
        return sum(hunk.count("-") for hunk in self.hunks)


def parse_guide(text: str) -> List[Snippet]:
    """The marked diff blocks of the guide.

    Example:
        >>> block = "<!-- dvar-snippet: a.py upstream=examples/a.py -->\\n```diff\\n@@ x @@\\n import os\\n+import dvar\\n```"
        >>> [(s.upstream, h.before(), h.after()) for s in parse_guide(block) for h in s.hunks]
        [('examples/a.py', ['import os'], ['import os', 'import dvar'])]
    """
    snippets = []
    for local, upstream, body in MARKER.findall(text):
        hunks: List[Hunk] = []
        for line in body.splitlines():
            if line.startswith("@@"):
                hunks.append(Hunk(line.strip("@ ").strip()))
                continue
            if not hunks:
                raise ValueError(f"{upstream}: diff line before the first @@ header: {line!r}")
            op, text = (line[0], line[1:]) if line else (" ", "")  # an empty line is blank context
            if op not in " +-":
                raise ValueError(f"{upstream}: a diff line must start with ' ', '+' or '-': {line!r}")
            hunks[-1].lines.append((op, text.rstrip()))
        snippets.append(Snippet(local, upstream, hunks))
    return snippets


def _find(lines: Sequence[str], block: Sequence[str], start: int) -> Optional[int]:
    for i in range(start, len(lines) - len(block) + 1):
        if all(lines[i + j].rstrip() == block[j] for j in range(len(block))):
            return i
    return None


def _diagnose(lines: Sequence[str], block: Sequence[str], start: int) -> str:
    """Where the block comes closest to matching (most equal lines), and its first differing line."""
    best, best_at = 0, None
    for i in range(start, len(lines)):
        same = sum(i + j < len(lines) and lines[i + j].rstrip() == block[j] for j in range(len(block)))
        if same > best:
            best, best_at = same, i
    if best_at is None:
        return f"none of its lines is in the file after line {start}"
    j = next(j for j in range(len(block)) if best_at + j >= len(lines) or lines[best_at + j].rstrip() != block[j])
    got = lines[best_at + j].rstrip() if best_at + j < len(lines) else "<end of file>"
    return (
        f"closest at line {best_at + 1} ({best} of its {len(block)} lines equal): line {best_at + j + 1} "
        f"is {got!r} where the guide has {block[j]!r}"
    )


def apply(lines: Sequence[str], hunks: Sequence[Hunk], reverse: bool = False) -> Tuple[List[str], List[str]]:
    """(patched lines, one message per hunk that does not apply); hunks apply in order."""
    out, failures, position = list(lines), [], 0
    for number, hunk in enumerate(hunks, 1):
        old, new = (hunk.after(), hunk.before()) if reverse else (hunk.before(), hunk.after())
        at = _find(out, old, position)
        if at is None:
            failures.append(f"hunk {number} '@@ {hunk.title} @@': {_diagnose(out, old, position)}")
            continue
        out[at : at + len(old)] = new
        position = at + len(new)
    return out, failures


def check(root: Path, guide: Path = GUIDE, reverse: bool = False, local: bool = False,
          write: Optional[Path] = None) -> List[str]:
    """Apply every snippet to the scripts under ``root``; returns the failure messages."""
    failures = []
    for snippet in parse_guide(guide.read_text()):
        relative = snippet.local if local else snippet.upstream
        path = root / relative
        if not path.is_file():
            failures.append(f"{relative}: no such file under {root}")
            continue
        patched, problems = apply(path.read_text().splitlines(), snippet.hunks, reverse=reverse)
        failures += [f"{relative}: {problem}" for problem in problems]
        status = "OK  " if not problems else "FAIL"
        print(f"{status} {relative}: {len(snippet.hunks) - len(problems)}/{len(snippet.hunks)} hunks apply "
              f"(+{snippet.added} lines, {snippet.replaced} replaced)")
        if write is not None and not problems:
            target = write / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(patched) + "\n")
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("diffusers", type=Path, nargs="?", help="a diffusers checkout (the folder holding examples/)")
    parser.add_argument("--guide", type=Path, default=GUIDE, help="the guide (default: docs/diffusers-scripts.md)")
    parser.add_argument("--write", type=Path, default=None, help="write the patched scripts under this folder")
    parser.add_argument("--reverse", action="store_true", help="remove the guide's lines instead of adding them")
    parser.add_argument("--local", action="store_true", help="use the cut-down copies in tests/upstream/ (root: this repo)")
    args = parser.parse_args(argv)
    root = REPO if args.local else args.diffusers
    if root is None or not root.is_dir():
        parser.error("give a diffusers checkout (a folder with examples/), or --local")
    if not args.local and not (root / "examples").is_dir():
        parser.error(f"{root} has no examples/ folder: give the root of a diffusers checkout")
    failures = check(root, args.guide, reverse=args.reverse, local=args.local, write=args.write)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

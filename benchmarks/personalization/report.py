"""Aggregate a personalization benchmark results folder into tables, CSVs and plots.

Reads ``OUT/benchmark.json``, ``OUT/records/<method>/<concept>/<variant>.json`` and
``OUT/traces/<method>/<concept>.json`` and writes ``OUT/report/``: ``report.md``, ``runs.csv``,
``summary.csv``, ``noninferiority.csv`` (does each rule keep quality, at a stated margin), ``informativeness.csv``,
``power.csv`` (and ``power_untuned.csv``: the same on the concepts no setting was tuned on), ``oracle.csv`` and
PNG plots. The pieces
live in their own modules: :mod:`.stats` (tests), :mod:`.tables` (Table 1, informativeness,
ablation, cost), :mod:`.noninferiority` (the CI decision at the margin), :mod:`.power` (can the benchmark see a
bad stop), :mod:`.saturation` (each
concept's saturation step and the budget check), :mod:`.render` (markdown), :mod:`.plots`.

    python -m benchmarks.personalization.report outputs/personalization
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Sequence

from .noninferiority import NONINFERIORITY_COLUMNS, noninferiority_table
from .plots import write_plots
from .power import POWER_COLUMNS, power_table, untuned_records
from .render import main_table, render_markdown
from .saturation import oracle_rows, oracle_summary
from .tables import INFORMATIVENESS_COLUMNS, ablation_table, benchmark_cost, informativeness, summary_table

RUN_COLUMNS = (
    "method", "concept", "variant", "steps", "max_train_steps", "wall_time_s", "train_s", "monitor_s", "setup_s",
    "identity", "identity_embedding", "alignment", "stop_reason",
)
ORACLE_COLUMNS = ("method", "concept", "saturation_step", "saturation_status", "plateau", "budget",
                  "judged_saturation", "dvar_stop", "auto_stop", "clip_s_stop")
SUMMARY_COLUMNS = (
    "method", "variant", "n", "steps_median", "steps_iqr", "step_speedup_median", "step_speedup_iqr", "minutes_median",
    "minutes_iqr", "speedup_median", "speedup_iqr", "saving_share_median", "identity_median", "identity_iqr",
    "alignment_median", "alignment_iqr", "identity_change", "alignment_change", "identity_p", "identity_ties",
)


# --------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_records(out: Path) -> list[dict]:
    """All run records under ``out/records``, in path order.

    >>> load_records(Path("outputs/personalization"))[0]["variant"]  # doctest: +SKIP
    'baseline'
    """
    return [_read_json(path) for path in sorted(Path(out).glob("records/*/*/*.json"))]


def load_traces(out: Path) -> list[dict]:
    """All trajectory traces under ``out/traces``, in path order.

    >>> load_traces(Path("outputs/personalization"))[0]["dvar"]["window"]  # doctest: +SKIP
    50
    """
    return [_read_json(path) for path in sorted(Path(out).glob("traces/*/*.json"))]


def load_meta(out: Path) -> dict:
    """``out/benchmark.json``, or ``{}`` when it is absent.

    >>> load_meta(Path("/nonexistent"))
    {}
    """
    path = Path(out) / "benchmark.json"
    return _read_json(path) if path.is_file() else {}


# ------------------------------------------------------------------------------------------ csv


def flatten_record(record: dict) -> dict:
    """A record as one flat CSV row: ``alignment_by_attribute`` becomes ``alignment_<attr>`` columns,
    other dicts ``<key>_<subkey>``, lists JSON.

    >>> flatten_record({"variant": "dvar", "alignment_by_attribute": {"red": 0.9}})
    {'variant': 'dvar', 'alignment_red': 0.9}
    """
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            prefix = "alignment" if key == "alignment_by_attribute" else key
            flat.update({f"{prefix}_{name}": inner for name, inner in value.items()})
        elif isinstance(value, list):
            flat[key] = json.dumps(value)
        else:
            flat[key] = value
    return flat


def write_csv(path: Path, rows: list[dict], columns: Sequence[str] = ()) -> None:
    """Write ``rows`` with ``columns`` first, then any other keys in first-seen order."""
    fieldnames = list(columns)
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)


# ---------------------------------------------------------------------------------------- entry


def write_report(out: Path) -> Path:
    """Write ``out/report/``: report.md, runs.csv, summary.csv, informativeness.csv, power.csv, oracle.csv and
    the plots.

    >>> write_report(Path("outputs/personalization"))  # doctest: +SKIP
    PosixPath('outputs/personalization/report/report.md')
    """
    out = Path(out)
    records = load_records(out)
    if not records:
        raise FileNotFoundError(f"no run records under {out / 'records'} (expected <method>/<concept>/<variant>.json)")
    traces = load_traces(out)
    summary = summary_table(records)
    info = informativeness(traces)
    ablation = ablation_table(traces)
    meta = load_meta(out)
    power = power_table(records)
    power_untuned = power_table(untuned_records(records, meta.get("concepts", {})))
    per_concept = oracle_rows(records, traces)
    noninferiority = noninferiority_table(records)

    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "runs.csv", [flatten_record(r) for r in records], RUN_COLUMNS)
    write_csv(folder / "summary.csv", summary, SUMMARY_COLUMNS)
    write_csv(folder / "informativeness.csv", info, INFORMATIVENESS_COLUMNS)
    write_csv(folder / "power.csv", power, POWER_COLUMNS)
    if power_untuned:
        write_csv(folder / "power_untuned.csv", power_untuned, POWER_COLUMNS)
    write_csv(folder / "oracle.csv", per_concept, ORACLE_COLUMNS)
    write_csv(folder / "noninferiority.csv", noninferiority, NONINFERIORITY_COLUMNS)
    write_plots(folder, records, traces, info)
    report = folder / "report.md"
    report.write_text(render_markdown(meta, summary, info, ablation, benchmark_cost(traces, records), power,
                                      oracle_summary(per_concept), power_untuned, noninferiority))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="benchmark results folder (holds records/ and traces/)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.out)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    print(report)
    print(main_table(summary_table(load_records(args.out))))


if __name__ == "__main__":
    main()

"""A recording's events, summary and timeline, derived from its saved window probabilities.

``main.py predict`` over recordings saves each recording's window probabilities
(:mod:`util.night.probabilities`) beside its ``events.csv``, ``summary.json`` and
``timeline.png``, all written by :func:`write_outputs`.

Re-deriving with other post-processing needs no model and takes seconds::

    python -m util.night.rederive predictions/ --postprocessing.on_threshold 0.45
    python -m util.night.rederive predictions/night/probabilities.parquet \\
        --postprocessing.min_duration_s "{snore: 5.0, default: 3.0}" --output_dir retry/

Options not given keep the post-processing the file was made with
(``--start_from defaults``: :class:`util.night.PostProcessing`'s defaults instead). The
outputs, the probabilities file among them (its metadata now naming the new
post-processing), are what ``main.py predict`` writes with the same post-processing,
byte for byte: both go through :func:`write_outputs`. Not imported by :mod:`util.night`, so that running
it as a module finds it unloaded; :class:`util.callbacks.NightWriter` imports it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from util.errors import add_debug_option, condense, debug_requested, report_error
from util.night.events import (
    Event,
    PostProcessing,
    detect_events,
    median_filter,
    write_events_csv,
)
from util.night.plot import plot_timeline
from util.night.probabilities import (
    PROBABILITIES_FILE,
    ProbabilitiesError,
    WindowProbabilities,
    find_probabilities,
    read_probabilities,
    write_probabilities,
)
from util.night.summary import console_line, snore_warning, summarize, timeline_title

__all__ = [
    "INDEX_COLUMNS",
    "derive",
    "index_row",
    "main",
    "thresholds_source",
    "update_index",
    "write_outputs",
]

PROG = "python -m util.night.rederive"
#: Columns of ``recordings.csv``, one row per recording of the run.
INDEX_COLUMNS = (
    "recording",
    "status",
    "output",
    "duration_h",
    "snore_minutes",
    "snore_episodes",
    "snore_episodes_per_hour",
    "longest_snore_free_min",
    "message",
)


def thresholds_source(
    postprocessing: PostProcessing, saved: WindowProbabilities | None = None
) -> str:
    """Where post-processing came from, for the summary and the console line.

    ``saved``'s own source when it is the post-processing the file was made with (a
    calibrated file re-derived with other options names the calibration and the options
    changed, as ``predict`` does); ``defaults`` when it is :class:`PostProcessing`'s; else ``options`` (given in a
    config or on the command line).
    """
    if saved is not None and postprocessing == saved.postprocessing:
        return saved.postprocessing_source
    if saved is not None and saved.postprocessing_source.startswith("calibrated"):
        changed = [
            f.name
            for f in fields(PostProcessing)
            if getattr(postprocessing, f.name) != getattr(saved.postprocessing, f.name)
        ]
        calibrated = saved.postprocessing_source.split("; options:")[0]
        return f"{calibrated}; options: {', '.join(changed)}"
    return "defaults" if postprocessing == PostProcessing() else "options"


def derive(
    night: WindowProbabilities, postprocessing: PostProcessing, source: str
) -> tuple[list[Event], np.ndarray, dict[str, Any]]:
    """Events, smoothed probabilities and ``summary.json``'s content (``files`` left empty)."""
    names = list(night.class_names)
    bounds = night.bounds()
    smoothed = median_filter(night.probs, postprocessing.median_windows)
    events = detect_events(night.probs, names, bounds, postprocessing, smoothed=smoothed)
    numbers = summarize(
        events, smoothed, names, bounds, night.duration_s, postprocessing, night.snore_label
    )
    numbers["postprocessing"] = {"source": source, **numbers["postprocessing"]}
    summary = {
        "recording": night.recording,
        "status": night.status,
        "message": night.message,
        **numbers,
        "window_s": night.window_s,
        "hop_s": night.hop_s,
        "input": night.input,
        "model": night.model,
    }
    warning = snore_warning(summary)
    summary["warnings"] = [warning] if warning else []
    return events, smoothed, summary


def write_outputs(
    out: str | os.PathLike[str],
    night: WindowProbabilities,
    postprocessing: PostProcessing,
    source: str,
    plot: bool = True,
    plot_points: int = 1600,
) -> dict[str, Any]:
    """Write ``events.csv``, ``summary.json`` and (``plot`` and any windows) ``timeline.png``.

    ``predict`` and the re-derive command both write through this, so equal inputs give
    equal files. ``probabilities.parquet`` is expected in ``out`` too (the summary names it).

    Returns:
        the summary written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    events, smoothed, summary = derive(night, postprocessing, source)
    files: dict[str, Any] = {"events": "events.csv", "summary": "summary.json", "timeline": None}
    write_events_csv(events, out / "events.csv")
    if plot and len(night.probs):
        plot_timeline(
            out / "timeline.png",
            smoothed,
            night.bounds(),
            events,
            night.class_names,
            title=timeline_title(Path(night.recording).name, summary),
            background=postprocessing.background,
            max_points=plot_points,
        )
        files["timeline"] = "timeline.png"
    summary["files"] = {**files, "probabilities": PROBABILITIES_FILE}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def index_row(summary: Mapping[str, Any], out: str | os.PathLike[str]) -> dict[str, str]:
    """The ``recordings.csv`` row of one recording's summary."""
    snore = summary["snore"]
    return {
        "recording": str(summary["recording"]),
        "status": str(summary["status"]),
        "output": str(out),
        "duration_h": f"{summary['duration_h']:.3f}",
        "snore_minutes": _fmt(snore.get("minutes")),
        "snore_episodes": _fmt(snore.get("episodes")),
        "snore_episodes_per_hour": _fmt(snore.get("episodes_per_hour")),
        "longest_snore_free_min": _fmt(snore.get("longest_snore_free_min")),
        "message": summary.get("message") or "",
    }


def update_index(path: str | os.PathLike[str], rows: Iterable[Mapping[str, str]]) -> None:
    """Write ``rows`` into the ``recordings.csv`` at ``path``, replacing rows of the same folder.

    Rows are matched by their output folder's name (unique in one ``predict`` run);
    the file's other rows (recordings that failed, or were not re-derived) stay.
    """
    path = Path(path)
    new = {Path(r["output"]).name: dict(r) for r in rows}
    kept: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="") as f:
            for old in csv.DictReader(f):
                name = Path(old["output"]).name if old.get("output") else None
                kept.append(new.pop(name) if name in new else old)
    kept.extend(new.values())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=INDEX_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(kept)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


# -- the command ----------------------------------------------------------------------


def build_parser() -> Any:
    """The parser: every option typed and documented (``--help`` shows the defaults)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog=PROG,
        description="Re-derive events.csv, summary.json and timeline.png from the "
        "probabilities.parquet that main.py predict wrote, with other post-processing; "
        "no model needed. Post-processing options not given keep the file's own.",
        exit_on_error=False,
    )
    parser.add_argument(
        "path", type=str, help=f"a {PROBABILITIES_FILE}, or a folder searched for them"
    )
    parser.add_argument(
        "--postprocessing",
        type=PostProcessing,
        default=PostProcessing(),
        help="post-processing; an option given here replaces the file's (see --start_from)",
    )
    parser.add_argument(
        "--start_from",
        type=Literal["file", "defaults"],
        default="file",
        help="what options not given keep: the post-processing the file was made with "
        "(file) or PostProcessing's defaults, as main.py predict without options (defaults)",
    )
    parser.add_argument(
        "--output_dir",
        type=str | None,
        default=None,
        help="folder for the recordings' folders (null: beside each probabilities file, "
        "replacing the outputs there and their rows of the recordings.csv above)",
    )
    parser.add_argument(
        "--snore_label",
        type=str | None,
        default=None,
        help="the class whose episodes are counted (null: the file's)",
    )
    parser.add_argument("--plot", type=bool, default=True, help="write timeline.png")
    parser.add_argument(
        "--plot_points", type=int, default=1600, help="most time bins in the timeline"
    )
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Re-derive every recording ``path`` holds; the exit status.

    0 when every recording was re-derived, 1 when one failed (each failure is one
    ``error:`` line and the others still run), 2 for a bad command line.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    from jsonargparse import ArgumentError

    parser = build_parser()
    argv = None if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        given = parser.parse_args(argv, defaults=False).as_dict().get("postprocessing") or {}
        files = find_probabilities(args.path)
    except (ArgumentError, FileNotFoundError) as err:
        print(f"error: {condense(str(err))} (options: {PROG} --help)", file=sys.stderr)
        return 2
    debug = args.debug or debug_requested()
    try:  # a wrong value is the command line's fault, whatever file it meets
        PostProcessing(**{**asdict(PostProcessing()), **given})
    except (TypeError, ValueError) as err:
        print(f"error: --postprocessing: {err} (options: {PROG} --help)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows: dict[Path, list[dict[str, str]]] = {}
    folders: set[Path] = set()
    failed = 0
    for file in files:
        try:
            out, row, line = _rederive_one(file, args, given, folders)
        except (ProbabilitiesError, ValueError, OSError) as err:
            report_error(err if str(file) in str(err) else type(err)(f"{file}: {err}"), debug)
            failed += 1
            continue
        rows.setdefault(out.parent, []).append(row)
        print(line)
    for root, root_rows in rows.items():
        update_index(root / "recordings.csv", root_rows)
    done = len(files) - failed
    print(
        f"re-derived {done} recording(s) in {time.perf_counter() - t0:.1f} s"
        + (f"; {failed} failed" if failed else "")
    )
    return 1 if failed else 0


def _rederive_one(
    file: Path, args: Any, given: Mapping[str, Any], folders: set[Path]
) -> tuple[Path, dict[str, str], str]:
    night = read_probabilities(file)
    base = night.postprocessing if args.start_from == "file" else PostProcessing()
    pp = PostProcessing(**{**asdict(base), **given})
    pp.check(night.class_names)
    night.postprocessing_source = thresholds_source(pp, night)
    night.postprocessing = pp
    if args.snore_label is not None:
        night.snore_label = args.snore_label
    night = night.normalized()  # as predict does: equal inputs, equal bytes
    if args.output_dir is None:
        out = file.parent
    else:
        stem, i = file.parent.name or "recording", 1
        out = Path(args.output_dir) / stem
        while out in folders:
            i += 1
            out = Path(args.output_dir) / f"{stem}-{i}"
    folders.add(out)
    out.mkdir(parents=True, exist_ok=True)
    # The file again, now naming the post-processing of the outputs beside it (as predict's
    # would): the folder stays consistent, and re-deriving it again starts from there.
    write_probabilities(out / PROBABILITIES_FILE, night)
    summary = write_outputs(
        out,
        night,
        night.postprocessing,
        night.postprocessing_source,
        args.plot,
        args.plot_points,
    )
    return out, index_row(summary, out), console_line(summary, out)


if __name__ == "__main__":
    sys.exit(main())

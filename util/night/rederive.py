"""Saved window probabilities, and a recording's events, summary and timeline derived from them.

``main.py predict`` over recordings writes ``probabilities.parquet`` beside each recording's
``events.csv``, ``summary.json`` and ``timeline.png``: one row per window, ``start_s`` and
``end_s`` (float64 seconds: window ``k`` covers ``[k·hop, k·hop + window)``) and one
float32 column per class, named by the class, in the model's order. The file's schema
metadata (key ``earsleep``, JSON) holds what re-deriving needs: the class names, hop,
window length, recording length, status, input facts, the model's identity and the
post-processing used (:class:`WindowProbabilities`). pandas, polars or DuckDB read it as
a table.

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

Why about 600 lines: the file's layout, the outputs derived from it and the command that
re-derives them change together (a field added to the file is read, derived and offered
as an option at once); the first two could move to a ``util/night/probabilities.py``,
leaving the command here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from util.errors import DEBUG_ENV, condense, debug_requested, report_error
from util.night.events import (
    Event,
    PostProcessing,
    detect_events,
    median_filter,
    window_bounds,
    write_events_csv,
)
from util.night.plot import plot_timeline
from util.night.summary import console_line, snore_warning, summarize, timeline_title

__all__ = [
    "INDEX_COLUMNS",
    "PROBABILITIES_FILE",
    "ProbabilitiesError",
    "WindowProbabilities",
    "check_class_names",
    "find_probabilities",
    "index_row",
    "main",
    "read_probabilities",
    "thresholds_source",
    "update_index",
    "write_outputs",
    "write_probabilities",
]

PROG = "python -m util.night.rederive"
#: The file's name in each recording's folder.
PROBABILITIES_FILE = "probabilities.parquet"
#: What the metadata says the file is, and the version of its layout.
FORMAT, FORMAT_VERSION = "earsleep.window_probabilities", 1
_META_KEY = b"earsleep"
_TIME_COLUMNS = ("start_s", "end_s")

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


class ProbabilitiesError(ValueError):
    """A probabilities file that is not one, or is damaged (the message says which and why)."""


@dataclass
class WindowProbabilities:
    """One recording's window probabilities and everything needed to derive its outputs.

    Attributes:
        probs: ``(N, K)`` float32 class probabilities, window ``k`` in row ``k``.
        class_names: the K classes, in column order.
        hop_s: seconds between window starts.
        window_s: window length in seconds.
        duration_s: the recording's length in seconds.
        recording: the recording's path as ``predict`` was given it.
        status: how it was read (``ok``, ``truncated``, ``partial``, ``too_short``).
        message: what went wrong in reading it, if anything.
        input: the input's facts (source rate, channels, format, repairs...).
        model: which model made the probabilities
            (:func:`util.night.model_identity` and the feature config).
        postprocessing: the post-processing ``predict`` used.
        postprocessing_source: where that came from (:func:`thresholds_source`).
        snore_label: the class whose episodes the summary counts.
    """

    probs: np.ndarray
    class_names: list[str]
    hop_s: float
    window_s: float
    duration_s: float
    recording: str
    status: str = "ok"
    message: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    postprocessing: PostProcessing = field(default_factory=PostProcessing)
    postprocessing_source: str = "defaults"
    snore_label: str = "snore"

    @property
    def start_s(self) -> np.ndarray:
        """``(N,)`` window starts in seconds."""
        return np.arange(len(self.probs), dtype=np.float64) * self.hop_s

    @property
    def end_s(self) -> np.ndarray:
        """``(N,)`` window ends in seconds."""
        return self.start_s + self.window_s

    def bounds(self) -> np.ndarray:
        """``(N + 1,)`` edges of the stretches the windows stand for (:func:`window_bounds`)."""
        return window_bounds(len(self.probs), self.hop_s, self.window_s, self.duration_s)

    def header(self) -> dict[str, Any]:
        """The metadata stored with the probabilities (JSON-ready)."""
        return _plain(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "recording": self.recording,
                "status": self.status,
                "message": self.message,
                "class_names": list(self.class_names),
                "n_windows": len(self.probs),
                "hop_s": self.hop_s,
                "window_s": self.window_s,
                "duration_s": self.duration_s,
                "input": self.input,
                "model": self.model,
                "postprocessing": asdict(self.postprocessing),
                "postprocessing_source": self.postprocessing_source,
                "snore_label": self.snore_label,
            }
        )

    @classmethod
    def from_header(cls, header: Mapping[str, Any], probs: np.ndarray) -> WindowProbabilities:
        """Rebuild from :meth:`header`'s dict and the probabilities.

        Raises:
            ProbabilitiesError: the header is not an earsleep one, is of a newer layout,
                or does not fit ``probs``.
        """
        if header.get("format") != FORMAT:
            raise ProbabilitiesError(f"not an earsleep probabilities file ({FORMAT!r} expected)")
        if int(header.get("version", 0)) > FORMAT_VERSION:
            raise ProbabilitiesError(
                f"layout version {header['version']} is newer than this earsleep reads "
                f"({FORMAT_VERSION}); update earsleep"
            )
        try:
            pp = PostProcessing(**header["postprocessing"])
            return cls(
                probs=np.asarray(probs, dtype=np.float32),
                class_names=[str(c) for c in header["class_names"]],
                hop_s=float(header["hop_s"]),
                window_s=float(header["window_s"]),
                duration_s=float(header["duration_s"]),
                recording=str(header["recording"]),
                status=str(header.get("status", "ok")),
                message=header.get("message"),
                input=dict(header.get("input") or {}),
                model=dict(header.get("model") or {}),
                postprocessing=pp,
                postprocessing_source=str(header.get("postprocessing_source", "defaults")),
                snore_label=str(header.get("snore_label", "snore")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ProbabilitiesError(f"damaged metadata ({type(err).__name__}: {err})") from err

    def normalized(self) -> WindowProbabilities:
        """This, as reading its file back gives it (metadata through JSON, probabilities float32).

        ``predict`` derives its outputs from this form, so that re-deriving from the
        file gives the same bytes.
        """
        return WindowProbabilities.from_header(json.loads(json.dumps(self.header())), self.probs)


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars, tuples and mappings made JSON's own types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return str(value)


# -- the file -------------------------------------------------------------------------


def write_probabilities(path: str | os.PathLike[str], night: WindowProbabilities) -> None:
    """Write ``night`` as Parquet (zstd), atomically: a temporary name, then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(night.class_names)
    check_class_names(names)
    probs = np.asarray(night.probs, dtype=np.float32)
    columns = {"start_s": night.start_s, "end_s": night.end_s}
    columns.update({c: probs[:, k] for k, c in enumerate(names)})
    table = pa.table(columns).replace_schema_metadata(
        {_META_KEY: json.dumps(night.header()).encode()}
    )
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def check_class_names(names: Sequence[str]) -> None:
    """Raise ``ProbabilitiesError`` unless every class can be a column of its own."""
    names = list(names)
    if set(names) & set(_TIME_COLUMNS) or len(set(names)) != len(names):
        raise ProbabilitiesError(
            f"class names {names} repeat or are {' or '.join(_TIME_COLUMNS)}: "
            "they cannot be columns of probabilities.parquet; rename the classes"
        )


def read_probabilities(path: str | os.PathLike[str]) -> WindowProbabilities:
    """Read a file :func:`write_probabilities` wrote.

    Raises:
        ProbabilitiesError: not Parquet, not earsleep's, damaged, or its rows are not
            the evenly spaced windows its metadata describes (the message names the file).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ProbabilitiesError(f"{path}: cannot read it as Parquet ({err})") from err
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ProbabilitiesError(
            f"{path}: no earsleep metadata; write the file with main.py predict over recordings"
        )
    try:
        header = json.loads(raw)
        names = [str(c) for c in header["class_names"]]
        missing = [c for c in (*_TIME_COLUMNS, *names) if c not in table.column_names]
        if missing:
            raise ProbabilitiesError(f"columns {missing} are missing")
        probs = np.stack(
            [table.column(c).to_numpy().astype(np.float32) for c in names], axis=1
        ).reshape(table.num_rows, len(names))
        night = WindowProbabilities.from_header(header, probs)
        start = table.column("start_s").to_numpy()
        if len(probs) != int(header.get("n_windows", len(probs))) or not np.allclose(
            start, night.start_s, rtol=0, atol=1e-6
        ):
            raise ProbabilitiesError(
                f"its {len(probs)} rows are not the {header.get('n_windows')} windows every "
                f"{night.hop_s} s it describes (rows removed or reordered?)"
            )
    except (ProbabilitiesError, KeyError, TypeError, ValueError) as err:
        raise ProbabilitiesError(f"{path}: {err}") from err
    return night


def find_probabilities(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself if it is a file; else every ``probabilities.parquet`` below it, sorted.

    Raises:
        FileNotFoundError: nothing there.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    found = sorted(path.rglob(PROBABILITIES_FILE)) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no {PROBABILITIES_FILE} at or under {path}: "
            "run main.py predict over recordings first (--night.output_dir)"
        )
    return found


# -- what is derived from it ----------------------------------------------------------


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
    parser.add_argument(
        "--debug",
        type=bool,
        nargs="?",
        const=True,
        default=False,
        help=f"print the traceback of a failure (also: {DEBUG_ENV}=1)",
    )
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

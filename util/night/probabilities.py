"""The saved window probabilities of a recording: ``probabilities.parquet``.

``main.py predict`` over recordings writes it beside each recording's ``events.csv``,
``summary.json`` and ``timeline.png``: one row per window, ``start_s`` and ``end_s``
(float64 seconds: window ``k`` covers ``[k·hop, k·hop + window)``) and one float32 column
per class, named by the class, in the model's order. The file's schema metadata (key
``earsleep``, JSON) holds what re-deriving needs: the class names, hop, window length,
recording length, status, input facts, the model's identity and the post-processing used
(:class:`WindowProbabilities`). pandas, polars or DuckDB read it as a table;
:mod:`util.night.rederive` derives events, summary and timeline from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from util.night.events import PostProcessing, window_bounds

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PROBABILITIES_FILE",
    "ProbabilitiesError",
    "WindowProbabilities",
    "check_class_names",
    "find_probabilities",
    "json_types",
    "read_probabilities",
    "write_probabilities",
]

#: The file's name in each recording's folder.
PROBABILITIES_FILE = "probabilities.parquet"
#: What the metadata says the file is, and the version of its layout.
FORMAT, FORMAT_VERSION = "earsleep.window_probabilities", 1
_META_KEY = b"earsleep"
_TIME_COLUMNS = ("start_s", "end_s")


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
        return json_types(
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


def json_types(value: Any) -> Any:
    """``value`` with numpy scalars, tuples and mappings made JSON's own types."""
    if isinstance(value, Mapping):
        return {str(k): json_types(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_types(v) for v in value]
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
    columns = [_arrow_column(night.start_s, np.float64), _arrow_column(night.end_s, np.float64)]
    columns += [_arrow_column(probs[:, k], np.float32) for k in range(len(names))]
    table = pa.Table.from_arrays(columns, names=[*_TIME_COLUMNS, *names])
    table = table.replace_schema_metadata({_META_KEY: json.dumps(night.header()).encode()})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _arrow_column(values: np.ndarray, dtype: type[np.floating]) -> Any:
    """A pyarrow array (no nulls) over ``values`` as a contiguous ``dtype`` array.

    ``pa.array`` on a numpy array first asks whether it is a pandas object, which imports
    pandas (39 MB of memory and about a second at the end of every night); building
    the array from its buffer does not.
    """
    import pyarrow as pa

    data = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(data.dtype), len(data), [None, pa.py_buffer(data)]
    )


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

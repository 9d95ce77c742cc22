"""One row per run in a CSV shared by all runs: the leaderboard.

The row is made of the run's summary (:attr:`RunArtifacts.summary
<util.callbacks.artifacts.RunArtifacts.summary>`, what ``metrics.json`` holds), so the
two always agree, and of its provenance (:attr:`Provenance.summary
<util.callbacks.provenance.Provenance.summary>`: the data fingerprint's hash and the
code version), so that a row says which data and which code it came from. Many runs may write at once (a sweep, parallel fits): every read and
write happens under an exclusive lock on ``<path>.lock``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from filelock import FileLock
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from util.callbacks.artifacts import RunArtifacts, csv_text, scalar
from util.callbacks.provenance import Provenance

__all__ = [
    "KD_COLUMNS",
    "LEADERBOARD_COLUMNS",
    "PROVENANCE_COLUMNS",
    "Leaderboard",
    "append_leaderboard_row",
    "leaderboard_row",
]

#: The leaderboard's header, in order.
LEADERBOARD_COLUMNS = (
    "time",
    "run_dir",
    "model",
    "params",
    "macs",
    "bytes_fp32",
    "latency_median_ms",
    "best_val_f1_macro",
    "test_f1_macro",
    "test_acc",
    "test_bal_acc",
    "collapsed",
    "seed",
    "teacher",
    "alpha",
    "temperature",
    "beta",
    "compression_ratio",
    "gap_closed",
    "gap_closed_reason",
    "data_fingerprint",
    "git_commit",
    "git_dirty",
    "config",
)
#: Columns a distillation run fills from its module's ``run_summary()``.
KD_COLUMNS = (
    "teacher",
    "alpha",
    "temperature",
    "beta",
    "compression_ratio",
    "gap_closed",
    "gap_closed_reason",  # why gap_closed is empty (e.g. the teacher is not above the baseline)
)
#: Columns filled from :attr:`Provenance.summary <util.callbacks.provenance.Provenance.summary>`.
PROVENANCE_COLUMNS = ("data_fingerprint", "git_commit", "git_dirty")


def _lock(path: Path) -> FileLock:
    """An exclusive inter-process lock on ``<path>.lock`` (flock on POSIX, msvcrt on Windows)."""
    return FileLock(path.with_name(path.name + ".lock"))


def append_leaderboard_row(
    path: str | os.PathLike, row: Mapping[str, Any], replace: Mapping[str, str] | None = None
) -> None:
    """Add ``row`` to the leaderboard CSV at ``path``, safe against concurrent writers.

    The file gets the header :data:`LEADERBOARD_COLUMNS` when new; a file with another
    header keeps its own (unknown fields are dropped, missing ones left empty). All
    reading and writing happens under an exclusive lock on ``<path>.lock``.

    Args:
        path: the leaderboard CSV.
        row: column name to value (``None`` writes an empty cell).
        replace: when given, the first existing row whose fields equal all of these
            values is replaced by ``row`` (the file is rewritten atomically); ``row``
            is appended if none matches.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        fieldnames: list[str] = list(LEADERBOARD_COLUMNS)
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as f:
                existing = next(csv.reader(f), None)
            if existing and existing != fieldnames:
                rank_zero_warn(
                    f"{path} has another header than this version writes; keeping its header."
                )
                fieldnames = existing
        if replace and not new:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            for i, old in enumerate(rows):
                if all(old.get(k) == str(v) for k, v in replace.items()):
                    rows[i] = dict(row)
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    tmp.write_text(csv_text(fieldnames, rows, header=True), newline="")
                    os.replace(tmp, path)
                    return
        with open(path, "a", newline="") as f:
            f.write(csv_text(fieldnames, [row], header=new))
            f.flush()
            os.fsync(f.fileno())


def leaderboard_row(
    summary: Mapping[str, Any], provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The leaderboard row of a run summary (the ``metrics.json`` dict of :class:`RunArtifacts`).

    ``time`` is the summary's ``finished``; the KD columns come from its ``extras``.

    Args:
        summary: :attr:`RunArtifacts.summary`.
        provenance: :attr:`Provenance.summary <util.callbacks.provenance.Provenance.summary>`
            (:data:`PROVENANCE_COLUMNS`); ``None`` leaves those cells empty.
    """
    provenance = provenance or {}
    complexity, test, extras = summary["complexity"], summary["test"], summary["extras"]
    return {
        "time": summary["finished"],
        "run_dir": summary["run_dir"],
        "model": summary["model"],
        "params": complexity.get("params"),
        "macs": complexity.get("macs"),
        "bytes_fp32": complexity.get("bytes_fp32"),
        "latency_median_ms": complexity.get("latency_median_ms"),
        "best_val_f1_macro": summary["best_val_f1_macro"],
        "test_f1_macro": test.get("test/f1_macro"),
        "test_acc": test.get("test/acc"),
        "test_bal_acc": test.get("test/bal_acc"),
        "collapsed": _collapsed(summary),
        "seed": summary["seed"],
        **{k: scalar(extras.get(k)) if k != "teacher" else extras.get(k) for k in KD_COLUMNS},
        **{k: provenance.get(k) for k in PROVENANCE_COLUMNS},
        "config": summary["config"],
    }


def _collapsed(summary: Mapping[str, Any]) -> bool | None:
    """The test split's collapse flag, else the validation split's (``None``: not measured)."""
    collapse = summary.get("collapse") or {}
    for stage in ("test", "val"):
        if stage in collapse:
            return bool(collapse[stage]["collapsed"])
    return None


class Leaderboard(Callback):
    """Append one row per run to the leaderboard CSV at ``path``.

    The row is appended after fit (test columns empty) and filled in place when the same
    trainer then tests; a test-only run adds its own row. It is made of the summary
    :class:`~util.callbacks.RunArtifacts` wrote for the stage, read in this callback's
    ``teardown`` (after every callback's ``on_fit_end``/``on_test_end``, whatever their
    order), so a run that fails, a ``validate``, ``predict`` or ``fast_dev_run`` and a
    run without a logger add no row. The provenance columns come from a
    :class:`~util.callbacks.Provenance` callback beside it (empty without one). Global
    rank zero only.

    Args:
        path: CSV shared by all runs (created with its header when missing); ``None``
            or empty writes no row.
    """

    def __init__(self, path: str | None = "log/leaderboard.csv") -> None:
        super().__init__()
        self.path = path
        self._key: dict[str, str] | None = None  # which row this run wrote, to fill in

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.path and stage in ("fit", "test") and self._artifacts(trainer) is None:
            raise ValueError(
                "Leaderboard needs a RunArtifacts callback beside it (its summary is the row): "
                "add util.callbacks.RunArtifacts to the trainer's callbacks"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        artifacts = self._artifacts(trainer)
        summary = artifacts.summary if artifacts is not None else None
        if not self.path or summary is None:
            return
        provenance = next((cb for cb in trainer.callbacks if isinstance(cb, Provenance)), None)
        row = leaderboard_row(summary, provenance.summary if provenance is not None else None)
        if self._key is not None:
            row["time"] = self._key["time"]
        append_leaderboard_row(self.path, row, replace=self._key)
        self._key = {"time": row["time"], "run_dir": row["run_dir"]}

    @staticmethod
    def _artifacts(trainer: pl.Trainer) -> RunArtifacts | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, RunArtifacts)), None)

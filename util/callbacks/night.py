"""Write a snore/breathing timeline and summary per recording from window predictions."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from data.malloc import keep_heap_flat, release_free_memory
from util.checkpoint import read_checkpoint
from util.night.events import PostProcessing
from util.night.probabilities import (
    PROBABILITIES_FILE,
    WindowProbabilities,
    check_class_names,
    write_probabilities,
)
from util.night.rederive import INDEX_COLUMNS, index_row, thresholds_source, write_outputs
from util.night.summary import console_line, model_identity
from util.night.thresholds import load_calibration

__all__ = ["NightWriter", "NoRecordingRead"]


class NoRecordingRead(RuntimeError):
    """Every recording of a prediction failed to read: nothing was written for any."""


log = logging.getLogger(__name__)

#: What the writer does unless told otherwise (frozen, so one instance serves every writer).
DEFAULT_POSTPROCESSING = PostProcessing()


class _Open:
    """Window probabilities of one recording being received, placed by window index.

    One buffer that doubles when full: a night is a few hundred kB, and a handful of
    large allocations (rather than one small array per batch, each pinning freed
    heap memory above it) keeps the process's memory flat over a long night.
    """

    def __init__(self) -> None:
        self.probs = np.zeros((0, 0), np.float32)
        self.count = 0  # windows received
        self.end = 0  # one past the highest window index received
        self.info: dict[str, Any] = {}

    def add(self, first: int, probs: np.ndarray) -> None:
        end = first + len(probs)
        if self.count == 0:
            self.probs = np.zeros((max(4096, end), probs.shape[1]), np.float32)
        elif end > len(self.probs):
            grown = np.zeros((max(2 * len(self.probs), end), probs.shape[1]), np.float32)
            grown[: len(self.probs)] = self.probs
            self.probs = grown
        self.probs[first:end] = probs
        self.count += len(probs)
        self.end = max(self.end, end)

    def result(self, key: str) -> np.ndarray:
        if self.count != self.end:
            raise RuntimeError(
                f"{key}: received {self.count} windows for indices 0..{self.end - 1}"
            )
        return self.probs[: self.end]


class NightWriter(BasePredictionWriter):
    """Turn per-window probabilities of long recordings into events, a summary and a plot.

    Acts only on batches from :class:`data.recordings.RecordingWindows` (dicts with a
    ``recording`` key); any other prediction (the cached test split) passes
    untouched. Window probabilities are gathered per recording (one at a time per
    data worker) and, when a recording's last window arrives, post-processed as
    described in :mod:`util.night.events` and written to ``<output_dir>/<stem>/``:

    * ``probabilities.parquet``: every window's start and end and class
      probabilities, with what re-deriving needs (:mod:`util.night.rederive`:
      ``python -m util.night.rederive <output_dir> --postprocessing.on_threshold 0.45``
      writes the files below again, with other post-processing, without the model);
    * ``events.csv``: ``start_s,end_s,label,mean_prob``;
    * ``summary.json``: length, minutes per class, snore episodes (and episodes per
      hour, for recordings of an hour or more), longest snore-free stretch, input
      repairs, the model's identity (backbone, checkpoint path and sha256 prefix,
      classes, feature config hash), the post-processing used and where it came
      from, and warnings;
    * ``timeline.png``: class probabilities over the recording with event bands.

    ``<output_dir>/recordings.csv`` lists every recording with its status, and
    ``<output_dir>/errors.json`` every recording that failed or was only partly
    read (unreadable, zero-length, truncated, too short, too many channels), with
    the reason; a failure is also logged and never stops the other recordings.
    When prediction ends, one line per recording goes to the console
    (:func:`util.night.summary.console_line`), with a warning where the snore events
    and the time snore is the top class disagree (:func:`util.night.summary.snore_warning`).

    Post-processing calibrated on validation travels in the checkpoint (key
    ``earsleep_postprocessing``, written at the end of ``fit`` by
    :class:`util.callbacks.Calibration` or by ``python -m util.night.calibrate``, on clips
    or with ``--recordings`` on labelled recordings). At predict start the writer reads it
    from ``trainer.ckpt_path`` (weights-only) and uses it for every calibrated field
    (``on_threshold`` and ``off_threshold``; from recordings also ``median_windows``,
    ``min_duration_s`` and ``merge_gap_s``) the user left at :class:`util.night.PostProcessing`'s default: a field that differs from the
    default was set in a config or on the command line, and wins. To use a default value
    over the calibrated one, pass ``--night.use_calibration false``. ``summary.json``'s
    ``postprocessing.source`` (and the console line's ``thresholds:``) says which:
    ``calibrated on validation (800 clips, snore F1 0.71 at on 0.45/off 0.35)``, with
    ``; options: <fields>`` when the user set others, or ``defaults`` / ``options``.

    What the writer reads from the model: ``class_names`` (the column of each
    probability) and ``backbone`` (its class name goes into the summary), the
    documented attributes of every earsleep task.

    Args:
        output_dir: folder for the per-recording folders (created when needed).
        postprocessing: how probabilities become events (median, hysteresis
            thresholds, merging, minimum duration, one event at a time), see
            :class:`util.night.PostProcessing`; the thresholds take one number or
            one per class (``--night.postprocessing.min_duration_s "{snore: 5.0,
            default: 3.0}"``).
        snore_label: the class whose episodes the summary counts.
        use_calibration: use the thresholds calibrated on validation that the checkpoint
            holds (when it holds them) for every threshold not set in ``postprocessing``.
        plot: write ``timeline.png``.
        plot_points: most time bins in the plot (the night is averaged into them).
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        postprocessing: PostProcessing = DEFAULT_POSTPROCESSING,
        snore_label: str = "snore",
        use_calibration: bool = True,
        plot: bool = True,
        plot_points: int = 1600,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.postprocessing = postprocessing
        self.snore_label = snore_label
        self.use_calibration = use_calibration
        self.plot = plot
        self.plot_points = int(plot_points)
        self._reset()

    def _reset(self) -> None:
        self._errors_file: Path | None = None
        self._open: dict[str, _Open] = {}
        self._rows: list[dict[str, Any]] = []
        self._errors: list[dict[str, Any]] = []
        self._stems: set[str] = set()
        self._identity: dict[str, Any] | None = None
        self._lines: list[str] = []
        #: The post-processing in use (``postprocessing`` with the calibrated thresholds).
        self._postprocessing = self.postprocessing
        self._source = thresholds_source(self.postprocessing)

    # -- Lightning hooks ----------------------------------------------------------

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        # The model's process: hours of batches must not grow the heap. Where the features
        # are computed too (no DataLoader workers), RecordingWindows raises it to 8 MB.
        keep_heap_flat(1 << 20)
        # Fail before hours of inference, not after.
        self._postprocessing, self._source = self._choose(trainer, list(pl_module.class_names))
        check_class_names(pl_module.class_names)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Gather one batch of a recording's windows; finish the recording on its last."""
        if not (isinstance(batch, dict) and "recording" in batch):
            return  # not a recording window (e.g. the cached test split): nothing to write
        key = str(batch["recording"])
        rec = self._open.setdefault(key, _Open())
        probs = torch.as_tensor(prediction).detach().float().cpu().numpy()
        if len(probs):
            index = batch["index"]  # consecutive window indices
            rec.add(int(index[0]), probs)
        if batch.get("last"):
            rec.info = dict(batch.get("info") or {})
            del self._open[key]
            self._finish(trainer, pl_module, key, rec)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, rec in list(self._open.items()):  # only when prediction stopped early
            rec.info.setdefault("status", "partial")
            rec.info["error"] = f"{key}: prediction ended before the recording's last window"
            self._finish(trainer, pl_module, key, rec)
        self._open.clear()
        if not self._rows:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        with open(self.output_dir / f"recordings{suffix}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
            w.writeheader()
            w.writerows(self._rows)
        (self.output_dir / f"errors{suffix}.json").write_text(json.dumps(self._errors, indent=2))
        for line in self._lines:  # after the progress bar, one line per recording
            rank_zero_info(line)
        failed = sum(1 for r in self._rows if r["status"] != "ok")
        self._errors_file = self.output_dir / f"errors{suffix}.json"
        rank_zero_info(
            f"night: {len(self._rows)} recording(s) written to {self.output_dir}"
            + (f"; {failed} with problems, see {self._errors_file}" if failed else "")
        )

    def check_any_read(self) -> None:
        """Raise :class:`NoRecordingRead` when the last prediction read none of its recordings.

        Bad files never stop the others, but a run in which every recording failed
        (unreadable, zero-length, too many channels) produced nothing, and a script
        that runs ``main.py predict`` must not take that for success.
        """
        if self._rows and all(r["status"] == "error" for r in self._rows):
            # every failed recording has its reason in errors.json (see _finish)
            more = f" (and {len(self._rows) - 1} more)" if len(self._rows) > 1 else ""
            raise NoRecordingRead(
                f"no recording could be read: {self._errors[0]['error']}{more}; "
                f"see {self._errors_file}"
            )

    # -- one recording --------------------------------------------------------------

    def _finish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, key: str, rec: _Open
    ) -> None:
        info = rec.info
        status = info.get("status", "ok")
        message = info.get("error")
        class_names = list(pl_module.class_names)
        if message:
            log.error("night: %s", message)
            self._errors.append({"recording": key, "status": status, "error": message})
        if status == "error":
            row = dict.fromkeys(INDEX_COLUMNS, "")
            row.update(recording=key, status=status, message=message or "")
            self._rows.append(row)
            return
        probs = rec.result(key) if rec.count else np.zeros((0, len(class_names)), np.float32)
        release_free_memory()  # what the loop freed, before writing and plotting add theirs
        if probs.shape[1] != len(class_names):
            raise ValueError(
                f"{key}: predictions have {probs.shape[1]} columns for classes {class_names}"
            )
        hop_s = float(info.get("hop_s", 0.5))
        if self._identity is None:
            self._identity = model_identity(
                pl_module, trainer.ckpt_path, info.get("feature_config_hash")
            )
        night = WindowProbabilities(
            probs=probs,
            class_names=class_names,
            hop_s=hop_s,
            window_s=float(info.get("window_s", 1.0)),
            duration_s=float(info.get("duration_s", len(probs) * hop_s)),
            recording=key,
            status=status,
            message=message,
            input={k: info.get(k) for k in _INPUT_FACTS},
            model={**self._identity, "feature_config": info.get("feature_config")},
            postprocessing=self._postprocessing,
            postprocessing_source=self._source,
            snore_label=self.snore_label,
        ).normalized()  # as the file reads back: re-deriving from it gives the same bytes
        out = self._folder(key)
        out.mkdir(parents=True, exist_ok=True)
        write_probabilities(out / PROBABILITIES_FILE, night)
        summary = write_outputs(
            out, night, night.postprocessing, self._source, self.plot, self.plot_points
        )
        self._rows.append(index_row(summary, out))
        self._lines.append(console_line(summary, out))

    def _choose(self, trainer: pl.Trainer, class_names: list[str]) -> tuple[PostProcessing, str]:
        """The post-processing to use and where it came from (see the class's docstring)."""
        given = self.postprocessing
        path = getattr(trainer, "ckpt_path", None)  # no trainer: a writer tested alone
        calibration = None
        if self.use_calibration and path and Path(path).is_file():
            what = f"--ckpt_path {path}"
            calibration = load_calibration(read_checkpoint(path, what=what), what=what)
        if calibration is not None:
            merged, used, user = calibration.apply(given)
            if used:
                try:
                    merged.check(class_names)
                except ValueError as err:
                    raise ValueError(
                        f"{err}: {' and '.join(used)} from the checkpoint's calibration, "
                        f"{', '.join(user)} from the options; give both thresholds, or pass "
                        "--night.use_calibration false"
                    ) from err
                source = calibration.source(self.snore_label)
                return merged, source + (f"; options: {', '.join(user)}" if user else "")
        given.check(class_names)
        return given, thresholds_source(given)

    def _folder(self, key: str) -> Path:
        """``<output_dir>/<stem>``, with ``-2``, ``-3``... when a stem repeats in one run."""
        stem = Path(key).stem or "recording"
        name, i = stem, 1
        while name in self._stems:
            i += 1
            name = f"{stem}-{i}"
        self._stems.add(name)
        return self.output_dir / name


#: The input facts of ``RecordingWindows``' info that the summary keeps.
_INPUT_FACTS = (
    "source_sample_rate",
    "source_channels",
    "source_format",
    "source_duration_s",
    "sample_rate",
    "nonfinite_samples",
    "repairs",
)

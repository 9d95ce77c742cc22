"""Write a snore/breathing timeline and summary per recording from window predictions."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from data.malloc import keep_heap_flat
from util.night.events import (
    PostProcessing,
    detect_events,
    median_filter,
    window_bounds,
    write_events_csv,
)
from util.night.plot import plot_timeline
from util.night.summary import model_identity, summarize

__all__ = ["NightWriter"]

log = logging.getLogger(__name__)

#: What the writer does unless told otherwise (frozen, so one instance serves every writer).
DEFAULT_POSTPROCESSING = PostProcessing()

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

    * ``events.csv``: ``start_s,end_s,label,mean_prob``;
    * ``summary.json``: length, minutes per class, snore episodes and episodes per
      hour, longest snore-free stretch, input repairs, the model's identity
      (backbone, checkpoint path and sha256 prefix, classes, feature config hash)
      and the post-processing used;
    * ``timeline.png``: class probabilities over the night with event bands.

    ``<output_dir>/recordings.csv`` lists every recording with its status, and
    ``<output_dir>/errors.json`` every recording that failed or was only partly
    read (unreadable, zero-length, truncated, too short, too many channels), with
    the reason; a failure is also logged and never stops the other recordings.

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
        plot: write ``timeline.png``.
        plot_points: most time bins in the plot (the night is averaged into them).
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        postprocessing: PostProcessing = DEFAULT_POSTPROCESSING,
        snore_label: str = "snore",
        plot: bool = True,
        plot_points: int = 1600,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.postprocessing = postprocessing
        self.snore_label = snore_label
        self.plot = plot
        self.plot_points = int(plot_points)
        self._reset()

    def _reset(self) -> None:
        self._open: dict[str, _Open] = {}
        self._rows: list[dict[str, Any]] = []
        self._errors: list[dict[str, Any]] = []
        self._stems: set[str] = set()
        self._identity: dict[str, Any] | None = None

    # -- Lightning hooks ----------------------------------------------------------

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        # The model's process: hours of batches must not grow the heap. Where the features
        # are computed too (no DataLoader workers), RecordingWindows raises it to 8 MB.
        keep_heap_flat(1 << 20)
        # Fail before hours of inference, not after.
        self.postprocessing.check(pl_module.class_names)

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
        failed = sum(1 for r in self._rows if r["status"] != "ok")
        rank_zero_info(
            f"night: {len(self._rows)} recording(s) written to {self.output_dir}"
            + (
                f"; {failed} with problems, see {self.output_dir / f'errors{suffix}.json'}"
                if failed
                else ""
            )
        )

    # -- one recording --------------------------------------------------------------

    def _finish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, key: str, rec: _Open
    ) -> None:
        info = rec.info
        status = info.get("status", "ok")
        message = info.get("error")
        class_names = list(pl_module.class_names)
        pp = self.postprocessing
        row: dict[str, Any] = dict.fromkeys(INDEX_COLUMNS, "")
        row.update(recording=key, status=status, message=message or "")
        if message:
            log.error("night: %s", message)
            self._errors.append({"recording": key, "status": status, "error": message})
        if status == "error":
            self._rows.append(row)
            return
        probs = rec.result(key) if rec.count else np.zeros((0, len(class_names)), np.float32)
        if probs.shape[1] != len(class_names):
            raise ValueError(
                f"{key}: predictions have {probs.shape[1]} columns for classes {class_names}"
            )
        hop_s = float(info.get("hop_s", 0.5))
        window_s = float(info.get("window_s", 1.0))
        duration_s = float(info.get("duration_s", len(probs) * hop_s))
        bounds = window_bounds(len(probs), hop_s, window_s, duration_s)
        smoothed = median_filter(probs, pp.median_windows)
        events = detect_events(probs, class_names, bounds, pp, smoothed=smoothed)
        if self._identity is None:
            self._identity = model_identity(
                pl_module, trainer.ckpt_path, info.get("feature_config_hash")
            )
        out = self._folder(key)
        out.mkdir(parents=True, exist_ok=True)
        numbers = summarize(events, smoothed, class_names, bounds, duration_s, pp, self.snore_label)
        summary = {
            "recording": key,
            "status": status,
            "message": message,
            **numbers,
            "window_s": window_s,
            "hop_s": hop_s,
            "input": {
                k: info.get(k)
                for k in (
                    "source_sample_rate",
                    "source_channels",
                    "source_format",
                    "source_duration_s",
                    "sample_rate",
                    "nonfinite_samples",
                    "repairs",
                )
            },
            "model": {**self._identity, "feature_config": info.get("feature_config")},
            "files": {"events": "events.csv", "summary": "summary.json", "timeline": None},
        }
        write_events_csv(events, out / "events.csv")
        if self.plot and len(probs):
            snore = numbers["snore"]
            title = f"{Path(key).name}  ·  {_hours(duration_s)}"
            if snore.get("episodes") is not None:
                title += (
                    f"  ·  {self.snore_label}: {snore['minutes']:.0f} min in {snore['episodes']} "
                    f"episodes ({snore['episodes_per_hour']:.1f}/h), longest free stretch "
                    f"{snore['longest_snore_free_min']:.0f} min"
                )
            plot_timeline(
                out / "timeline.png",
                smoothed,
                bounds,
                events,
                class_names,
                title=title,
                background=pp.background,
                max_points=self.plot_points,
            )
            summary["files"]["timeline"] = "timeline.png"
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        snore = numbers["snore"]
        row.update(
            output=str(out),
            duration_h=f"{numbers['duration_h']:.3f}",
            snore_minutes=_fmt(snore.get("minutes")),
            snore_episodes=_fmt(snore.get("episodes")),
            snore_episodes_per_hour=_fmt(snore.get("episodes_per_hour")),
            longest_snore_free_min=_fmt(snore.get("longest_snore_free_min")),
        )
        self._rows.append(row)
        if snore.get("episodes_per_hour") is not None:
            rank_zero_info(
                f"night: {key}: {_hours(duration_s)}, {self.snore_label} {snore['minutes']:.1f} min "
                f"in {snore['episodes']} episodes ({snore['episodes_per_hour']:.2f}/h) -> {out}"
            )
        else:
            rank_zero_info(f"night: {key}: {_hours(duration_s)}, {len(events)} events -> {out}")

    def _folder(self, key: str) -> Path:
        """``<output_dir>/<stem>``, with ``-2``, ``-3``... when a stem repeats in one run."""
        stem = Path(key).stem or "recording"
        name, i = stem, 1
        while name in self._stems:
            i += 1
            name = f"{stem}-{i}"
        self._stems.add(name)
        return self.output_dir / name


def _hours(seconds: float) -> str:
    minutes = int(round(seconds / 60.0))
    return f"{minutes // 60} h {minutes % 60:02d} min" if seconds >= 60 else f"{seconds:.1f} s"


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

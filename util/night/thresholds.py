"""Post-processing calibrated on labelled validation data, and its record in a checkpoint.

The clip search (:func:`calibrate_thresholds`), the record it and the search on labelled
recordings (:func:`util.night.recalibrate.calibrate_on_recordings`) make
(:class:`CalibratedThresholds`) and how a checkpoint stores and gives it back
(:func:`store_calibration`, :func:`load_calibration`). :mod:`util.night.calibrate` explains
the rules and is the command that runs them.

The record's layout: version 1 holds ``on_threshold`` and ``off_threshold``; version 2
(written now) may also hold ``median_windows``, ``min_duration_s`` and ``merge_gap_s``
(:data:`CALIBRATED_FIELDS`). Both are read.

Why about 530 lines: the clip search, the record (two layout versions, validated field by
field) and its storage in a checkpoint are one contract, read back by ``predict``.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.task import checkpoint_validation_score
from util.checkpoint import read_checkpoint
from util.night.events import PostProcessing
from util.night.probabilities import json_types
from util.night.summary import format_duration

__all__ = [
    "CALIBRATED_FIELDS",
    "CHECKPOINT_KEY",
    "FORMAT_VERSION",
    "GRID",
    "THRESHOLD_FIELDS",
    "CalibratedThresholds",
    "CalibrationError",
    "best_threshold",
    "calibrate_thresholds",
    "checkpoint_facts",
    "clip_probabilities",
    "describe",
    "load_calibration",
    "off_threshold_for",
    "store_calibration",
    "weights_sha256",
]

#: The command that calibrates a checkpoint (:mod:`util.night.calibrate`).
PROG = "python -m util.night.calibrate"
#: The checkpoint's top-level key holding :meth:`CalibratedThresholds.record`.
CHECKPOINT_KEY = "earsleep_postprocessing"
#: What the record says it is, and the version of its layout.
FORMAT, FORMAT_VERSION = "earsleep.postprocessing", 2
#: The ``on_threshold`` candidates.
GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)
#: ``off_threshold`` is this much below ``on_threshold`` (at most half of it).
OFF_GAP = 0.1
#: The fields a calibration may choose (the others keep the user's or the defaults): clip
#: calibration chooses the two thresholds, calibration on recordings all five.
CALIBRATED_FIELDS = (
    "median_windows",
    "on_threshold",
    "off_threshold",
    "min_duration_s",
    "merge_gap_s",
)
#: The fields of the record's version 1 (and of clip calibration).
THRESHOLD_FIELDS = ("on_threshold", "off_threshold")
_DURATION_FIELDS = ("min_duration_s", "merge_gap_s")
_DEFAULTS = PostProcessing()


class CalibrationError(ValueError):
    """A calibration that cannot be made, stored or used (the message says why and what to do)."""


def off_threshold_for(on: float, gap: float = OFF_GAP) -> float:
    """``max(on - gap, on / 2)``, to the thousandth: "off" below "on", never 0."""
    return round(max(on - gap, on / 2.0), 3)


def best_threshold(
    p: np.ndarray, positive: np.ndarray, grid: Sequence[float] = GRID
) -> tuple[float, dict[str, float]]:
    """The grid threshold ``t`` whose ``p >= t`` has the highest F1 against ``positive``.

    Compared in float32, as :func:`util.night.events.hysteresis_runs` compares. Where
    several thresholds share the best F1, the middle one of them (the lower of two).

    Args:
        p: ``(N,)`` probabilities of one class.
        positive: ``(N,)`` whether each clip is of that class (at least one must be).

    Returns:
        ``(t, {"f1", "precision", "recall"})`` at ``t``.
    """
    p = np.asarray(p, dtype=np.float32)
    positive = np.asarray(positive, dtype=bool)
    if p.shape != positive.shape or p.ndim != 1:
        raise ValueError(f"need (N,) probabilities and labels, got {p.shape} and {positive.shape}")
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("no positive clips: F1 is undefined")
    grid = np.asarray(grid, dtype=np.float64)
    scores = _scores(p, positive, grid)
    f1 = scores["f1"]
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    i = int(best[(len(best) - 1) // 2])
    return float(grid[i]), {k: float(v[i]) for k, v in scores.items()}


def _scores(p: np.ndarray, positive: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """F1, precision and recall of ``p >= t`` for each ``t`` (float32 comparison)."""
    predicted = p[None, :] >= thresholds.astype(np.float32)[:, None]
    tp = (predicted & positive[None, :]).sum(axis=1).astype(np.float64)
    n_pred = predicted.sum(axis=1).astype(np.float64)
    n_pos = float(positive.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_pred > 0, tp / n_pred, 0.0)
        recall = tp / n_pos if n_pos else np.zeros_like(tp)
        f1 = np.where(n_pred + n_pos > 0, 2 * tp / (n_pred + n_pos), 0.0)
    return {"f1": f1, "precision": precision, "recall": recall}


@dataclass(frozen=True)
class CalibratedThresholds:
    """Calibrated thresholds and what they were calibrated on.

    Attributes:
        postprocessing: :class:`PostProcessing`'s defaults with the calibrated fields
            (``calibrated``: a ``{class: value, "default": value}`` mapping each, but
            ``median_windows``, one odd number for every class).
        provenance: on clips: ``split``, ``clips``, ``class_counts``, ``method`` (the rule in
            words), ``per_class`` (``on_threshold``, ``off_threshold``, ``f1``,
            ``precision``, ``recall``, ``clips`` and ``f1_before``, the F1 at the thresholds
            it replaced), ``not_calibrated`` (class: why), ``data`` (the split's cache key);
            on recordings (``method`` ``"recordings"``), see
            :func:`util.night.recalibrate.calibrate_on_recordings`. Both: ``created_utc``
            and ``checkpoint`` (its file, epoch, step, validation score, ``weights_sha256``)
            once stored.
        calibrated: the fields of ``postprocessing`` that were calibrated (in
            :data:`CALIBRATED_FIELDS`' order); the others are defaults, not choices.
    """

    postprocessing: PostProcessing
    provenance: dict[str, Any] = field(default_factory=dict)
    calibrated: tuple[str, ...] = THRESHOLD_FIELDS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.calibrated) - set(CALIBRATED_FIELDS))
        if unknown:
            raise CalibrationError(f"{unknown} cannot be calibrated (only {CALIBRATED_FIELDS})")
        ordered = tuple(name for name in CALIBRATED_FIELDS if name in self.calibrated)
        object.__setattr__(self, "calibrated", ordered)

    def values(self) -> dict[str, Any]:
        """The calibrated fields and their values."""
        return {name: getattr(self.postprocessing, name) for name in self.calibrated}

    def source(self, label: str = "snore") -> str:
        """Where the post-processing came from, in one phrase.

        On clips: ``calibrated on validation (800 clips, snore F1 0.71 at on 0.45/off
        0.35)``; on recordings: ``calibrated on 3 validation recordings (2.1 h, snore event
        F1 0.71, 0.00 before; on 0.45/off 0.35, min 1 s, gap 5 s, median 3)``. Names
        ``label`` when it was calibrated, else every calibrated class.
        """
        per_class = self.provenance.get("per_class") or {}
        named = [label] if label in per_class else list(per_class)
        if self.provenance.get("method") == "recordings":
            return self._recordings_source(named)
        scores = ", ".join(
            f"{c} F1 {per_class[c]['f1']:.2f} at on {per_class[c]['on_threshold']:g}"
            f"/off {per_class[c]['off_threshold']:g}"
            for c in named
        )
        head = f"calibrated on {self.provenance.get('split', 'validation')}"
        clips = self.provenance.get("clips")
        inside = ", ".join(x for x in (f"{clips} clips" if clips else "", scores) if x)
        return f"{head} ({inside})" if inside else head

    def _recordings_source(self, named: Sequence[str]) -> str:
        p = self.provenance
        per_class = p.get("per_class") or {}
        n = len(p.get("recordings") or [])
        head = f"calibrated on {n} {p.get('split', 'validation')} recording" + "s" * (n != 1)
        seconds = 3600.0 * float(p.get("hours") or 0.0)
        length = f"{seconds / 3600.0:.1f} h" if seconds >= 360.0 else format_duration(seconds)
        scores = "; ".join(
            f"{c} event F1 {per_class[c]['f1']:.2f}, {per_class[c]['f1_before']:.2f} before; "
            f"on {per_class[c]['on_threshold']:g}/off {per_class[c]['off_threshold']:g}, "
            f"min {per_class[c]['min_duration_s']:g} s, gap {per_class[c]['merge_gap_s']:g} s"
            for c in named
        )
        median = f"median {self.postprocessing.median_windows}"
        return f"{head} ({', '.join(x for x in (length, scores, median) if x)})"

    def apply(self, given: PostProcessing) -> tuple[PostProcessing, list[str], list[str]]:
        """``given`` with every calibrated field it leaves at its default replaced.

        A field of ``given`` that differs from :class:`PostProcessing`'s default was set
        by the user (a config or ``--night.postprocessing.*``) and wins. (A value set to
        the default itself cannot be told from an unset one: the calibrated value is used.)

        Returns:
            ``(post-processing, calibrated fields used, fields the user set)``.
        """
        user = [
            f.name
            for f in fields(PostProcessing)
            if getattr(given, f.name) != getattr(_DEFAULTS, f.name)
        ]
        used = [name for name in self.calibrated if name not in user]
        merged = replace(given, **{name: getattr(self.postprocessing, name) for name in used})
        return merged, used, user

    def with_checkpoint(self, facts: Mapping[str, Any]) -> CalibratedThresholds:
        """This calibration naming the checkpoint it belongs to (:func:`checkpoint_facts`)."""
        return replace(self, provenance={**self.provenance, "checkpoint": dict(facts)})

    def record(self) -> dict[str, Any]:
        """What the checkpoint stores under :data:`CHECKPOINT_KEY` (plain JSON types only)."""
        return json_types(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "postprocessing": self.values(),
                "provenance": self.provenance,
            }
        )

    @classmethod
    def from_record(cls, record: Any) -> CalibratedThresholds:
        """Rebuild from :meth:`record`'s dict (layout version 1 or 2).

        Raises:
            CalibrationError: not an earsleep record, of a newer layout, or damaged.
        """
        if not isinstance(record, Mapping) or record.get("format") != FORMAT:
            raise CalibrationError(f"not an earsleep calibration ({FORMAT!r} expected)")
        version = record.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CalibrationError(f"damaged calibration: version is {version!r}")
        if version > FORMAT_VERSION:
            raise CalibrationError(
                f"calibration layout version {version} is newer than this earsleep "
                f"reads ({FORMAT_VERSION}); update earsleep"
            )
        values = record.get("postprocessing")
        allowed = THRESHOLD_FIELDS if version == 1 else CALIBRATED_FIELDS
        if not (
            isinstance(values, Mapping)
            and values
            and set(values) <= set(allowed)
            and all(_valid(str(k), v) for k, v in values.items())
        ):
            raise CalibrationError(f"damaged calibration: postprocessing is {values!r}")
        pp = replace(_DEFAULTS, **{str(k): v for k, v in values.items()})
        return cls(pp, dict(record.get("provenance") or {}), tuple(str(k) for k in values))


def _valid(name: str, value: Any) -> bool:
    """Whether ``value`` can be the calibrated ``name``.

    ``median_windows``: an odd whole number >= 1; a threshold: a number in [0, 1]; a
    duration: seconds >= 0; the last two also as a mapping of names to such numbers.
    """

    if name == "median_windows":
        return (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value % 2 == 1
        )
    high = math.inf if name in _DURATION_FIELDS else 1.0

    def number(x: Any) -> bool:
        real = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
        return real and 0.0 <= x <= high

    if isinstance(value, Mapping):
        return all(isinstance(k, str) and number(v) for k, v in value.items())
    return number(value)


def calibrate_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    base: PostProcessing | None = None,
    split: str = "validation",
    grid: Sequence[float] = GRID,
    data: Mapping[str, Any] | None = None,
) -> CalibratedThresholds:
    """Per-class on/off thresholds from clip probabilities and labels (see the module's rule).

    Args:
        probs: ``(N, K)`` class probabilities of the split's clips.
        labels: ``(N,)`` class indices.
        class_names: the K classes.
        base: the post-processing whose background classes get no thresholds and whose
            thresholds a class that cannot be calibrated keeps (default: the defaults).
        split: the split's name, for the provenance.
        grid: the ``on_threshold`` candidates.
        data: what identifies the clips (e.g. the split's cache key), for the provenance.

    Raises:
        CalibrationError: no clips, or shapes that do not fit ``class_names``.
    """
    base = _DEFAULTS if base is None else base
    names = list(class_names)
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[1] != len(names) or len(probs) != len(labels):
        raise CalibrationError(
            f"need ({len(labels)}, {len(names)}) probabilities for {len(labels)} labels and "
            f"classes {names}, got {probs.shape}"
        )
    if len(probs) == 0:
        raise CalibrationError(f"the {split} split has no clips: nothing to calibrate on")
    if labels.min() < 0 or labels.max() >= len(names):
        raise CalibrationError(f"labels outside 0..{len(names) - 1}")
    on: dict[str, float] = {}
    off: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for label in base.event_classes(names):
        k = names.index(label)
        before = base.for_class(label, names)
        positive = labels == k
        if not positive.any():
            skipped[label] = f"no {split} clips of {label}"
        else:
            t, scores = best_threshold(probs[:, k], positive, grid)
            if scores["f1"] > 0:
                f1_before = _scores(probs[:, k], positive, np.array([before.on_threshold]))["f1"]
                on[label], off[label] = t, off_threshold_for(t)
                per_class[label] = {
                    "on_threshold": t,
                    "off_threshold": off[label],
                    **{name: round(v, 4) for name, v in scores.items()},
                    "clips": int(positive.sum()),
                    "f1_before": round(float(f1_before[0]), 4),
                }
                continue
            skipped[label] = f"no threshold gives its {split} clips an F1 above 0"
        on[label], off[label] = before.on_threshold, before.off_threshold
    for name, chosen in (("on_threshold", on), ("off_threshold", off)):
        fallback = getattr(base, name)
        if not isinstance(fallback, Mapping):
            chosen["default"] = float(fallback)
        elif "default" in fallback:
            chosen["default"] = float(fallback["default"])
    pp = replace(_DEFAULTS, on_threshold=on, off_threshold=off)
    pp.check(names)
    provenance = {
        "split": split,
        "clips": len(labels),
        "class_counts": {c: int((labels == k).sum()) for k, c in enumerate(names)},
        "method": (
            f"on_threshold: the clip F1 of p >= t at its best over {float(grid[0]):g}..."
            f"{float(grid[-1]):g} (ties: the middle one); off_threshold: "
            f"max(on - {OFF_GAP:g}, on / 2)"
        ),
        "per_class": per_class,
        "not_calibrated": skipped,
        "data": dict(data) if data else None,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return CalibratedThresholds(pp, provenance)


# -- models and checkpoints -----------------------------------------------------------


def clip_probabilities(
    module: torch.nn.Module,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of every clip of ``batches`` (the module in eval, no grad).

    Args:
        module: an earsleep task: ``module(x)`` gives logits (band standardisation inside).
        batches: ``(x, y, ...)`` batches, e.g. the data module's ``val_dataloader()``.
        device: where to run (default: where the module is); the module is moved back.
        progress: show a progress bar.

    Returns:
        ``(probs (N, K) float32, labels (N,) int64)``.
    """
    from tqdm.auto import tqdm

    first = next(iter(module.parameters()), None)
    home = first.device if first is not None else None
    device = torch.device(device) if device is not None else home
    was_training = module.training
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if device is not None:
        module.to(device)
    module.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
                x, y = batch[0], batch[1]
                logits = module(x.to(device) if device is not None else x)
                probs.append(logits.float().softmax(dim=1).cpu().numpy())
                labels.append(torch.as_tensor(y).cpu().numpy())
    finally:
        module.train(was_training)
        if home is not None:
            module.to(home)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs).astype(np.float32), np.concatenate(labels).astype(np.int64)


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a ``state_dict``'s names, dtypes, shapes and bytes (which weights these are)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = torch.as_tensor(state_dict[name]).detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_facts(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Which checkpoint a calibration belongs to: file name, epoch, step, score, weights hash."""
    return {
        "file": Path(path).name,
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "validation_score": checkpoint_validation_score(dict(checkpoint)),
        "weights_sha256": weights_sha256(checkpoint["state_dict"]),
    }


def store_calibration(path: str | os.PathLike[str], calibration: CalibratedThresholds) -> None:
    """Write ``calibration`` into the checkpoint at ``path``, atomically (temporary file, rename).

    Raises:
        CheckpointError: the file is not a readable weights-only checkpoint.
        CalibrationError: it holds other weights than the calibration names.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    facts = checkpoint_facts(checkpoint, path)
    named = (calibration.provenance.get("checkpoint") or {}).get("weights_sha256")
    if named is not None and named != facts["weights_sha256"]:
        raise CalibrationError(
            f"{path} holds other weights than the ones calibrated ({named[:12]}...); "
            f"calibrate it on its own: {PROG} --ckpt_path {path}"
        )
    checkpoint[CHECKPOINT_KEY] = calibration.with_checkpoint(facts).record()
    tmp = path.with_name(f".{path.name}.calibrating")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_calibration(
    checkpoint: Mapping[str, Any], what: str = "checkpoint"
) -> CalibratedThresholds | None:
    """The calibration a checkpoint dict holds, or ``None`` when it holds none.

    Raises:
        CalibrationError: the record is damaged, of a newer layout, or names other weights
            than the checkpoint's (one line, naming ``what`` and what to do).
    """
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is None:
        return None
    fix = f"calibrate again ({PROG} --ckpt_path <file>) or pass --night.use_calibration false"
    try:
        calibration = CalibratedThresholds.from_record(record)
    except CalibrationError as err:
        raise CalibrationError(f"{what}: {CHECKPOINT_KEY}: {err}; {fix}") from err
    named = (calibration.provenance.get("checkpoint") or {}).get("weights_sha256")
    stored = checkpoint.get("state_dict")
    if named is not None and stored is not None and named != weights_sha256(stored):
        raise CalibrationError(
            f"{what}: its {CHECKPOINT_KEY} was calibrated for other weights than the file "
            f"holds; {fix}"
        )
    return calibration


def describe(calibration: CalibratedThresholds, class_names: Sequence[str]) -> str:
    """One line per calibrated class: its settings, its F1 and the F1 before."""
    lines = []
    recordings = calibration.provenance.get("method") == "recordings"
    for label, c in (calibration.provenance.get("per_class") or {}).items():
        if recordings:
            lines.append(
                f"  {label}: on {c['on_threshold']:g} / off {c['off_threshold']:g}, min "
                f"{c['min_duration_s']:g} s, gap {c['merge_gap_s']:g} s, event F1 {c['f1']:.3f} "
                f"(precision {c['precision']:.3f}, recall {c['recall']:.3f}; "
                f"{c['f1_before']:.3f} before), {c['events']} true events, {c['detected']} found"
            )
            continue
        lines.append(
            f"  {label}: on {c['on_threshold']:g} / off {c['off_threshold']:g}, clip F1 "
            f"{c['f1']:.3f} (precision {c['precision']:.3f}, recall {c['recall']:.3f}; "
            f"{c['f1_before']:.3f} at the thresholds before), {c['clips']} clips"
        )
    for label, why in (calibration.provenance.get("not_calibrated") or {}).items():
        pp = calibration.postprocessing.for_class(label, class_names)
        kept = (
            f"on {pp.on_threshold:g}, min {pp.min_duration_s:g} s, gap {pp.merge_gap_s:g} s"
            if recordings
            else f"on {pp.on_threshold:g}"
        )
        lines.append(f"  {label}: not calibrated ({why}); keeps {kept}")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------

"""From a night's window probabilities to events: the post-processing and the events file.

Window ``k`` of a recording covers ``[k·hop, k·hop + window)``; for events it stands
for the ``hop``-long stretch around its centre (:func:`window_bounds`), so the
stretches tile the recording from 0 to its end. Post-processing, per class and in
this order (:func:`detect_events`, every knob a field of :class:`PostProcessing`):

1. a running median over ``median_windows`` windows smooths each class's probability;
2. hysteresis: an event is a maximal run of windows with probability above
   ``off_threshold`` that holds at least one window at or above ``on_threshold`` (so
   onsets are where the probability first rose above "off", not where it reached "on");
3. events of one class less than ``merge_gap_s`` apart are merged (snoring comes in
   breaths: a bout is one event);
4. events shorter than ``min_duration_s`` are dropped;
5. (``exclusive``) where events of two classes overlap, the class first in
   ``priority`` (``snore``) keeps the time and the other's event is cut there.

Background classes (``quiet``) get no events.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

#: A value for every class, or per class (``{"snore": 10.0, "default": 3.0}``).
PerClass = float | Mapping[str, float]

#: Columns of ``events.csv`` (and of ground-truth event lists, which may add ``kind``).
EVENT_COLUMNS = ("start_s", "end_s", "label", "mean_prob")


@dataclass(frozen=True)
class Event:
    """One event: ``[start_s, end_s)`` of ``label``.

    Attributes:
        start_s: onset in seconds from the start of the recording.
        end_s: offset in seconds.
        label: the class name.
        mean_prob: mean smoothed probability of the class over the event (NaN for
            ground truth).
    """

    start_s: float
    end_s: float
    label: str
    mean_prob: float = math.nan

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return self.end_s - self.start_s


@dataclass(frozen=True)
class PostProcessing:
    """How window probabilities become events (the steps of :mod:`util.night.events`).

    The one definition of these knobs: :func:`detect_events` and
    :func:`util.night.summary.summarize` take it, and
    :class:`util.callbacks.NightWriter` takes it as ``postprocessing``
    (``--night.postprocessing.min_duration_s``). The four thresholds take one number
    for every class or a mapping such as ``{snore: 10.0, default: 3.0}``.

    Attributes:
        median_windows: running-median length in windows (odd; 1 turns it off). At
            the default 0.5 s hop, 3 windows smooth over 1.5 s; longer medians erase
            snoring that comes only on inhalations.
        on_threshold: probability that starts an event (hysteresis "on").
        off_threshold: probability an event stays above (hysteresis "off").
        min_duration_s: events shorter than this, after merging, are dropped.
        merge_gap_s: events of one class closer than this are merged; snoring
            comes once per breath (and a weak model misses some breaths), so a gap
            of a few breaths keeps a bout whole.
        background: classes that never make events (their time is the rest).
        exclusive: one event at a time: where events of two classes overlap, the
            class first in ``priority`` keeps the time and the other is cut there
            (snoring is breathing too; without this a snore bout's exhalations
            make breathing events across it). Pieces shorter than their class's
            ``min_duration_s`` are dropped.
        priority: classes that win overlaps, first first; the others follow in
            class order (names the model lacks are ignored).
    """

    median_windows: int = 3
    on_threshold: PerClass = 0.6
    off_threshold: PerClass = 0.4
    min_duration_s: PerClass = 3.0
    merge_gap_s: PerClass = 20.0
    background: tuple[str, ...] = ("quiet",)
    exclusive: bool = True
    priority: tuple[str, ...] = ("snore",)

    def __post_init__(self) -> None:
        if self.median_windows < 1 or self.median_windows % 2 == 0:
            raise ValueError(
                f"median_windows must be a positive odd number, got {self.median_windows}"
            )
        object.__setattr__(self, "background", tuple(self.background))
        object.__setattr__(self, "priority", tuple(self.priority))

    def for_class(self, label: str, class_names: Sequence[str]) -> PostProcessing:
        """This post-processing with every per-class threshold resolved to ``label``'s number.

        Raises:
            ValueError: a mapping names no class of the model or lacks ``label`` and
                ``default``; or the numbers are out of range (``0 <= off <= on <= 1``,
                durations ``>= 0``).
        """
        resolved = replace(
            self,
            **{
                name: resolve(getattr(self, name), label, class_names, name)
                for name in PER_CLASS_FIELDS
            },
        )
        if not 0.0 <= resolved.off_threshold <= resolved.on_threshold <= 1.0:
            raise ValueError(
                f"{label}: need 0 <= off_threshold <= on_threshold <= 1, "
                f"got {resolved.thresholds()}"
            )
        if resolved.min_duration_s < 0 or resolved.merge_gap_s < 0:
            raise ValueError(f"{label}: durations must be >= 0, got {resolved.thresholds()}")
        return resolved

    def thresholds(self) -> dict[str, Any]:
        """The per-class fields, by name (numbers once :meth:`for_class` resolved them)."""
        return {name: getattr(self, name) for name in PER_CLASS_FIELDS}

    def event_classes(self, class_names: Sequence[str]) -> list[str]:
        """The classes that make events: all but the background, in class order."""
        return [c for c in class_names if c not in self.background]

    def check(self, class_names: Sequence[str]) -> None:
        """Raise ``ValueError`` now if any event class's thresholds are wrong (see :meth:`for_class`)."""
        for label in self.event_classes(class_names):
            self.for_class(label, class_names)

    def describe(self, class_names: Sequence[str]) -> dict[str, Any]:
        """What ``summary.json`` records: the settings and each event class's resolved thresholds."""
        return {
            "median_windows": self.median_windows,
            "background": list(self.background),
            "exclusive": self.exclusive,
            "priority": list(self.priority),
            "per_class": {
                label: self.for_class(label, class_names).thresholds()
                for label in self.event_classes(class_names)
            },
        }


#: The fields of :class:`PostProcessing` that take a number per class.
PER_CLASS_FIELDS = tuple(f.name for f in fields(PostProcessing) if f.type == "PerClass")


def resolve(value: PerClass, label: str, class_names: Sequence[str], name: str) -> float:
    """The value of a :data:`PerClass` option for ``label``.

    Args:
        value: a number for every class, or a mapping of class name to number with
            an optional ``default`` entry for the rest.
        label: the class asked for.
        class_names: every class (a mapping key that is none of these nor
            ``default`` is a mistake and raises).
        name: the option's name, for the error message.
    """
    if not isinstance(value, Mapping):
        return float(value)
    unknown = sorted(set(value) - set(class_names) - {"default"})
    if unknown:
        raise ValueError(f"{name}: {unknown} are not classes of the model {list(class_names)}")
    if label in value:
        return float(value[label])
    if "default" in value:
        return float(value["default"])
    raise ValueError(f"{name}: no value for class {label!r} and no 'default' entry")


def median_filter(probs: np.ndarray, length: int) -> np.ndarray:
    """Running median over ``length`` (odd) windows of each column; edges repeat the end values.

    Args:
        probs: ``(N, K)`` window probabilities.
        length: window of the median, in windows (1 returns a copy).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if length < 1 or length % 2 == 0:
        raise ValueError(f"median length must be a positive odd number of windows, got {length}")
    if length == 1 or len(probs) == 0:
        return probs.copy()
    half = length // 2
    padded = np.pad(probs, ((half, half), (0, 0)), mode="edge")
    view = np.lib.stride_tricks.sliding_window_view(padded, length, axis=0)  # (N, K, length)
    return np.median(view, axis=-1).astype(np.float32)


def hysteresis_runs(p: np.ndarray, on: float, off: float) -> list[tuple[int, int]]:
    """Window runs ``[a, b)`` with ``p > off`` throughout and ``p >= on`` somewhere.

    Args:
        p: ``(N,)`` probabilities of one class.
        on: threshold an event must reach.
        off: threshold an event stays above (``off <= on``).
    """
    if off > on:
        raise ValueError(f"hysteresis needs off <= on, got on={on}, off={off}")
    above = np.concatenate([[False], np.asarray(p) > off, [False]])
    edges = np.flatnonzero(np.diff(above.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    peak = np.asarray(p) >= on
    csum = np.concatenate([[0], np.cumsum(peak)])
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True) if csum[b] > csum[a]]


def window_bounds(n_windows: int, hop_s: float, window_s: float, duration_s: float) -> np.ndarray:
    """``(n + 1,)`` edges of the stretch each window stands for.

    Window ``k`` stands for ``[c_k - hop/2, c_k + hop/2)`` around its centre
    ``c_k = k·hop + window/2``; the first starts at 0 and the last ends at the
    recording's end, so the stretches tile ``[0, duration_s]``.
    """
    if n_windows == 0:
        return np.array([0.0])
    k = np.arange(n_windows + 1, dtype=np.float64)
    bounds = k * hop_s + window_s / 2 - hop_s / 2
    bounds[0] = 0.0
    bounds[-1] = max(duration_s, bounds[-2])
    return bounds


def detect_events(
    probs: np.ndarray,
    class_names: Sequence[str],
    bounds: np.ndarray,
    postprocessing: PostProcessing | None = None,
    smoothed: np.ndarray | None = None,
) -> list[Event]:
    """Events of every non-background class, sorted by onset.

    Args:
        probs: ``(N, K)`` window probabilities (rows in time order).
        class_names: the K class names.
        bounds: ``(N + 1,)`` window edges in seconds (:func:`window_bounds`).
        postprocessing: the steps' settings (default: :class:`PostProcessing`'s).
        smoothed: the already median-filtered ``probs`` (skips filtering again).
    """
    pp = PostProcessing() if postprocessing is None else postprocessing
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probs must be (N, {len(class_names)}), got {probs.shape}")
    if len(bounds) != len(probs) + 1:
        raise ValueError(f"need {len(probs) + 1} bounds, got {len(bounds)}")
    smooth = median_filter(probs, pp.median_windows) if smoothed is None else smoothed
    event_classes = pp.event_classes(class_names)
    order = [c for c in pp.priority if c in event_classes]
    order += [c for c in event_classes if c not in order]
    taken = np.zeros(len(probs), dtype=bool)  # windows already in an event (exclusive)
    events: list[Event] = []
    for label in order:
        rule = pp.for_class(label, class_names)
        p = smooth[:, list(class_names).index(label)]
        merged: list[list[int]] = []
        for a, b in hysteresis_runs(p, rule.on_threshold, rule.off_threshold):
            if merged and bounds[a] - bounds[merged[-1][1]] < rule.merge_gap_s:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        for a, b in merged:
            pieces = _free_runs(taken, a, b) if pp.exclusive else [(a, b)]
            for x, y in pieces:
                start, end = float(bounds[x]), float(bounds[y])
                if end - start >= rule.min_duration_s:
                    events.append(Event(start, end, label, float(p[x:y].mean())))
                    if pp.exclusive:
                        taken[x:y] = True
    return sorted(events, key=lambda e: (e.start_s, e.label))


def _free_runs(taken: np.ndarray, a: int, b: int) -> list[tuple[int, int]]:
    """Runs ``[x, y)`` within ``[a, b)`` where ``taken`` is False."""
    free = np.concatenate([[False], ~taken[a:b], [False]])
    edges = np.flatnonzero(np.diff(free.astype(np.int8)))
    return [(a + int(x), a + int(y)) for x, y in zip(edges[0::2], edges[1::2], strict=True)]


# -- files ------------------------------------------------------------------------


def write_events_csv(events: Iterable[Event], path: str | os.PathLike[str]) -> None:
    """Write ``start_s,end_s,label,mean_prob`` rows (seconds to the millisecond)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(EVENT_COLUMNS)
        for e in events:
            prob = "" if math.isnan(e.mean_prob) else f"{e.mean_prob:.4f}"
            w.writerow([f"{e.start_s:.3f}", f"{e.end_s:.3f}", e.label, prob])


def read_events_csv(path: str | os.PathLike[str]) -> list[Event]:
    """Read an events file (``events.csv`` or a ground-truth list; extra columns ignored)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        Event(
            float(r["start_s"]),
            float(r["end_s"]),
            r["label"],
            float(r["mean_prob"]) if r.get("mean_prob") else math.nan,
        )
        for r in rows
    ]

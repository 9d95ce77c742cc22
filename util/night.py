"""A night's window probabilities into events, a summary, a timeline plot; event scoring.

Window ``k`` of a recording covers ``[k·hop, k·hop + window)``; for events it stands
for the ``hop``-long stretch around its centre (:func:`window_bounds`), so the
stretches tile the recording from 0 to its end. Post-processing, per class and in
this order (:func:`detect_events`):

1. a running median over ``median_windows`` windows smooths each class's probability;
2. hysteresis: an event is a maximal run of windows with probability above ``off``
   that holds at least one window at or above ``on`` (so onsets are where the
   probability first rose above ``off``, not where it reached ``on``);
3. events of one class less than ``merge_gap_s`` apart are merged (snoring comes in
   breaths: a bout is one event);
4. events shorter than ``min_duration_s`` are dropped;
5. (``exclusive``) where events of two classes overlap, the class first in
   ``priority`` (``snore``) keeps the time and the other's event is cut there.

Background classes (``quiet``) get no events. The event scorer
(:func:`evaluate_events`) follows the usual event-based rule: an estimate matches a
reference of its class when the onsets are within ``onset_collar_s`` and the offsets
within ``max(offset_collar_s, offset_ratio × reference length)``; matches are
one-to-one (a maximum bipartite matching).

Why about 620 lines: events, the summary and the timeline plot read the same per-window
probabilities and thresholds; its split into ``util/night/`` (events, plot, scoring) is
part of the layout issue (14).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: A value for every class, or per class (``{"snore": 10.0, "default": 3.0}``).
PerClass = float | Mapping[str, float]

#: Columns of ``events.csv`` (and of ground-truth event lists, which may add ``kind``).
EVENT_COLUMNS = ("start_s", "end_s", "label", "mean_prob")

#: Plot colours of the usual classes; others take the tab10 cycle.
CLASS_COLOURS = {
    "quiet": "#d0d0d0",
    "breathe": "#4c9be8",
    "snore": "#e4572e",
    "non_wearer": "#9b59b6",
    "cough": "#2ca02c",
    "movements": "#8c564b",
}


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
    """Resolved post-processing for one class (see the module docstring).

    Attributes:
        on: hysteresis threshold that starts an event.
        off: hysteresis threshold the event stays above.
        min_duration_s: shorter events are dropped.
        merge_gap_s: gaps shorter than this between events are closed.
    """

    on: float
    off: float
    min_duration_s: float
    merge_gap_s: float


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
    median_windows: int = 3,
    on_threshold: PerClass = 0.6,
    off_threshold: PerClass = 0.4,
    min_duration_s: PerClass = 3.0,
    merge_gap_s: PerClass = 20.0,
    background: Sequence[str] = ("quiet",),
    smoothed: np.ndarray | None = None,
    exclusive: bool = True,
    priority: Sequence[str] = ("snore",),
) -> list[Event]:
    """Events of every non-background class, sorted by onset.

    Args:
        probs: ``(N, K)`` window probabilities (rows in time order).
        class_names: the K class names.
        bounds: ``(N + 1,)`` window edges in seconds (:func:`window_bounds`).
        median_windows: running-median length in windows (odd; 1 disables).
        on_threshold: hysteresis "on" level, for all classes or per class.
        off_threshold: hysteresis "off" level, for all classes or per class.
        min_duration_s: events shorter than this (after merging) are dropped.
        merge_gap_s: events of a class closer than this are merged.
        background: classes that get no events.
        smoothed: the already median-filtered ``probs`` (skips filtering again).
        exclusive: at most one event at a time. Classes are taken in ``priority``
            order, then in class order; each class's events are cut where an
            earlier class already has one (pieces shorter than the class's
            ``min_duration_s`` are dropped). Snoring is breathing too: without
            this, the exhalations of a snore bout make breathing events over it.
        priority: classes whose events win where events overlap (names the
            model lacks are ignored).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probs must be (N, {len(class_names)}), got {probs.shape}")
    if len(bounds) != len(probs) + 1:
        raise ValueError(f"need {len(probs) + 1} bounds, got {len(bounds)}")
    smooth = median_filter(probs, median_windows) if smoothed is None else smoothed
    order = [c for c in priority if c in class_names]
    order += [c for c in class_names if c not in order]
    taken = np.zeros(len(probs), dtype=bool)  # windows already in an event (exclusive)
    events: list[Event] = []
    for label in order:
        if label in background:
            continue
        k = list(class_names).index(label)
        pp = post_processing(
            label, class_names, on_threshold, off_threshold, min_duration_s, merge_gap_s
        )
        p = smooth[:, k]
        merged: list[list[int]] = []
        for a, b in hysteresis_runs(p, pp.on, pp.off):
            if merged and bounds[a] - bounds[merged[-1][1]] < pp.merge_gap_s:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        for a, b in merged:
            pieces = _free_runs(taken, a, b) if exclusive else [(a, b)]
            for x, y in pieces:
                start, end = float(bounds[x]), float(bounds[y])
                if end - start >= pp.min_duration_s:
                    events.append(Event(start, end, label, float(p[x:y].mean())))
                    if exclusive:
                        taken[x:y] = True
    return sorted(events, key=lambda e: (e.start_s, e.label))


def _free_runs(taken: np.ndarray, a: int, b: int) -> list[tuple[int, int]]:
    """Runs ``[x, y)`` within ``[a, b)`` where ``taken`` is False."""
    free = np.concatenate([[False], ~taken[a:b], [False]])
    edges = np.flatnonzero(np.diff(free.astype(np.int8)))
    return [(a + int(x), a + int(y)) for x, y in zip(edges[0::2], edges[1::2], strict=True)]


def post_processing(
    label: str,
    class_names: Sequence[str],
    on_threshold: PerClass,
    off_threshold: PerClass,
    min_duration_s: PerClass,
    merge_gap_s: PerClass,
) -> PostProcessing:
    """The resolved :class:`PostProcessing` of ``label`` (validated)."""
    pp = PostProcessing(
        on=resolve(on_threshold, label, class_names, "on_threshold"),
        off=resolve(off_threshold, label, class_names, "off_threshold"),
        min_duration_s=resolve(min_duration_s, label, class_names, "min_duration_s"),
        merge_gap_s=resolve(merge_gap_s, label, class_names, "merge_gap_s"),
    )
    if not 0.0 <= pp.off <= pp.on <= 1.0:
        raise ValueError(f"{label}: need 0 <= off_threshold <= on_threshold <= 1, got {pp}")
    if pp.min_duration_s < 0 or pp.merge_gap_s < 0:
        raise ValueError(f"{label}: durations must be >= 0, got {pp}")
    return pp


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


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- summary ----------------------------------------------------------------------


def summarize(
    events: Sequence[Event],
    smoothed: np.ndarray,
    class_names: Sequence[str],
    bounds: np.ndarray,
    duration_s: float,
    snore_label: str = "snore",
    background: Sequence[str] = ("quiet",),
) -> dict[str, Any]:
    """The night in numbers.

    Args:
        events: the detected events.
        smoothed: ``(N, K)`` median-filtered window probabilities.
        class_names: the K class names.
        bounds: ``(N + 1,)`` window edges (:func:`window_bounds`).
        duration_s: recording length in seconds.
        snore_label: the class whose episodes are counted (``None`` fields when the
            model has no such class).
        background: classes without events (left out of the event counts).

    Returns:
        ``duration_s``, ``duration_h``; ``top_class_minutes`` (time where the class
        has the highest smoothed probability: the classes share out the night);
        ``event_minutes`` and ``event_counts`` per event class; ``snore``: episodes,
        episodes per hour, minutes in episodes, mean and longest episode, longest
        snore-free stretch (minutes, counting from the start and to the end).
    """
    seg = np.diff(bounds) if len(smoothed) else np.zeros(0)
    top = smoothed.argmax(axis=1) if len(smoothed) else np.zeros(0, dtype=np.int64)
    minutes = {c: float(seg[top == k].sum() / 60.0) for k, c in enumerate(class_names)}
    labels = [c for c in class_names if c not in background]
    event_minutes = {c: sum(e.duration_s for e in events if e.label == c) / 60.0 for c in labels}
    event_counts = {c: sum(1 for e in events if e.label == c) for c in labels}
    hours = duration_s / 3600.0
    snore: dict[str, Any] = {"label": snore_label}
    if snore_label in class_names:
        bouts = [e for e in events if e.label == snore_label]
        edges = [0.0] + [x for e in bouts for x in (e.start_s, e.end_s)] + [duration_s]
        gaps = [max(0.0, b - a) for a, b in zip(edges[0::2], edges[1::2], strict=True)]
        snore.update(
            episodes=len(bouts),
            episodes_per_hour=len(bouts) / hours if hours > 0 else None,
            minutes=sum(e.duration_s for e in bouts) / 60.0,
            mean_episode_min=(sum(e.duration_s for e in bouts) / len(bouts) / 60.0)
            if bouts
            else 0.0,
            longest_episode_min=max((e.duration_s for e in bouts), default=0.0) / 60.0,
            longest_snore_free_min=max(gaps) / 60.0,
        )
    else:
        snore.update(
            episodes=None,
            episodes_per_hour=None,
            minutes=None,
            mean_episode_min=None,
            longest_episode_min=None,
            longest_snore_free_min=None,
        )
    return {
        "duration_s": float(duration_s),
        "duration_h": float(hours),
        "n_windows": int(len(smoothed)),
        "top_class_minutes": minutes,
        "event_minutes": event_minutes,
        "event_counts": event_counts,
        "snore": snore,
    }


def model_identity(
    module: Any, ckpt_path: str | os.PathLike[str] | None, feature_config_hash: str | None
) -> dict[str, Any]:
    """Which model made the predictions: classes, backbone, checkpoint and its hash, features.

    Args:
        module: the LightningModule (its ``backbone`` and ``class_names`` are read
            when present).
        ckpt_path: the checkpoint the weights came from, if any.
        feature_config_hash: sha256 of the front end's config.
    """
    backbone = getattr(module, "backbone", None)
    ckpt = Path(ckpt_path) if ckpt_path else None
    sha = file_sha256(ckpt)[:16] if ckpt is not None and ckpt.is_file() else None
    return {
        "module": type(module).__name__,
        "backbone": type(backbone).__name__ if backbone is not None else None,
        "class_names": list(getattr(module, "class_names", []) or []),
        "checkpoint": str(ckpt.resolve()) if ckpt is not None else None,
        "checkpoint_sha256": sha,
        "feature_config_hash": feature_config_hash,
    }


# -- plot -------------------------------------------------------------------------


def format_clock(seconds: float, _pos: object = None) -> str:
    """``hh:mm`` of elapsed seconds (``mm:ss`` would be wrong for a night)."""
    minutes = int(round(seconds / 60.0))
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _tick_step(duration_s: float) -> float:
    """Seconds between labelled ticks: about 8 to 16 ticks over the recording."""
    for step in (60, 120, 300, 600, 900, 1800, 3600, 7200):
        if duration_s / step <= 16:
            return float(step)
    return 14400.0


def plot_timeline(
    path: str | os.PathLike[str],
    probs: np.ndarray,
    bounds: np.ndarray,
    events: Sequence[Event],
    class_names: Sequence[str],
    title: str = "",
    background: Sequence[str] = ("quiet",),
    max_points: int = 1600,
    figsize: tuple[float, float] = (16.0, 6.0),
    reference: Sequence[Event] | None = None,
) -> None:
    """Save a PNG: class probabilities over the night, event bands below, an ``hh:mm`` axis.

    A night has tens of thousands of windows; they are averaged into at most
    ``max_points`` bins (the figure is about that many pixels wide) so every
    stretch stays visible.

    Args:
        path: the PNG to write.
        probs: ``(N, K)`` smoothed window probabilities.
        bounds: ``(N + 1,)`` window edges in seconds.
        events: detected events, drawn as bands, one lane per event class.
        class_names: the K class names.
        title: figure title.
        background: classes drawn without an event lane.
        max_points: most time bins drawn.
        figsize: inches (16×6 at 100 dpi: 1600×600 pixels).
        reference: ground-truth events, drawn as a thin lane under each class's
            detected events when given.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    probs = np.asarray(probs, dtype=np.float32)
    n = len(probs)
    duration = float(bounds[-1]) if len(bounds) else 0.0
    colours = _colours(class_names)
    lanes = [c for c in class_names if c not in background]
    fig, (ax, lane_ax) = plt.subplots(
        2, 1, figsize=figsize, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]}
    )
    if n:
        m = max(1, math.ceil(n / max_points))
        usable = n // m * m
        centres = (bounds[:-1] + bounds[1:]) / 2
        binned = probs[:usable].reshape(-1, m, probs.shape[1]).mean(axis=1)
        t = centres[:usable].reshape(-1, m).mean(axis=1)
        if usable < n:  # the ragged tail is one more bin
            binned = np.vstack([binned, probs[usable:].mean(axis=0)])
            t = np.append(t, centres[usable:].mean())
        ax.stackplot(
            t,
            binned.T,
            labels=list(class_names),
            colors=[colours[c] for c in class_names],
            linewidth=0,
        )
        # Event spans along the top edge too, so bands and curves line up. One collection
        # per class: a poor model can make thousands of events.
        for label in lanes:
            spans = [(e.start_s, e.duration_s) for e in events if e.label == label]
            ax.broken_barh(spans, (0.97, 0.03), color=colours[label], lw=0)
    else:
        ax.text(0.5, 0.5, "no windows", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("class probability\n(smoothed, stacked)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.002, 1.0), fontsize=9, frameon=False)
    ax.set_title(title, fontsize=11, loc="left")
    for i, label in enumerate(lanes):
        y = len(lanes) - 1 - i
        spans = [(e.start_s, e.duration_s) for e in events if e.label == label]
        if reference is not None:
            ref = [(e.start_s, e.duration_s) for e in reference if e.label == label]
            lane_ax.broken_barh(ref, (y + 0.05, 0.2), color="black", alpha=0.6)
            lane_ax.broken_barh(spans, (y + 0.3, 0.6), color=colours[label])
        else:
            lane_ax.broken_barh(spans, (y + 0.15, 0.7), color=colours[label])
    lane_ax.set_yticks([len(lanes) - 1 - i + 0.5 for i in range(len(lanes))], lanes)
    lane_ax.set_ylim(0, max(1, len(lanes)))
    if reference is not None:
        lane_ax.set_ylabel("events\n(thin: truth)", fontsize=9)
    else:
        lane_ax.set_ylabel("events", fontsize=9)
    lane_ax.set_xlim(0, max(duration, 1.0))
    lane_ax.xaxis.set_major_locator(MultipleLocator(_tick_step(duration)))
    lane_ax.xaxis.set_major_formatter(FuncFormatter(format_clock))
    lane_ax.set_xlabel("time since start of recording (hh:mm)")
    for a in (ax, lane_ax):
        a.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _colours(class_names: Sequence[str]) -> dict[str, str]:
    import matplotlib

    cycle = matplotlib.colormaps["tab10"].colors
    out, i = {}, 0
    for c in class_names:
        if c in CLASS_COLOURS:
            out[c] = CLASS_COLOURS[c]
        else:
            out[c] = matplotlib.colors.to_hex(cycle[i % len(cycle)])
            i += 1
    return out


# -- event-based evaluation -------------------------------------------------------


def evaluate_events(
    reference: Sequence[Event],
    estimated: Sequence[Event],
    labels: Sequence[str] | None = None,
    onset_collar_s: float = 2.0,
    offset_collar_s: float = 2.0,
    offset_ratio: float = 0.2,
    evaluate_offset: bool = True,
) -> dict[str, Any]:
    """Event-based precision, recall and F1 per class, and their micro and macro averages.

    An estimate matches a reference of the same label when
    ``|onset difference| <= onset_collar_s`` and (with ``evaluate_offset``)
    ``|offset difference| <= max(offset_collar_s, offset_ratio × reference length)``.
    Each event matches at most one other (maximum bipartite matching), so a bout
    detected as two halves counts one hit and one false alarm.

    Args:
        reference: ground-truth events.
        estimated: detected events.
        labels: classes to score (default: every label in either list).
        onset_collar_s: onset tolerance in seconds.
        offset_collar_s: least offset tolerance in seconds.
        offset_ratio: offset tolerance as a fraction of the reference event's length.
        evaluate_offset: also require offsets to match (onset-only scoring when off).

    Returns:
        ``{"per_class": {label: {tp, fp, fn, n_ref, n_est, precision, recall, f1}},
        "micro": {...}, "macro_f1": float | None, "params": {...}}``; a precision,
        recall or F1 whose denominator is zero is ``None``.
    """
    if labels is None:
        labels = sorted({e.label for e in reference} | {e.label for e in estimated})
    per_class: dict[str, dict[str, Any]] = {}
    totals = {"tp": 0, "fp": 0, "fn": 0}
    for label in labels:
        ref = sorted((e for e in reference if e.label == label), key=lambda e: e.start_s)
        est = sorted((e for e in estimated if e.label == label), key=lambda e: e.start_s)
        candidates = [
            [
                j
                for j, s in enumerate(est)
                if abs(s.start_s - r.start_s) <= onset_collar_s
                and (
                    not evaluate_offset
                    or abs(s.end_s - r.end_s) <= max(offset_collar_s, offset_ratio * r.duration_s)
                )
            ]
            for r in ref
        ]
        tp = _max_matching(candidates, len(est))
        counts = {"tp": tp, "fp": len(est) - tp, "fn": len(ref) - tp}
        for k in totals:
            totals[k] += counts[k]
        per_class[label] = {**counts, "n_ref": len(ref), "n_est": len(est), **_prf(**counts)}
    f1s = [v["f1"] for v in per_class.values() if v["f1"] is not None]
    return {
        "per_class": per_class,
        "micro": {**totals, **_prf(**totals)},
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "params": {
            "onset_collar_s": onset_collar_s,
            "offset_collar_s": offset_collar_s,
            "offset_ratio": offset_ratio,
            "evaluate_offset": evaluate_offset,
        },
    }


def _prf(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": precision, "recall": recall, "f1": f1}


def _max_matching(candidates: list[list[int]], n_right: int) -> int:
    """Size of a maximum matching; ``candidates[i]`` lists the right nodes left node ``i`` may take."""
    match_right = [-1] * n_right

    def augment(i: int, seen: list[bool]) -> bool:
        for j in candidates[i]:
            if not seen[j]:
                seen[j] = True
                if match_right[j] < 0 or augment(match_right[j], seen):
                    match_right[j] = i
                    return True
        return False

    return sum(augment(i, [False] * n_right) for i in range(len(candidates)))

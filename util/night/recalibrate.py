"""Post-processing chosen on labelled validation recordings: smoothing, thresholds, durations.

Clip calibration (:func:`util.night.thresholds.calibrate_thresholds`) sees clips one at a
time, so it can choose only thresholds. Labelled recordings (the ``probabilities.parquet``
that ``main.py predict`` writes for each, and its ground truth in earsleep's events-CSV
format) show how events come and go, so :func:`calibrate_on_recordings` chooses every
setting the events depend on:

- ``median_windows``, shared by all classes, from :data:`MEDIAN_GRID` ``(1, 3, 5)``;
- per event class (every class but the background): ``on_threshold`` from :data:`ON_GRID`
  (0.05 to 0.95 in steps of 0.05), ``off_threshold`` by the clip rule
  (:func:`util.night.thresholds.off_threshold_for`: ``max(on - 0.1, on / 2)``),
  ``min_duration_s`` from :data:`MIN_DURATION_GRID` and ``merge_gap_s`` from
  :data:`MERGE_GAP_GRID`. Each grid also holds the starting value, so that the starting
  post-processing is one of the candidates.

**The score** is the event-based F1 of :func:`util.night.scoring.evaluate_events`
(sed_eval with DCASE's collars: onset within 0.2 s, offset within the larger of 0.2 s and
20 % of the true event), with its counts pooled over the recordings, as sed_eval pools
files: ``F1 = 2·hits / (true events + found events)``. Pooling weighs every event alike:
a recording without events of a class adds only its false alarms, and a short recording
with one event does not weigh as much as a night with fifty.

The onset collar is DCASE's 0.2 s only where the windows are that fine: an event found
from windows every ``hop_s`` starts on a window edge, so its onset can be up to half a hop
(plus the model's own lag) from the truth, and with the default 0.5-s hop a true onset
on a whole second is never within 0.2 s of one. By default the collar is therefore the
longest hop of the recordings when that is longer than 0.2 s (``collar_s`` sets it).

**The search.** For each median candidate, the event classes in the order in which
:func:`util.night.events.detect_events` gives them time (``priority`` first, ``snore``,
then the others): with ``exclusive`` a class loses time only to the classes before it,
so with theirs fixed its own F1 is exactly what the whole post-processing gives it. For
each class, a coordinate search from its starting settings: ``on_threshold`` over its
grid, then ``merge_gap_s``, then ``min_duration_s``, each with the others held, repeated
until a round changes nothing (at most :data:`MAX_ROUNDS`). That scores some 35 settings
per class and round instead of the whole grid's 1,000-odd, and an event list already
scored is not scored again. Ties go to the simpler setting: the smaller merge gap and
minimum duration, the middle of tied thresholds (as on clips) and, across medians, the
smaller median; the median whose class F1s sum highest wins. A class without true events,
or that no setting finds (F1 0), keeps its starting settings; the record says why. If the
result scores below the start (classes interact through ``exclusive``), the start is kept.

``background``, ``exclusive`` and ``priority`` are the starting post-processing's; the
record keeps only the five chosen fields (:data:`util.night.thresholds.CALIBRATED_FIELDS`),
and ``predict`` uses its own for the rest.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from util.night.events import Event, PostProcessing, detect_events, median_filter
from util.night.probabilities import WindowProbabilities
from util.night.scoring import DEFAULT_COLLAR_S, DEFAULT_OFFSET_RATIO, evaluate_events
from util.night.thresholds import (
    CALIBRATED_FIELDS,
    CalibratedThresholds,
    CalibrationError,
    off_threshold_for,
)

__all__ = [
    "MAX_ROUNDS",
    "MEDIAN_GRID",
    "MERGE_GAP_GRID",
    "MIN_DURATION_GRID",
    "ON_GRID",
    "calibrate_on_recordings",
    "check_truth",
]

#: The ``median_windows`` candidates (shared by every class).
MEDIAN_GRID = (1, 3, 5)
#: The ``on_threshold`` candidates.
ON_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: The ``min_duration_s`` candidates, in seconds.
MIN_DURATION_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
#: The ``merge_gap_s`` candidates, in seconds.
MERGE_GAP_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
#: Most rounds of the coordinate search per class.
MAX_ROUNDS = 4
#: How far a true event may end after the recording's last window (rounding in the CSV).
_END_SLACK_S = 0.01
_TIE = 1e-12


def check_truth(
    night: WindowProbabilities, truth: Sequence[Event], class_names: Sequence[str], what: str
) -> None:
    """Raise :class:`CalibrationError` (one line, naming ``what``) unless ``truth`` fits ``night``.

    Checks: the recording's classes are ``class_names``; every true label is one of them
    (the others counted and listed); every event has finite times, ``0 <= start < end``, and
    ends within the recording.
    """
    names = list(class_names)
    if list(night.class_names) != names:
        raise CalibrationError(
            f"{night.recording}: its probabilities are of classes {list(night.class_names)}, "
            f"the model's are {names}: predict the recordings with this checkpoint"
        )
    unknown = Counter(e.label for e in truth if e.label not in names)
    if unknown:
        listed = ", ".join(f"{label!r} x{n}" for label, n in sorted(unknown.items()))
        raise CalibrationError(
            f"{what}: {sum(unknown.values())} events of labels that are not classes of the "
            f"model {names}: {listed}; rename or remove them"
        )
    end = float(night.bounds()[-1])
    for e in truth:
        if not (np.isfinite(e.start_s) and np.isfinite(e.end_s)) or not (
            0.0 <= e.start_s < e.end_s
        ):
            raise CalibrationError(f"{what}: event {e.label} {e.start_s}-{e.end_s} s is not a span")
        if e.end_s > end + _END_SLACK_S:
            raise CalibrationError(
                f"{what}: a {e.label} event ends at {e.end_s:g} s, after the recording "
                f"{night.recording} ends ({end:g} s): is it another recording's truth?"
            )


def calibrate_on_recordings(
    nights: Sequence[WindowProbabilities],
    truths: Sequence[Sequence[Event]],
    class_names: Sequence[str],
    start: CalibratedThresholds | PostProcessing | None = None,
    split: str = "validation",
    collar_s: float | None = None,
    offset_ratio: float = DEFAULT_OFFSET_RATIO,
    medians: Sequence[int] = MEDIAN_GRID,
    on_grid: Sequence[float] = ON_GRID,
    min_duration_grid: Sequence[float] = MIN_DURATION_GRID,
    merge_gap_grid: Sequence[float] = MERGE_GAP_GRID,
) -> CalibratedThresholds:
    """Median, per-class thresholds, minimum duration and merge gap from labelled recordings.

    The rule is the module's. The result's ``provenance``: ``method`` ``"recordings"``,
    ``rule`` (in words), ``split``, ``recordings`` (as ``predict`` named them), ``hours``,
    ``events`` (true events per class), ``scoring`` (library, collars, pooling), ``grid``,
    ``median_windows`` (``chosen``, ``before``, the sum of class F1s per candidate),
    ``per_class`` (the chosen settings, ``f1``, ``precision``, ``recall``, ``hits``,
    ``events``, ``detected`` and ``f1_before`` at the start), ``macro_f1`` and
    ``macro_f1_before`` (means over classes with true events), ``not_calibrated``
    (class: why), ``start`` (where the starting post-processing came from), ``kept_start``,
    ``evaluations`` (sed_eval calls), ``seconds`` and ``created_utc``.

    Args:
        nights: the recordings' window probabilities (:func:`read_probabilities`).
        truths: each recording's true events (:func:`read_events_csv`), in ``nights``' order.
        class_names: the model's classes; every recording must have them.
        start: where the search starts and what a class that cannot be calibrated keeps: a
            calibration (applied to the defaults), a post-processing, or ``None`` for the
            defaults.
        split: what the recordings are, for the provenance and the summary.
        collar_s: onset collar (and least offset collar) in seconds (``None``: DCASE's
            0.2 s, or the recordings' longest hop when that is longer; see the module).
        offset_ratio: offset collar as a fraction of the true event's length.
        medians, on_grid, min_duration_grid, merge_gap_grid: the candidates.

    Raises:
        CalibrationError: no recordings, a truth list per recording missing, or a truth
            that does not fit its recording (:func:`check_truth`).
    """
    t0 = time.perf_counter()
    names = list(class_names)
    if not nights:
        raise CalibrationError("no recordings to calibrate on")
    if len(truths) != len(nights):
        raise CalibrationError(f"{len(nights)} recordings but {len(truths)} truth lists")
    for night, truth in zip(nights, truths, strict=True):
        check_truth(night, truth, names, f"the truth of {night.recording}")
    if collar_s is None:
        collar_s = max(DEFAULT_COLLAR_S, max(float(n.hop_s) for n in nights))
    base, start_source = _start(start)
    try:
        base.check(names)
    except ValueError as err:
        raise CalibrationError(f"the starting post-processing: {err}") from err
    scorer = _Scorer(nights, truths, names, collar_s, offset_ratio)
    order = _order(base, names)
    scored = [c for c in order if scorer.n_true[c]]
    grids = {
        "on_threshold": on_grid,
        "merge_gap_s": merge_gap_grid,
        "min_duration_s": min_duration_grid,
    }
    before = {c: scorer.counts(base, c, order) for c in order}
    best: tuple[float, PostProcessing, dict[str, str]] | None = None
    sums: dict[int, float] = {}
    for m in sorted(set(medians) | {base.median_windows}):
        pp, skipped = replace(base, median_windows=int(m)), {}
        for label in order:
            if not scorer.n_true[label]:
                skipped[label] = f"no true {label} events in the recordings"
                continue
            found = _search_class(scorer, pp, label, order, names, grids)
            if _f1(*scorer.counts(found, label, order)) > 0:
                pp = found
            else:
                skipped[label] = "no setting finds its events (event F1 0)"
        sums[int(m)] = sum(_f1(*scorer.counts(pp, c, order)) for c in scored)
        if best is None or sums[int(m)] > best[0] + _TIE:
            best = (sums[int(m)], pp, skipped)
    assert best is not None
    total, chosen, skipped = best
    kept_start = total + _TIE < sum(_f1(*before[c]) for c in scored)
    if kept_start:
        chosen = base
        skipped = {c: "no setting scored above the start" for c in order}
    after = {c: scorer.counts(chosen, c, order) for c in order}
    per_class: dict[str, dict[str, Any]] = {}
    for label in order:
        if label in skipped:
            continue
        rule = chosen.for_class(label, names)
        tp, n_ref, n_est = after[label]
        per_class[label] = {
            "on_threshold": rule.on_threshold,
            "off_threshold": rule.off_threshold,
            "min_duration_s": rule.min_duration_s,
            "merge_gap_s": rule.merge_gap_s,
            "f1": round(_f1(tp, n_ref, n_est), 4),
            "precision": round(tp / n_est if n_est else 0.0, 4),
            "recall": round(tp / n_ref if n_ref else 0.0, 4),
            "hits": tp,
            "events": n_ref,
            "detected": n_est,
            "f1_before": round(_f1(*before[label]), 4),
        }
    pp = _record_postprocessing(base, chosen, names)
    hours = sum(n.duration_s for n in nights) / 3600.0
    provenance = {
        "method": "recordings",
        "rule": (
            "event F1 (sed_eval, DCASE collars) with counts pooled over the recordings; per "
            "median, classes in priority order, a coordinate search over on_threshold, "
            f"merge_gap_s, min_duration_s (at most {MAX_ROUNDS} rounds; ties: the middle "
            "threshold, the smaller duration and gap, the smaller median); off_threshold: "
            "max(on - 0.1, on / 2)"
        ),
        "split": split,
        "recordings": [str(n.recording) for n in nights],
        "hours": round(hours, 4),
        "events": {c: scorer.n_true[c] for c in order},
        "scoring": {
            "library": f"sed_eval {importlib.metadata.version('sed_eval')}",
            "collar_s": collar_s,
            "offset_ratio": offset_ratio,
            "pooled": "event counts summed over the recordings",
        },
        "grid": {
            "median_windows": sorted(set(medians)),
            "on_threshold": list(on_grid),
            "min_duration_s": list(min_duration_grid),
            "merge_gap_s": list(merge_gap_grid),
        },
        "median_windows": {
            "chosen": chosen.median_windows,
            "before": base.median_windows,
            "f1_sum": {str(m): round(v, 4) for m, v in sums.items()},
        },
        "per_class": per_class,
        "macro_f1": _macro(after, scored),
        "macro_f1_before": _macro(before, scored),
        "not_calibrated": skipped,
        "start": start_source,
        "kept_start": kept_start,
        "evaluations": scorer.evaluations,
        "seconds": round(time.perf_counter() - t0, 2),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return CalibratedThresholds(pp, provenance, CALIBRATED_FIELDS)


def _start(start: CalibratedThresholds | PostProcessing | None) -> tuple[PostProcessing, str]:
    """The starting post-processing and where it came from."""
    if start is None:
        return PostProcessing(), "defaults"
    if isinstance(start, CalibratedThresholds):
        merged, _, _ = start.apply(PostProcessing())
        return merged, start.source()
    return start, "defaults" if start == PostProcessing() else "options"


def _order(pp: PostProcessing, names: Sequence[str]) -> list[str]:
    """The event classes in the order :func:`detect_events` gives them time."""
    event_classes = pp.event_classes(names)
    order = [c for c in pp.priority if c in event_classes]
    return order + [c for c in event_classes if c not in order]


def _f1(tp: int, n_ref: int, n_est: int) -> float:
    return 2.0 * tp / (n_ref + n_est) if n_ref + n_est else 0.0


def _macro(counts: Mapping[str, tuple[int, int, int]], classes: Sequence[str]) -> float | None:
    return round(sum(_f1(*counts[c]) for c in classes) / len(classes), 4) if classes else None


class _Scorer:
    """Pooled event counts ``(hits, true, found)`` of one class under a post-processing."""

    def __init__(
        self,
        nights: Sequence[WindowProbabilities],
        truths: Sequence[Sequence[Event]],
        names: list[str],
        collar_s: float,
        offset_ratio: float,
    ) -> None:
        self.nights, self.names = list(nights), names
        self.collar_s, self.offset_ratio = collar_s, offset_ratio
        self.bounds = [n.bounds() for n in nights]
        self.truth = [{c: [e for e in t if e.label == c] for c in names} for t in truths]
        # sed_eval refuses events after the length it is given: the truth may end a few
        # milliseconds after the last window (check_truth allows it).
        self.length = [
            max(float(b[-1]), max((e.end_s for e in t), default=0.0))
            for b, t in zip(self.bounds, truths, strict=True)
        ]
        self.n_true = {c: sum(len(t[c]) for t in self.truth) for c in names}
        self._smoothed: dict[int, list[np.ndarray]] = {}
        self._memo: dict[tuple[Any, ...], tuple[int, int, int]] = {}
        self.evaluations = 0

    def smoothed(self, median: int) -> list[np.ndarray]:
        if median not in self._smoothed:
            self._smoothed[median] = [median_filter(n.probs, median) for n in self.nights]
        return self._smoothed[median]

    def counts(self, pp: PostProcessing, label: str, order: Sequence[str]) -> tuple[int, int, int]:
        # The classes after ``label`` cannot take its time: leave them out (as background).
        later = tuple(order[order.index(label) + 1 :])
        trimmed = replace(pp, background=(*pp.background, *later))
        smoothed = self.smoothed(pp.median_windows)
        tp = n_ref = n_est = 0
        for i, night in enumerate(self.nights):
            events = [
                e
                for e in detect_events(
                    night.probs, self.names, self.bounds[i], trimmed, smoothed=smoothed[i]
                )
                if e.label == label
            ]
            truth = self.truth[i][label]
            if not truth or not events:  # nothing to match: no need to ask the library
                counts = (0, len(truth), len(events))
            else:
                key = (i, label, tuple((e.start_s, e.end_s) for e in events))
                if key not in self._memo:
                    scores = evaluate_events(
                        truth,
                        events,
                        labels=[label],
                        collar_s=self.collar_s,
                        offset_ratio=self.offset_ratio,
                        duration_s=self.length[i],
                        # only the event-based counts are used: one segment spares the
                        # library the segment-based pass (80 % of its time at 1 s)
                        segment_s=max(self.length[i], 1.0),
                    )["per_class"][label]
                    self._memo[key] = (scores["tp"], scores["n_ref"], scores["n_est"])
                    self.evaluations += 1
                counts = self._memo[key]
            tp, n_ref, n_est = tp + counts[0], n_ref + counts[1], n_est + counts[2]
        return tp, n_ref, n_est


def _search_class(
    scorer: _Scorer,
    pp: PostProcessing,
    label: str,
    order: Sequence[str],
    names: Sequence[str],
    grids: Mapping[str, Sequence[float]],
) -> PostProcessing:
    """``pp`` with ``label``'s on/off thresholds, merge gap and minimum duration searched."""
    rule = pp.for_class(label, names)
    settings = {name: float(getattr(rule, name)) for name in grids}

    def score(candidate: Mapping[str, float]) -> float:
        return _f1(*scorer.counts(_with(pp, label, candidate), label, order))

    for _ in range(MAX_ROUNDS):
        previous = dict(settings)
        for name, grid in grids.items():
            values = sorted({float(v) for v in grid} | {settings[name]})
            f1 = np.array([score({**settings, name: v}) for v in values])
            tied = [v for v, s in zip(values, f1, strict=True) if s >= f1.max() - _TIE]
            settings[name] = tied[(len(tied) - 1) // 2] if name == "on_threshold" else tied[0]
        if settings == previous:
            break
    return _with(pp, label, settings)


def _with(pp: PostProcessing, label: str, settings: Mapping[str, float]) -> PostProcessing:
    """``pp`` with ``label``'s per-class values set (``off_threshold`` follows ``on``)."""
    values = {**settings, "off_threshold": off_threshold_for(settings["on_threshold"])}
    return replace(
        pp, **{name: _per_class(getattr(pp, name), label, v) for name, v in values.items()}
    )


def _per_class(value: float | Mapping[str, float], label: str, new: float) -> dict[str, float]:
    mapping = dict(value) if isinstance(value, Mapping) else {"default": float(value)}
    return {**mapping, label: float(new)}


def _record_postprocessing(
    base: PostProcessing, chosen: PostProcessing, names: Sequence[str]
) -> PostProcessing:
    """``chosen`` with each per-class field one ``{class: value, "default": value}`` mapping.

    Every event class gets its resolved value; ``default`` is the start's (a number, or its
    mapping's ``default``), for classes the model lacks or a differently named background.
    """
    values: dict[str, Any] = {"median_windows": chosen.median_windows}
    for name in CALIBRATED_FIELDS[1:]:
        mapping = {c: getattr(chosen.for_class(c, names), name) for c in _order(chosen, names)}
        fallback = getattr(base, name)
        if not isinstance(fallback, Mapping):
            mapping["default"] = float(fallback)
        elif "default" in fallback:
            mapping["default"] = float(fallback["default"])
        values[name] = mapping
    return replace(chosen, **values)

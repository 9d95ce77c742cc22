"""Scoring detected events against a reference with ``sed_eval``, the DCASE metrics library.

Two views of one recording, both computed by `sed_eval
<https://tut-arg.github.io/sed_eval/>`_ (Mesaros, Heittola and Virtanen, "Metrics for
polyphonic sound event detection", Applied Sciences 6(6):162, 2016), so the numbers
compare with the sound-event-detection literature:

- **event-based** (:class:`sed_eval.sound_event.EventBasedMetrics`): an estimate is a hit
  when it has the reference's label, its onset is within ``collar_s`` of the reference's
  and its offset within ``max(collar_s, offset_ratio × reference length)``; each event
  matches at most one other (the library's maximum bipartite matching), so a bout found
  as two halves is one hit and one false alarm. The defaults are DCASE's: a 200 ms
  collar and 20 % of the length for offsets (``sed_eval``'s own default for the latter
  is 50 %).
- **segment-based** (:class:`sed_eval.sound_event.SegmentBasedMetrics`): the recording is
  cut into ``segment_s`` segments (1 s, DCASE's choice), a class is active in a segment
  when any of its events overlaps it, and reference and estimate are compared segment
  by segment; it forgives boundary jitter that the event-based view punishes.

Precision, recall and F1 follow the library exactly, with its ``zero_score`` handling of
an empty output (a class never detected has precision 0, so F1 0 rather than a gap in
the class average); a value the library leaves undefined (NaN) is returned as ``None``.
Macro F1 is the library's class-wise average: the mean F1 over classes whose F1 is defined.

PSDS (threshold-independent, from the saved window probabilities) is not computed: both
maintained implementations fail under pandas 3, which ``datasets`` brings in. Measured
2026-12-02: ``sed_scores_eval`` 0.0.4 (an sdist with a Cython extension, 3 minutes to
build) raises "buffer source array is read-only" in ``onset_offset_curves`` because pandas
3 hands out read-only arrays (copy-on-write); ``psds_eval`` 0.5.3 calls
``fillna(method=...)``, removed in pandas 3. A home-made PSDS would be exactly the
hand-written scorer this module replaced.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from util.night.events import Event

if TYPE_CHECKING:
    from sed_eval.sound_event import EventBasedMetrics, SegmentBasedMetrics

log = logging.getLogger(__name__)

#: Onset collar and least offset collar in seconds (DCASE's default).
DEFAULT_COLLAR_S = 0.2
#: Offset collar as a fraction of the reference event's length (DCASE's default).
DEFAULT_OFFSET_RATIO = 0.2
#: Segment length of the segment-based metrics in seconds (DCASE's default).
DEFAULT_SEGMENT_S = 1.0

# The library's collar test is ``|difference| <= collar`` on binary floats, where 5.2 - 5.0
# exceeds 0.2; this slack keeps an edge exactly on the collar a hit, as the definition says.
_COLLAR_SLACK_S = 1e-9
# Times are rounded to the microsecond so float noise cannot light an extra segment.
_TIME_DIGITS = 6


def evaluate_events(
    reference: Sequence[Event],
    estimated: Sequence[Event],
    labels: Sequence[str] | None = None,
    collar_s: float = DEFAULT_COLLAR_S,
    offset_ratio: float = DEFAULT_OFFSET_RATIO,
    evaluate_onset: bool = True,
    evaluate_offset: bool = True,
    segment_s: float = DEFAULT_SEGMENT_S,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """Event-based and segment-based precision, recall and F1 of one recording (``sed_eval``).

    Args:
        reference: ground-truth events of the recording.
        estimated: detected events of the same recording.
        labels: classes to score (default: every label in either list). Events of other
            labels are left out of every count and reported under ``"ignored"``.
        collar_s: onset tolerance, and the least offset tolerance, in seconds.
        offset_ratio: offset tolerance as a fraction of the reference event's length
            (the larger of this and ``collar_s`` applies).
        evaluate_onset: require onsets to match.
        evaluate_offset: require offsets to match (onset-only scoring when off).
        segment_s: segment length of the segment-based metrics, in seconds.
        duration_s: the recording's length, so that trailing segments without events
            count (default: the last offset of either list). No event may end after it.

    Returns:
        ``{"per_class": {label: {tp, fp, fn, n_ref, n_est, precision, recall, f1}},
        "micro": {..., substitutions, error_rate}, "macro_f1": float | None,
        "segment": {"per_class": {...}, "micro": {..., error_rate}, "macro_f1": ...,
        "n_segments": int}, "ignored": {"reference": {label: n}, "estimated": {label: n}},
        "params": {...}}``. The top-level counts are events; ``"segment"`` counts
        segments. ``fp`` and ``fn`` are the estimates and references without a hit
        (what F1 sees); ``substitutions`` are misses explained by an estimate of another
        label at the right time, which the error rate ``(S + D + I) / n_ref`` counts once.

    Raises:
        ValueError: an event with a non-finite or negative time or no length, a
            non-positive collar or segment, a ratio outside [0, 1], both onset and offset
            evaluation off, or an event ending after ``duration_s``.
    """
    _check_parameters(collar_s, offset_ratio, evaluate_onset, evaluate_offset, segment_s)
    for event in (*reference, *estimated):
        _check_event(event)
    if labels is None:
        labels = sorted({e.label for e in reference} | {e.label for e in estimated})
    labels = list(dict.fromkeys(labels))
    ref, ignored_ref = _as_library_events(reference, labels)
    est, ignored_est = _as_library_events(estimated, labels)
    if ignored_ref or ignored_est:
        log.info(
            "evaluate_events: left out events of unscored labels: reference %s, estimated %s",
            dict(ignored_ref),
            dict(ignored_est),
        )
    last_offset = max((e["event_offset"] for e in (*ref, *est)), default=0.0)
    if duration_s is not None and last_offset > duration_s + _COLLAR_SLACK_S:
        raise ValueError(
            f"an event ends at {last_offset} s, after duration_s={duration_s} s: "
            "pass the recording's real length, or None to use the last offset"
        )
    evaluated_s = last_offset if duration_s is None else float(duration_s)

    sound_event = _sound_event()
    events = sound_event.EventBasedMetrics(
        event_label_list=labels,
        evaluate_onset=evaluate_onset,
        evaluate_offset=evaluate_offset,
        t_collar=float(collar_s) + _COLLAR_SLACK_S,
        percentage_of_length=float(offset_ratio),
        event_matching_type="optimal",
        empty_system_output_handling="zero_score",
    ).evaluate(ref, est)
    segments = sound_event.SegmentBasedMetrics(
        event_label_list=labels, time_resolution=float(segment_s)
    )
    segments.empty_system_output_handling = "zero_score"  # its constructor does not pass it on
    segments.evaluate(ref, est, evaluated_length_seconds=evaluated_s)

    per_class = {label: _event_scores(events, label) for label in labels}
    segment_per_class = {label: _segment_scores(segments, label) for label in labels}
    return {
        "per_class": per_class,
        "micro": _event_scores(events, None),
        "macro_f1": _macro_f1(per_class),
        "segment": {
            "per_class": segment_per_class,
            "micro": _segment_scores(segments, None),
            "macro_f1": _macro_f1(segment_per_class),
            "n_segments": math.ceil(evaluated_s / float(segment_s)),  # as the library counts
        },
        "ignored": {"reference": dict(ignored_ref), "estimated": dict(ignored_est)},
        "params": {
            "collar_s": collar_s,
            "offset_ratio": offset_ratio,
            "evaluate_onset": evaluate_onset,
            "evaluate_offset": evaluate_offset,
            "segment_s": segment_s,
            "evaluated_s": evaluated_s,
            "labels": labels,
            "library": f"sed_eval {importlib.metadata.version('sed_eval')}",
        },
    }


def _sound_event() -> ModuleType:
    """``sed_eval.sound_event``, imported on first use.

    Imported here rather than with this module so that ``main.py`` (whose callbacks import
    :mod:`util.night`) does not pay for it on every start. ``dcase_util``, under
    ``sed_eval``, imports ``pkg_resources`` and so triggers setuptools' deprecation warning
    on every import; that warning is about the library's packaging, not about the user's
    data, so it is silenced here (pyproject.toml keeps ``setuptools<82``, which still has
    ``pkg_resources``).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="pkg_resources is deprecated", category=UserWarning
        )
        import sed_eval.sound_event

    return sed_eval.sound_event


def _check_parameters(
    collar_s: float, offset_ratio: float, onset: bool, offset: bool, segment_s: float
) -> None:
    if not collar_s > 0:
        raise ValueError(f"collar_s must be a positive number of seconds, got {collar_s!r}")
    if not 0.0 <= offset_ratio <= 1.0:
        raise ValueError(f"offset_ratio must lie in [0, 1], got {offset_ratio!r}")
    if not (onset or offset):
        raise ValueError("evaluate_onset and evaluate_offset are both off: turn one of them on")
    if not segment_s > 0:
        raise ValueError(f"segment_s must be a positive number of seconds, got {segment_s!r}")


def _check_event(event: Event) -> None:
    start, end = event.start_s, event.end_s
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
        raise ValueError(
            f"cannot score {event}: times must be finite, start_s >= 0 and end_s > start_s "
            "(fix the events file)"
        )


def _as_library_events(
    events: Sequence[Event], labels: Sequence[str]
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The events of ``labels`` in ``sed_eval``'s dictionary form, and a count of the rest."""
    wanted = set(labels)
    kept = [
        {
            "event_onset": round(float(e.start_s), _TIME_DIGITS),
            "event_offset": round(float(e.end_s), _TIME_DIGITS),
            "event_label": e.label,
        }
        for e in events
        if e.label in wanted
    ]
    return kept, Counter(e.label for e in events if e.label not in wanted)


def _defined(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


#: Our names for the library's precision, recall and F-measure keys.
_F_KEYS = {"precision": "precision", "recall": "recall", "f1": "f_measure"}


def _f_measure(f: dict[str, float]) -> dict[str, float | None]:
    return {k: _defined(f[name]) for k, name in _F_KEYS.items()}


def _event_scores(metrics: EventBasedMetrics, label: str | None) -> dict[str, Any]:
    """One class's (or, for ``None``, the overall) event counts and scores."""
    if label is None:
        counts, scores = metrics.overall, metrics.overall_f_measure()
    else:
        counts, scores = metrics.class_wise[label], metrics.class_wise_f_measure(label)
    tp, n_ref, n_est = int(counts["Ntp"]), int(counts["Nref"]), int(counts["Nsys"])
    out: dict[str, Any] = {
        "tp": tp,
        "fp": n_est - tp,
        "fn": n_ref - tp,
        "n_ref": n_ref,
        "n_est": n_est,
        **_f_measure(scores),
    }
    if label is None:
        out["substitutions"] = int(counts["Nsubs"])
        out["error_rate"] = metrics.overall_error_rate()["error_rate"] if n_ref else None
    return out


def _segment_scores(metrics: SegmentBasedMetrics, label: str | None) -> dict[str, Any]:
    """One class's (or, for ``None``, the overall) segment counts and scores."""
    if label is None:
        counts, scores = metrics.overall, metrics.overall_f_measure()
    else:
        counts, scores = metrics.class_wise[label], metrics.class_wise_f_measure(label)
    out: dict[str, Any] = {
        "tp": int(counts["Ntp"]),
        "fp": int(counts["Nfp"]),
        "fn": int(counts["Nfn"]),
        "n_ref": int(counts["Nref"]),
        "n_est": int(counts["Nsys"]),
        **_f_measure(scores),
    }
    if label is None:
        out["error_rate"] = metrics.overall_error_rate()["error_rate"] if counts["Nref"] else None
    return out


def _macro_f1(per_class: dict[str, dict[str, Any]]) -> float | None:
    """The library's class-wise average: the mean F1 over classes whose F1 is defined."""
    f1s = [scores["f1"] for scores in per_class.values() if scores["f1"] is not None]
    return sum(f1s) / len(f1s) if f1s else None

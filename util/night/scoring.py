"""Event-based scoring of detected events against a reference (precision, recall, F1).

An estimate matches a reference of its class when the onsets are within
``onset_collar_s`` and the offsets within ``max(offset_collar_s, offset_ratio ×
reference length)``; matches are one-to-one (a maximum bipartite matching), the usual
event-based rule of sound event detection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from util.night.events import Event


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

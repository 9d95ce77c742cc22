"""A night in numbers: time per class, events per class, snore episodes; which model made them.

Also the words for them: :func:`format_duration` (lengths that never round to "0 min"),
the timeline's title (:func:`timeline_title`), the one console line per recording
(:func:`console_line`) and the check that the snore events and the snore probabilities
tell the same story (:func:`snore_warning`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.hashing import file_sha256
from util.night.events import Event, PostProcessing

#: Episodes per hour only for recordings at least this long: a rate over minutes says
#: nothing about a night (one 5 s bout in a 9 s file would be "400 episodes/h").
MIN_RATE_HOURS = 1.0

#: :func:`snore_warning` fires when the snore events cover less than this share of the
#: time snore is the top class (thresholds too high for the model: the issue-15 case of
#: "top class 4.5 min, 0 episodes")...
EVENTS_BELOW_TOP = 0.5
#: ...or more than this many times that time (thresholds too low, or merging too
#: generous). Not 2: within a bout the exhalations lean to ``breathe``, so a good model's
#: snore events are over twice its top-class time (204 vs 86 min on the README's night).
EVENTS_ABOVE_TOP = 3.0


def summarize(
    events: Sequence[Event],
    smoothed: np.ndarray,
    class_names: Sequence[str],
    bounds: np.ndarray,
    duration_s: float,
    postprocessing: PostProcessing | None = None,
    snore_label: str = "snore",
) -> dict[str, Any]:
    """The night in numbers.

    Args:
        events: the detected events.
        smoothed: ``(N, K)`` median-filtered window probabilities.
        class_names: the K class names.
        bounds: ``(N + 1,)`` window edges (:func:`util.night.events.window_bounds`).
        duration_s: recording length in seconds.
        postprocessing: what made ``events`` (default: :class:`PostProcessing`'s
            defaults); its background classes are left out of the event counts.
        snore_label: the class whose episodes are counted (``None`` fields when the
            model has no such class).

    Returns:
        ``duration_s``, ``duration_h``, ``n_windows``; ``top_class_minutes`` (time
        where the class has the highest smoothed probability: the classes share out
        the night); ``event_minutes`` and ``event_counts`` per event class; ``snore``:
        episodes, minutes in episodes, mean and longest episode, longest snore-free
        stretch (minutes, counting from the start and to the end), and episodes per
        hour for recordings of at least :data:`MIN_RATE_HOURS` (shorter ones have
        ``episodes_per_hour_omitted``, the reason, instead); ``postprocessing``:
        :meth:`PostProcessing.describe`.
    """
    pp = PostProcessing() if postprocessing is None else postprocessing
    seg = np.diff(bounds) if len(smoothed) else np.zeros(0)
    top = smoothed.argmax(axis=1) if len(smoothed) else np.zeros(0, dtype=np.int64)
    minutes = {c: float(seg[top == k].sum() / 60.0) for k, c in enumerate(class_names)}
    labels = pp.event_classes(class_names)
    event_minutes = {c: sum(e.duration_s for e in events if e.label == c) / 60.0 for c in labels}
    event_counts = {c: sum(1 for e in events if e.label == c) for c in labels}
    hours = duration_s / 3600.0
    return {
        "duration_s": float(duration_s),
        "duration_h": float(hours),
        "n_windows": int(len(smoothed)),
        "top_class_minutes": minutes,
        "event_minutes": event_minutes,
        "event_counts": event_counts,
        "snore": _snore(events, class_names, duration_s, snore_label),
        "postprocessing": pp.describe(class_names),
    }


def _snore(
    events: Sequence[Event], class_names: Sequence[str], duration_s: float, label: str
) -> dict[str, Any]:
    """The ``snore`` part of :func:`summarize` (every number ``None`` without the class)."""
    keys = (
        "episodes",
        "episodes_per_hour",
        "minutes",
        "mean_episode_min",
        "longest_episode_min",
        "longest_snore_free_min",
    )
    if label not in class_names:
        return {"label": label, **dict.fromkeys(keys)}
    bouts = [e for e in events if e.label == label]
    edges = [0.0] + [x for e in bouts for x in (e.start_s, e.end_s)] + [duration_s]
    gaps = [max(0.0, b - a) for a, b in zip(edges[0::2], edges[1::2], strict=True)]
    total_s = sum(e.duration_s for e in bouts)
    hours = duration_s / 3600.0
    out: dict[str, Any] = {"label": label, "episodes": len(bouts)}
    if hours >= MIN_RATE_HOURS:
        out["episodes_per_hour"] = len(bouts) / hours
    else:
        out["episodes_per_hour_omitted"] = (
            f"only for recordings of at least {MIN_RATE_HOURS:g} h; "
            f"this one is {format_duration(duration_s)}"
        )
    out.update(
        minutes=total_s / 60.0,
        mean_episode_min=total_s / len(bouts) / 60.0 if bouts else 0.0,
        longest_episode_min=max((e.duration_s for e in bouts), default=0.0) / 60.0,
        longest_snore_free_min=max(gaps) / 60.0,
    )
    return out


def model_identity(
    module: Any, ckpt_path: str | os.PathLike[str] | None, feature_config_hash: str | None
) -> dict[str, Any]:
    """Which model made the predictions: classes, backbone, checkpoint and its hash, features.

    Args:
        module: the task (an earsleep LightningModule: its documented ``backbone``
            and ``class_names`` are read).
        ckpt_path: the checkpoint the weights came from, if any.
        feature_config_hash: sha256 of the front end's config.
    """
    ckpt = Path(ckpt_path) if ckpt_path else None
    sha = file_sha256(ckpt)[:16] if ckpt is not None and ckpt.is_file() else None
    return {
        "module": type(module).__name__,
        "backbone": type(module.backbone).__name__,
        "class_names": list(module.class_names),
        "checkpoint": str(ckpt.resolve()) if ckpt is not None else None,
        "checkpoint_sha256": sha,
        "feature_config_hash": feature_config_hash,
    }


# -- in words -------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """A length for people: ``8.7 s`` under a minute, ``12.5 min`` under an hour, ``8 h 05 min``."""
    if seconds < 60.0:
        return f"{seconds:.1f} s"
    if seconds < 3600.0:
        return f"{seconds / 60.0:.1f} min"
    minutes = int(round(seconds / 60.0))
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _episodes(n: int) -> str:
    return f"{n} episode" if n == 1 else f"{n} episodes"


def timeline_title(name: str, summary: Mapping[str, Any]) -> str:
    """``night.wav  ·  8 h 00 min  ·  snore: 3 h 24 min in 5 episodes (0.6/h), longest free stretch 1 h 46 min``."""
    title = f"{name}  ·  {format_duration(summary['duration_s'])}"
    snore = summary["snore"]
    if snore.get("episodes") is not None:
        rate = snore.get("episodes_per_hour")
        title += (
            f"  ·  {snore['label']}: {format_duration(snore['minutes'] * 60)} in "
            f"{_episodes(snore['episodes'])}"
            + (f" ({rate:.1f}/h)" if rate is not None else "")
            + f", longest free stretch {format_duration(snore['longest_snore_free_min'] * 60)}"
        )
    return title


def snore_warning(summary: Mapping[str, Any]) -> str | None:
    """Why the snore events and the snore probabilities disagree, or ``None`` when they agree.

    They disagree when the events cover less than :data:`EVENTS_BELOW_TOP` of the time
    snore is the top class (and that time is at least one minimum-length event), or
    more than :data:`EVENTS_ABOVE_TOP` times it. Either way the thresholds do not fit
    the model, and re-deriving with others (``python -m util.night.rederive``) is quick.
    """
    snore = summary["snore"]
    label = snore["label"]
    rules = summary["postprocessing"]["per_class"].get(label)
    if snore.get("minutes") is None or rules is None:
        return None
    top_s = summary["top_class_minutes"].get(label, 0.0) * 60.0
    event_s = snore["minutes"] * 60.0
    top, events = format_duration(top_s), format_duration(event_s)
    if top_s > 0 and top_s >= rules["min_duration_s"] and event_s < EVENTS_BELOW_TOP * top_s:
        return (
            f"{label} is the top class for {top} but its events cover {events}: "
            f"on_threshold {rules['on_threshold']:g} may be too high for this model"
        )
    if event_s > EVENTS_ABOVE_TOP * top_s:
        return (
            f"{label} events cover {events} but it is the top class for only {top}: "
            f"the thresholds (on {rules['on_threshold']:g}, off {rules['off_threshold']:g}) "
            "may be too low, or merge_gap_s too long"
        )
    return None


def console_line(summary: Mapping[str, Any], output: str | os.PathLike[str]) -> str:
    """The one line printed per recording at the end of ``predict`` (and by the re-derive command).

    ``night: <file>[ (<status>)]: <length>, <snore> <time> in <n> episode(s)[ (<rate>/h)],
    thresholds: <source> -> <output folder>``, then ``; WARNING: <why>`` when
    :func:`snore_warning` has something to say.
    """
    name = Path(str(summary["recording"])).name
    status = summary.get("status", "ok")
    head = f"night: {name}" + (f" ({status})" if status != "ok" else "")
    snore = summary["snore"]
    if snore.get("episodes") is not None:
        rate = snore.get("episodes_per_hour")
        found = (
            f"{snore['label']} {format_duration(snore['minutes'] * 60)} in "
            f"{_episodes(snore['episodes'])}" + (f" ({rate:.2f}/h)" if rate is not None else "")
        )
    else:
        found = f"{sum(summary['event_counts'].values())} events"
    source = summary["postprocessing"].get("source", "defaults")
    line = (
        f"{head}: {format_duration(summary['duration_s'])}, {found}, "
        f"thresholds: {source} -> {output}"
    )
    warning = snore_warning(summary)
    return line + (f"; WARNING: {warning}" if warning else "")

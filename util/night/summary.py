"""A night in numbers: time per class, events per class, snore episodes; which model made them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.hashing import file_sha256
from util.night.events import Event, PostProcessing


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
        episodes, episodes per hour, minutes in episodes, mean and longest episode,
        longest snore-free stretch (minutes, counting from the start and to the end);
        ``postprocessing``: :meth:`PostProcessing.describe`.
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
    values = (
        len(bouts),
        len(bouts) / hours if hours > 0 else None,
        total_s / 60.0,
        total_s / len(bouts) / 60.0 if bouts else 0.0,
        max((e.duration_s for e in bouts), default=0.0) / 60.0,
        max(gaps) / 60.0,
    )
    return {"label": label, **dict(zip(keys, values, strict=True))}


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


def format_clock(seconds: float, _pos: object = None) -> str:
    """``hh:mm`` of elapsed seconds (``mm:ss`` would be wrong for a night)."""
    minutes = int(round(seconds / 60.0))
    return f"{minutes // 60:02d}:{minutes % 60:02d}"

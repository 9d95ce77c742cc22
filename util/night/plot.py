"""The timeline of a recording: class probabilities over time, event lanes below.

The time axis fits the length (:func:`time_axis`): seconds under 2 minutes, ``mm:ss``
under an hour, ``hh:mm`` beyond.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from util.night.events import Event

#: Plot colours of the usual classes; others take the tab10 cycle.
CLASS_COLOURS = {
    "quiet": "#d0d0d0",
    "breathe": "#4c9be8",
    "snore": "#e4572e",
    "non_wearer": "#9b59b6",
    "cough": "#2ca02c",
    "movements": "#8c564b",
}


#: Seconds between labelled ticks to choose from, per axis unit.
_STEPS = {
    "s": (1, 2, 5, 10, 15, 20, 30),
    "mm:ss": (10, 15, 30, 60, 120, 300, 600),
    "hh:mm": (600, 900, 1800, 3600, 7200, 14400),
}


def format_clock(seconds: float, _pos: object = None) -> str:
    """``hh:mm`` of elapsed seconds (the axis of recordings of an hour or more)."""
    minutes = int(round(seconds / 60.0))
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def format_minutes(seconds: float, _pos: object = None) -> str:
    """``mm:ss`` of elapsed seconds (the axis of recordings under an hour)."""
    whole = int(round(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def format_seconds(seconds: float, _pos: object = None) -> str:
    """Elapsed seconds as a plain number (the axis of recordings under 2 minutes)."""
    return f"{seconds:g}"


def time_axis(duration_s: float) -> tuple[float, Callable[[float, object], str], str]:
    """``(seconds between ticks, tick formatter, unit)`` for a recording of ``duration_s``.

    Seconds under 2 minutes, ``mm:ss`` under an hour, ``hh:mm`` beyond; the step is the
    smallest that gives at most 16 labelled ticks.
    """
    if duration_s < 120.0:
        unit, formatter = "s", format_seconds
    elif duration_s < 3600.0:
        unit, formatter = "mm:ss", format_minutes
    else:
        unit, formatter = "hh:mm", format_clock
    steps = _STEPS[unit]
    step = next((s for s in steps if duration_s / s <= 16), steps[-1])
    return float(step), formatter, unit


def stack_fractions(probs: np.ndarray) -> np.ndarray:
    """Rows scaled to add up to 1, so a stacked plot fills its height.

    Each class's probability is median-filtered on its own, so the smoothed rows do not
    add up to 1 and would leave white notches; rows of zeros stay zero.
    """
    probs = np.asarray(probs, dtype=np.float32)
    total = probs.sum(axis=1, keepdims=True)
    return np.divide(probs, total, out=np.zeros_like(probs), where=total > 0)


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
    """Save a PNG: class probabilities over the recording, event bands below.

    A night has tens of thousands of windows; they are averaged into at most
    ``max_points`` bins (the figure is about that many pixels wide) so every
    stretch stays visible. Each bin's probabilities are drawn stacked, scaled to add
    up to 1 (:func:`stack_fractions`); the time axis fits the length (:func:`time_axis`).

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
        # The first and last bins reach the recording's ends: no white strip at either edge.
        t = np.concatenate([[bounds[0]], t, [bounds[-1]]])
        binned = np.vstack([binned[:1], binned, binned[-1:]])
        ax.stackplot(
            t,
            stack_fractions(binned).T,
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
    ax.set_ylabel("class probability\n(smoothed, stacked to 1)")
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
    step, formatter, unit = time_axis(duration)
    lane_ax.set_xlim(0, max(duration, 1.0))
    lane_ax.xaxis.set_major_locator(MultipleLocator(step))
    lane_ax.xaxis.set_major_formatter(FuncFormatter(formatter))
    lane_ax.set_xlabel(f"time since start of recording ({unit})")
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

"""The timeline of a night: class probabilities over time, event lanes below, an ``hh:mm`` axis."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from util.night.events import Event
from util.night.summary import format_clock

#: Plot colours of the usual classes; others take the tab10 cycle.
CLASS_COLOURS = {
    "quiet": "#d0d0d0",
    "breathe": "#4c9be8",
    "snore": "#e4572e",
    "non_wearer": "#9b59b6",
    "cough": "#2ca02c",
    "movements": "#8c564b",
}


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

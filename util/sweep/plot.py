"""The sweep summary's picture: macro-F1 against size, and the KD α × T grid.

:func:`plot_summary` draws ``summary.csv``'s rows (:func:`util.sweep.report.summary_rows`)
on the Agg canvas, never through pyplot's global state, and writes ``summary.png`` beside
``summary.md``; optionally it logs the same figure to TensorBoard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

__all__ = ["plot_summary", "summary_figure"]

log = logging.getLogger(__name__)

#: Marker per phase: baselines (phase 1), tuned teachers, distilled students (phase 2).
_MARKERS = {"phase1": ("o", "baseline"), "tuning": ("s", "tuned teacher"), "phase2": ("^", "KD")}
_COLLAPSED = "tab:red"


def _num(v: Any) -> float | None:
    """``v`` as a finite float, or ``None`` (empty CSV cells, ``n/a``)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _scatter_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Test macro-F1 (mean, bootstrap 95% CI as error bars) per configuration vs. params."""
    left_out = []
    seen: set[str] = set()
    for r in rows:
        x, y = _num(r.get("params")), _num(r.get("test_f1_mean"))
        if x is None or x <= 0 or y is None:
            left_out.append(str(r.get("config")))
            continue
        lo, hi = _num(r.get("test_f1_ci_low")), _num(r.get("test_f1_ci_high"))
        yerr = None
        if lo is not None and hi is not None:
            # the CI is of pooled predictions; it need not bracket the mean of seeds
            yerr = [[max(y - lo, 0.0)], [max(hi - y, 0.0)]]
        marker, kind = _MARKERS.get(str(r.get("phase")), ("D", str(r.get("phase"))))
        collapsed = bool(_num(r.get("collapsed_runs")))
        colour = _COLLAPSED if collapsed else ("tab:orange" if kind == "KD" else "tab:blue")
        label = "collapsed (≥ 1 seed)" if collapsed else kind
        ax.errorbar(
            [x],
            [y],
            yerr=yerr,
            fmt=marker,
            color=colour,
            mfc="none" if collapsed else colour,
            ms=7,
            capsize=3,
            lw=1,
            label=None if label in seen else label,
        )
        seen.add(label)
        ax.annotate(
            str(r.get("config")), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6
        )
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a log axis
    ax.set_xlabel("parameters")
    ax.set_ylabel("test macro-F1 (mean over seeds, 95% bootstrap CI)")
    ax.set_title("test macro-F1 per configuration")
    ax.grid(True, which="both", alpha=0.3)
    if seen:
        ax.legend(fontsize=7, loc="best")
    if left_out:
        ax.text(
            0.01,
            0.01,
            f"not shown (no params or test score): {', '.join(left_out)}",
            transform=ax.transAxes,
            fontsize=6,
            va="bottom",
            wrap=True,
        )


def _tick(v: float | None) -> str:
    return "config" if v is None else f"{v:g}"


def _heatmap_panel(ax: Any, student: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Mean validation macro-F1 of one student's KD runs over α (rows) × T (columns)."""
    alphas = sorted({_num(r.get("kd_alpha")) for r in rows}, key=lambda v: (v is None, v or 0))
    temps = sorted({_num(r.get("kd_temperature")) for r in rows}, key=lambda v: (v is None, v or 0))
    grid = np.full((len(alphas), len(temps)), np.nan)
    down = np.zeros_like(grid, dtype=bool)
    for r in rows:
        i = alphas.index(_num(r.get("kd_alpha")))
        j = temps.index(_num(r.get("kd_temperature")))
        v = _num(r.get("val_f1_mean"))
        grid[i, j] = np.nan if v is None else v
        down[i, j] = bool(_num(r.get("collapsed_runs")))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="val macro-F1 (mean over seeds)")
    ax.set_xticks(range(len(temps)), [_tick(t) for t in temps])
    ax.set_yticks(range(len(alphas)), [_tick(a) for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("alpha")
    ax.set_title(f"KD into {student} (student)")
    finite = grid[np.isfinite(grid)]
    middle = float(finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(alphas)):
        for j in range(len(temps)):
            if np.isnan(grid[i, j]):
                text, colour = "n/a", "black"
            else:
                text = f"{grid[i, j]:.3f}" + ("\n(collapsed)" if down[i, j] else "")
                colour = "black" if grid[i, j] > middle else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)


def _note_panel(ax: Any, note: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=9, wrap=True)


def summary_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """The summary figure of ``rows``: the macro-F1 scatter, then one KD heat map per student.

    Left: test macro-F1 (mean over seeds, the bootstrap 95% CI as error bars) per
    configuration against its parameter count (log axis); circles are baselines, squares
    tuned teachers, triangles distilled students; a configuration with a collapsed seed is a
    hollow red marker. Right: per distilled student (phase-2 ``kd_student``), its mean
    validation macro-F1 over the KD ``alpha`` × ``temperature`` the manifest set
    ("config": the KD config's own value); a note instead when there are no phase-2 rows.

    Args:
        rows: ``summary.csv``'s rows (values as numbers or as CSV strings).
        title: figure title.
    """
    kd: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("phase") == "phase2":
            kd.setdefault(str(r.get("kd_student") or r.get("model") or "student"), []).append(r)
    panels = 1 + max(len(kd), 1)
    fig = Figure(figsize=(7.0 + 5.0 * (panels - 1), 5.5), layout="constrained")
    FigureCanvasAgg(fig)  # off-screen, whatever pyplot backend is configured
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _scatter_panel(axes[0], rows)
    if not kd:
        _note_panel(axes[1], "no distilled (phase 2) configurations:\nno KD α × T grid to show")
    for ax, (student, group) in zip(axes[1:], kd.items(), strict=False):  # none: the note
        _heatmap_panel(ax, student, group)
    if title:
        fig.suptitle(title)
    return fig


def plot_summary(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    tensorboard: str | Path | None = None,
    title: str = "",
) -> Path:
    """Write :func:`summary_figure` of ``rows`` as a PNG at ``path`` (atomically).

    Args:
        rows: ``summary.csv``'s rows.
        path: the PNG to write (``summary.png`` beside ``summary.md``).
        tensorboard: a folder to log the figure to as ``sweep/summary`` through a
            TensorBoard ``SummaryWriter`` (``None``: not logged).
        title: figure title.

    Returns:
        ``path``.
    """
    path = Path(path)
    fig = summary_figure(rows, title)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter  # only when asked: a slow import

        with SummaryWriter(str(tensorboard)) as writer:
            writer.add_figure("sweep/summary", fig, close=False)
    log.info("summary picture: %s", path)
    return path

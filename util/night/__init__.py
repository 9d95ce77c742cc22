"""Whole-night analysis: window probabilities into events, a summary, a timeline; scoring.

- :mod:`util.night.events`: :class:`PostProcessing` (median, hysteresis, merging,
  minimum duration, one event at a time), :func:`detect_events`, the events CSV;
- :mod:`util.night.summary`: :func:`summarize` (minutes per class, snore episodes,
  longest snore-free stretch) and :func:`model_identity`;
- :mod:`util.night.plot`: :func:`plot_timeline`, the PNG of a night;
- :mod:`util.night.scoring`: :func:`evaluate_events`, event-based precision, recall, F1;
- :mod:`util.night.generate`: a synthetic night and its ground truth
  (``python -m util.night.generate --hours 8 --out night.wav``); not imported here, so
  that running it as a module finds it unloaded.

:class:`util.callbacks.NightWriter` applies these to every recording ``main.py predict``
reads.
"""

from util.night.events import (
    EVENT_COLUMNS,
    PER_CLASS_FIELDS,
    Event,
    PerClass,
    PostProcessing,
    detect_events,
    hysteresis_runs,
    median_filter,
    read_events_csv,
    resolve,
    window_bounds,
    write_events_csv,
)
from util.night.plot import CLASS_COLOURS, plot_timeline
from util.night.scoring import evaluate_events
from util.night.summary import format_clock, model_identity, summarize

__all__ = [
    "CLASS_COLOURS",
    "EVENT_COLUMNS",
    "PER_CLASS_FIELDS",
    "Event",
    "PerClass",
    "PostProcessing",
    "detect_events",
    "evaluate_events",
    "format_clock",
    "hysteresis_runs",
    "median_filter",
    "model_identity",
    "plot_timeline",
    "read_events_csv",
    "resolve",
    "summarize",
    "window_bounds",
    "write_events_csv",
]

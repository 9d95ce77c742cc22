"""Whole-night analysis: window probabilities into events, a summary, a timeline; scoring.

- :mod:`util.night.events`: :class:`PostProcessing` (median, hysteresis, merging,
  minimum duration, one event at a time), :func:`detect_events`, the events CSV;
- :mod:`util.night.summary`: :func:`summarize` (minutes per class, snore episodes,
  longest snore-free stretch; episodes per hour from an hour on), :func:`model_identity`,
  and the words: :func:`format_duration`, :func:`console_line`, :func:`snore_warning`;
- :mod:`util.night.plot`: :func:`plot_timeline`, the PNG of a recording, its time axis
  fitted to the length (:func:`time_axis`);
- :mod:`util.night.scoring`: :func:`evaluate_events`, event- and segment-based precision,
  recall, F1 and error rate (sed_eval, DCASE collars);
- :mod:`util.night.generate`: a synthetic night and its ground truth
  (``python -m util.night.generate --hours 8 --out night.wav``); not imported here, so
  that running it as a module finds it unloaded;
- :mod:`util.night.probabilities`: the ``probabilities.parquet`` every recording gets
  (:class:`~util.night.probabilities.WindowProbabilities`, ``write_probabilities``,
  ``read_probabilities``);
- :mod:`util.night.rederive`: the outputs derived from it (``write_outputs``), and
  ``python -m util.night.rederive``, which derives them again with other
  post-processing, without the model; not imported here, for the same reason;
- :mod:`util.night.thresholds`: per-class on/off thresholds chosen on validation clips
  (:func:`calibrate_thresholds`), stored in a checkpoint (:func:`store_calibration`,
  :func:`load_calibration`); its names are offered here but imported on first use (it
  loads torch, which ``rederive`` must not);
- :mod:`util.night.recalibrate`: median, thresholds, minimum duration and merge gap chosen
  on labelled recordings from their saved probabilities (``calibrate_on_recordings``);
- :mod:`util.night.calibrate`: ``python -m util.night.calibrate --ckpt_path X``, not
  imported here, for the same reason as ``generate``.

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
from util.night.plot import CLASS_COLOURS, format_clock, plot_timeline, time_axis
from util.night.scoring import evaluate_events
from util.night.summary import (
    console_line,
    format_duration,
    model_identity,
    snore_warning,
    summarize,
)

#: Names of :mod:`util.night.thresholds`, imported when first asked for (it loads torch).
_CALIBRATE = (
    "CHECKPOINT_KEY",
    "CalibratedThresholds",
    "CalibrationError",
    "best_threshold",
    "calibrate_thresholds",
    "load_calibration",
    "store_calibration",
)


def __getattr__(name: str) -> object:
    if name in _CALIBRATE:
        from util.night import thresholds

        return getattr(thresholds, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHECKPOINT_KEY",
    "CLASS_COLOURS",
    "EVENT_COLUMNS",
    "PER_CLASS_FIELDS",
    "CalibratedThresholds",
    "CalibrationError",
    "Event",
    "PerClass",
    "PostProcessing",
    "best_threshold",
    "calibrate_thresholds",
    "console_line",
    "detect_events",
    "evaluate_events",
    "format_clock",
    "format_duration",
    "hysteresis_runs",
    "load_calibration",
    "median_filter",
    "model_identity",
    "plot_timeline",
    "read_events_csv",
    "resolve",
    "snore_warning",
    "store_calibration",
    "summarize",
    "time_axis",
    "window_bounds",
    "write_events_csv",
]

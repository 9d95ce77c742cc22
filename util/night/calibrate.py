"""Post-processing thresholds chosen on labelled validation clips, stored in the checkpoint.

A model's probabilities have their own scale: one trained on real clips may call a snore
``snore`` at p ≈ 0.5, under the default ``on_threshold`` of 0.6, and a night then shows no
snoring at all. Calibration chooses, for each event class ``k`` (every class but
:attr:`PostProcessing.background`), the ``on_threshold`` that maximises the clip-level F1
of ``p_k >= t`` against ``label == k`` on the validation split, over the grid
:data:`GRID` (0.05 to 0.95 in steps of 0.01; where several thresholds tie, the middle
one). Clips are independent, so they say nothing about how long an event stays on:
``off_threshold`` follows a rule, ``max(on - 0.1, on / 2)`` (:func:`off_threshold_for`;
0.45/0.35 is the pair that found a real model's snoring in issue 15), never 0. A class
with no validation clips, or whose probabilities never rank its own clips, keeps the
thresholds it had (the record says why).

Where the result lives: ``main.py fit`` runs this at its end on the best checkpoint's
weights (:class:`util.callbacks.Calibration`) and writes
:meth:`CalibratedThresholds.record`, a plain JSON-ready dict, into the checkpoint file
under the top-level key :data:`CHECKPOINT_KEY`, so weights-only loading still reads it;
``main.py predict`` (:class:`util.callbacks.NightWriter`) uses it for every threshold the
user did not set. The record names the weights it belongs to (a sha256 of the
``state_dict``, :func:`weights_sha256`); a record whose weights differ from the file's is
refused.

For a checkpoint made without it (or to calibrate again)::

    python -m util.night.calibrate --ckpt_path log/demo/version_0/checkpoints/best.ckpt

builds the run's data module from its ``config.yaml`` (next to ``checkpoints/``, or
``--config``) as :mod:`util.deploy.data` does, reads only the validation split, and writes
the record into the file, atomically. Not imported by :mod:`util.night` (which offers its
names lazily), so that running it as a module finds it unloaded.

**On labelled recordings** (smoothing, minimum duration and merge gap too). Clips say
nothing about how long events last; labelled validation recordings do. Predict them with
the checkpoint, then calibrate from the saved probabilities (no model runs)::

    python main.py predict --config <run>/config.yaml --ckpt_path best.ckpt \\
        --data.predict_audio val_nights/ --night.output_dir val_pred/
    python -m util.night.calibrate --ckpt_path best.ckpt --recordings val_pred/

``--recordings`` takes ``probabilities.parquet`` files or folders searched for them. Each
recording's truth is an events CSV (``start_s,end_s,label``, as ``events.csv`` and
:mod:`util.night.generate` write it): without ``--truth``, the ``.csv`` beside the recording's
audio with its stem (``val_nights/a.wav`` -> ``val_nights/a.csv``, the path as ``predict``
was given it); with ``--truth`` (CSV files or folders of them), the one named by the audio's
stem (``a.csv``), each used once. A recording without truth, a truth without recording,
classes other than the checkpoint's, or truth labels that are not classes (counted and
listed; ``--ignore_labels non_wearer`` leaves such labels out, counted in the record) are
one-line errors. :func:`util.night.recalibrate.calibrate_on_recordings` states the rule
(median 1/3/5, then per class on threshold, merge gap and minimum duration for the best
event F1 of sed_eval, counts pooled over the recordings, the onset collar at least one hop:
``--collar_s``); the search starts from the checkpoint's calibration when it holds one
(``--start_from defaults``: the defaults). The record (layout version 2) holds all five fields; ``predict`` uses each the user did not
set, and its summary says ``calibrated on 3 validation recordings (2.1 h, snore event F1
0.71, 0.00 before; ...)``.

The searches, the record and its storage are :mod:`util.night.thresholds` and
:mod:`util.night.recalibrate`; this module is the command.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from util.checkpoint import read_checkpoint
from util.errors import add_debug_option, condense, debug_requested, report_error
from util.night.events import Event, read_events_csv
from util.night.probabilities import WindowProbabilities, find_probabilities, read_probabilities
from util.night.thresholds import (
    CHECKPOINT_KEY,
    PROG,
    CalibratedThresholds,
    CalibrationError,
    calibrate_thresholds,
    checkpoint_facts,
    clip_probabilities,
    describe,
    load_calibration,
    store_calibration,
)

__all__ = ["PROG", "build_parser", "main"]


def build_parser() -> Any:
    """The parser: every option typed and documented (``--help`` shows the defaults)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog=PROG,
        description="Choose per-class on/off thresholds on the validation split of the run "
        "that trained a checkpoint (or, with --recordings, the median, thresholds, minimum "
        "duration and merge gap on labelled recordings predicted with it), and store them in "
        f"the checkpoint (key {CHECKPOINT_KEY}); main.py predict then uses them for every "
        "post-processing option not given.",
        exit_on_error=False,
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="the .ckpt to calibrate")
    parser.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="the run's config.yaml, for its data section (null: next to the checkpoint or "
        "in its run folder)",
    )
    parser.add_argument(
        "--batch_size", type=int | None, default=None, help="clips per batch (null: the config's)"
    )
    parser.add_argument(
        "--progress", type=bool, default=True, help="progress bars (cache build, inference)"
    )
    parser.add_argument(
        "--recordings",
        type=str,
        nargs="+",
        default=None,
        help="calibrate on labelled recordings instead of clips: probabilities.parquet files "
        "that main.py predict wrote with this checkpoint, or folders searched for them",
    )
    parser.add_argument(
        "--truth",
        type=str,
        nargs="+",
        default=None,
        help="the recordings' true events (events CSVs, or folders of them), each named by its "
        "recording's audio stem (null: the .csv beside each recording's audio)",
    )
    parser.add_argument(
        "--ignore_labels",
        type=str,
        nargs="+",
        default=None,
        help="with --recordings: true-event labels to leave out (e.g. non_wearer, which "
        "python -m util.night.generate writes for a 3-class model); counted in the record",
    )
    parser.add_argument(
        "--collar_s",
        type=float | None,
        default=None,
        help="with --recordings: the event-based onset collar in seconds (null: DCASE's 0.2, "
        "or the recordings' hop when longer: windows every 0.5 s cannot place an onset closer)",
    )
    parser.add_argument(
        "--start_from",
        type=Literal["checkpoint", "defaults"],
        default="checkpoint",
        help="with --recordings: start the search from the checkpoint's calibration (when it "
        "holds one) or from PostProcessing's defaults",
    )
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate one checkpoint; the exit status (1: it failed, 2: a bad command line)."""
    from jsonargparse import ArgumentError

    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except ArgumentError as err:
        print(f"error: {condense(str(err))} (options: {PROG} --help)", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print(f"error: --batch_size must be at least 1 (options: {PROG} --help)", file=sys.stderr)
        return 2
    if args.collar_s is not None and not args.collar_s > 0:
        print(f"error: --collar_s must be positive (options: {PROG} --help)", file=sys.stderr)
        return 2
    if args.truth is not None and args.recordings is None:
        print(
            f"error: --truth needs --recordings (the predicted recordings it labels) "
            f"(options: {PROG} --help)",
            file=sys.stderr,
        )
        return 2
    recordings_only = {
        "--ignore_labels": args.ignore_labels is not None,
        "--collar_s": args.collar_s is not None,
        "--start_from": args.start_from != "checkpoint",
    }
    if args.recordings is None and any(recordings_only.values()):
        given = ", ".join(name for name, set_ in recordings_only.items() if set_)
        print(
            f"error: {given} only apply with --recordings (calibration on clips has no events) "
            f"(options: {PROG} --help)",
            file=sys.stderr,
        )
        return 2
    if args.recordings is not None and (args.config is not None or args.batch_size is not None):
        print(
            "error: --config and --batch_size are for calibration on clips; --recordings reads "
            f"saved probabilities and runs no model (options: {PROG} --help)",
            file=sys.stderr,
        )
        return 2
    debug = args.debug or debug_requested()
    try:
        if args.recordings is not None:
            calibration, path, names = _calibrate_recordings(args)
        else:
            calibration, path = _calibrate_file(args)
            names = list(calibration.provenance.get("class_counts") or {})
    except Exception as err:  # one line each: checkpoint, config, data, truth, calibration
        report_error(err, debug)
        return 1
    if args.recordings is not None:
        print(_recordings_line(calibration, path))
    else:
        print(f"{path}: {calibration.source()}; stored under {CHECKPOINT_KEY}")
    print(describe(calibration, names))
    return 0


def _recordings_line(calibration: CalibratedThresholds, path: Path) -> str:
    """``<ckpt>: calibrated on ...; event F1 before -> after: snore 0.00 -> 0.95, ...``."""
    p = calibration.provenance
    per_class = p.get("per_class") or {}
    scores = ", ".join(f"{c} {s['f1_before']:.2f} -> {s['f1']:.2f}" for c, s in per_class.items())
    macro = p.get("macro_f1_before"), p.get("macro_f1")
    if macro[0] is not None and macro[1] is not None:
        scores += f"{', ' if scores else ''}macro {macro[0]:.2f} -> {macro[1]:.2f}"
    return (
        f"{path}: {calibration.source()}; event F1 before -> after: {scores or 'none'}; "
        f"searched in {p.get('seconds', 0.0):.1f} s; stored under {CHECKPOINT_KEY}"
    )


def _calibrate_recordings(args: Any) -> tuple[CalibratedThresholds, Path, list[str]]:
    from util.night.recalibrate import calibrate_on_recordings, check_truth

    path = Path(args.ckpt_path)
    checkpoint = read_checkpoint(path, what="--ckpt_path")
    names = (checkpoint.get("hyper_parameters") or {}).get("class_names")
    if not names:
        raise CalibrationError(f"--ckpt_path {path}: it names no class_names; use one from fit")
    names = [str(c) for c in names]
    files: list[Path] = []
    for given in args.recordings:
        try:
            found = find_probabilities(given)
        except FileNotFoundError as err:
            raise CalibrationError(f"--recordings: {err}") from err
        files += [f for f in found if f.resolve() not in {g.resolve() for g in files}]
    nights = [read_probabilities(f) for f in files]
    for file, night in zip(files, nights, strict=True):
        if list(night.class_names) != names:
            raise CalibrationError(
                f"{file}: its classes {list(night.class_names)} are not the checkpoint's "
                f"{names}: predict the recordings with --ckpt_path {path}"
            )
    ignore = set(args.ignore_labels or ())
    if ignore & set(names):
        raise CalibrationError(
            f"--ignore_labels {sorted(ignore & set(names))}: classes of the model, not extra labels"
        )
    truths, ignored = [], Counter()
    for night, csv in zip(nights, pair_truth(files, nights, args.truth), strict=True):
        events = read_truth(csv)
        ignored.update(e.label for e in events if e.label in ignore)
        truths.append([e for e in events if e.label not in ignore])
        try:
            check_truth(night, truths[-1], names, str(csv))
        except CalibrationError as err:
            hint = " (or pass --ignore_labels)" if "not classes of the model" in str(err) else ""
            raise CalibrationError(f"{err}{hint}") from err
    start = None
    if args.start_from == "checkpoint":
        start = load_calibration(checkpoint, what=f"--ckpt_path {path}")
    calibration = calibrate_on_recordings(
        nights, truths, names, start=start, collar_s=args.collar_s
    )
    provenance = {**calibration.provenance, "ignored_truth_labels": dict(sorted(ignored.items()))}
    calibration = replace(calibration, provenance=provenance)
    calibration = calibration.with_checkpoint(checkpoint_facts(checkpoint, path))
    store_calibration(path, calibration)
    return calibration, path, names


def pair_truth(
    files: Sequence[Path], nights: Sequence[WindowProbabilities], truth: Sequence[str] | None
) -> list[Path]:
    """The truth CSV of each recording (the pairing rule of the module's docstring).

    Raises:
        CalibrationError: a recording without truth, two truth files of one stem, or a
            truth file no recording uses.
    """
    if truth is None:
        paired = []
        for file, night in zip(files, nights, strict=True):
            csv = Path(night.recording).with_suffix(".csv")
            if not csv.is_file():
                raise CalibrationError(
                    f"{file}: no truth for recording {night.recording}: expected {csv} (the "
                    "events CSV beside the audio, with its stem), or pass --truth"
                )
            paired.append(csv)
        return paired
    by_stem: dict[str, Path] = {}
    for given in truth:
        root = Path(given)
        found = sorted(root.rglob("*.csv")) if root.is_dir() else [root]
        if not found or not found[0].is_file():
            raise CalibrationError(f"--truth {given}: no such file, or no .csv in the folder")
        for csv in found:
            if csv.stem in by_stem and by_stem[csv.stem].resolve() != csv.resolve():
                raise CalibrationError(
                    f"--truth: {by_stem[csv.stem]} and {csv} have one stem: which recording "
                    "is whose? pass the files one by one"
                )
            by_stem[csv.stem] = csv
    paired, used = [], set()
    for file, night in zip(files, nights, strict=True):
        stem = Path(night.recording).stem
        if stem not in by_stem:
            raise CalibrationError(
                f"{file}: no truth for recording {night.recording} among --truth "
                f"(expected a file named {stem}.csv)"
            )
        if stem in used:
            raise CalibrationError(
                f"--truth: recordings of one stem {stem!r} share {by_stem[stem]}: leave out "
                "--truth to use the CSV beside each recording's audio"
            )
        used.add(stem)
        paired.append(by_stem[stem])
    unused = sorted(str(by_stem[s]) for s in set(by_stem) - used)
    if unused:
        raise CalibrationError(
            f"--truth: {len(unused)} file(s) label no recording of --recordings: "
            f"{', '.join(unused)}"
        )
    return paired


def read_truth(path: Path) -> list[Event]:
    """A truth CSV's events, or a one-line :class:`CalibrationError` naming the file."""
    try:
        return read_events_csv(path)
    except (OSError, KeyError, ValueError) as err:
        why = f"no {err} column" if isinstance(err, KeyError) else str(err)
        raise CalibrationError(f"{path}: not an events CSV (start_s,end_s,label): {why}") from err


def _calibrate_file(args: Any) -> tuple[CalibratedThresholds, Path]:
    from models.compatibility import IncompatibleError
    from util.deploy.data import run_datamodule
    from util.deploy.errors import ExportError
    from util.deploy.export import load_classifier

    path = Path(args.ckpt_path)
    checkpoint = read_checkpoint(path, what="--ckpt_path")
    try:
        dm, _ = run_datamodule(
            path, checkpoint.get("hyper_parameters") or {}, args.config, args.progress, "--config"
        )
    except (ExportError, IncompatibleError) as err:
        raise CalibrationError(str(err)) from err
    model = load_classifier(path)
    if args.batch_size is not None:
        dm.batch_size = args.batch_size
    dm.caches.build(["validation"])  # only the split calibration reads
    dm.setup("validate")
    try:
        probs, labels = clip_probabilities(model, dm.val_dataloader(), progress=args.progress)
    finally:
        dm.teardown("validate")
    data = {"cache_key": dm.cache_key("validation")}
    calibration = calibrate_thresholds(probs, labels, model.class_names, data=data)
    calibration = calibration.with_checkpoint(checkpoint_facts(checkpoint, path))
    store_calibration(path, calibration)
    return calibration, path


if __name__ == "__main__":
    sys.exit(main())

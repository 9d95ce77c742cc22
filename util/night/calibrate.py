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

The search, the record and its storage are :mod:`util.night.thresholds`; this module is
the command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from util.checkpoint import read_checkpoint
from util.errors import add_debug_option, condense, debug_requested, report_error
from util.night.thresholds import (
    CHECKPOINT_KEY,
    PROG,
    CalibratedThresholds,
    CalibrationError,
    calibrate_thresholds,
    checkpoint_facts,
    clip_probabilities,
    describe,
    store_calibration,
)

__all__ = ["PROG", "build_parser", "main"]


def build_parser() -> Any:
    """The parser: every option typed and documented (``--help`` shows the defaults)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog=PROG,
        description="Choose per-class on/off thresholds on the validation split of the run "
        f"that trained a checkpoint, and store them in the checkpoint (key {CHECKPOINT_KEY}); "
        "main.py predict then uses them for every threshold not given.",
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
    debug = args.debug or debug_requested()
    try:
        calibration, path = _calibrate_file(args)
    except Exception as err:  # one line each: checkpoint, config, data, calibration
        report_error(err, debug)
        return 1
    names = list(calibration.provenance.get("class_counts") or {})
    print(f"{path}: {calibration.source()}; stored under {CHECKPOINT_KEY}")
    print(describe(calibration, names))
    return 0


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

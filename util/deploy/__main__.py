"""``python -m util.deploy --ckpt_path <run>/checkpoints/best-….ckpt [--int8 true] [--audio_in true]``.

The options are :func:`util.deploy.export.export_checkpoint`'s arguments, read from its
signature and docstring by jsonargparse, so each is documented once and ``--help`` shows
its type and default. As with ``main.py``: booleans take a value (``--int8 true``),
``--config export.yaml`` reads options from a file (``--print_config`` writes one), a bad
option is one ``error:`` line. An export that fails prints one ``export failed:`` line and
exits 1; ``--debug`` (or ``EARSLEEP_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile

from util.cli import EarSleepParser
from util.deploy.errors import ExportError
from util.deploy.export import REPORT_NAME, export_checkpoint, format_report
from util.errors import DEBUG_ENV, debug_requested, report_error

__all__ = ["build_parser", "main"]

PROG = "python -m util.deploy"


def build_parser() -> EarSleepParser:
    """The ``python -m util.deploy`` argument parser."""
    parser = EarSleepParser(
        prog=PROG,
        description=(
            "Export a trained earsleep checkpoint (plain or KD student) to ONNX with dynamic "
            "batch and time axes, check it against PyTorch on validation clips, optionally "
            "quantise it to static INT8, and score every file on the test split. Writes "
            f"<backbone>.onnx, <backbone>.int8.onnx and {REPORT_NAME} into --out; "
            "--audio_in true also writes <backbone>.audio.onnx (two-channel audio in, "
            "class probabilities out: the whole pipeline for onnxruntime alone). "
            f"--debug (or {DEBUG_ENV}=1) prints the traceback of a failure."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(export_checkpoint, as_positional=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (1 on any export failure, 2 on a bad option)."""
    given = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in given or debug_requested()
    run_config = _run_config_as_options(given)
    if run_config:
        print(
            f"error: --config {run_config} is a run config (it has a data section); "
            f"pass it as --run_config (--config reads this command's options) "
            f"(options: {PROG} --help)",
            file=sys.stderr,
        )
        return 2
    try:
        options = build_parser().parse_args([a for a in given if a != "--debug"]).as_dict()
    except SystemExit as done:  # --help, or a bad option (one line already printed)
        return done.code if isinstance(done.code, int) else 0
    options.pop("config", None)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # our steps; the exporter's and quantiser's chatter stays quiet
    logging.getLogger("util.deploy").setLevel(logging.INFO)
    try:
        report = export_checkpoint(**options)
    except ExportError as err:
        if debug:
            traceback.print_exc()
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # anything else: one line too, the traceback behind --debug
        report_error(err, debug, prefix="export failed")
        return 1
    print(format_report(report))
    return 0


def _run_config_as_options(args: list[str]) -> str | None:
    """The path of a ``--config`` file that is a run's config.yaml (what util.export's was)."""
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--config" and i + 1 < len(args) else None
        value = arg.removeprefix("--config=") if arg.startswith("--config=") else value
        if value and Path(value).is_file():
            try:
                content = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError:
                continue  # the parser says what is wrong with it
            if isinstance(content, dict) and "data" in content:
                return value
    return None


if __name__ == "__main__":
    sys.exit(main())

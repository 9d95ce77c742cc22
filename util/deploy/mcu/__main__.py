"""``python -m util.deploy.mcu --ckpt_path <run>/checkpoints/best-….ckpt --out DIR``.

The options are :func:`util.deploy.mcu.bundle.write_bundle`'s arguments, read from its
signature and docstring by jsonargparse, so ``--help`` documents each with its type and
default. A bad option is one ``error:`` line; a failure is one ``mcu export failed:`` line
and exit status 1 (``--debug`` or ``EARSLEEP_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile

from util.cli import EarSleepParser
from util.deploy.errors import ExportError
from util.deploy.mcu.bundle import MANIFEST_NAME, write_bundle
from util.deploy.mcu.report import format_manifest
from util.errors import DEBUG_ENV, debug_requested, report_error

__all__ = ["build_parser", "main"]

PROG = "python -m util.deploy.mcu"


def build_parser() -> EarSleepParser:
    """The ``python -m util.deploy.mcu`` argument parser."""
    parser = EarSleepParser(
        prog=PROG,
        description=(
            "Write a microcontroller bundle of a trained earsleep checkpoint: an int8 "
            ".tflite (litert-torch + ai-edge-quantizer), its C array, the front end's "
            f"constants as a C header and {MANIFEST_NAME}, measured by TensorFlow Lite "
            "Micro (arena, int8 agreement with fp32 on the validation split) and vela "
            "(Ethos-U SRAM, flash, cycles), with the CMSIS-DSP front end checked against "
            f"LogMelFrontEnd. --debug (or {DEBUG_ENV}=1) prints the traceback of a failure."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(write_bundle, as_positional=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (1 on a failure, 2 on a bad option)."""
    given = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in given or debug_requested()
    try:
        options = build_parser().parse_args([a for a in given if a != "--debug"]).as_dict()
    except SystemExit as done:  # --help, or a bad option (one line already printed)
        return done.code if isinstance(done.code, int) else 0
    options.pop("config", None)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("util.deploy").setLevel(logging.INFO)
    try:
        manifest = write_bundle(**options)
    except ExportError as err:
        report_error(err, debug, prefix="mcu export failed")
        return 1
    except Exception as err:  # anything else: one line too, the traceback behind --debug
        report_error(err, debug, prefix="mcu export failed")
        return 1
    print(format_manifest(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

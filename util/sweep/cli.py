"""``python -m util.sweep``: the sweep's command line (jsonargparse, like ``main.py``).

``--help`` lists every option with its default. Booleans are ``--dry_run true|false``;
``--debug`` (or ``EARSLEEP_DEBUG=1``) adds the traceback to an ``error:`` line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat
from tqdm import tqdm

from util.errors import add_debug_option, condense, debug_requested, report_error
from util.sweep.manifest import ROOT, ManifestError, load_manifest
from util.sweep.sweep import Sweep
from util.sweep.tune import RaySettings

__all__ = ["PROG", "build_parser", "main"]

PROG = "python -m util.sweep"


def build_parser() -> ArgumentParser:
    """The parser: every option typed and documented (``--help`` shows the defaults)."""
    parser = ArgumentParser(
        prog=PROG,
        description="Baselines, a teacher gate, then a distillation grid, over seeds "
        "(see the docstring of util/sweep/__init__.py).",
        exit_on_error=False,
    )
    parser.add_argument(
        "--manifest", type=str, required=True, help="sweep manifest YAML (config/sweep/*.yaml)"
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="output folder (null: log/sweeps/<manifest name>)",
    )
    parser.add_argument(
        "--dry_run", type=bool, default=False, help="print the plan and run counts, run nothing"
    )
    parser.add_argument(
        "--resume",
        type=bool,
        default=False,
        help="continue the sweep in --out: skip runs already finished with the same config",
    )
    parser.add_argument(
        "--distil_anyway",
        type=bool,
        default=False,
        help="run phase 2 even when no teacher meets the gate's margin after tuning "
        "(as the manifest's gate.on_fail: distil does); the summary says it was forced",
    )
    parser.add_argument(
        "--ray_address",
        type=str | None,
        default=None,
        help="Ray cluster to run on (auto, ray://host:10001; its nodes must see this checkout "
        "and --out at the same paths); null starts a local Ray runtime for the sweep",
    )
    parser.add_argument(
        "--cpus_per_trial",
        type=PositiveFloat | None,
        default=None,
        help="CPUs reserved per run, which is also its thread count (null: every core of the "
        "local runtime, one run at a time; 1 on a cluster); e.g. 1 on 2 cores trains 2 at once",
    )
    parser.add_argument(
        "--gpus_per_trial",
        type=NonNegativeFloat,
        default=0.0,
        help="GPUs per run; a fraction (0.25) lets several tiny runs share one GPU",
    )
    parser.add_argument(
        "--max_concurrent_trials",
        type=NonNegativeInt,
        default=0,
        help="most runs at once (0: as many as the CPUs and GPUs allow)",
    )
    parser.add_argument(
        "--run_in",
        type=Literal["worker", "subprocess"],
        default="worker",
        help="where each run's fit + test executes: worker (inside its Ray worker, which takes "
        "the next run too, so imports are paid once per worker) or subprocess (a fresh Python "
        "per run: for runs that start processes of their own, e.g. DDP over several devices)",
    )
    parser.add_argument(
        "--retries",
        type=NonNegativeInt,
        default=0,
        help="times Ray Tune tries a failed run again before it counts as failed",
    )
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Plan or run a sweep; returns the exit status.

    0 when every run succeeded (or a dry run), 1 when a run failed or the sweep could
    not run, 2 for a bad command line or manifest; 130 when interrupted.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except ArgumentError as err:
        print(f"error: {condense(str(err))} (options: {PROG} --help)", file=sys.stderr)
        return 2
    debug = args.debug or debug_requested()
    try:
        manifest = load_manifest(args.manifest)
    except (ManifestError, OSError, yaml.YAMLError) as err:
        report_error(err, debug)
        return 2
    out = Path(args.out) if args.out else ROOT / "log" / "sweeps" / manifest.name
    echo = print if args.dry_run else tqdm.write
    sweep = Sweep(
        manifest,
        out,
        resume=args.resume,
        ray=RaySettings(
            address=args.ray_address,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            max_concurrent_trials=args.max_concurrent_trials,
            retries=args.retries,
        ),
        run_in=args.run_in,
        echo=echo,
        distil_anyway=args.distil_anyway,
    )
    if args.dry_run:
        print(sweep.plan_text())
        return 0
    try:
        rows = sweep.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume true (finished runs in {out} are kept)")
        return 130
    except Exception as err:  # one line; the traceback behind --debug
        report_error(err, debug)
        return 1
    failed = sum(1 for r in sweep.results if r.status == "failed")
    print(f"\nwrote {out}/summary.md, summary.csv, runs.csv; {failed} failed run(s)")
    return 1 if failed or not rows else 0

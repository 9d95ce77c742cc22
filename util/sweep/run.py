"""One sweep run: its command line, its execution in a fresh process, and what it left behind.

Each run is ``main.py fit`` followed by ``test`` on the best checkpoint, in its own
subprocess (:func:`fit_and_test`): a crash is one failed run, not a failed sweep. A run
lives in ``<out>/runs/<name>/seed<s>/`` (TensorBoard events, checkpoints, the artifacts
of :class:`~util.callbacks.RunArtifacts`, ``run.log`` and ``sweep_run.json``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.task import MONITOR
from util.redact import mask_text
from util.sweep.manifest import ROOT, Spec, cli_value

__all__ = [
    "BEST_SCORE",
    "RUN_RECORD",
    "TEST_SCORE",
    "Run",
    "RunResult",
    "Runner",
    "fit_and_test",
    "read_predictions",
    "read_result",
    "subprocess_runner",
]

#: The sweep's record of a run, beside the run's own artifacts.
RUN_RECORD = "sweep_run.json"
#: ``metrics.json`` key of the best :data:`~models.task.MONITOR` score (``best_val_f1_macro``).
BEST_SCORE = "best_" + MONITOR.replace("/", "_")
#: ``metrics.json["test"]`` key of the same score on the test split (``test/f1_macro``).
TEST_SCORE = "test/" + MONITOR.split("/", 1)[-1]
#: Runner: ``(run, argv, run_dir, log_path) -> return code``.
Runner = Callable[["Run", list[str], Path, Path], int]


def _config_texts(configs: Sequence[str], root: Path) -> list[tuple[str, str]]:
    """Text of each config and of the YAML files it names (``data: data/x.yaml``), recursively."""
    seen: dict[str, str] = {}

    def visit(path: Path) -> None:
        key = str(path)
        if key in seen or not path.is_file():
            return
        text = path.read_text()
        seen[key] = text
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError:
            return
        stack = [tree]
        while stack:
            node = stack.pop()
            if isinstance(node, Mapping):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, str) and node.endswith((".yaml", ".yml")):
                visit(path.parent / node)

    for config in configs:
        visit(root / config)
    return sorted(seen.items())


@dataclasses.dataclass
class Run:
    """One training run: a spec at one seed."""

    phase: str
    spec: Spec
    seed: int
    configs: tuple[str, ...]
    args: tuple[tuple[str, Any], ...]
    status: str = "planned"
    note: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def run_dir(self, out: Path) -> Path:
        """Where the run's TensorBoard version folder and artifacts are."""
        return out / "runs" / self.name / f"seed{self.seed}"

    def argv(self, out: Path) -> list[str]:
        """``main.py`` arguments: configs, settings, then the sweep's own placement."""
        argv = ["fit"]
        for config in self.configs:
            argv += ["--config", config]
        for key, value in self.args:
            argv += [f"--{key}", cli_value(value)]
        argv += [
            "--seed_everything", str(self.seed),
            "--trainer.logger.init_args.save_dir", str(out / "runs"),
            "--trainer.logger.init_args.name", self.name,
            "--trainer.logger.init_args.version", f"seed{self.seed}",
            "--artifacts.leaderboard", str(out / "leaderboard.csv"),
        ]  # fmt: skip
        return argv

    def config_hash(self, root: Path) -> str:
        """Hash of what decides the result: settings, seed and the configs' text."""
        payload = {
            "configs": _config_texts(self.configs, root),
            "args": [[k, v] for k, v in self.args],
            "seed": self.seed,
        }
        return hashlib.sha256(
            json.dumps(payload, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]


@dataclasses.dataclass
class RunResult:
    """What a finished run left behind, read from its artifacts."""

    phase: str
    name: str
    seed: int
    status: str
    run_dir: str
    val_f1: float | None = None
    test_f1: float | None = None
    test_acc: float | None = None
    test_bal_acc: float | None = None
    best_ckpt: str | None = None
    model: str | None = None
    params: int | None = None
    latency_ms: float | None = None
    gap_closed: float | None = None
    compression_ratio: float | None = None
    seconds: float | None = None
    note: str = ""


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content; ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_result(run: Run, out: Path) -> RunResult:
    """Read a run's ``metrics.json`` and ``sweep_run.json`` (status ``missing`` when absent)."""
    run_dir = run.run_dir(out)
    record = read_json(run_dir / RUN_RECORD) or {}
    metrics = read_json(run_dir / "metrics.json") or {}
    test = metrics.get("test") or {}
    complexity = metrics.get("complexity") or {}
    extras = metrics.get("extras") or {}
    status = record.get("status", "missing")
    if status == "ok" and test.get(TEST_SCORE) is None:
        status = "failed"
    return RunResult(
        phase=run.phase,
        name=run.name,
        seed=run.seed,
        status=status,
        run_dir=str(run_dir),
        val_f1=metrics.get(BEST_SCORE),
        test_f1=test.get(TEST_SCORE),
        test_acc=test.get("test/acc"),
        test_bal_acc=test.get("test/bal_acc"),
        best_ckpt=metrics.get("best_model_path"),
        model=metrics.get("model"),
        params=complexity.get("params"),
        latency_ms=complexity.get("latency_median_ms"),
        gap_closed=extras.get("gap_closed"),
        compression_ratio=extras.get("compression_ratio"),
        seconds=record.get("seconds"),
        note=record.get("note", ""),
    )


def read_predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(targets, predictions, number of classes)`` from a run's ``test_predictions.csv``.

    ``None`` when the file is missing or malformed.
    """
    path = run_dir / "test_predictions.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = [(int(r[1]), int(r[2])) for r in reader]
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    k = sum(1 for h in header if h.startswith("prob_"))
    data = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return data[:, 0], data[:, 1], k


def fit_and_test(argv: Sequence[str]) -> int:
    """``main.py fit <argv>`` then ``test`` on the best checkpoint, in this process.

    The sweep runs this in a subprocess per run, so fit and test share one trainer,
    one run folder and one leaderboard row.

    Args:
        argv: ``main.py`` arguments starting with ``fit``.
    """
    from util.cli import main as cli_main  # Lightning and the models: only in the run's process
    from util.errors import debug_requested, report_error

    if list(argv) == sys.argv[1:]:  # Lightning's warning would print both copies into run.log
        del sys.argv[1:]
    try:
        cli = cli_main(list(argv))
        trainer = cli.trainer
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None else ""
        if not best:
            print(
                "util.sweep: no best checkpoint was written; testing the final weights", flush=True
            )
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best" if best else None)
    except Exception as err:  # one masked line in run.log (the traceback with EARSLEEP_DEBUG=1)
        report_error(err, debug_requested())
        return 1
    return 0


_FIT_AND_TEST = (
    "import sys; from util.sweep.run import fit_and_test; sys.exit(fit_and_test(sys.argv[1:]))"
)


def subprocess_runner(threads: int | None = None) -> Runner:
    """The default runner: :func:`fit_and_test` in a fresh Python, output to the run's log.

    Args:
        threads: ``OMP_NUM_THREADS`` for each run (``None`` leaves the environment as is).
    """

    def run(run: Run, argv: list[str], run_dir: Path, log_path: Path) -> int:
        env = dict(os.environ)
        if threads is not None and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log_path, "w") as log:
            log.write("$ python main.py " + mask_text(" ".join(argv)) + "\n")
            log.flush()
            return subprocess.run(
                [sys.executable, "-c", _FIT_AND_TEST, *argv],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            ).returncode

    return run


def last_line(path: Path) -> str:
    """The last non-empty line of a log (at most 300 characters), for a failed run's note."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""

"""One sweep run: its command line, its execution in a fresh process, and what it left behind.

Each run is ``main.py fit`` followed by ``test`` on the best checkpoint, in its own
subprocess (:func:`fit_and_test`), started by the Ray Tune trial that
:mod:`util.sweep.tune` placed: a crash is one failed run, not a failed sweep. A run
lives in ``<out>/runs/<name>/seed<s>/`` (TensorBoard events, checkpoints, the artifacts
of :class:`~util.callbacks.RunArtifacts` and :class:`~util.callbacks.Provenance`,
``run.log`` and ``sweep_run.json``).

What a run left behind is read back by :func:`read_result`: its scores, whether it
collapsed (``metrics.json``'s ``collapse``), and where it came from: the hash of its
``data_fingerprint.json`` and the code version of its ``git.json``. A resumed sweep
compares those with :func:`data_fingerprint_now` and
:func:`~util.callbacks.provenance.git_info` to decide whether the run still holds.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.task import MONITOR
from util.callbacks.provenance import data_fingerprint_hash
from util.redact import mask_text
from util.sweep.manifest import ROOT, Spec, cli_value
from util.sweep.tune import thread_env

__all__ = [
    "BEST_SCORE",
    "RUN_RECORD",
    "TEST_SCORE",
    "Run",
    "RunResult",
    "Runner",
    "data_fingerprint_now",
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
            "--leaderboard.path", str(out / "leaderboard.csv"),
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
    collapsed: bool | None = None
    never_predicted: str = ""
    best_ckpt: str | None = None
    model: str | None = None
    params: int | None = None
    latency_ms: float | None = None
    gap_closed: float | None = None
    gap_closed_reason: str | None = None
    compression_ratio: float | None = None
    data_fingerprint: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    seconds: float | None = None
    note: str = ""

    @property
    def eligible(self) -> bool:
        """Whether the run may be chosen (best, teacher, baseline): finished and not collapsed."""
        return self.status == "ok" and not self.collapsed


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content; ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _collapse(metrics: Mapping[str, Any]) -> tuple[bool | None, str]:
    """``(collapsed, never-predicted classes)`` of ``metrics.json``'s ``collapse`` section.

    Collapsed when the test or the validation split says so (:mod:`models.metrics`:
    it predicts at most one class, or its macro-F1 is no better than always answering
    the majority class); ``None`` when neither was measured. The classes never
    predicted are the test split's, else the validation split's.
    """
    collapse = metrics.get("collapse") or {}
    stages = [collapse[s] for s in ("test", "val") if isinstance(collapse.get(s), Mapping)]
    if not stages:
        return None, ""
    flagged = any(bool(s.get("collapsed")) for s in stages)
    return flagged, ",".join(str(c) for c in stages[0].get("never_predicted") or [])


def read_result(run: Run, out: Path) -> RunResult:
    """Read a run's ``metrics.json``, provenance files and ``sweep_run.json``.

    The status is ``missing`` without a record, ``failed`` when the run ended without
    test metrics.
    """
    run_dir = run.run_dir(out)
    record = read_json(run_dir / RUN_RECORD) or {}
    metrics = read_json(run_dir / "metrics.json") or {}
    test = metrics.get("test") or {}
    complexity = metrics.get("complexity") or {}
    extras = metrics.get("extras") or {}
    git = read_json(run_dir / "git.json") or {}
    status = record.get("status", "missing")
    if status == "ok" and test.get(TEST_SCORE) is None:
        status = "failed"
    collapsed, never = _collapse(metrics)
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
        collapsed=collapsed,
        never_predicted=never,
        best_ckpt=metrics.get("best_model_path"),
        model=metrics.get("model"),
        params=complexity.get("params"),
        latency_ms=complexity.get("latency_median_ms"),
        gap_closed=extras.get("gap_closed"),
        gap_closed_reason=extras.get("gap_closed_reason"),
        compression_ratio=extras.get("compression_ratio"),
        data_fingerprint=data_fingerprint_hash(read_json(run_dir / "data_fingerprint.json")),
        git_commit=git.get("commit"),
        git_dirty=git.get("dirty"),
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
            reader = csv.DictReader(f)  # by name: columns were added before (clip_id)
            header = reader.fieldnames or []
            rows = [(int(r["target"]), int(r["pred"])) for r in reader]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    k = sum(1 for h in header if h.startswith("prob_"))
    data = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return data[:, 0], data[:, 1], k


def data_fingerprint_now(argv: Sequence[str]) -> str | None:
    """The data fingerprint a run of ``argv`` would record now, hashed; nothing is built.

    ``main.py`` resolves the run's configuration (``--print_config``, so exactly as the
    run would, defaults included), the data module is made from its ``data`` section and
    its ``fingerprint()`` is hashed as :class:`~util.callbacks.Provenance` hashes the
    run's ``data_fingerprint.json``. A cache that is gone, rebuilt or keyed otherwise (a
    changed archive gives another source fingerprint, hence another cache key) gives
    another hash than the finished run recorded.

    Args:
        argv: ``main.py`` arguments starting with ``fit`` (:meth:`Run.argv`).

    Returns:
        The hash; ``None`` when the data module has no ``fingerprint()``.
    """
    # Lightning, the models and the data sources: only when a resume asks
    from lightning.pytorch.cli import LightningArgumentParser

    from data.datamodule import SleepSoundDataModule
    from util.cli import main as cli_main

    printed = io.StringIO()
    argv0 = sys.argv
    # configs and cache folders are relative to the repository root, as in a run's process
    with _working_dir(ROOT), contextlib.redirect_stdout(printed):
        try:
            sys.argv = argv0[:1]  # the sweep's own options are no run's (LightningCLI warns)
            cli_main([*argv, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise RuntimeError(
                    f"cannot resolve the run's configuration (exit code {done.code}); "
                    "run `python main.py " + mask_text(" ".join(argv)) + "` to see why"
                ) from None
        else:  # --print_config exits after printing; anything else is not a probe
            raise RuntimeError("main.py --print_config returned without printing a config")
        finally:
            sys.argv = argv0
        data = (yaml.safe_load(printed.getvalue()) or {}).get("data") or {}
        parser = LightningArgumentParser()
        parser.add_lightning_class_args(SleepSoundDataModule, "data")
        datamodule = parser.instantiate(parser.parse_object({"data": data})).data
        if not hasattr(datamodule, "fingerprint"):
            return None
        fingerprint = datamodule.fingerprint()
    # the run's file went through write_json (secrets masked in strings): hash the same
    return data_fingerprint_hash(_masked(json.loads(json.dumps(fingerprint, default=str))))


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run the block in ``path`` (``contextlib.chdir`` needs Python 3.11)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _masked(obj: Any) -> Any:
    """``obj`` with :func:`~util.redact.mask_text` applied to every string, as ``write_json`` does."""
    if isinstance(obj, dict):
        return {k: _masked(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_masked(v) for v in obj]
    return mask_text(obj) if isinstance(obj, str) else obj


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
        threads: intra-op threads of each run (``EARSLEEP_THREADS`` and ``OMP_NUM_THREADS``,
            unless the sweep's own environment sets them); ``None`` lets each run choose
            (:func:`util.cpu.choose_threads`).
    """

    def run(run: Run, argv: list[str], run_dir: Path, log_path: Path) -> int:
        env = dict(os.environ)
        for key, value in thread_env(threads).items():
            env.setdefault(key, value)
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

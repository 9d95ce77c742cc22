"""One sweep run: its command line, its resolved configuration, its execution, what it left.

Each run is ``main.py fit`` followed by ``test`` on the best checkpoint
(:func:`fit_and_test`: one process, one trainer, one run folder), executed by the Ray
Tune trial that :mod:`util.sweep.tune` placed: by default inside that trial's Ray worker
(:func:`worker_runner`; Tune reuses the worker, so Python, torch and Lightning are
imported once per worker, not once per run), or in a fresh Python per run
(:func:`subprocess_runner`). A crash is one failed run, not a failed sweep. A run lives
in ``<out>/runs/<name>/seed<s>/`` (TensorBoard events, checkpoints, the artifacts of
:class:`~util.callbacks.RunArtifacts` and :class:`~util.callbacks.Provenance`,
``run.log`` and ``sweep_run.json``).

What a run would do is its configuration as ``main.py`` resolves it
(:func:`resolve_config`: the project's own parser, defaults and included YAML files
applied, nothing instantiated); :func:`settings_digest` hashes it, leaving out what only
places the run (:data:`PLACEMENT`) and which files said what, so that a comment or a
re-indented YAML changes nothing and a changed value in any included file does. What a
run left behind is read back by :func:`read_result`: its scores, whether it collapsed
(``metrics.json``'s ``collapse``), and where it came from: the hash of its
``data_fingerprint.json`` and the code version of its ``git.json``. A resumed sweep
compares those with :func:`data_fingerprint_now` and
:func:`~util.callbacks.provenance.git_info` to decide whether the run still holds.

Why about 600 lines: a run's command line, its resolved configuration, the two ways of
executing it (with the fresh-process guard of the in-worker one) and the reading back of
its results are one contract between the sweep and ``main.py``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
    "PLACEMENT",
    "RunResult",
    "Runner",
    "as_fresh_process",
    "data_fingerprint_now",
    "fit_and_test",
    "read_predictions",
    "read_result",
    "resolve_config",
    "settings_digest",
    "subprocess_runner",
    "worker_runner",
]

#: The sweep's record of a run, beside the run's own artifacts.
RUN_RECORD = "sweep_run.json"
#: ``metrics.json`` key of the best :data:`~models.task.MONITOR` score (``best_val_f1_macro``).
BEST_SCORE = "best_" + MONITOR.replace("/", "_")
#: ``metrics.json["test"]`` key of the same score on the test split (``test/f1_macro``).
TEST_SCORE = "test/" + MONITOR.split("/", 1)[-1]
#: Runner: ``(run, argv, run_dir, log_path) -> return code``.
Runner = Callable[["Run", list[str], Path, Path], int]


#: Settings of a resolved configuration that place a run, not decide its result.
PLACEMENT = (
    "trainer.logger.init_args.save_dir",
    "trainer.logger.init_args.name",
    "trainer.logger.init_args.version",
    "leaderboard.path",
)


@functools.cache
def _cli_parser() -> Any:
    from util.cli import build_parser  # Lightning and the models: only when a run is resolved

    return build_parser()


def resolve_config(argv: Sequence[str]) -> dict[str, Any]:
    """The configuration ``main.py <argv>`` would run, as plain values; nothing is built.

    The project's own parser (:func:`util.cli.build_parser`, built once per process)
    applies ``config/defaults.yaml``, every ``--config`` file, the YAML files those name
    (``data: data/x.yaml``) and the settings, exactly as a run does. About 0.2-0.5 s per
    command line on a busy 2-core machine.

    Args:
        argv: ``main.py`` arguments starting with the subcommand (:meth:`Run.argv`).

    Returns:
        The subcommand's section (``trainer``, ``model``, ``data``, the callbacks, ...).

    Raises:
        RuntimeError: the command line does not parse; the message has the parser's line.
    """
    parser = _cli_parser()
    said = io.StringIO()
    # configs and cache folders are relative to the repository root, as in a run
    with _working_dir(ROOT), contextlib.redirect_stderr(said):
        try:
            config = parser.parse_args(list(argv))
        except SystemExit:
            line = last_text_line(said.getvalue()) or "the parser gave no reason"
            raise RuntimeError(f"cannot resolve the run's configuration: {line}") from None
    return _plain(config[config.subcommand].as_dict())


def _plain(obj: Any) -> Any:
    """JSON values of a resolved tree, without ``__path__`` (which file said it)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items() if k != "__path__"}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def flat_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"data.batch_size": 64, ...}`` of a resolved configuration, less :data:`PLACEMENT`.

    The ``config`` list (the files given) is left out too: what decides a run is what
    the files say, not their names.
    """
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                if not prefix and key == "config":
                    continue
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(config, "")
    for key in PLACEMENT:
        flat.pop(key, None)
    return flat


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short hash of :func:`flat_settings` (what a resume compares)."""
    text = json.dumps(dict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_settings(then: Mapping[str, Any], now: Mapping[str, Any], most: int = 3) -> str:
    """``data.batch_size 32 -> 64; ...``: the first ``most`` settings that differ."""
    keys = sorted(k for k in set(then) | set(now) if then.get(k, _UNSET) != now.get(k, _UNSET))
    shown = [
        f"{k} {_short(then.get(k, _UNSET))} -> {_short(now.get(k, _UNSET))}" for k in keys[:most]
    ]
    more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
    return "; ".join(shown) + more


_UNSET = object()


def _short(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


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
    #: :func:`flat_settings` of its resolved configuration (set by the sweep before it runs).
    settings: dict[str, Any] | None = None
    #: :func:`settings_digest` of ``settings``.
    digest: str | None = None

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


def data_fingerprint_now(
    argv: Sequence[str], config: Mapping[str, Any] | None = None
) -> str | None:
    """The data fingerprint a run of ``argv`` would record now, hashed; nothing is built.

    The run's configuration is resolved (:func:`resolve_config`, or ``config`` when the
    caller has it already), the data module is made from its ``data`` section and its
    ``fingerprint()`` is hashed as :class:`~util.callbacks.Provenance` hashes the run's
    ``data_fingerprint.json``. A cache that is gone, rebuilt or keyed otherwise (a
    changed archive gives another source fingerprint, hence another cache key) gives
    another hash than the finished run recorded.

    Args:
        argv: ``main.py`` arguments starting with ``fit`` (:meth:`Run.argv`).
        config: ``resolve_config(argv)``, if already known.

    Returns:
        The hash; ``None`` when the data module has no ``fingerprint()``.
    """
    data = dict((config if config is not None else resolve_config(argv)).get("data") or {})
    with _working_dir(ROOT):  # cache folders are relative to the repository root
        parser = _data_parser()
        datamodule = parser.instantiate_classes(parser.parse_object({"data": data})).data
        if not hasattr(datamodule, "fingerprint"):
            return None
        fingerprint = datamodule.fingerprint()
    # the run's file went through write_json (secrets masked in strings): hash the same
    return data_fingerprint_hash(_masked(json.loads(json.dumps(fingerprint, default=str))))


@functools.cache
def _data_parser() -> Any:
    from lightning.pytorch.cli import LightningArgumentParser

    from data.datamodule import SleepSoundDataModule

    parser = LightningArgumentParser()
    parser.add_lightning_class_args(SleepSoundDataModule, "data")
    return parser


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

    Fit and test share one trainer, one run folder and one leaderboard row. Errors,
    argument errors included, are one line on stderr and a non-zero return.

    Args:
        argv: ``main.py`` arguments starting with ``fit``.
    """
    from util.cli import main as cli_main  # Lightning and the models: only where runs execute
    from util.errors import debug_requested, report_error

    argv0 = sys.argv
    sys.argv = argv0[:1]  # the caller's own options are no run's (LightningCLI warns)
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
    except SystemExit as done:  # an argument error: its line is printed already
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        return code or 1
    except Exception as err:  # one masked line in run.log (the traceback with EARSLEEP_DEBUG=1)
        report_error(err, debug_requested())
        return 1
    finally:
        sys.argv = argv0
    return 0


_FIT_AND_TEST = (
    "import sys; from util.sweep.run import fit_and_test; sys.exit(fit_and_test(sys.argv[1:]))"
)

#: How a sweep executes its runs (``python -m util.sweep --run_in``).
RUN_IN = ("worker", "subprocess")


def runner_for(run_in: str, threads: int | None = None) -> Runner:
    """The runner named by ``--run_in``: :func:`worker_runner` or :func:`subprocess_runner`."""
    if run_in == "worker":
        return worker_runner(threads)
    if run_in == "subprocess":
        return subprocess_runner(threads)
    raise ValueError(f"run_in must be one of {', '.join(RUN_IN)}, got {run_in!r}")


def _header(argv: Sequence[str]) -> str:
    return "$ python main.py " + mask_text(" ".join(argv)) + "\n"


def worker_runner(threads: int | None = None) -> Runner:
    """The default runner: :func:`fit_and_test` in the process that executes the trial.

    In a Ray worker that Tune reuses from run to run, the imports (Python, torch,
    Lightning: about 10 s a run on a busy 2-core machine) are paid once per worker.
    Each run gets what a fresh process would have: the repository root as working
    directory, the sweep's environment plus the thread variables (restored afterwards,
    so ``PL_GLOBAL_SEED`` and the like do not leak into the next run), its own thread
    count (``--threads auto`` reads ``EARSLEEP_THREADS``), Python's warning filters and
    torch's determinism flags as they were before, and its stdout and stderr, file
    descriptors included, in its ``run.log``. Seeds are set by the run itself
    (``--seed_everything``). Not for runs that start processes of their own from
    ``sys.argv`` (Lightning's DDP over several devices): use :func:`subprocess_runner`.

    Args:
        threads: intra-op threads of each run (``EARSLEEP_THREADS`` and ``OMP_NUM_THREADS``,
            unless the sweep's own environment sets them); ``None`` lets each run choose
            (:func:`util.cpu.choose_threads`).
    """

    def run(run: Run, argv: list[str], run_dir: Path, log_path: Path) -> int:
        with open(log_path, "w", buffering=1) as log:
            log.write(_header(argv))
            with as_fresh_process(log, thread_env(threads)):
                return fit_and_test(argv)

    return run


@contextlib.contextmanager
def as_fresh_process(log: io.TextIOBase, env: Mapping[str, str]) -> Iterator[None]:
    """Run the block as :func:`worker_runner` runs a run: as if in a fresh process.

    Args:
        log: where the block's stdout and stderr go (its file descriptors too).
        env: variables to set unless the environment has them already.
    """
    with _isolated(env), _output_to(log):
        yield


@contextlib.contextmanager
def _isolated(env: Mapping[str, str]) -> Iterator[None]:
    """Run one sweep run here as if in a fresh process; put back what it changes."""
    import torch

    environ = dict(os.environ)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    argv0, cwd = list(sys.argv), os.getcwd()
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        os.chdir(ROOT)
        # the filters come back afterwards, and warnings already shown show again
        with warnings.catch_warnings():
            warnings.onceregistry.clear()
            yield
    finally:
        for key in set(os.environ) - set(environ):  # key by key: other threads read it too
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        sys.argv[:] = argv0
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
        gc.collect()


@contextlib.contextmanager
def _output_to(log: io.TextIOBase) -> Iterator[None]:
    """Send this process's stdout and stderr (Python's and the file descriptors) to ``log``."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        log.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def subprocess_runner(threads: int | None = None) -> Runner:
    """:func:`fit_and_test` in a fresh Python per run, output to the run's log.

    Each run pays its own imports; nothing a run leaves in its process can reach
    another. For runs that start processes of their own (Lightning's DDP over several
    devices) and code that keeps global state.

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
            log.write(_header(argv))
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


def last_text_line(text: str) -> str:
    """The last non-empty line of ``text`` (at most 300 characters)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def last_line(path: Path) -> str:
    """The last non-empty line of a log (at most 300 characters), for a failed run's note."""
    try:
        return last_text_line(path.read_text(errors="replace"))
    except OSError:
        return ""

"""Everything a finished run leaves behind besides TensorBoard events and checkpoints.

Files in the run's log directory (``trainer.log_dir``):

- ``epoch_metrics.csv``: one row per training epoch: ``epoch``, ``step`` and every
  ``train/*`` and ``val/*`` scalar of that epoch.
- ``metrics.json``: best ``val/f1_macro`` and its epoch and checkpoint, the test
  scalars, complexity, seed, config path, wall time.
- ``test_metrics.csv``, ``class_metrics.csv``, ``test_predictions.csv`` after testing.
- ``env.json``, ``git.json``, ``data_fingerprint.json`` at setup.

Plus one row per run in a shared leaderboard CSV, written under a file lock.

Why about 600 lines: every artifact of a run (metrics, CSVs, environment, git state,
fingerprint, leaderboard row) is written by one callback so that they describe the same
run; the leaderboard and provenance writers are to become callbacks of their own in
``util/callbacks/`` (issue 14).
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from filelock import FileLock
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from data.system import usable_cpus
from models.task import MONITOR, Reports, checkpoint_validation_score
from util.complexity import profile
from util.cpu import cpu_model
from util.redact import mask_secrets, mask_text

__all__ = [
    "LEADERBOARD_COLUMNS",
    "RunArtifacts",
    "append_leaderboard_row",
    "class_metrics",
    "environment_info",
    "git_info",
    "mask_secrets",
]

LEADERBOARD_COLUMNS = (
    "time",
    "run_dir",
    "model",
    "params",
    "macs",
    "bytes_fp32",
    "latency_median_ms",
    "best_val_f1_macro",
    "test_f1_macro",
    "test_acc",
    "test_bal_acc",
    "seed",
    "teacher",
    "alpha",
    "temperature",
    "beta",
    "compression_ratio",
    "gap_closed",
    "config",
)
PER_CLASS = ("precision", "recall", "f1")
KD_COLUMNS = ("teacher", "alpha", "temperature", "beta", "compression_ratio", "gap_closed")

# Environment variables worth recording (prefixes and exact names); secrets among them are masked.
ENV_PREFIXES = (
    "CUDA_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "PL_",
    "PYTORCH_",
    "TORCH_",
    "TORCHINDUCTOR_",
    "HF_",
    "HUGGINGFACE_",
    "SLURM_",
    "CUBLAS_",
    "CUDNN_",
)
ENV_NAMES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PYTHONHASHSEED",
)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Versions, hardware and selected environment variables (secrets masked).

    Args:
        environ: the environment to read (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    selected = {
        name: value
        for name, value in sorted(environ.items())
        if name.startswith(ENV_PREFIXES) or name in ENV_NAMES
    }
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            name: _package_version(name)
            for name in ("torch", "lightning", "torchaudio", "torchmetrics", "numpy", "h5py")
        },
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda
            else [],
        },
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable_cpus(),
        "env": mask_secrets(selected),
    }


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit, branch and dirtiness of the git checkout holding ``path``; no remote URL.

    ``dirty`` means tracked files differ from the commit. Outside a git repository (or
    without git) every field is ``None`` and ``error`` says why.

    Args:
        path: a folder inside the checkout (default: this project's root).
    """
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError) as err:
        reason = getattr(err, "stderr", None) or str(err)
        return {"commit": None, "branch": None, "dirty": None, "error": reason.strip()}


def class_metrics(
    metrics: Mapping[str, Any], confusion: torch.Tensor, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-class precision, recall, F1 (as torchmetrics logged them) and support.

    Args:
        metrics: the logged ``test/precision/<class>``, ``test/recall/<class>`` and
            ``test/f1/<class>`` values (``trainer.callback_metrics``).
        confusion: ``(K, K)`` test counts, rows = true class: the support of each class.
        class_names: the ``K`` class names, in index order.

    Returns:
        One dict per class: ``class``, ``precision``, ``recall``, ``f1``, ``support``.
    """
    support = confusion.detach().cpu().sum(dim=1).tolist()
    return [
        {
            "class": name,
            **{kind: _scalar(metrics.get(f"test/{kind}/{name}")) for kind in PER_CLASS},
            "support": int(support[k]),
        }
        for k, name in enumerate(class_names)
    ]


def _lock(path: Path) -> FileLock:
    """An exclusive inter-process lock on ``<path>.lock`` (flock on POSIX, msvcrt on Windows)."""
    return FileLock(path.with_name(path.name + ".lock"))


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    return "" if value is None else value


def _csv_text(fieldnames: Sequence[str], rows: Sequence[Mapping[str, Any]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), restval="", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def append_leaderboard_row(
    path: str | os.PathLike, row: Mapping[str, Any], replace: Mapping[str, str] | None = None
) -> None:
    """Add ``row`` to the leaderboard CSV at ``path``, safe against concurrent writers.

    The file gets the header :data:`LEADERBOARD_COLUMNS` when new; a file with another
    header keeps its own (unknown fields are dropped, missing ones left empty). All
    reading and writing happens under an exclusive lock on ``<path>.lock``.

    Args:
        path: the leaderboard CSV.
        row: column name to value (``None`` writes an empty cell).
        replace: when given, the first existing row whose fields equal all of these
            values is replaced by ``row`` (the file is rewritten atomically); ``row``
            is appended if none matches.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        fieldnames: list[str] = list(LEADERBOARD_COLUMNS)
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as f:
                existing = next(csv.reader(f), None)
            if existing and existing != fieldnames:
                rank_zero_warn(
                    f"{path} has another header than this version writes; keeping its header."
                )
                fieldnames = existing
        if replace and not new:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            for i, old in enumerate(rows):
                if all(old.get(k) == str(v) for k, v in replace.items()):
                    rows[i] = dict(row)
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    tmp.write_text(_csv_text(fieldnames, rows, header=True), newline="")
                    os.replace(tmp, path)
                    return
        with open(path, "a", newline="") as f:
            f.write(_csv_text(fieldnames, [row], header=new))
            f.flush()
            os.fsync(f.fileno())


def _checkpoint_validation(ckpt_path: str | os.PathLike[str]) -> dict[str, Any]:
    """``best_val_f1_macro``, ``best_epoch``, ``best_model_path`` of a checkpoint file.

    The score is the ``val/f1_macro`` its ``ModelCheckpoint`` saw when it wrote the file
    (``current_score``): the validation score of exactly the weights being tested.
    Unknown (``None``) when the file has no such callback state.
    """
    try:
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError) as err:
        rank_zero_warn(f"run artifacts: cannot read {ckpt_path} for its validation score ({err})")
        ckpt = {}
    score = checkpoint_validation_score(ckpt)
    epoch = ckpt.get("epoch") if score is not None else None
    return {"best_val_f1_macro": score, "best_epoch": epoch, "best_model_path": str(ckpt_path)}


def _scalar(value: Any) -> Any:
    """A plain Python number from a tensor / numpy scalar; ``None`` for non-finite or non-scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, str):
        return mask_text(obj)
    if isinstance(obj, (bool, int)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and scalars
        return _jsonable(obj.tolist())
    return str(obj)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _scalars(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The scalar entries of ``metrics`` whose key starts with ``prefix``, as Python numbers."""
    return {
        key: _scalar(value)
        for key, value in metrics.items()
        if key.startswith(prefix) and not (isinstance(value, torch.Tensor) and value.numel() != 1)
    }


class RunArtifacts(Callback):
    """Write the run's metrics, environment and provenance next to its TensorBoard events.

    In ``trainer.log_dir`` (global rank zero only): ``env.json``, ``git.json`` and
    ``data_fingerprint.json`` (when the datamodule has ``fingerprint()``) at setup;
    ``epoch_metrics.csv`` with one row per epoch, written once the epoch's train and
    validation scalars are all in; ``metrics.json`` after fit and again after test;
    ``test_metrics.csv``, ``class_metrics.csv`` and ``test_predictions.csv`` after test.
    The resolved ``config.yaml`` is written by LightningCLI; its path is recorded.

    One row per run goes to the ``leaderboard`` CSV: appended after fit (test columns
    empty) and filled in place when the same trainer then tests; a test-only run adds
    its own row. Nothing is written under ``fast_dev_run``.

    Args:
        leaderboard: CSV shared by all runs (created with its header when missing);
            ``None`` or empty writes no leaderboard row.
    """

    def __init__(self, leaderboard: str | None = "log/leaderboard.csv") -> None:
        super().__init__()
        self.leaderboard = leaderboard
        self._log_dir: Path | None = None
        self._started: float | None = None
        self._started_at: str | None = None
        self._epoch_rows: list[dict[str, Any]] = []
        self._pending_epoch: tuple[int, int] | None = None
        self._val_scalars: dict[str, Any] = {}
        self._complexity: dict[str, Any] | None = None
        self._leaderboard_key: dict[str, str] | None = None

    # -- setup: where to write, and what is known before training ------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        # predict writes its own outputs; without a logger there is no run folder to fill
        if trainer.fast_dev_run or not log_dir or stage == "predict" or trainer.logger is None:
            self._log_dir = None
            return
        self._log_dir = Path(log_dir)
        if self._started is None:
            self._started = time.monotonic()
            self._started_at = _now()
        if not trainer.is_global_zero:
            return
        self._log_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self._log_dir / "env.json", environment_info())
        _write_json(self._log_dir / "git.json", git_info())
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "fingerprint"):
            _write_json(self._log_dir / "data_fingerprint.json", datamodule.fingerprint())

    # -- per-epoch rows ------------------------------------------------------------

    # Lightning runs callbacks' epoch-end hooks before the module's, and validation
    # before train epoch end; an epoch's row is therefore written at the next hook
    # that is sure to follow all of its logging (next epoch start or train end).

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_scalars = _scalars(trainer.callback_metrics, "val/")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending_epoch = (trainer.current_epoch, trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_epoch(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_epoch(trainer)

    def _flush_epoch(self, trainer: pl.Trainer) -> None:
        if self._pending_epoch is None:
            return
        epoch, step = self._pending_epoch
        row = {"epoch": epoch, "step": step, **_scalars(trainer.callback_metrics, "train/")}
        row.update(self._val_scalars)
        self._epoch_rows.append(row)
        self._pending_epoch, self._val_scalars = None, {}
        if self._log_dir is None or not trainer.is_global_zero:
            return
        keys = {k for r in self._epoch_rows for k in r} - {"epoch", "step"}
        columns = ["epoch", "step", *sorted(k for k in keys if k.startswith("train/"))]
        columns += sorted(k for k in keys if not k.startswith("train/"))
        _write_atomic(
            self._log_dir / "epoch_metrics.csv", _csv_text(columns, self._epoch_rows, header=True)
        )

    # -- end of fit / test ---------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._log_dir is not None and trainer.is_global_zero:
            self._write_summary(trainer, pl_module, tested=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._log_dir is None or not trainer.is_global_zero:
            return
        test = _scalars(trainer.callback_metrics, "test/")
        _write_atomic(
            self._log_dir / "test_metrics.csv",
            _csv_text(
                ["metric", "value"],
                [{"metric": k, "value": v} for k, v in sorted(test.items())],
                True,
            ),
        )
        task = pl_module if isinstance(pl_module, Reports) else None
        confusion = task.confusion.get("test") if task is not None else None
        if confusion is not None:
            rows = class_metrics(trainer.callback_metrics, confusion, task.class_names)
            columns = ["class", "precision", "recall", "f1", "support"]
            _write_atomic(
                self._log_dir / "class_metrics.csv", _csv_text(columns, rows, header=True)
            )
        predictions = task.test_predictions if task is not None else None
        if predictions:  # empty before a test epoch
            self._write_predictions(predictions, pl_module.class_names)
        self._write_summary(trainer, pl_module, tested=True)

    def _write_predictions(
        self, predictions: Mapping[str, torch.Tensor], class_names: Sequence[str]
    ) -> None:
        index = predictions["index"].detach().cpu().long()
        target = predictions["target"].detach().cpu().long()
        probs = predictions["probs"].detach().cpu().float()
        # DistributedSampler pads the last batch with repeated rows: keep each index once.
        order = torch.argsort(index, stable=True)
        index, target, probs = index[order], target[order], probs[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        if not keep.all():
            rank_zero_info(
                f"test_predictions.csv: dropped {int((~keep).sum())} repeated rows (DDP padding)"
            )
        index, target, probs = index[keep], target[keep], probs[keep]
        pred = probs.argmax(dim=1)
        with open(self._log_dir / "test_predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "target", "pred", *(f"prob_{c}" for c in class_names)])
            for i, t, p, row in zip(
                index.tolist(), target.tolist(), pred.tolist(), probs.tolist(), strict=True
            ):
                writer.writerow([i, t, p, *(f"{v:.7g}" for v in row)])

    def _best(self, trainer: pl.Trainer) -> dict[str, Any]:
        history = [(r["epoch"], r[MONITOR]) for r in self._epoch_rows if r.get(MONITOR) is not None]
        score, path = None, None
        for cb in trainer.checkpoint_callbacks:
            if (
                isinstance(cb, ModelCheckpoint)
                and cb.monitor == MONITOR
                and cb.best_model_score is not None
            ):
                score, path = _scalar(cb.best_model_score), cb.best_model_path or None
                break
        if score is None and history:
            score = max(v for _, v in history)
        if score is None and not history and trainer.testing and trainer.ckpt_path:
            # A run that only tests a checkpoint: its validation score is in the file.
            return _checkpoint_validation(trainer.ckpt_path)
        epoch = (
            min(history, key=lambda ev: abs(ev[1] - score))[0]
            if history and score is not None
            else None
        )
        return {"best_val_f1_macro": score, "best_epoch": epoch, "best_model_path": path}

    def _complexity_of(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        measured = pl_module.complexity if isinstance(pl_module, Reports) else None
        if measured is not None:
            return dict(measured)
        if self._complexity is None:
            example = getattr(pl_module, "example_input_array", None)
            backbone = pl_module.backbone
            if example is not None:
                self._complexity = profile(backbone, tuple(example.shape[1:]), latency=False)
            else:
                bytes_fp32 = sum(p.numel() for p in backbone.parameters()) * 4
                bytes_fp32 += sum(b.numel() * b.element_size() for b in backbone.buffers())
                self._complexity = {
                    "params": sum(p.numel() for p in backbone.parameters()),
                    "bytes_fp32": bytes_fp32,
                }
        return dict(self._complexity)

    def _config_path(self, trainer: pl.Trainer) -> str | None:
        names = [getattr(cb, "config_filename", None) for cb in trainer.callbacks]
        for name in [n for n in names if n] + ["config.yaml"]:
            path = self._log_dir / name
            if path.exists():
                return str(path)
        return None

    def _write_summary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tested: bool
    ) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        extras = dict(pl_module.run_summary()) if isinstance(pl_module, Reports) else {}
        test = _scalars(trainer.callback_metrics, "test/") if tested else {}
        complexity = self._complexity_of(pl_module)
        summary = {
            "run_dir": str(self._log_dir),
            "model": type(pl_module.backbone).__name__,
            "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed,
            "config": self._config_path(trainer),
            "started": self._started_at,
            "finished": _now(),
            "wall_time_s": time.monotonic() - self._started if self._started is not None else None,
            "epochs": len(self._epoch_rows),
            **self._best(trainer),
            "test": test,
            "complexity": complexity,
            "extras": extras,
        }
        _write_json(self._log_dir / "metrics.json", summary)
        if self.leaderboard:
            self._record_leaderboard(summary, extras)

    def _record_leaderboard(self, summary: Mapping[str, Any], extras: Mapping[str, Any]) -> None:
        complexity, test = summary["complexity"], summary["test"]
        row = {
            "time": self._leaderboard_key["time"] if self._leaderboard_key else summary["finished"],
            "run_dir": summary["run_dir"],
            "model": summary["model"],
            "params": complexity.get("params"),
            "macs": complexity.get("macs"),
            "bytes_fp32": complexity.get("bytes_fp32"),
            "latency_median_ms": complexity.get("latency_median_ms"),
            "best_val_f1_macro": summary["best_val_f1_macro"],
            "test_f1_macro": test.get("test/f1_macro"),
            "test_acc": test.get("test/acc"),
            "test_bal_acc": test.get("test/bal_acc"),
            "seed": summary["seed"],
            **{k: _scalar(extras.get(k)) if k != "teacher" else extras.get(k) for k in KD_COLUMNS},
            "config": summary["config"],
        }
        append_leaderboard_row(self.leaderboard, row, replace=self._leaderboard_key)
        self._leaderboard_key = {"time": row["time"], "run_dir": row["run_dir"]}


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")

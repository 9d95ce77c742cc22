"""The metrics a finished run leaves behind besides TensorBoard events and checkpoints.

Files in the run's log directory (``trainer.log_dir``), written by :class:`RunArtifacts`:

- ``epoch_metrics.csv``: one row per training epoch: ``epoch``, ``step`` and every
  ``train/*`` and ``val/*`` scalar of that epoch.
- ``metrics.json``: best ``val/f1_macro`` and its epoch and checkpoint, the test
  scalars, complexity, seed, config path, wall time.
- ``test_metrics.csv``, ``class_metrics.csv``, ``test_predictions.csv`` after testing.

The run's other records are callbacks of their own beside this one:
:class:`~util.callbacks.provenance.Provenance` (``env.json``, ``git.json``,
``data_fingerprint.json``) and :class:`~util.callbacks.leaderboard.Leaderboard` (one
row per run in a shared CSV, made of :attr:`RunArtifacts.summary`). They share the
writers here (:func:`write_json`, :func:`csv_text`, :func:`scalar`), so every file a
run leaves masks secrets and drops non-finite numbers the same way.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from data.datamodule import SleepSoundDataModule
from models.task import MONITOR, Reports, checkpoint_validation_score
from util.complexity import profile
from util.redact import mask_text

__all__ = ["RunArtifacts", "class_metrics", "csv_text", "run_folder", "scalar", "write_json"]

PER_CLASS = ("precision", "recall", "f1")


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
            **{kind: scalar(metrics.get(f"test/{kind}/{name}")) for kind in PER_CLASS},
            "support": int(support[k]),
        }
        for k, name in enumerate(class_names)
    ]


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    return "" if value is None else value


def csv_text(fieldnames: Sequence[str], rows: Sequence[Mapping[str, Any]], header: bool) -> str:
    """CSV text of ``rows`` in the columns ``fieldnames``, secrets in strings masked.

    A missing or ``None`` value is an empty cell; a key outside ``fieldnames`` is dropped.

    Args:
        fieldnames: the columns, in order.
        rows: column name to value, one mapping a row.
        header: whether the text starts with the header line.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), restval="", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


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


def scalar(value: Any) -> Any:
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


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically.

    Strings have their secrets masked, non-finite floats become ``null``, tensors and
    arrays become lists and anything else its ``str``.
    """
    _write_atomic(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _scalars(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The scalar entries of ``metrics`` whose key starts with ``prefix``, as Python numbers."""
    return {
        key: scalar(value)
        for key, value in metrics.items()
        if key.startswith(prefix) and not (isinstance(value, torch.Tensor) and value.numel() != 1)
    }


def run_folder(trainer: pl.Trainer, stage: str) -> Path | None:
    """The folder a run's records go to, ``None`` when the run keeps none.

    None under ``fast_dev_run``, without a logger or log directory, and for ``predict``
    (which writes its own outputs). Call it on every rank: ``trainer.log_dir`` is a
    collective under DDP.
    """
    log_dir = trainer.log_dir
    if trainer.fast_dev_run or not log_dir or stage == "predict" or trainer.logger is None:
        return None
    return Path(log_dir)


class RunArtifacts(Callback):
    """Write the run's metrics next to its TensorBoard events.

    In ``trainer.log_dir`` (global rank zero only): ``epoch_metrics.csv`` with one row
    per epoch, written once the epoch's train and validation scalars are all in;
    ``metrics.json`` after fit and again after test; ``test_metrics.csv``,
    ``class_metrics.csv`` and ``test_predictions.csv`` after test. The resolved
    ``config.yaml`` is written by LightningCLI; its path is recorded. Nothing is
    written under ``fast_dev_run``.

    Attributes:
        summary: what ``metrics.json`` holds, once the fit or test of the current stage
            has ended and the file is written (global rank zero only); ``None`` before,
            and again at the next stage's setup. :class:`~util.callbacks.Leaderboard`
            makes its row of it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.summary: dict[str, Any] | None = None
        self._log_dir: Path | None = None
        self._started: float | None = None
        self._started_at: str | None = None
        self._epoch_rows: list[dict[str, Any]] = []
        self._pending_epoch: tuple[int, int] | None = None
        self._val_scalars: dict[str, Any] = {}
        self._complexity: dict[str, Any] | None = None

    # -- setup: where to write ---------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.summary = None
        self._log_dir = run_folder(trainer, stage)
        if self._log_dir is None:
            return
        if self._started is None:
            self._started = time.monotonic()
            self._started_at = _now()
        if trainer.is_global_zero:
            self._log_dir.mkdir(parents=True, exist_ok=True)

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
            self._log_dir / "epoch_metrics.csv", csv_text(columns, self._epoch_rows, header=True)
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
            csv_text(
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
            _write_atomic(self._log_dir / "class_metrics.csv", csv_text(columns, rows, header=True))
        predictions = task.test_predictions if task is not None else None
        if predictions:  # empty before a test epoch
            self._write_predictions(predictions, pl_module.class_names, _test_clip_ids(trainer))
        self._write_summary(trainer, pl_module, tested=True)

    def _write_predictions(
        self,
        predictions: Mapping[str, torch.Tensor],
        class_names: Sequence[str],
        clip_ids: Sequence[str] | None = None,
    ) -> None:
        """``test_predictions.csv``; with ``clip_ids`` (row order), a ``clip_id`` column too."""
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
        ids = list(clip_ids) if clip_ids is not None and len(clip_ids) == len(index) else None
        with open(self._log_dir / "test_predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            named = ["clip_id"] if ids is not None else []
            writer.writerow(
                ["index", *named, "target", "pred", *(f"prob_{c}" for c in class_names)]
            )
            for i, t, p, row in zip(
                index.tolist(), target.tolist(), pred.tolist(), probs.tolist(), strict=True
            ):
                name = [ids[i]] if ids is not None else []
                writer.writerow([i, *name, t, p, *(f"{v:.7g}" for v in row)])

    def _best(self, trainer: pl.Trainer) -> dict[str, Any]:
        history = [(r["epoch"], r[MONITOR]) for r in self._epoch_rows if r.get(MONITOR) is not None]
        score, path = None, None
        for cb in trainer.checkpoint_callbacks:
            if (
                isinstance(cb, ModelCheckpoint)
                and cb.monitor == MONITOR
                and cb.best_model_score is not None
            ):
                score, path = scalar(cb.best_model_score), cb.best_model_path or None
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
            example = pl_module.example_input_array
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
            "collapse": self._collapse_of(pl_module),
            "extras": extras,
        }
        write_json(self._log_dir / "metrics.json", summary)
        self.summary = summary

    @staticmethod
    def _collapse_of(pl_module: pl.LightningModule) -> dict[str, Any]:
        """Per stage: ``collapsed``, never-predicted classes and prediction shares by name."""
        if not isinstance(pl_module, Reports):
            return {}
        names = pl_module.class_names
        return {
            stage: {
                "collapsed": report["collapsed"],
                "never_predicted": [names[k] for k in report["never_predicted"]],
                "pred_share": dict(zip(names, report["pred_share"], strict=True)),
                "majority_f1_macro": report["majority_f1_macro"],
            }
            for stage, report in pl_module.collapse.items()
        }


def _test_clip_ids(trainer: pl.Trainer) -> list[str] | None:
    """The test split's clip ids in row order, when the data module is earsleep's."""
    datamodule = getattr(trainer, "datamodule", None)
    if not isinstance(datamodule, SleepSoundDataModule):
        return None
    try:
        return datamodule.dataset("test").clip_ids
    except (OSError, KeyError, RuntimeError, ValueError):  # no cache to name them from
        return None


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")

"""TensorBoard's HParams tab: every run's hyper-parameters beside its val/test macro-F1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as hparams_summary

from models.task import MODE, MONITOR

#: The HParams tab's metric columns and the logged scores they show.
METRICS = {"hp/val_f1_macro": MONITOR, "hp/test_f1_macro": "test/f1_macro"}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"a": {"b": 1}}`` → ``{"a/b": 1}``; values TensorBoard cannot show become strings."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class HParamsSummary(Callback):
    """Write the HParams summary of the run and the scores it ranks by.

    At the start of ``fit``, ``validate`` or ``test`` the model's (and the data module's)
    hyper-parameters are written with the metric names of :data:`METRICS`; after every
    validation epoch ``hp/val_f1_macro`` gets the best validation macro-F1 so far, and
    after a test ``hp/test_f1_macro`` the test macro-F1. Lightning writes no HParams
    summary when ``default_hp_metric`` is off, which the defaults set so that no
    meaningless ``hp_metric`` appears. Idle without a TensorBoard logger.
    """

    def __init__(self) -> None:
        self._best: float | None = None

    @staticmethod
    def _logger(trainer: pl.Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def _write_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        params = dict(pl_module.hparams)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "hparams", None):
            params["data"] = dict(datamodule.hparams)
        summaries = hparams_summary(flatten(params), dict.fromkeys(METRICS, 0.0))
        writer = logger.experiment._get_file_writer()
        for summary in summaries:
            writer.add_summary(summary)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._best = None
        self._write_summary(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_summary(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._logger(trainer)
        score = trainer.callback_metrics.get(MONITOR)
        if logger is None or score is None or trainer.sanity_checking:
            return
        better = max if MODE == "max" else min
        self._best = float(score) if self._best is None else better(self._best, float(score))
        logger.log_metrics({"hp/val_f1_macro": self._best}, step=trainer.global_step)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._logger(trainer)
        score = trainer.callback_metrics.get("test/f1_macro")
        if logger is not None and score is not None:
            logger.log_metrics({"hp/test_f1_macro": float(score)}, step=trainer.global_step)
            logger.experiment.flush()

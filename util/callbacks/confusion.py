"""Confusion matrices as TensorBoard figures and a test CSV."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.task import Reports

__all__ = ["ConfusionMatrixLogger", "confusion_figure", "write_confusion_csv"]


def confusion_figure(
    confusion: torch.Tensor, class_names: Sequence[str], title: str = ""
) -> Figure:
    """A heat map of ``confusion`` (rows true, columns predicted) on the Agg canvas.

    Colour is the row-normalised share (recall per true class); each cell reads its
    count and that share in percent.

    Args:
        confusion: ``(K, K)`` counts, rows = true class, columns = predicted class.
        class_names: the ``K`` class names, in index order.
        title: figure title.
    """
    counts = confusion.detach().cpu().to(torch.float64)
    k = counts.shape[0]
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    side = 2.0 + 0.9 * k
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)  # draw off-screen, whatever pyplot backend is configured
    ax = fig.add_subplot()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    ax.set_xticks(range(k), list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.5 else "black"
            text = f"{int(counts[i, j])}\n{100 * share[i, j]:.1f}%"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    return fig


def write_confusion_csv(
    path: str | os.PathLike, confusion: torch.Tensor, class_names: Sequence[str]
) -> None:
    """Write ``confusion`` as CSV: header ``true\\pred, <classes>``, one row per true class.

    Args:
        path: the CSV file to write.
        confusion: ``(K, K)`` counts, rows = true class, columns = predicted class.
        class_names: the ``K`` class names, in index order.
    """
    rows = confusion.detach().cpu().tolist()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\pred", *class_names])
        for name, row in zip(class_names, rows, strict=True):
            writer.writerow([name, *(int(v) for v in row)])


class ConfusionMatrixLogger(Callback):
    """Log the validation and test confusion matrices.

    After every validation epoch (not the sanity check) the figure of
    ``pl_module.confusion["val"]`` goes to TensorBoard as ``val/confusion``; after
    testing, the figure of ``pl_module.confusion["test"]`` goes there as
    ``test/confusion`` and its counts to ``confusion_test.csv`` in the log directory.
    Only global rank zero writes. Figures need a ``TensorBoardLogger``; other loggers
    are skipped.

    Args:
        csv_name: file name of the test confusion CSV inside the log directory.
    """

    def __init__(self, csv_name: str = "confusion_test.csv") -> None:
        super().__init__()
        self.csv_name = csv_name

    # on_*_end rather than on_*_epoch_end: Lightning calls callbacks' epoch-end hooks
    # before the module's, which is where the module stores the matrix.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._log_figure(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        confusion = self._log_figure(trainer, pl_module, "test")
        if confusion is not None and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            write_confusion_csv(
                os.path.join(log_dir, self.csv_name), confusion, pl_module.class_names
            )

    @staticmethod
    def _log_figure(
        trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> torch.Tensor | None:
        if not isinstance(pl_module, Reports):
            return None
        confusion = pl_module.confusion.get(stage)
        if confusion is None:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                title = stage if stage == "test" else f"{stage}, epoch {trainer.current_epoch}"
                fig = confusion_figure(confusion, pl_module.class_names, title)
                logger.experiment.add_figure(
                    f"{stage}/confusion", fig, trainer.global_step, close=True
                )
        return confusion

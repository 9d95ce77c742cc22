"""What runs the model in ``predict``: PyTorch or ONNX Runtime, chosen in YAML."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from models.task import Task
from util.deploy.runtime import ExportError, OnnxRuntimeRunner

RUNTIMES = ("auto", "torch", "onnxruntime")


class PredictEngine(Callback):
    """Run ``predict`` on ONNX Runtime or PyTorch (``--predict_engine.runtime``).

    ``onnxruntime`` exports the model to ONNX once when prediction starts, checks the
    logits against PyTorch (within 1e-4) and runs ONNX Runtime on the CPU, about twice
    as fast as eager PyTorch for the tiny CNNs (:class:`util.deploy.runtime.OnnxRuntimeRunner`);
    ``torch`` runs PyTorch; ``auto`` takes ONNX Runtime on a CPU and PyTorch on a GPU,
    or when the export or its check fails (with a warning). Training, validation and
    testing always run PyTorch. The runner is handed to the task as its
    ``predict_runner`` for the duration of the predict run; the task itself stays plain
    PyTorch.

    Args:
        runtime: ``auto``, ``torch`` or ``onnxruntime``.
    """

    def __init__(self, runtime: Literal["auto", "torch", "onnxruntime"] = "auto") -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"predict_engine.runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.runtime = runtime

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, Task):
            return
        pl_module.predict_runner = None
        runtime = self.runtime
        on_cpu = pl_module.device.type == "cpu"
        if runtime == "torch" or (runtime == "auto" and not on_cpu):
            return
        if not on_cpu:
            raise ValueError(
                f"predict_engine.runtime onnxruntime runs on the CPU but the model is on "
                f"{pl_module.device}; use --predict_engine.runtime torch (or auto)"
            )
        try:
            pl_module.predict_runner = OnnxRuntimeRunner(
                pl_module, pl_module.input_shape, threads=torch.get_num_threads()
            )
        except ExportError as err:
            if runtime == "onnxruntime":
                raise
            first = str(err).strip().splitlines()[0]
            rank_zero_warn(
                f"predict_engine auto: ONNX Runtime cannot run "
                f"{type(pl_module.backbone).__name__} ({first}); predicting with torch"
            )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, Task):
            pl_module.predict_runner = None

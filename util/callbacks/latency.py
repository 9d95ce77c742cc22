"""Profile the backbone once per run: size, MACs and single-thread CPU latency."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from models.task import Reports
from util.complexity import profile

__all__ = ["LatencyProfiler"]


class LatencyProfiler(Callback):
    """Measure the backbone's parameters, MACs, bytes and CPU latency at batch 1.

    On fit start (and on test start when the module has not been profiled yet), a CPU
    copy of ``pl_module.backbone`` is profiled with :func:`util.complexity.profile` at
    the shape of ``pl_module.example_input_array``. The numbers are logged as
    ``complexity/params``, ``complexity/macs``, ``complexity/bytes_fp32``,
    ``latency/cpu_b1_median_ms`` and ``latency/cpu_b1_p90_ms``, and the whole dict is
    stored as ``pl_module.complexity`` for the run artifacts. Runs on global rank zero
    only; the training itself is not affected. Under ``fast_dev_run`` a single pass is
    timed, without warmup.

    Args:
        runs: timed forward passes.
        warmup: untimed forward passes before timing.
        threads: intra-op CPU threads while timing (1 mimics a small device).
    """

    def __init__(self, runs: int = 100, warmup: int = 10, threads: int = 1) -> None:
        super().__init__()
        if runs < 1 or warmup < 0 or threads < 1:
            raise ValueError(
                f"LatencyProfiler needs runs >= 1, warmup >= 0, threads >= 1; "
                f"got runs={runs}, warmup={warmup}, threads={threads}"
            )
        self.runs = runs
        self.warmup = warmup
        self.threads = threads

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._profile(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, Reports) and pl_module.complexity is None:
            self._profile(trainer, pl_module)

    def _profile(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            rank_zero_warn("LatencyProfiler: the module has no example_input_array; not profiling.")
            return
        # A fast_dev_run is a smoke test: time one pass instead of a hundred.
        runs, warmup = (1, 0) if trainer.fast_dev_run else (self.runs, self.warmup)
        backbone = copy.deepcopy(pl_module.backbone).cpu()
        numbers = profile(
            backbone, tuple(example.shape[1:]), runs=runs, warmup=warmup, threads=self.threads
        )
        if isinstance(pl_module, Reports):
            pl_module.complexity = numbers
        metrics = {
            "complexity/params": numbers["params"],
            "complexity/macs": numbers["macs"],
            "complexity/bytes_fp32": numbers["bytes_fp32"],
            "latency/cpu_b1_median_ms": numbers["latency_median_ms"],
            "latency/cpu_b1_p90_ms": numbers["latency_p90_ms"],
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"{type(backbone).__name__}: {numbers['params']:,} params, {numbers['macs']:,} MACs, "
            f"{numbers['latency_median_ms']:.2f} ms median CPU latency at batch 1, "
            f"{self.threads} thread(s)"
        )

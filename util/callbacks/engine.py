"""What runs the model in ``predict``: PyTorch or ONNX Runtime, chosen in YAML."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from data.recordings import RecordingWindows, check_thread_count
from models.task import Task
from util.cpu import available_cores
from util.deploy.errors import ExportError
from util.night.shared_windows import SharedWindowRunner
from util.night.tinycnn_graphs import supports_tinycnn

RUNTIMES = ("auto", "torch", "onnxruntime")


def recording_datasets(trainer: pl.Trainer) -> list[RecordingWindows]:
    """The predict loaders' :class:`data.recordings.RecordingWindows` (empty when a loader
    is anything else)."""
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    found = [getattr(loader, "dataset", None) for loader in loaders]
    if not found or not all(isinstance(d, RecordingWindows) for d in found):
        return []
    return found


def model_threads(trainer: pl.Trainer) -> int:
    """Intra-op threads for the model: what ``--threads`` chose
    (``torch.get_num_threads()``), one fewer (at least one) when the predict data compute
    their features in a thread of their own (``data.predict_prefetch``)."""
    threads = torch.get_num_threads()
    if any(d.prefetch for d in recording_datasets(trainer)):
        threads = max(1, threads - 1)
    return threads


def window_hop_frames(trainer: pl.Trainer) -> int | None:
    """Front-end frames between the predict windows, when the predict data are long
    recordings (:class:`data.recordings.RecordingWindows`) cut at a whole number of
    frame hops; else ``None``."""
    datasets = recording_datasets(trainer)
    hops = set()
    for data in datasets:
        frame = getattr(data.front_end, "hop_length", None)
        if not frame or data.hop_samples % int(frame):
            return None
        hops.add(data.hop_samples // int(frame))
    return hops.pop() if len(hops) == 1 else None


def _per_worker(threads: int, workers: int) -> int:
    """Intra-op threads of each of ``workers`` runs: all ``threads`` for one, else one."""
    return threads if workers == 1 else 1


class PredictEngine(Callback):
    """Run ``predict`` on ONNX Runtime or PyTorch (``--predict_engine.runtime``).

    ``onnxruntime`` builds an ONNX Runtime model once when prediction starts, checks its
    logits against PyTorch (within 1e-4) and runs it on the CPU, about twice as fast as
    eager PyTorch for the tiny CNNs; ``torch`` runs PyTorch; ``auto`` takes ONNX Runtime
    on a CPU and PyTorch on a GPU, or when the export or its check fails (with a
    warning). Training, validation and testing always run PyTorch. The runner is handed
    to the task as its ``predict_runner`` for the duration of the predict run; the task
    itself stays plain PyTorch.

    Which ONNX Runtime model: a plain TinyCNN
    (:func:`util.night.tinycnn_graphs.supports_tinycnn`) gets
    :class:`util.night.shared_windows.SharedWindowRunner`, its layers written straight
    as ONNX graphs (milliseconds, where the exporter takes seconds), which over the
    overlapping windows of a night computes what they share once; every other backbone
    is exported whole (:class:`util.deploy.runtime.OnnxRuntimeRunner`). Both give the
    per-window logits to float rounding. ONNX Runtime runs the intra-op threads
    ``--threads`` chose (:func:`util.cpu.choose_threads`), one fewer (at least one) when
    the recordings' features come from a thread of their own (``data.predict_prefetch``,
    on by default; :func:`model_threads`), and so does PyTorch in the predicting thread
    until prediction ends. ONNX Runtime takes the features in its own memory order, not
    channels-last.

    The TinyCNN's runner instead runs each batch's windows in independent pieces on
    ``workers`` threads side by side, one intra-op thread each (its ``workers``). Threads
    that never wait on one another lose nothing when a core is busy, where intra-op
    threads meet at every operator and all wait for the slowest; so ``auto`` takes every
    core the process may use (:func:`util.cpu.available_cores`), or the ``--threads``
    number when one is given, and the scheduler shares the cores between them, the
    feature thread and whatever else runs. An 8-h night on two Zen 3 cores: 26.2 s idle
    and 46.4 s beside two busy processes with one worker, 22.6 s and 39.3 s with two; on
    two Zen 4 cores the difference was within the run-to-run noise (``benchmarks/night.py``).

    The recordings' features (``data.predict_prefetch``) are computed on
    ``feature_threads`` threads, each batch on one, handed to the model in order
    (:func:`data.recordings.ahead`), by the same ``auto`` rule. With one feature thread
    the features were the night's critical path: beside two model workers on two cores
    it got about two thirds of a core, so the model waited for it 3-11 s of an 8-h night;
    with two, 0.1-0.5 s (``benchmarks/night.py``).

    Args:
        runtime: ``auto``, ``torch`` or ``onnxruntime``.
        workers: threads that run the TinyCNN's per-window pieces side by side: ``auto``
            (the ``--threads`` number, else every available core) or a number; 1 runs
            them in turn on ``--threads`` intra-op threads, as the other backbones run.
        feature_threads: threads that compute the recordings' features ahead of the
            model, with ``data.predict_prefetch``: ``auto`` (the ``--threads`` number,
            else every available core) or a number.
    """

    def __init__(
        self,
        runtime: Literal["auto", "torch", "onnxruntime"] = "auto",
        workers: int | Literal["auto"] = "auto",
        feature_threads: int | Literal["auto"] = "auto",
    ) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"predict_engine.runtime must be one of {RUNTIMES}, got {runtime!r}")
        for name, value in (("workers", workers), ("feature_threads", feature_threads)):
            check_thread_count(f"predict_engine.{name}", value, auto=True)
        self.runtime = runtime
        self.workers = workers
        self.feature_threads = feature_threads
        #: ``--threads`` when given as a number (set by the CLI): ``auto`` takes it.
        self.threads_requested: int | None = None
        self._threads_before: int | None = None
        #: What the last predict ran: the runner's class, intra-op threads, workers and
        #: feature threads (0: no features ahead of the model).
        self.ran_with: dict[str, object] = {}

    def _count(self, value: int | str) -> int:
        """A thread count: the number, or for ``auto`` the ``--threads`` number, else
        every available core."""
        if value != "auto":
            return int(value)
        return self.threads_requested or available_cores()

    def model_workers(self) -> int:
        """The TinyCNN runner's workers (see ``workers``)."""
        return self._count(self.workers)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, Task):
            return
        pl_module.predict_runner = None
        threads = model_threads(trainer)
        if threads != torch.get_num_threads():  # PyTorch's share too, until predict ends
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        runtime = self.runtime
        datasets = recording_datasets(trainer)
        features = self._count(self.feature_threads)
        for data in datasets:
            data.feature_threads = features
        ahead = features if any(d.prefetch for d in datasets) else 0
        self.ran_with = {"runner": "torch", "threads": threads, "workers": 1}
        self.ran_with["feature_threads"] = ahead
        on_cpu = pl_module.device.type == "cpu"
        if runtime == "torch" or (runtime == "auto" and not on_cpu):
            return
        if not on_cpu:
            raise ValueError(
                f"predict_engine.runtime onnxruntime runs on the CPU but the model is on "
                f"{pl_module.device}; use --predict_engine.runtime torch (or auto)"
            )
        try:
            if supports_tinycnn(pl_module) is None:
                workers = self.model_workers()
                pl_module.predict_runner = SharedWindowRunner(
                    pl_module,
                    window_hop_frames(trainer),
                    threads=_per_worker(threads, workers),
                    workers=workers,
                )
            else:  # the exporter's stack (torch.onnx, onnxscript) only where it is used
                from util.deploy.runtime import OnnxRuntimeRunner

                pl_module.predict_runner = OnnxRuntimeRunner(
                    pl_module, pl_module.input_shape, threads=threads
                )
        except ExportError as err:
            if runtime == "onnxruntime":
                raise
            first = str(err).strip().splitlines()[0]
            rank_zero_warn(
                f"predict_engine auto: ONNX Runtime cannot run "
                f"{type(pl_module.backbone).__name__} ({first}); predicting with torch"
            )
        runner = pl_module.predict_runner
        if runner is not None:  # ONNX Runtime copies channels-last back
            workers = getattr(runner, "workers", 1)
            self.ran_with = {
                "runner": type(runner).__name__,
                "threads": _per_worker(threads, workers),
                "workers": workers,
                "feature_threads": ahead,
            }
            for data in datasets:
                data.channels_last = False

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, Task):
            close = getattr(pl_module.predict_runner, "close", None)
            if close is not None:  # the TinyCNN runner's workers
                close()
            pl_module.predict_runner = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

"""Running exported files in ONNX Runtime: sessions, the parity check, scoring, a runner.

:class:`OnnxRuntimeRunner` is what the predict-engine callback builds: it exports a model
once, checks ONNX Runtime's logits against PyTorch's and then maps a torch batch of features
to logits. :class:`~util.deploy.errors.ExportError` is re-exported here for that caller.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score
from tqdm.auto import tqdm

from util.deploy.errors import ExportError, ParityError
from util.deploy.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx

__all__ = [
    "DEFAULT_TOLERANCE",
    "ExportError",
    "OnnxRuntimeRunner",
    "check_parity",
    "evaluate_onnx",
    "ort_session",
]

#: Largest |logit difference| between ONNX fp32 and PyTorch that still counts as equal.
DEFAULT_TOLERANCE = 1e-4


def ort_session(
    path: str | Path, threads: int = 0, spin: bool = True, optimize: bool = True
) -> ort.InferenceSession:
    """A CPU session, by default with every graph optimisation on.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (0: ONNX Runtime's default, one per core); the
            inter-op pool gets one thread (the graphs here are sequential).
        spin: let idle intra-op threads spin between runs (ONNX Runtime's default,
            lowest latency). Turn it off when other work (PyTorch's own threads) shares
            the cores between runs: spinning threads then take its CPU time.
        optimize: ``ORT_ENABLE_ALL``; ``False`` disables every graph optimisation, so
            a QDQ int8 graph runs as written, ``DequantizeLinear`` → float operator →
            ``QuantizeLinear``: the int8 model's reference arithmetic, free of this CPU's
            fused int8 kernels (and of their saturation without VNNI).
    """
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32, copy=False)})[0]


def check_parity(
    model: nn.Module,
    session: ort.InferenceSession,
    batches: Iterator[np.ndarray] | Sequence[np.ndarray],
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, float]:
    """Compare ONNX logits with PyTorch's on ``batches``; raise beyond ``tolerance``.

    Args:
        model: the PyTorch module the ONNX file was exported from (run on CPU, eval).
        session: the ONNX Runtime session of the exported fp32 file.
        batches: float32 arrays ``(B, C, F, T)``; their batch sizes may differ.
        tolerance: the largest allowed absolute logit difference.

    Returns:
        ``max_abs_diff``, ``clips`` and ``tolerance``.

    Raises:
        ParityError: the difference exceeds ``tolerance`` (or is NaN); the message
            gives the measured difference.
    """
    net = copy.deepcopy(model).cpu().eval()
    worst, clips = 0.0, 0
    with torch.inference_mode():
        for x in batches:
            ref = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
            diff = np.abs(_logits(session, x).astype(np.float64) - ref.astype(np.float64))
            worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max()))
            clips += len(x)
    if clips == 0:
        raise ExportError("no clips to check parity on: the validation split is empty")
    if not worst <= tolerance:
        raise ParityError(
            f"ONNX fp32 logits differ from PyTorch's by up to {worst:.3g} on {clips} validation "
            f"clips (tolerance {tolerance:g}); the export is not trustworthy",
            max_abs_diff=worst,
            tolerance=tolerance,
        )
    return {"max_abs_diff": worst, "clips": clips, "tolerance": tolerance}


class OnnxRuntimeRunner:
    """A classifier's forward pass in ONNX Runtime: fast CPU prediction, same logits.

    The model is exported once with :func:`util.deploy.onnx.export_onnx` (into a temporary
    folder that is deleted as soon as the session holds the graph) and checked against
    PyTorch with :func:`check_parity` on random inputs of two batch sizes before it is used.
    Calling the runner maps features ``(B, C, F, T)`` (any memory layout) to logits
    ``(B, K)``, running ONNX Runtime on pieces of at most ``chunk`` clips: its memory arena
    then holds one piece's activations, not a whole batch's (TinyCNN at batch 64: about
    50 MB less), at the same speed.

    Args:
        model: a module taking ``(B, C, F, T)`` features (copied; left untouched).
        input_shape: ``(C, F, T)`` of one input.
        threads: ONNX Runtime intra-op threads (0: one per core).
        tolerance: the largest allowed absolute logit difference from PyTorch.
        chunk: the most clips per ONNX Runtime run.

    Raises:
        UnsupportedOperatorError: the model cannot be exported.
        ParityError: ONNX Runtime's logits differ from PyTorch's beyond ``tolerance``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        threads: int = 0,
        tolerance: float = DEFAULT_TOLERANCE,
        chunk: int = 16,
    ) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.chunk = int(chunk)
        shape = tuple(int(d) for d in input_shape)
        with tempfile.TemporaryDirectory(prefix="earsleep-ort-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx", shape)
            # The front end computes the next batch between runs: no spinning.
            self.session = ort_session(path, threads, spin=False)
        rng = np.random.default_rng(0)
        batches = [rng.standard_normal((n, *shape), dtype=np.float32) for n in (1, 3)]
        #: What :func:`check_parity` measured: ``max_abs_diff``, ``clips``, ``tolerance``.
        self.parity = check_parity(model, self.session, batches, tolerance)
        #: Logits per clip.
        self.num_outputs = int(_logits(self.session, batches[0]).shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        pieces = [
            _logits(self.session, array[i : i + self.chunk])
            for i in range(0, len(array), self.chunk)
        ]
        if not pieces:  # a recording without windows ends with an empty batch
            return torch.zeros(0, self.num_outputs)
        return torch.from_numpy(np.concatenate(pieces))


def evaluate_onnx(
    session: ort.InferenceSession,
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    progress: bool = False,
    desc: str = "test",
    total: int | None = None,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of an ONNX classifier on labelled batches.

    Macro-F1 and accuracy are torchmetrics' (as in training), computed over all clips.

    Args:
        session: an ONNX Runtime session of a classifier.
        batches: ``(x float32 (B, C, F, T), y int (B,))`` pairs.
        num_classes: number of classes.
        progress: show a progress bar.
        desc: label of the progress bar.
        total: number of batches, for the progress bar.

    Returns:
        ``acc``, ``f1_macro``, ``clips`` and ``predictions`` (int64 array).
    """
    preds, targets = [], []
    for x, y in tqdm(batches, desc=desc, total=total, disable=not progress, unit="batch"):
        preds.append(_logits(session, x).argmax(axis=1))
        targets.append(np.asarray(y, dtype=np.int64))
    if not preds:
        raise ExportError("no clips to score: the split is empty")
    p = torch.from_numpy(np.concatenate(preds).astype(np.int64))
    t = torch.from_numpy(np.concatenate(targets))
    return {
        "acc": float(multiclass_accuracy(p, t, num_classes, average="micro")),
        "f1_macro": float(multiclass_f1_score(p, t, num_classes, average="macro")),
        "clips": int(len(t)),
        "predictions": p.numpy(),
    }

"""A trained classifier to an int8 ``.tflite`` for TensorFlow Lite Micro and Ethos-U.

:func:`to_tflite` exports the whole classifier (band standardisation, backbone; raw
front-end features ``(1, C, n_mels, T)`` in, logits out) with ``torch.export``, saves the
program, and runs :mod:`util.deploy.mcu.litert_worker` on it: ``litert-torch`` converts it,
``ai-edge-quantizer`` quantises it to static int8 on validation clips. The worker runs in
this process when ``litert_torch`` imports here, otherwise in the Python interpreter named
by ``converter_python`` (or ``$EARSLEEP_LITERT_PYTHON``): ``litert-torch`` pins
``typing-extensions<4.13`` (through ``xdsl``) and pulls in JAX and transformers, so it may
live in a virtual environment of its own, next to the same torch.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from util.deploy.errors import ExportError
from util.deploy.mcu import litert_worker

__all__ = ["CONVERTER_ENV", "ExportableClassifier", "UnrolledGRU", "to_tflite"]

#: The environment variable naming a Python interpreter that has ``litert-torch``.
CONVERTER_ENV = "EARSLEEP_LITERT_PYTHON"


class UnrolledGRU(nn.Module):
    """A stacked, batch-first ``nn.GRU`` unrolled over time, returning only its summary.

    TensorFlow Lite Micro's CONCATENATION takes at most 10 inputs, and the converter joins
    every time step of a GRU layer into one sequence for the next layer (25 for the CRNN),
    so the CRNN's file cannot be prepared. Here the layers advance together step by step
    (the same equations and weights as ``nn.GRU`` in eval mode) and only what the backbone
    reads is kept: the last step (``last``) or the running mean (``mean``), returned as a
    one-step sequence so ``seq[:, -1]`` and ``seq.mean(dim=1)`` still give it.

    Args:
        gru: the trained GRU (``batch_first=True``).
        pooling: what the backbone takes of the output sequence: ``last`` or ``mean``.
    """

    def __init__(self, gru: nn.GRU, pooling: str) -> None:
        super().__init__()
        if not gru.batch_first or gru.bidirectional:
            raise ExportError("only a batch-first, one-directional GRU can be unrolled")
        self.gru = gru
        self.pooling = pooling

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        g, hidden = self.gru, self.gru.hidden_size
        h = [x.new_zeros(x.shape[0], hidden) for _ in range(g.num_layers)]
        total = None
        for t in range(x.shape[1]):
            inp = x[:, t]
            for k in range(g.num_layers):
                gi = nn.functional.linear(
                    inp, getattr(g, f"weight_ih_l{k}"), getattr(g, f"bias_ih_l{k}", None)
                )
                gh = nn.functional.linear(
                    h[k], getattr(g, f"weight_hh_l{k}"), getattr(g, f"bias_hh_l{k}", None)
                )
                i_r, i_z, i_n = gi.chunk(3, dim=1)
                h_r, h_z, h_n = gh.chunk(3, dim=1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h[k] = n + z * (h[k] - n)  # (1 - z)·n + z·h
                inp = h[k]
            total = inp if total is None else total + inp
        assert total is not None
        summary = inp if self.pooling == "last" else total / x.shape[1]
        return summary[:, None, :], None


class ExportableClassifier(nn.Module):
    """A classifier's inference path as a plain module: ``backbone(standardize(x))``.

    A LightningModule carries a trainer, metrics and hooks that ``torch.export`` has no use
    for; this holds only what inference computes.

    Args:
        model: the classifier.
        standardize: apply the band standardisation in the graph; ``False`` when the
            device's front end standardises (then the model reads standardised features).
    """

    def __init__(self, model: nn.Module, standardize: bool = True) -> None:
        super().__init__()
        self.backbone = _unroll_recurrences(model.backbone)
        self.normalize = standardize and bool(getattr(model, "normalize", False))
        self.register_buffer("band_mean", model.band_mean.detach().clone())
        self.register_buffer("band_std", model.band_std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.band_mean) / self.band_std
        return self.backbone(x)


def _unroll_recurrences(backbone: nn.Module) -> nn.Module:
    """``backbone``, or a copy whose ``rnn`` GRU is an :class:`UnrolledGRU` (see there)."""
    rnn = getattr(backbone, "rnn", None)
    if not isinstance(rnn, nn.GRU):
        return backbone
    clone = copy.deepcopy(backbone)
    clone.rnn = UnrolledGRU(clone.rnn, getattr(backbone, "pooling", "last"))
    return clone


def _converter_python(converter_python: str | Path | None) -> str | None:
    """The interpreter to run the worker in, or ``None`` for this process."""
    given = converter_python or os.environ.get(CONVERTER_ENV)
    if given:
        path = Path(given)
        if not path.is_file():
            raise ExportError(
                f"converter Python {given} does not exist; give a Python that has "
                f"litert-torch (--converter_python or ${CONVERTER_ENV})"
            )
        return str(path)
    if importlib.util.find_spec("litert_torch") is None:
        raise ExportError(
            "converting to .tflite needs litert-torch: pip install -e '.[mcu-convert]', or "
            f"point --converter_python (or ${CONVERTER_ENV}) at a Python that has it"
        )
    return None


def to_tflite(
    model: nn.Module,
    calib: np.ndarray,
    out_dir: str | Path,
    converter_python: str | Path | None = None,
    standardize_in_graph: bool = True,
) -> dict[str, Any]:
    """Export ``model`` and convert it to ``model.fp32.tflite`` and ``model.int8.tflite``.

    Args:
        model: a :class:`~models.classifier.Classifier` (or subclass) in eval mode.
        calib: calibration features ``(N, C, n_mels, T)`` float32 (raw front-end output).
        out_dir: where the program, both files and ``convert.json`` go.
        converter_python: a Python interpreter with ``litert-torch`` (default: this one,
            or ``$EARSLEEP_LITERT_PYTHON``).
        standardize_in_graph: the file standardises its input itself (raw log-mel in);
            ``False``: it reads standardised features (``calib`` must be standardised too).

    Returns:
        The worker's result: each file's path, bytes and operators (``float_ops``: those
        left in float in the int8 file), and ``fp32_max_abs_diff`` against PyTorch.

    Raises:
        ExportError: torch.export, the converter or the quantiser failed; the message
            names the stage and the operator or error it reported.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    python = _converter_python(converter_python)
    module = ExportableClassifier(model, standardize_in_graph).eval()
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    program = out_dir / "model.pt2"
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (torch.from_numpy(calib[:1]),))
    except Exception as err:
        raise ExportError(f"torch.export failed: {type(err).__name__}: {err}") from err
    torch.export.save(exported, str(program))
    calib_path = out_dir / "calibration.npy"
    np.save(calib_path, calib)
    args = ["--program", str(program), "--calib", str(calib_path), "--out", str(out_dir)]
    if python is None:
        litert_worker.main(args)
    else:
        worker = Path(litert_worker.__file__)
        done = subprocess.run(
            [python, str(worker), *args], capture_output=True, text=True, check=False
        )
        if not (out_dir / litert_worker.RESULT_NAME).is_file():
            tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise ExportError(f"the converter ({python}) failed: {tail}")
    result = json.loads((out_dir / litert_worker.RESULT_NAME).read_text())
    calib_path.unlink(missing_ok=True)
    if result.get("stage") != "done":
        raise ExportError(f"{result.get('stage')} failed: {result.get('error', 'unknown error')}")
    return result

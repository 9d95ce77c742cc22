"""Shipping a trained classifier: ONNX fp32 and static INT8, checked against PyTorch.

``python -m util.deploy --ckpt_path <run>/checkpoints/best-….ckpt --int8 true`` writes,
into ``<run>/export/`` unless ``--out`` says otherwise, ``<backbone>.onnx`` (the whole
classifier, band standardisation included: raw front-end features
``(batch, C, n_mels, time)`` in, ``logits (batch, K)`` out, batch and time dynamic),
``<backbone>.int8.onnx`` and ``export_report.json``. Every file carries the model's facts
as metadata (:mod:`util.deploy.metadata`) and runs without the repository
(:mod:`util.deploy.standalone`).

One job a module:

- :mod:`~util.deploy.errors`: :class:`ExportError` and its subclasses;
- :mod:`~util.deploy.onnx`: PyTorch to ONNX (dynamic axes, the GRU op, what failed);
- :mod:`~util.deploy.graph`: proto edits (debug info, compaction, metadata);
- :mod:`~util.deploy.quantize`: INT8 schemes, calibration, quantisation, the int8 guard;
- :mod:`~util.deploy.runtime`: ONNX Runtime sessions, parity, scoring, the predict runner;
- :mod:`~util.deploy.data`: the run's validation and test splits;
- :mod:`~util.deploy.audio_in`: the audio-in file (front end + classifier + softmax in
  one graph, ``--audio_in true``);
- :mod:`~util.deploy.export`: the whole pipeline and its report;
- ``__main__``: the command line.
"""

from util.deploy.errors import (
    ExportError,
    FeatureMismatchError,
    Int8LossError,
    ParityError,
    UnsupportedOperatorError,
)
from util.deploy.export import REPORT_NAME, export_checkpoint, format_report, load_classifier
from util.deploy.onnx import export_onnx
from util.deploy.quantize import (
    INT8_SCHEMES,
    CalibrationReader,
    Int8Scheme,
    choose_int8_scheme,
    int8_guard,
    quantize_int8,
    resolve_int8_scheme,
)
from util.deploy.runtime import OnnxRuntimeRunner, check_parity, evaluate_onnx, ort_session

__all__ = [
    "INT8_SCHEMES",
    "REPORT_NAME",
    "CalibrationReader",
    "ExportError",
    "FeatureMismatchError",
    "Int8LossError",
    "Int8Scheme",
    "OnnxRuntimeRunner",
    "ParityError",
    "UnsupportedOperatorError",
    "check_parity",
    "choose_int8_scheme",
    "evaluate_onnx",
    "export_checkpoint",
    "export_onnx",
    "format_report",
    "int8_guard",
    "load_classifier",
    "ort_session",
    "quantize_int8",
    "resolve_int8_scheme",
]

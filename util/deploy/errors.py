"""Why an export failed: one exception family, each with the facts a caller may act on.

Every failure of :mod:`util.deploy` is an :class:`ExportError` with a one-line message
(the export CLI prints it after ``export failed:``); the subclasses also carry the measured
facts as attributes, so a caller (a sweep, the predict-engine callback) can decide without
parsing the message.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ExportError",
    "FeatureMismatchError",
    "Int8LossError",
    "ParityError",
    "UnsupportedOperatorError",
]


class ExportError(RuntimeError):
    """The model cannot be exported, or its export is not trustworthy.

    Args:
        message: what is wrong and what to do, in one line.
        **facts: stored as attributes of the same names (each subclass lists its own).
    """

    def __init__(self, message: str, **facts: Any) -> None:
        super().__init__(message)
        for name, value in facts.items():
            setattr(self, name, value)


class UnsupportedOperatorError(ExportError):
    """The dynamo exporter cannot capture or translate an operator of the backbone.

    Attributes:
        operator: the operator (e.g. ``aten.cummax.default``) or, when the capture
            failed before any operator was recorded, the failing call.
        backbone: class name of the backbone.
    """

    operator: str
    backbone: str


class ParityError(ExportError):
    """ONNX fp32 logits differ from PyTorch's by more than the tolerance.

    Attributes:
        max_abs_diff: the largest absolute logit difference measured.
        tolerance: the allowed difference.
    """

    max_abs_diff: float
    tolerance: float


class Int8LossError(ExportError):
    """The int8 file loses more validation macro-F1 than allowed against fp32.

    Attributes:
        fp32_f1: fp32 validation macro-F1.
        int8_f1: int8 validation macro-F1.
        drop_pp: ``100 * (fp32_f1 - int8_f1)``.
        max_drop_pp: the allowed drop.
    """

    fp32_f1: float
    int8_f1: float
    drop_pp: float
    max_drop_pp: float


class FeatureMismatchError(ExportError):
    """The model, its run config or a cache disagree on features, classes or input shape."""

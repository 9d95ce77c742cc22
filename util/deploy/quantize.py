"""Static INT8 quantisation of an fp32 ONNX file, in integer types exact on its target.

ONNX Runtime's x86 u8s8 kernels multiply uint8 activations by int8 weights with
``vpmaddubsw``, which adds pairs of products into int16 and saturates there (2 × 255 ×
127 > 32767) on CPUs without VNNI (AVX2, AVX-512F/BW without VNNI). VNNI's ``vpdpbusd``
accumulates in int32 and is exact. ARM kernels widen to 32 bits. 7-bit weights
(``reduce_range``) keep every pair sum within int16, at the cost of one bit of weight
precision; on a microcontroller (Arm CMSIS-NN, TFLite Micro) every product is summed in
32 bits, so the device flavour keeps 8-bit symmetric weights and activations.

:data:`INT8_SCHEMES` names those choices, :func:`choose_int8_scheme` picks the one exact on
this CPU, :func:`quantize_int8` writes the QDQ file and :func:`int8_guard` judges it against
its fp32 twin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from util.cpu import cpu_flags, cpu_model
from util.deploy.graph import compact, set_metadata, strip_debug_info
from util.deploy.onnx import INPUT_NAME

__all__ = [
    "DEFAULT_MAX_INT8_DROP_PP",
    "INT8_SCHEMES",
    "MIN_KERNEL_AGREEMENT",
    "CalibrateMethod",
    "CalibrationReader",
    "Int8Scheme",
    "Int8SchemeName",
    "choose_int8_scheme",
    "cpu_summary",
    "int8_guard",
    "quantize_int8",
    "resolve_int8_scheme",
]

log = logging.getLogger("util.deploy")

#: Most validation macro-F1 (percentage points) an int8 file may lose against fp32.
DEFAULT_MAX_INT8_DROP_PP = 0.5
#: Least share of validation clips on which this CPU's fused int8 kernels must predict
#: what the QDQ reference arithmetic predicts; below it ``auto`` takes 7-bit weights.
MIN_KERNEL_AGREEMENT = 0.999
#: CPU flags (Linux ``/proc/cpuinfo`` spelling) of x86 int8 dot products with int32 sums.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")

#: ``auto`` or a name of :data:`INT8_SCHEMES` (spelled out for the CLI's choices).
Int8SchemeName = Literal["auto", "u8s8", "u8s7", "s8s8"]
#: How activation ranges are calibrated.
CalibrateMethod = Literal["minmax", "entropy", "percentile"]
_CALIB_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


@dataclass(frozen=True)
class Int8Scheme:
    """One way to quantise: the integer types and where the arithmetic is exact.

    Attributes:
        name: the ``--int8_scheme`` value.
        activation_type: ``uint8`` or ``int8`` activations.
        reduce_range: 7-bit weights instead of 8-bit.
        symmetric_activations: activation zero points fixed at 0.
        target: where this scheme runs exactly.
        reference_scoring: score the int8 file by running its QDQ graph as float
            operations (what a 32-bit-accumulating runtime computes) instead of with
            this host's fused int8 kernels, which are not the target's.
    """

    name: str
    activation_type: str
    reduce_range: bool
    symmetric_activations: bool
    target: str
    reference_scoring: bool = False


INT8_SCHEMES: dict[str, Int8Scheme] = {
    s.name: s
    for s in (
        Int8Scheme(
            "u8s8",
            "uint8",
            reduce_range=False,
            symmetric_activations=False,
            target="ONNX Runtime on x86 CPUs with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) and on ARM",
        ),
        Int8Scheme(
            "u8s7",
            "uint8",
            reduce_range=True,
            symmetric_activations=False,
            target="ONNX Runtime on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI): "
            "7-bit weights cannot saturate the 16-bit pair sums",
        ),
        Int8Scheme(
            "s8s8",
            "int8",
            reduce_range=False,
            symmetric_activations=True,
            target="microcontrollers (Arm CMSIS-NN, TFLite Micro): symmetric int8 activations "
            "and per-channel symmetric int8 weights, summed in 32 bits",
            reference_scoring=True,
        ),
    )
}


def choose_int8_scheme(
    machine: str | None = None, flags: set[str] | None = None
) -> tuple[Int8Scheme, str]:
    """The host scheme whose int8 arithmetic is exact on this CPU, and why.

    Args:
        machine: ``platform.machine()`` (default: this one's).
        flags: CPU feature flags (default: :func:`util.cpu.cpu_flags`); ``None`` when unknown.

    Returns:
        ``(scheme, reason)``: ``u8s8`` on x86 with VNNI and on non-x86 CPUs, ``u8s7``
        on x86 without VNNI or when the flags cannot be read (it cannot saturate).
    """
    machine = (machine or platform.machine() or "unknown").lower()
    if machine not in _X86:
        return INT8_SCHEMES["u8s8"], f"{machine} CPU: ONNX Runtime sums int8 products in 32 bits"
    if flags is None and machine == platform.machine().lower():
        flags = cpu_flags()
    if flags is None:
        return INT8_SCHEMES["u8s7"], (
            "x86 CPU whose flags could not be read: 7-bit weights, which cannot saturate"
        )
    found = [f for f in VNNI_FLAGS if f in flags]
    if found:
        return INT8_SCHEMES["u8s8"], (
            f"x86 CPU with {'/'.join(found)}: u8s8 products are summed in 32 bits, exactly"
        )
    return INT8_SCHEMES["u8s7"], (
        "x86 CPU without VNNI: ONNX Runtime's u8s8 kernels add pairs of products in 16 bits, "
        "which saturates; 7-bit weights cannot"
    )


def resolve_int8_scheme(name: str = "auto") -> tuple[Int8Scheme, str]:
    """``(scheme, reason)`` for an ``--int8_scheme`` value (``auto`` or a scheme name)."""
    if name == "auto":
        return choose_int8_scheme()
    if name not in INT8_SCHEMES:
        raise ValueError(f"int8 scheme must be auto or one of {sorted(INT8_SCHEMES)}, got {name!r}")
    return INT8_SCHEMES[name], "chosen by --int8_scheme"


def cpu_summary() -> dict[str, Any]:
    """This CPU for a report: machine, processor, and the VNNI flags it has."""
    flags = cpu_flags()
    return {
        "machine": platform.machine(),
        "processor": cpu_model(),
        "vnni_flags": None if flags is None else [f for f in VNNI_FLAGS if f in flags],
    }


class CalibrationReader(CalibrationDataReader):
    """Feeds calibration batches to ONNX Runtime's quantiser.

    Args:
        batches: called with no argument, returns a fresh iterator of float32 arrays
            ``(B, C, F, T)`` (called again on ``rewind``).
        input_name: the model's input name.
    """

    def __init__(
        self, batches: Callable[[], Iterator[np.ndarray]], input_name: str = INPUT_NAME
    ) -> None:
        self._make = batches
        self._input_name = input_name
        self._it: Iterator[np.ndarray] = batches()

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self._input_name: x.astype(np.float32, copy=False)}

    def rewind(self) -> None:
        self._it = self._make()


def quantize_int8(
    fp32_path: str | Path,
    int8_path: str | Path,
    reader: CalibrationDataReader,
    scheme: str | Int8Scheme = "auto",
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    compact_graph: bool = True,
    reason: str | None = None,
) -> Path:
    """Static INT8 quantisation (QDQ) of an fp32 ONNX file.

    Runs ``quant_pre_process`` (shape inference and graph optimisation; ONNX shape
    inference alone when ONNX Runtime's symbolic shape inference gives up, as on
    TinyCNN-CBAM), then ``quantize_static`` with int8 weights in the types of ``scheme``.
    The model metadata is the fp32 file's plus ``earsleep.quantization`` (a JSON object:
    scheme, why it was chosen, its target, the integer types); the quantiser's own keys
    (e.g. ``onnx.quant.pre_process``) and the exporter's per-node debug metadata are
    dropped.

    Args:
        fp32_path: the exported fp32 model.
        int8_path: where to write the quantised model.
        reader: calibration batches (e.g. :class:`CalibrationReader`).
        scheme: ``auto`` (:func:`choose_int8_scheme`: exact on this CPU), a name of
            :data:`INT8_SCHEMES` (``u8s8``, ``u8s7``, ``s8s8``) or an :class:`Int8Scheme`.
        per_channel: one weight scale per output channel.
        calibrate_method: ``minmax``, ``entropy`` or ``percentile``.
        compact_graph: shrink the file with :func:`util.deploy.graph.compact` (same
            computation, same ONNX Runtime kernels); ``False`` keeps the quantiser's
            tensor and node names, for reading the graph.
        reason: why this scheme, for the metadata (default: what
            :func:`resolve_int8_scheme` says).

    Returns:
        ``int8_path``.
    """
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    if calibrate_method not in _CALIB_METHODS:
        raise ValueError(f"calibrate_method must be one of {sorted(_CALIB_METHODS)}")
    if isinstance(scheme, Int8Scheme):
        chosen, why = scheme, "given"
    else:
        chosen, why = resolve_int8_scheme(scheme)
    reason = reason or why
    fp32_path = Path(fp32_path).resolve()
    with tempfile.TemporaryDirectory(prefix="earsleep-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ONNX Runtime's symbolic shape inference leaves ``sym_shape_infer_temp.onnx`` and
        # uuid-named ``.data`` files in the working directory when it gives up (TinyCNN-CBAM):
        # it runs inside the temporary folder instead.
        with _working_directory(tmp):
            try:
                quant_pre_process(str(fp32_path), str(pre))
            except Exception as err:  # e.g. "Incomplete symbolic shape inference" on CBAM
                log.info("symbolic shape inference failed (%s); ONNX shape inference only", err)
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=chosen.reduce_range,
            activation_type=_ACTIVATION_TYPES[chosen.activation_type],
            weight_type=QuantType.QInt8,
            calibrate_method=_CALIB_METHODS[calibrate_method],
            calibration_providers=["CPUExecutionProvider"],
            extra_options={
                "ActivationSymmetric": chosen.symmetric_activations,
                "WeightSymmetric": True,
            },
        )
    source = onnx.load(str(fp32_path), load_external_data=False)
    metadata = {p.key: p.value for p in source.metadata_props}
    proto = onnx.load(str(int8_path))
    strip_debug_info(proto)
    if compact_graph:
        compact(proto)
    del proto.metadata_props[:]
    quantization = {
        "format": "static int8 QDQ",
        "scheme": chosen.name,
        "reason": reason,
        "target": chosen.target,
        "activations": chosen.activation_type
        + (" symmetric" if chosen.symmetric_activations else " asymmetric"),
        "weights": f"int8 symmetric {'7-bit' if chosen.reduce_range else '8-bit'}"
        + (" per-channel" if per_channel else " per-tensor"),
        "calibrate_method": calibrate_method,
    }
    set_metadata(proto, {**metadata, "earsleep.quantization": json.dumps(quantization)})
    onnx.save(proto, str(int8_path))
    return int8_path


@contextlib.contextmanager
def _working_directory(path: str | Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def int8_guard(
    fp32: dict[str, Any], int8: dict[str, Any], max_drop_pp: float = DEFAULT_MAX_INT8_DROP_PP
) -> dict[str, Any]:
    """Judge an int8 file against its fp32 twin on the same clips.

    Args:
        fp32: :func:`util.deploy.runtime.evaluate_onnx` of the fp32 file.
        int8: the same of the int8 file, on the same clips in the same order.
        max_drop_pp: the most macro-F1 (in percentage points) int8 may lose.

    Returns:
        ``fp32`` and ``int8`` (``acc``, ``f1_macro``), ``f1_macro_drop_pp``,
        ``int8_agreement_with_fp32``, ``max_drop_pp`` and ``accepted``.
    """
    if len(fp32["predictions"]) != len(int8["predictions"]):
        raise ValueError("fp32 and int8 were scored on different clips")
    drop = 100 * (fp32["f1_macro"] - int8["f1_macro"])
    agreement = float(np.mean(int8["predictions"] == fp32["predictions"]))
    return {
        "fp32": {"acc": fp32["acc"], "f1_macro": fp32["f1_macro"]},
        "int8": {"acc": int8["acc"], "f1_macro": int8["f1_macro"]},
        "f1_macro_drop_pp": drop,
        "int8_agreement_with_fp32": agreement,
        "max_drop_pp": max_drop_pp,
        "accepted": bool(drop <= max_drop_pp),
    }

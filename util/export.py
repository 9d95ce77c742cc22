"""Ship a trained classifier as ONNX: fp32 and static INT8, checked against PyTorch.

``python -m util.export --ckpt_path <run>/checkpoints/best-….ckpt --int8`` writes, into
``<run>/export/`` unless ``--out`` says otherwise:

- ``<backbone>.onnx``: the whole :class:`~models.classifier.Classifier` forward (band
  standardisation included), so it takes the front end's raw features
  ``features (batch, C, n_mels, time)`` and returns ``logits (batch, K)``; batch and
  time are dynamic axes. Exported with the dynamo exporter
  (``torch.onnx.export(..., dynamo=True)``); class names, feature config and hash
  travel in the model's metadata.
- ``<backbone>.int8.onnx`` (``--int8``): ONNX Runtime static quantisation, QDQ format,
  per-channel int8 weights, calibrated on validation clips after ``quant_pre_process``,
  in the integer types of ``--int8_scheme`` (:data:`INT8_SCHEMES`; ``auto`` picks the
  one that is exact on this CPU, see :func:`choose_int8_scheme`). It is judged against
  fp32 on the validation split and refused (:class:`Int8LossError`) when it loses more
  than ``--max_int8_drop_pp`` (0.5) points of macro-F1.
- ``export_report.json``: parity, file sizes, the int8 scheme and why, int8 against fp32
  on validation, and accuracy / macro-F1 of each file on the test cache, also printed
  as a table.

Which features and caches: the model's features are the ``data`` section of the
run's ``config.yaml`` (LightningCLI writes it next to ``checkpoints/``; ``--config``
names another). From it the validation and test caches are found as the data module
finds them (and built if missing). ``--calib_cache`` / ``--test_cache`` name other
cache files instead; a cache built with another feature config than the model's
(another feature hash) or other classes is refused.

Failures are loud: a backbone with an operator the exporter cannot translate raises
:class:`UnsupportedOperatorError` naming the operator and the backbone; an ONNX model
whose logits differ from PyTorch's by more than ``--tolerance`` raises
:class:`ParityError` with the measured difference (exit status 1 from the CLI).

Why about 1,850 lines, for now: it holds the GRU export op, the exporter's error
forensics, graph compaction, ONNX Runtime sessions, INT8 schemes and quantisation,
scoring, and the CLI. Its split into ``util/deploy/`` (export, quantise, runtime, CLI)
is part of the layout issue (14); until then the sections are marked by banner comments.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import importlib
import itertools
import json
import logging
import math
import os
import platform
import re
import string
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score
from tqdm.auto import tqdm

from data.cache import CacheInfo, build_cache, open_cache, verify
from models.classifier import Classifier
from models.compatibility import IncompatibleError, check_compatible
from util.cpu import cpu_flags, cpu_model, parse_cpu_flags
from util.errors import DEBUG_ENV, debug_requested, report_error

__all__ = [
    "CacheSplit",
    "CalibrationReader",
    "ExportError",
    "FeatureMismatchError",
    "INT8_SCHEMES",
    "Int8LossError",
    "Int8Scheme",
    "OnnxRuntimeRunner",
    "ParityError",
    "RunData",
    "UnsupportedOperatorError",
    "check_parity",
    "choose_int8_scheme",
    "cpu_flags",
    "evaluate_onnx",
    "export_checkpoint",
    "export_onnx",
    "int8_guard",
    "load_classifier",
    "main",
    "ort_session",
    "parse_cpu_flags",
    "quantize_int8",
    "resolve_int8_scheme",
    "resolve_run_data",
]

log = logging.getLogger("util.export")  # not __name__: "__main__" under python -m

INPUT_NAME = "features"
OUTPUT_NAME = "logits"
#: Largest |logit difference| between ONNX fp32 and PyTorch that still counts as equal.
DEFAULT_TOLERANCE = 1e-4
#: Most validation macro-F1 (percentage points) an int8 file may lose against fp32.
DEFAULT_MAX_INT8_DROP_PP = 0.5
#: Least share of validation clips on which this CPU's fused int8 kernels must predict
#: what the QDQ reference arithmetic predicts; below it ``auto`` takes 7-bit weights.
MIN_KERNEL_AGREEMENT = 0.999
REPORT_NAME = "export_report.json"
_CALIB_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


class ExportError(RuntimeError):
    """The model cannot be exported, or its export is not trustworthy."""


class UnsupportedOperatorError(ExportError):
    """The dynamo exporter cannot capture or translate an operator of the backbone.

    Attributes:
        operator: the operator (e.g. ``aten.cummax.default``) or, when the capture
            failed before any operator was recorded, the failing call.
        backbone: class name of the backbone.
    """

    def __init__(self, message: str, operator: str, backbone: str) -> None:
        super().__init__(message)
        self.operator = operator
        self.backbone = backbone


class ParityError(ExportError):
    """ONNX fp32 logits differ from PyTorch's by more than the tolerance.

    Attributes:
        max_abs_diff: the largest absolute logit difference measured.
        tolerance: the allowed difference.
    """

    def __init__(self, message: str, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


class Int8LossError(ExportError):
    """The int8 file loses more validation macro-F1 than allowed against fp32.

    Attributes:
        fp32_f1: fp32 validation macro-F1.
        int8_f1: int8 validation macro-F1.
        drop_pp: ``100 * (fp32_f1 - int8_f1)``.
        max_drop_pp: the allowed drop.
    """

    def __init__(
        self, message: str, fp32_f1: float, int8_f1: float, drop_pp: float, max_drop_pp: float
    ) -> None:
        super().__init__(message)
        self.fp32_f1 = fp32_f1
        self.int8_f1 = int8_f1
        self.drop_pp = drop_pp
        self.max_drop_pp = max_drop_pp


class FeatureMismatchError(ExportError):
    """A cache was built from other features (or classes) than the model was trained on."""


# ---------------------------------------------------------------------------------------
# GRU: captured as one op so that the time axis stays dynamic
# ---------------------------------------------------------------------------------------
# torch.export traces nn.GRU's CompositeImplicitAutograd kernel on fake tensors to learn its
# output shapes; that kernel loops over time steps and fails (or specialises the time axis)
# when the sequence length is a derived size such as T//4 after pooling. Wrapped as a
# custom op with a shape-only fake kernel, the GRU stays one node, which the exporter
# translates with torchlib's aten::gru (one ONNX GRU per layer, linear_before_reset=1).


@torch.library.custom_op("earsleep_export::gru", mutates_args=())
def _gru_op(
    input: torch.Tensor,
    hx: torch.Tensor,
    params: list[torch.Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, h_n = torch.ops.aten.gru.input(
        input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first
    )
    return out.clone(), h_n.clone()  # a custom op's outputs must not alias anything


@_gru_op.register_fake
def _gru_fake(
    input: torch.Tensor,
    hx: torch.Tensor,
    params: list[torch.Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    directions = 2 if bidirectional else 1
    out = input.new_empty((input.shape[0], input.shape[1], directions * hx.shape[2]))
    return out, hx.new_empty(hx.shape)


class _ExportGRU(nn.Module):
    """Calls an ``nn.GRU``'s weights through the ``earsleep_export::gru`` op."""

    def __init__(self, gru: nn.GRU) -> None:
        super().__init__()
        self.gru = gru

    def forward(
        self, x: torch.Tensor, hx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gru
        directions = 2 if g.bidirectional else 1
        if hx is None:
            batch = x.shape[0] if g.batch_first else x.shape[1]
            hx = x.new_zeros((g.num_layers * directions, batch, g.hidden_size))
        return torch.ops.earsleep_export.gru(
            x,
            hx,
            list(g._flat_weights),
            g.bias,
            g.num_layers,
            float(g.dropout),
            g.training,
            g.bidirectional,
            g.batch_first,
        )


def _translation_table() -> dict[Any, Any]:
    from onnxscript.function_libs.torch_lib.ops.core import aten_gru

    return {torch.ops.earsleep_export.gru.default: aten_gru}


def _exportable_copy(model: nn.Module) -> nn.Module:
    """A CPU eval copy of ``model`` with every ``nn.GRU`` routed through the custom op."""
    model = copy.deepcopy(model).cpu().eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GRU:
                setattr(parent, name, _ExportGRU(child))
    return model


# ---------------------------------------------------------------------------------------
# export and its errors
# ---------------------------------------------------------------------------------------


def _backbone_name(model: nn.Module) -> str:
    return type(getattr(model, "backbone", model)).__name__


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    min_time: int = 8,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
    strip_debug: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file with dynamic batch and time axes.

    Args:
        model: a module taking ``(B, C, F, T)`` features (normally a whole
            :class:`~models.classifier.Classifier`, standardisation included). It is
            copied; the caller's module is not touched.
        path: the ``.onnx`` file to write (parents are created).
        input_shape: ``(C, F, T)`` of one example input; ``T`` is only the example.
        min_time: the shortest time axis the exported model must accept.
        opset: ONNX opset; ``None`` takes the exporter's default.
        metadata: string key/values stored in the model's ``metadata_props``, beside
            ``earsleep.backbone``, ``earsleep.model_class`` and, for a Classifier,
            ``earsleep.class_names``, ``earsleep.input_shape`` and ``earsleep.normalize``.
        strip_debug: drop the exporter's per-node debug metadata (Python stack traces,
            FX node names): about 12 KB on TinyCNN, half the size of its int8 weights.

    Returns:
        ``path``.

    Raises:
        UnsupportedOperatorError: an operator cannot be captured or translated; the
            message names it and the backbone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone = _backbone_name(model)
    net = _exportable_copy(model)
    c, f, t = (int(d) for d in input_shape)
    example = torch.randn(2, c, f, max(t, min_time))  # batch 2: 0/1 sizes get specialised
    dims = {0: torch.export.Dim("batch", min=1), 3: torch.export.Dim("time", min=min_time)}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                dynamic_shapes=(dims,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                custom_translation_table=_translation_table(),
                opset_version=opset,
                verbose=False,
            )
    except Exception as err:
        raise _explain_export_failure(err, backbone) from err
    if program is None:  # pragma: no cover - only when f= is given
        raise ExportError(f"the exporter returned no program for {backbone}")
    program.save(str(path))
    proto = onnx.load(str(path))
    if strip_debug:
        strip_debug_info(proto)
    _set_metadata(proto, {**_model_metadata(model), **(metadata or {})})
    onnx.save(proto, str(path))
    return path


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _model_metadata(model: nn.Module) -> dict[str, str]:
    """What a deployment needs to know about the model, as ONNX metadata strings."""
    meta = {"earsleep.backbone": _backbone_name(model), "earsleep.model_class": _class_path(model)}
    if isinstance(model, Classifier):
        meta["earsleep.class_names"] = json.dumps(list(model.class_names))
        meta["earsleep.input_shape"] = json.dumps(list(model.input_shape))
        meta["earsleep.normalize"] = json.dumps(bool(model.normalize))
    return meta


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's log chatter (e.g. 'torchvision is not installed')."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch.export's own deprecation noise, not ours to fix
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_NO_FUNCTION = re.compile(
    r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>"
)
_NODE_TARGET = re.compile(r"target=torch\.ops\.([\w.]+)")
_TORCH_CALL_DIRS = ("/torch/nn/", "/torch/functional.py", "/torch/_tensor.py")


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _summary(err: BaseException) -> str:
    """The innermost exception as one line ``Type: first line``."""
    inner = _exception_chain(err)[-1]
    text = str(inner).strip().split("## Exception summary")[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return f"{type(inner).__name__}: {first}"[:400]


def _failing_call(err: BaseException) -> tuple[str | None, str | None]:
    """``(torch call, model source line)`` where the capture failed.

    The model line is the innermost traceback frame outside the Python installation
    (the backbone's code); the torch call is the innermost ``torch.nn`` frame below
    it, other than ``Module.__call__`` (e.g. ``_VF.gru(...)`` in ``rnn.py``).
    """
    torch_call = user_line = None
    for exc in _exception_chain(err):
        frames = traceback.extract_tb(exc.__traceback__)
        names = [f.filename.replace("\\", "/") for f in frames]
        mine = [
            i
            for i, n in enumerate(names)
            if "site-packages" not in n
            and "/lib/python" not in n
            and not n.endswith("util/export.py")
        ]
        if not mine:
            continue
        frame = frames[mine[-1]]
        user_line = f"{Path(frame.filename).name}:{frame.lineno} `{(frame.line or '').strip()}`"
        torch_call = None
        for f, n in zip(frames[mine[-1] + 1 :], names[mine[-1] + 1 :], strict=True):
            if any(d in n for d in _TORCH_CALL_DIRS) and not n.endswith("/nn/modules/module.py"):
                torch_call = f"`{(f.line or '').strip()}` ({Path(n).name}:{f.lineno})"
    return torch_call, user_line


def _explain_export_failure(err: BaseException, backbone: str) -> ExportError:
    """Turn an exporter exception into an error naming the operator and the backbone."""
    text = "\n".join(str(e) for e in _exception_chain(err))
    found = _NO_FUNCTION.search(text)
    if found:
        op = f"{found.group(1)}.{found.group(2)}"
        return UnsupportedOperatorError(
            f"cannot export backbone {backbone} to ONNX: operator {op} has no ONNX "
            f"translation in the dynamo exporter (torch {torch.__version__}); replace it in "
            f"{backbone} or register an onnxscript function for it",
            operator=op,
            backbone=backbone,
        )
    target = _NODE_TARGET.search(text)
    torch_call, user_line = _failing_call(err)
    if target:
        op = target.group(1)
        return UnsupportedOperatorError(
            f"cannot export backbone {backbone} to ONNX: translating operator {op} failed: "
            f"{_summary(err)}",
            operator=op,
            backbone=backbone,
        )
    op = torch_call or user_line or "unknown"
    where = f" (called from {user_line})" if user_line and torch_call else ""
    return UnsupportedOperatorError(
        f"cannot export backbone {backbone} to ONNX: torch.export could not capture "
        f"operator {op}{where} with dynamic batch and time axes: {_summary(err)}",
        operator=op,
        backbone=backbone,
    )


def strip_debug_info(proto: onnx.ModelProto) -> None:
    """Remove per-node metadata and doc strings in place (the model's own metadata stays)."""

    def strip_graph(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip_graph(attr.g)
                for sub in attr.graphs:
                    strip_graph(sub)

    strip_graph(proto.graph)
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""


def compact(proto: onnx.ModelProto) -> None:
    """Shrink a quantised graph's bookkeeping in place; what it computes stays the same.

    On TinyCNN the int8 weights are 25% of the fp32 file; with this the whole int8 file
    is 28.6% (31% before; see the README):

    - tensors get ids of one or two letters, the most used the shortest (a QDQ graph
      spells each name up to four times); graph inputs and outputs keep their names,
      and the fp32 file keeps all of them, for reading the graph;
    - node names, doc strings, the producer, inner shape annotations (``value_info``,
      which ONNX Runtime infers again) and opset imports of unused domains go, and so
      does the exporter's graph-level metadata (the torch.export signature, which names
      fp32 tensors and means nothing here);
    - the all-zero zero points of int32 bias ``DequantizeLinear`` nodes go: a missing
      zero point means 0 and the int32 input keeps the type. Weight and activation zero
      points stay: ONNX Runtime (1.31) fuses ``Gemm`` to ``QGemm`` only with its weight's
      zero point present, and a ``QuantizeLinear`` takes its output type from its zero point;
    - identical scales and zero points are stored once and shared.

    Metadata of the model (``metadata_props``) is left to the caller.
    """
    graph = proto.graph
    _drop_bias_zero_points(graph)
    _share_quant_params(graph)
    _drop_unused_initializers(graph)
    if not _subgraphs(graph):  # names inside a subgraph may refer to outer ones
        _short_names(graph)
    for node in graph.node:
        node.ClearField("name")
        node.ClearField("doc_string")  # proto2: an empty string set is still written
    for value in (*graph.input, *graph.output):
        del value.metadata_props[:]
        value.ClearField("doc_string")
    del graph.value_info[:]
    del graph.metadata_props[:]
    graph.ClearField("doc_string")
    for field in ("producer_name", "producer_version", "doc_string"):
        proto.ClearField(field)
    used = {node.domain for node in graph.node} | {""}
    unused = [o for o in proto.opset_import if o.domain not in used]
    for opset in unused:
        proto.opset_import.remove(opset)


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every graph nested in ``graph``'s node attributes (``If``, ``Loop``, ``Scan``), recursively."""
    found = []
    for node in graph.node:
        for attr in node.attribute:
            nested = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in nested:
                found += [sub, *_subgraphs(sub)]
    return found


def _is_standard(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _drop_bias_zero_points(graph: onnx.GraphProto) -> None:
    """Drop all-zero zero points of ``DequantizeLinear`` nodes on int32 initializers."""
    inits = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if not _is_standard(node, "DequantizeLinear") or len(node.input) != 3:
            continue
        x, zero_point = inits.get(node.input[0]), inits.get(node.input[2])
        if (
            x is not None
            and zero_point is not None
            and x.data_type == onnx.TensorProto.INT32
            and not onnx.numpy_helper.to_array(zero_point).any()
        ):
            del node.input[2]


def _share_quant_params(graph: onnx.GraphProto) -> None:
    """Point identical scale / zero-point initializers of Q and DQ nodes at one copy.

    Only initializers used nowhere but as a ``QuantizeLinear`` / ``DequantizeLinear``
    scale or zero point are shared; weights and biases keep one consumer each.
    """
    quant_param: dict[str, bool] = {}
    for node in graph.node:
        is_qdq = _is_standard(node, "QuantizeLinear") or _is_standard(node, "DequantizeLinear")
        for i, name in enumerate(node.input):
            quant_param[name] = quant_param.get(name, True) and is_qdq and i in (1, 2)
    for sub in _subgraphs(graph):
        for node in sub.node:
            quant_param.update(dict.fromkeys(node.input, False))
    for value in (*graph.input, *graph.output):
        quant_param[value.name] = False
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for init in graph.initializer:
        if quant_param.get(init.name):
            key = (init.data_type, tuple(init.dims), onnx.numpy_helper.to_array(init).tobytes())
            alias[init.name] = first.setdefault(key, init.name)
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for g in (graph, *_subgraphs(graph)) for node in g.node for name in node.input}
    used |= {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _short_ids() -> Iterator[str]:
    """``a`` … ``Z``, then ``aa`` … ``Z9``, ``aaa`` …: every id starts with a letter."""
    rest = string.ascii_letters + string.digits
    for length in itertools.count(0):
        for head in string.ascii_letters:
            for tail in itertools.product(rest, repeat=length):
                yield head + "".join(tail)


def _short_names(graph: onnx.GraphProto) -> None:
    """Rename every tensor but the graph's inputs and outputs, most used first."""
    keep = {value.name for value in (*graph.input, *graph.output)} | {""}
    uses = collections.Counter(
        name for node in graph.node for name in (*node.input, *node.output) if name not in keep
    )
    uses.update(init.name for init in graph.initializer if init.name not in keep)
    ids = (i for i in _short_ids() if i not in keep)
    names = {name: next(ids) for name, _ in uses.most_common()}
    for init in graph.initializer:
        init.name = names.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            proto.metadata_props.add(key=key, value=str(value))


# ---------------------------------------------------------------------------------------
# INT8 schemes: which integer arithmetic is exact on which CPU
# ---------------------------------------------------------------------------------------
# ONNX Runtime's x86 u8s8 kernels multiply uint8 activations by int8 weights with
# ``vpmaddubsw``, which adds pairs of products into int16 and saturates there (2 × 255 ×
# 127 > 32767) on CPUs without VNNI (AVX2, AVX-512F/BW without VNNI). VNNI's ``vpdpbusd``
# accumulates in int32 and is exact. ARM kernels widen to 32 bits. 7-bit weights
# (``reduce_range``) keep every pair sum within int16, at the cost of one bit of weight
# precision; on a microcontroller (Arm CMSIS-NN, TFLite Micro) every product is summed in
# 32 bits, so the device flavour keeps 8-bit symmetric weights and activations.

#: CPU flags (Linux ``/proc/cpuinfo`` spelling) of x86 int8 dot products with int32 sums.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


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
        flags: CPU feature flags (default: :func:`cpu_flags`); ``None`` when unknown.

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


# ---------------------------------------------------------------------------------------
# ONNX Runtime: sessions, parity, quantisation, scoring
# ---------------------------------------------------------------------------------------


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
            out = session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32, copy=False)})[0]
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max()))
            clips += len(x)
    if clips == 0:
        raise ExportError("no clips to check parity on: the validation cache is empty")
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

    The model is exported once with :func:`export_onnx` (into a temporary folder that
    is deleted as soon as the session holds the graph) and checked against PyTorch with
    :func:`check_parity` on random inputs of two batch sizes before it is used. Calling
    the runner maps features ``(B, C, F, T)`` (any memory layout) to logits ``(B, K)``,
    running ONNX Runtime on pieces of at most ``chunk`` clips: its memory arena then
    holds one piece's activations, not a whole batch's (TinyCNN at batch 64: about
    50 MB less), at the same speed.
    :meth:`models.classifier.Classifier.on_predict_start` builds one for
    ``predict_engine: onnxruntime`` (or ``auto``).

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
        self.num_outputs = int(
            self.session.run([OUTPUT_NAME], {INPUT_NAME: batches[0]})[0].shape[1]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        pieces = [
            self.session.run([OUTPUT_NAME], {INPUT_NAME: array[i : i + self.chunk]})[0]
            for i in range(0, len(array), self.chunk)
        ]
        if not pieces:  # a recording without windows ends with an empty batch
            return torch.zeros(0, self.num_outputs)
        return torch.from_numpy(np.concatenate(pieces))


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
        compact_graph: shrink the file with :func:`compact` (same computation, same
            ONNX Runtime kernels); ``False`` keeps the quantiser's tensor and node
            names, for reading the graph.
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
    _set_metadata(proto, {**metadata, "earsleep.quantization": json.dumps(quantization)})
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
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32, copy=False)})[0]
        preds.append(logits.argmax(axis=1))
        targets.append(np.asarray(y, dtype=np.int64))
    if not preds:
        raise ExportError("no clips to score: the test cache is empty")
    p = torch.from_numpy(np.concatenate(preds).astype(np.int64))
    t = torch.from_numpy(np.concatenate(targets))
    return {
        "acc": float(multiclass_accuracy(p, t, num_classes, average="micro")),
        "f1_macro": float(multiclass_f1_score(p, t, num_classes, average="macro")),
        "clips": int(len(t)),
        "predictions": p.numpy(),
    }


# ---------------------------------------------------------------------------------------
# checkpoint, run config, caches
# ---------------------------------------------------------------------------------------


def load_classifier(ckpt_path: str | Path) -> Classifier:
    """Restore a :class:`Classifier` (or subclass, e.g. a KD student) in eval mode on CPU.

    The class is the checkpoint's own ``_class_path`` (written by LightningCLI) when it
    names a Classifier subclass: ``Classifier.load_from_checkpoint`` alone would
    silently build a plain Classifier from a student's checkpoint, since Lightning
    drops hyperparameters that ``Classifier.__init__`` does not take, ``_class_path``
    included. A KD student never reads its teacher file here.

    Raises:
        ExportError: the checkpoint cannot be restored.
    """
    ckpt_path = Path(ckpt_path)
    cls: type[Classifier] = Classifier
    class_path = _checkpoint_class_path(ckpt_path)  # refuses anything but weights, in one line
    if class_path:
        module_name, _, name = class_path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ExportError(
                f"{ckpt_path} names class {class_path}, which cannot be imported"
            ) from err
        if not (isinstance(found, type) and issubclass(found, Classifier)):
            raise ExportError(f"{ckpt_path} holds a {class_path}, not a Classifier")
        cls = found
    try:
        model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(
            f"cannot restore {ckpt_path} as {cls.__name__}: {type(err).__name__}: {err}"
        ) from err
    return model.eval()


def _checkpoint_class_path(ckpt_path: Path) -> str | None:
    """The ``_class_path`` hyperparameter of a checkpoint, if any.

    The file is read weights-only: a checkpoint holding any other object (whose
    unpickling could run code) is refused, never retried with the full unpickler.

    Raises:
        ExportError: the file is missing, unreadable or holds more than weights.
    """
    from util.checkpoint import CheckpointError, read_checkpoint  # here: the imports are shared

    try:
        checkpoint = read_checkpoint(ckpt_path, what="--ckpt_path")
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    return str(class_path) if class_path else None


@dataclass
class RunData:
    """What the model was trained on, and where its validation and test caches are.

    Attributes:
        config_path: the run config the data section came from.
        feature_config: the front end's resolved parameters.
        feature_hash: sha256 of ``feature_config`` (as in the caches).
        class_names: class names in label order.
        input_shape: ``(C, F, T)`` of one clip's features.
        validation: the validation cache file.
        test: the test cache file.
    """

    config_path: Path | None
    feature_config: dict[str, Any]
    feature_hash: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    validation: Path
    test: Path


def find_run_config(ckpt_path: str | Path) -> Path | None:
    """The run's ``config.yaml``: next to the checkpoint or one folder up (LightningCLI's layout)."""
    ckpt_path = Path(ckpt_path)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def datamodule_from_config(config_path: str | Path) -> Any:
    """Build the run's :class:`~data.datamodule.SleepSoundDataModule` from a config's ``data`` section.

    The section may be inline (a run's ``config.yaml``, an experiment YAML) or a path
    to a data YAML relative to the config (e.g. ``data: data/dreamcatcher_reference.yaml``).
    Nothing is built or read: only the data module object.
    """
    from jsonargparse import ArgumentParser

    from data.datamodule import SleepSoundDataModule

    config_path = Path(config_path)
    if not config_path.is_file():
        raise ExportError(f"no run config at {config_path}")
    config = yaml.safe_load(config_path.read_text()) or {}
    data = config.get("data") if isinstance(config, dict) else None
    if isinstance(data, str):
        for base in (config_path.parent, Path.cwd()):
            if (base / data).is_file():
                data = yaml.safe_load((base / data).read_text())
                break
        else:
            raise ExportError(f"{config_path}: data file {data!r} not found")
    if not isinstance(data, dict):
        raise ExportError(
            f"{config_path} has no data section: pass the config.yaml of the run that "
            "trained the checkpoint (--config)"
        )
    cls: type = SleepSoundDataModule
    if "class_path" in data:  # subclass-mode layout
        module_name, _, name = str(data["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        data = data.get("init_args") or {}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    try:
        parsed = parser.parse_object({"data": data})
        # ``instantiate`` since jsonargparse 4.49; ``instantiate_classes`` before (deprecated)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        return instantiate(parsed).data
    except Exception as err:
        raise ExportError(f"{config_path}: cannot build the data module: {err}") from err


def _config_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    keys = sorted(set(ours) | set(theirs))
    diffs = [
        f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)
    ]
    return "; ".join(diffs) if diffs else "no parameter differs (another front-end version?)"


class CacheSplit:
    """One cache file read in row blocks, checked against the model's features and classes.

    Args:
        path: a complete cache file (see :mod:`data.cache`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.info: CacheInfo = open_cache(self.path)

    def __len__(self) -> int:
        return self.info.n_rows

    def check(
        self,
        feature_hash: str,
        feature_config: dict[str, Any] | None,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        role: str,
    ) -> None:
        """Refuse a cache of other features, classes or shape than the model's.

        Raises:
            FeatureMismatchError: naming both feature hashes (and the differing
                parameters), or both class lists, or both shapes.
        """
        info = self.info
        if info.feature_hash != feature_hash:
            diff = _config_diff(feature_config or {}, info.feature_config)
            raise FeatureMismatchError(
                f"{role} cache {self.path} was built with feature hash {info.feature_hash}, but "
                f"the model was trained on features with hash {feature_hash} ({diff}); "
                "use a cache built with the run's own data config"
            )
        if list(info.classes) != list(class_names):
            raise FeatureMismatchError(
                f"{role} cache {self.path} holds classes {list(info.classes)}, the model "
                f"predicts {list(class_names)}"
            )
        if tuple(info.feature_shape[:2]) != tuple(int(d) for d in input_shape[:2]):
            raise FeatureMismatchError(
                f"{role} cache {self.path} holds features {info.feature_shape}, the model "
                f"takes {tuple(input_shape)}"
            )

    def sample(self, n: int | None, seed: int = 0) -> np.ndarray:
        """Up to ``n`` row indices (all when ``None``), drawn at random and sorted.

        Random, not the first rows: a cache keeps its source's order, which may be
        grouped by label.
        """
        rows = len(self)
        if n is None or n >= rows:
            return np.arange(rows)
        return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))

    def batches(
        self, batch_size: int, indices: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(features float32, labels int64)`` in blocks of ``batch_size`` rows."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        with h5py.File(self.path, "r") as f:
            feats, labels = f["features"], f["labels"]
            for lo in range(0, len(indices), batch_size):
                idx = indices[lo : lo + batch_size]
                if len(idx) and idx[-1] - idx[0] == len(idx) - 1:  # contiguous: one slice read
                    sl = slice(int(idx[0]), int(idx[-1]) + 1)
                    x, y = feats[sl], labels[sl]
                else:
                    x, y = feats[idx], labels[idx]
                yield x.astype(np.float32), y.astype(np.int64)


def resolve_run_data(
    ckpt_path: str | Path,
    model: Classifier,
    config: str | Path | None = None,
    calib_cache: str | Path | None = None,
    test_cache: str | Path | None = None,
    build_missing: bool = True,
    progress: bool = True,
) -> RunData:
    """Find the model's feature config and its validation/test caches.

    The feature config comes from the run config's ``data`` section (``config``, else
    the ``config.yaml`` next to the checkpoint): its front end's hash is what every
    cache must carry. Without explicit cache files, the validation and test caches are
    the data module's own (built when missing and ``build_missing``).

    Raises:
        ExportError: no run config, or one that disagrees with the checkpoint.
        FeatureMismatchError: see :meth:`CacheSplit.check`.
    """
    config_path = Path(config) if config else find_run_config(ckpt_path)
    if config_path is None:
        raise ExportError(
            f"cannot tell which features {ckpt_path} was trained on: no config.yaml next to "
            "it or in its run folder; pass --config <the run's config.yaml>"
        )
    dm = datamodule_from_config(config_path)
    feature_config = dm.features.config()
    feature_hash = dm.features.config_hash()
    class_names = list(dm.class_names)
    input_shape = tuple(int(d) for d in dm.input_shape)
    if class_names != list(model.class_names):
        raise ExportError(
            f"{config_path} names classes {class_names}, the checkpoint {list(model.class_names)}; "
            "pass the config of the run that trained it"
        )
    if input_shape[:2] != tuple(model.input_shape[:2]):
        raise ExportError(
            f"{config_path} gives features {input_shape}, the checkpoint takes "
            f"{tuple(model.input_shape)}; pass the config of the run that trained it"
        )
    try:  # the checkpoint's own record of its front end, where it has one
        check_compatible(
            {"features": model.feature_config},
            feature_config=feature_config,
            what=f"--ckpt_path {ckpt_path}",
        )
    except IncompatibleError as err:
        raise FeatureMismatchError(f"{err} ({config_path})") from err

    def own_cache(split: str) -> Path:
        path = dm.cache_file(split)
        if not path.exists():
            if not build_missing:
                raise ExportError(f"no {split} cache at {path}")
            log.info("building the %s cache at %s", split, path)
            build_cache(
                dm.source,
                split,
                dm.features,
                dm.classes,
                path,
                min_duration_s=dm.min_duration_s,
                progress=progress,
            )
        verify(path, dm.cache_key(split))
        return path

    validation = Path(calib_cache) if calib_cache else own_cache("validation")
    test = Path(test_cache) if test_cache else own_cache("test")
    return RunData(
        config_path, feature_config, feature_hash, class_names, input_shape, validation, test
    )


# ---------------------------------------------------------------------------------------
# the whole pipeline
# ---------------------------------------------------------------------------------------


def _default_out(ckpt_path: Path) -> Path:
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent / "export"
    return ckpt_path.parent / f"{ckpt_path.stem}_export"


def _versions() -> dict[str, str]:
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": getattr(onnxscript, "__version__", "?"),
    }


def export_checkpoint(
    ckpt_path: str | Path,
    config: str | Path | None = None,
    out: str | Path | None = None,
    int8: bool = False,
    calib_cache: str | Path | None = None,
    test_cache: str | Path | None = None,
    calib_clips: int = 300,
    parity_clips: int = 512,
    test_clips: int | None = None,
    batch_size: int = 64,
    tolerance: float = DEFAULT_TOLERANCE,
    min_time: int = 8,
    opset: int | None = None,
    per_channel: bool = True,
    int8_scheme: str = "auto",
    max_int8_drop_pp: float = DEFAULT_MAX_INT8_DROP_PP,
    val_clips: int | None = None,
    calibrate_method: str = "minmax",
    threads: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Export a checkpoint to ONNX (and INT8), check parity, score both on the test cache.

    With ``int8``, the int8 file is also scored against fp32 on the validation split
    (``val_clips`` clips, default all): if it loses more than ``max_int8_drop_pp``
    points of macro-F1 it is kept as ``<backbone>.int8.rejected.onnx``, the report is
    written, and :class:`Int8LossError` is raised.

    See the module docstring and ``python -m util.export --help`` for every argument;
    they are the CLI's options.

    Returns:
        The report (also written to ``<out>/export_report.json``).

    Raises:
        ExportError: any failure (no config, mismatched cache, unsupported operator,
            parity beyond ``tolerance``, an int8 file that loses too much).
    """
    ckpt_path = Path(ckpt_path)
    model = load_classifier(ckpt_path)
    backbone = _backbone_name(model)
    data = resolve_run_data(ckpt_path, model, config, calib_cache, test_cache, progress=progress)
    shape = data.input_shape
    val = CacheSplit(data.validation)
    test = CacheSplit(data.test)
    for split, role in ((val, "calibration/validation"), (test, "test")):
        split.check(data.feature_hash, data.feature_config, data.class_names, shape, role)

    out_dir = Path(out) if out else _default_out(ckpt_path)
    stem = backbone.lower()
    fp32_path = out_dir / f"{stem}.onnx"
    metadata = {
        "earsleep.feature_hash": data.feature_hash,
        "earsleep.feature_config": json.dumps(data.feature_config, sort_keys=True),
        "earsleep.checkpoint": str(ckpt_path),
    }
    log.info("exporting %s (%s) to %s", ckpt_path, backbone, fp32_path)
    export_onnx(model, fp32_path, shape, min_time=min_time, opset=opset, metadata=metadata)
    fp32 = ort_session(fp32_path, threads)
    try:
        parity = check_parity(
            model,
            fp32,
            (x for x, _ in val.batches(batch_size, val.sample(parity_clips, seed))),
            tolerance,
        )
    except ParityError as err:
        failed = fp32_path.with_name(f"{stem}.parity_failed.onnx")
        fp32_path.replace(failed)
        raise ParityError(f"{err} (kept as {failed})", err.max_abs_diff, err.tolerance) from None
    log.info("parity: max |logit diff| %.3g over %d clips", parity["max_abs_diff"], parity["clips"])

    report: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "config": str(data.config_path) if data.config_path else None,
        "model_class": _class_path(model),
        "backbone": backbone,
        "class_names": data.class_names,
        "input_shape": list(shape),
        "feature_hash": data.feature_hash,
        "dynamic_axes": {INPUT_NAME: {"0": "batch", "3": "time"}, OUTPUT_NAME: {"0": "batch"}},
        "min_time": min_time,
        "parity": {**parity, "cache": str(val.path)},
        "files": {"fp32": {"path": str(fp32_path), "bytes": fp32_path.stat().st_size}},
        "versions": _versions(),
    }
    sessions = {"fp32": fp32}
    rejected: Int8LossError | None = None
    if int8:
        val_rows = val.sample(val_clips, seed + 3)

        def score(session: ort.InferenceSession, name: str) -> dict[str, Any]:
            return evaluate_onnx(
                session,
                val.batches(batch_size, val_rows),
                len(data.class_names),
                progress=progress,
                desc=f"validation {name}",
                total=-(-len(val_rows) // batch_size),
            )

        calib_rows = val.sample(calib_clips, seed + 1)
        int8_path = out_dir / f"{stem}.int8.onnx"
        scheme, reason = resolve_int8_scheme(int8_scheme)
        while True:
            reader = CalibrationReader(lambda: (x for x, _ in val.batches(batch_size, calib_rows)))
            log.info(
                "quantising to %s with scheme %s (%s), calibrated on %d validation clips",
                int8_path,
                scheme.name,
                reason,
                len(calib_rows),
            )
            quantize_int8(
                fp32_path,
                int8_path,
                reader,
                scheme=scheme,
                reason=reason,
                per_channel=per_channel,
                calibrate_method=calibrate_method,
            )
            kernels = ort_session(int8_path, threads)
            reference = ort_session(int8_path, threads, optimize=False)
            kernel_scores, reference_scores = score(kernels, "int8"), score(reference, "int8 ref")
            kernel_agreement = float(
                np.mean(kernel_scores["predictions"] == reference_scores["predictions"])
            )
            # ``auto`` read the CPU's flags; this measures what its kernels really compute
            # (an emulator or a hypervisor can report flags the kernels do not get).
            if (
                int8_scheme == "auto"
                and scheme.name == "u8s8"
                and kernel_agreement < MIN_KERNEL_AGREEMENT
            ):
                reason = (
                    f"{reason}, but its int8 kernels agreed with the QDQ reference on only "
                    f"{100 * kernel_agreement:.1f}% of validation clips (saturation): "
                    "7-bit weights instead"
                )
                log.warning("int8: %s", reason)
                scheme = INT8_SCHEMES["u8s7"]
                continue
            break
        # The device flavour is scored as its target computes it (32-bit sums), not with
        # this host's fused kernels; the host schemes with the kernels a user will run.
        sessions["int8"] = reference if scheme.reference_scoring else kernels
        int8_scores = reference_scores if scheme.reference_scoring else kernel_scores
        report["files"]["int8"] = {"path": str(int8_path), "bytes": int8_path.stat().st_size}
        report["files"]["int8"]["ratio_to_fp32"] = (
            report["files"]["int8"]["bytes"] / report["files"]["fp32"]["bytes"]
        )
        report["calibration"] = {
            "cache": str(val.path),
            "clips": int(len(calib_rows)),
            "method": calibrate_method,
            "format": "QDQ",
            "per_channel": per_channel,
            "scheme": scheme.name,
            "scheme_reason": reason,
            "scheme_target": scheme.target,
            "activation_type": scheme.activation_type,
            "symmetric_activations": scheme.symmetric_activations,
            "weight_type": "int8",
            "reduce_range": scheme.reduce_range,
            "scored_with": "QDQ reference (no graph optimisation)"
            if scheme.reference_scoring
            else "ONNX Runtime's fused int8 kernels (ORT_ENABLE_ALL)",
            "kernels_agree_with_reference": kernel_agreement,
            "cpu": _cpu_summary(),
        }
        guard = int8_guard(score(fp32, "fp32"), int8_scores, max_int8_drop_pp)
        report["validation"] = {"cache": str(val.path), "clips": int(len(val_rows)), **guard}
        log.info(
            "int8 on %d validation clips: macro-F1 %.4f vs fp32 %.4f (%+.2f pp), agreement %.2f%%",
            len(val_rows),
            guard["int8"]["f1_macro"],
            guard["fp32"]["f1_macro"],
            -guard["f1_macro_drop_pp"],
            100 * guard["int8_agreement_with_fp32"],
        )
        if not guard["accepted"]:
            kept = int8_path.with_name(f"{stem}.int8.rejected.onnx")
            int8_path.replace(kept)
            report["files"]["int8"]["path"] = str(kept)
            report["files"]["int8"]["rejected"] = True
            rejected = Int8LossError(
                f"int8 (scheme {scheme.name}: {reason}) loses "
                f"{guard['f1_macro_drop_pp']:.2f} pp of validation macro-F1 "
                f"(fp32 {guard['fp32']['f1_macro']:.4f}, int8 {guard['int8']['f1_macro']:.4f}, "
                f"agreement {100 * guard['int8_agreement_with_fp32']:.1f}% on {len(val_rows)} "
                f"clips), more than --max_int8_drop_pp {max_int8_drop_pp:g}; kept as {kept}; "
                f"try another --int8_scheme (one of {', '.join(INT8_SCHEMES)}) or pass "
                f"--max_int8_drop_pp {math.ceil(guard['f1_macro_drop_pp'] + 0.5):g} to accept it",
                fp32_f1=guard["fp32"]["f1_macro"],
                int8_f1=guard["int8"]["f1_macro"],
                drop_pp=guard["f1_macro_drop_pp"],
                max_drop_pp=max_int8_drop_pp,
            )
            del sessions["int8"]

    rows = test.sample(test_clips, seed + 2)
    n_batches = -(-len(rows) // batch_size)
    scores: dict[str, dict[str, Any]] = {}
    for name, session in sessions.items():
        scores[name] = evaluate_onnx(
            session,
            test.batches(batch_size, rows),
            len(data.class_names),
            progress=progress,
            desc=f"test {name}",
            total=n_batches,
        )
    report["test"] = {"cache": str(test.path), "clips": int(len(rows))}
    for name, s in scores.items():
        report["test"][name] = {"acc": s["acc"], "f1_macro": s["f1_macro"]}
    if "int8" in scores:
        agree = float(np.mean(scores["int8"]["predictions"] == scores["fp32"]["predictions"]))
        report["test"]["int8_agreement_with_fp32"] = agree
        report["test"]["f1_macro_drop_pp"] = 100 * (
            scores["fp32"]["f1_macro"] - scores["int8"]["f1_macro"]
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["report_path"] = str(out_dir / REPORT_NAME)
    if rejected is not None:
        raise rejected
    return report


def int8_guard(
    fp32: dict[str, Any], int8: dict[str, Any], max_drop_pp: float = DEFAULT_MAX_INT8_DROP_PP
) -> dict[str, Any]:
    """Judge an int8 file against its fp32 twin on the same clips.

    Args:
        fp32: :func:`evaluate_onnx` of the fp32 file.
        int8: :func:`evaluate_onnx` of the int8 file, on the same clips in the same order.
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


def _cpu_summary() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "machine": platform.machine(),
        "processor": cpu_model(),
        "vnni_flags": None if flags is None else [f for f in VNNI_FLAGS if f in flags],
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a small text table: file size, accuracy and macro-F1 per file."""
    names = [n for n in ("fp32", "int8") if n in report["files"]]
    test = report["test"]
    width = 14
    lines = [
        f"{report['backbone']} ({report['model_class']}), input {report['input_shape']}, "
        f"{test['clips']} test clips",
        f"parity fp32 vs PyTorch: max |logit diff| {report['parity']['max_abs_diff']:.2e} "
        f"on {report['parity']['clips']} validation clips (tolerance {report['parity']['tolerance']:g})",
        "",
        f"{'':<12}" + "".join(f"{'ONNX ' + n:>{width}}" for n in names),
        f"{'file (KiB)':<12}"
        + "".join(f"{report['files'][n]['bytes'] / 1024:>{width}.1f}" for n in names),
        f"{'accuracy':<12}" + "".join(f"{test[n]['acc']:>{width}.4f}" for n in names),
        f"{'macro-F1':<12}" + "".join(f"{test[n]['f1_macro']:>{width}.4f}" for n in names),
    ]
    if "int8" in names:
        cal, val = report["calibration"], report["validation"]
        lines += [
            "",
            f"int8 scheme {cal['scheme']}: {cal['scheme_reason']}; for {cal['scheme_target']}",
            f"int8 file is {100 * report['files']['int8']['ratio_to_fp32']:.1f}% of fp32; "
            f"test macro-F1 change {-test['f1_macro_drop_pp']:+.2f} pp, "
            f"agreement with fp32 {100 * test['int8_agreement_with_fp32']:.2f}%; "
            f"validation {-val['f1_macro_drop_pp']:+.2f} pp, "
            f"{100 * val['int8_agreement_with_fp32']:.2f}% (allowed loss {val['max_drop_pp']:g} pp)",
        ]
    lines.append(f"report: {report.get('report_path', '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` (whose meaning each help text spells out)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m util.export`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m util.export",
        description=(
            "Export a trained earsleep checkpoint (plain or KD student) to ONNX with dynamic "
            "batch and time axes, check it against PyTorch on validation clips, optionally "
            "quantise it to static INT8, and score every file on the test cache. Writes "
            f"<backbone>.onnx, <backbone>.int8.onnx and {REPORT_NAME} into --out."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--ckpt_path", required=True, help="the Lightning checkpoint to export")
    p.add_argument(
        "--config",
        default=None,
        help="the run's config.yaml (its data section gives the features and caches); "
        "default: config.yaml next to the checkpoint or in its run folder",
    )
    p.add_argument("--int8", action="store_true", help="also write a static INT8 (QDQ) model")
    p.add_argument(
        "--out", default=None, help="output folder; default <run>/export next to checkpoints/"
    )
    p.add_argument(
        "--calib_cache",
        default=None,
        help="validation cache file for calibration and parity (default: the run's own); "
        "refused if built with other features or classes",
    )
    p.add_argument(
        "--test_cache",
        default=None,
        help="test cache file to score on (default: the run's own); same checks",
    )
    p.add_argument("--calib_clips", type=int, default=300, help="validation clips to calibrate on")
    p.add_argument(
        "--parity_clips", type=int, default=512, help="validation clips to check parity on"
    )
    p.add_argument(
        "--test_clips", type=int, default=None, help="score on this many test clips (default: all)"
    )
    p.add_argument("--batch_size", type=int, default=64, help="clips per inference batch")
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest allowed |logit difference| between ONNX fp32 and PyTorch",
    )
    p.add_argument(
        "--min_time", type=int, default=8, help="shortest time axis the ONNX model must accept"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--per_channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-output-channel weight scales",
    )
    p.add_argument(
        "--int8_scheme",
        choices=["auto", *INT8_SCHEMES],
        default="auto",
        help="integer types of --int8. auto: exact on this CPU (u8s8 on x86 with VNNI and "
        "on ARM, u8s7 on x86 without VNNI). u8s8: uint8 activations, 8-bit int8 weights. "
        "u8s7: the same with 7-bit weights (x86 without VNNI saturates 8-bit ones). s8s8: "
        "the microcontroller flavour (CMSIS-NN, TFLite Micro), symmetric int8 activations "
        "and weights, scored as its 32-bit-accumulating target computes it",
    )
    p.add_argument(
        "--max_int8_drop_pp",
        type=float,
        default=DEFAULT_MAX_INT8_DROP_PP,
        help="refuse an int8 file that loses more validation macro-F1 than this against "
        "fp32 (percentage points; it is kept as <backbone>.int8.rejected.onnx); inf accepts any",
    )
    p.add_argument(
        "--val_clips",
        type=int,
        default=None,
        help="validation clips to judge int8 against fp32 on (default: all)",
    )
    p.add_argument(
        "--calibrate_method",
        choices=sorted(_CALIB_METHODS),
        default="minmax",
        help="how activation ranges are calibrated",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime threads for scoring (0: all cores)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the clip samples")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show progress bars",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of a failure (also: {DEBUG_ENV}=1)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (1 on any export failure)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # our steps; the exporter's and quantiser's chatter stays quiet
    try:
        report = export_checkpoint(
            args.ckpt_path,
            config=args.config,
            out=args.out,
            int8=args.int8,
            calib_cache=args.calib_cache,
            test_cache=args.test_cache,
            calib_clips=args.calib_clips,
            parity_clips=args.parity_clips,
            test_clips=args.test_clips,
            batch_size=args.batch_size,
            tolerance=args.tolerance,
            min_time=args.min_time,
            opset=args.opset,
            per_channel=args.per_channel,
            int8_scheme=args.int8_scheme,
            max_int8_drop_pp=args.max_int8_drop_pp,
            val_clips=args.val_clips,
            calibrate_method=args.calibrate_method,
            threads=args.threads,
            seed=args.seed,
            progress=args.progress,
        )
    except ExportError as err:
        if args.debug or debug_requested():
            traceback.print_exc()
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # anything else: one line too, the traceback behind --debug
        report_error(err, args.debug or debug_requested(), prefix="export failed")
        return 1
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A PyTorch model to an ONNX file with dynamic batch and time axes, or a clear refusal.

:func:`export_onnx` runs the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) on
a copy of the model in which every ``nn.GRU`` goes through one custom op (so the time
axis stays dynamic), writes the model's metadata (:func:`util.deploy.metadata.model_metadata`)
and drops the exporter's per-node debug metadata. When the exporter fails, the failure is
turned into an :class:`~util.deploy.errors.UnsupportedOperatorError` that names the operator
and the backbone.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from util.deploy.errors import ExportError, UnsupportedOperatorError
from util.deploy.graph import set_metadata, strip_debug_info
from util.deploy.metadata import model_metadata

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "backbone_name", "export_onnx", "run_exporter"]

#: The exported graph's input: raw front-end features ``(batch, C, n_mels, time)``.
INPUT_NAME = "features"
#: The exported graph's output: ``(batch, K)`` logits.
OUTPUT_NAME = "logits"


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
    input: torch.Tensor, hx: torch.Tensor, params: list[torch.Tensor], *flags: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output shapes only; ``flags`` are :func:`_gru_op`'s after ``params`` (4: bidirectional)."""
    directions = 2 if flags[4] else 1
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


def backbone_name(model: nn.Module) -> str:
    """Class name of ``model``'s backbone (of ``model`` itself when it has none)."""
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
            (and over) :func:`util.deploy.metadata.model_metadata`'s.
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
    backbone = backbone_name(model)
    net = _exportable_copy(model)
    c, f, t = (int(d) for d in input_shape)
    example = torch.randn(2, c, f, max(t, min_time))  # batch 2: 0/1 sizes get specialised
    dims = {0: torch.export.Dim("batch", min=1), 3: torch.export.Dim("time", min=min_time)}
    try:
        program = run_exporter(
            net, example, dims, INPUT_NAME, OUTPUT_NAME, opset, _translation_table()
        )
    except Exception as err:
        raise _explain_export_failure(err, backbone) from err
    if program is None:  # pragma: no cover - only when f= is given
        raise ExportError(f"the exporter returned no program for {backbone}")
    program.save(str(path))
    proto = onnx.load(str(path))
    if strip_debug:
        strip_debug_info(proto)
    set_metadata(proto, {**model_metadata(model), **(metadata or {})})
    onnx.save(proto, str(path))
    return path


def run_exporter(
    net: nn.Module,
    example: torch.Tensor,
    dims: dict[int, Any],
    input_name: str,
    output_name: str,
    opset: int | None = None,
    translations: dict[Any, Any] | None = None,
) -> Any:
    """``torch.onnx.export`` (dynamo) of ``net`` on one example input, its chatter silenced.

    The one exporter call of the project (the features-in classifier, the audio front end).

    Args:
        net: the module to export (one tensor in, one out).
        example: an example input.
        dims: the input's dynamic axes (``{axis: torch.export.Dim}``).
        input_name: name of the graph's input.
        output_name: name of the graph's output.
        opset: ONNX opset; ``None`` takes the exporter's default.
        translations: the exporter's ``custom_translation_table``.

    Returns:
        The exporter's ONNX program (``.save(path)`` writes it); exporter errors propagate.
    """
    with _quiet_exporter():
        return torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            dynamic_shapes=(dims,),
            input_names=[input_name],
            output_names=[output_name],
            custom_translation_table=translations,
            opset_version=opset,
            verbose=False,
        )


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


# -- what failed, from the exporter's exception chain ------------------------------------

_NO_FUNCTION = re.compile(
    r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>"
)
_NODE_TARGET = re.compile(r"target=torch\.ops\.([\w.]+)")
_TORCH_CALL_DIRS = ("/torch/nn/", "/torch/functional.py", "/torch/_tensor.py")
_THIS_FILE = "/util/deploy/onnx.py"  # its frames (the GRU wrapper) are not the model's


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
            if "site-packages" not in n and "/lib/python" not in n and not n.endswith(_THIS_FILE)
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

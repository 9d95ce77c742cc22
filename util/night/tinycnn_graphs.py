"""ONNX graphs of pieces of a TinyCNN classifier, built node by node for ONNX Runtime.

:class:`util.night.shared_windows.SharedWindowRunner` runs a TinyCNN one layer at a time
over a long stream of frames and over narrow per-window slabs, so it needs each layer on
its own (conv 3×3 → ReLU, with or without the 2×2 max pool) and the rest of the network
from any layer to the logits. These graphs are a handful of standard operators, so they
are written directly with :mod:`onnx.helper` (milliseconds) rather than traced by the
exporter (seconds each); batch and time axes are dynamic. :func:`tinycnn_layers` reads
the weights out of a classifier (batch norm, when present, folded into the conv).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.backbones.tinycnn import TinyCNN
from models.task import Task

__all__ = ["ConvLayer", "session", "stack_graph", "supports_tinycnn", "tinycnn_layers"]

#: Opset of the graphs (``ReduceMean`` still takes its axes as an attribute).
OPSET = 17


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One TinyCNN block as plain arrays: 3×3 conv (padding 1) with bias, then ReLU."""

    weight: np.ndarray  # (C_out, C_in, 3, 3) float32
    bias: np.ndarray  # (C_out,) float32


def supports_tinycnn(model: nn.Module) -> str | None:
    """Why ``model`` cannot be run as separate TinyCNN layers, or ``None`` when it can.

    It can when it is a task whose forward is the plain ``backbone(standardize(x))`` and
    whose backbone is a :class:`~models.backbones.TinyCNN` (not a subclass that changes
    its blocks, e.g. TinyCNN-CBAM's attention or CRNN's recurrent head) built from the
    stock 3×3/padding-1 convs, ReLU and 2×2 max pooling.
    """
    if not isinstance(model, Task) or type(model).forward is not Task.forward:
        return f"{type(model).__name__} is not a plain earsleep task"
    net = model.backbone
    if not isinstance(net, TinyCNN):
        return f"{type(net).__name__} is not a TinyCNN"
    for name in ("forward_with_maps", "trunk", "after_block", "forward"):
        if getattr(type(net), name) is not getattr(TinyCNN, name):
            return f"{type(net).__name__} overrides TinyCNN.{name}"
    pool = net.pool
    if not (
        isinstance(pool, nn.MaxPool2d)
        and _pair(pool.kernel_size) == (2, 2)
        and _pair(pool.stride) == (2, 2)
        and _pair(pool.padding) == (0, 0)
        and _pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
    ):
        return f"{type(net).__name__} pools with {pool}, not a 2x2 max pool"
    for i, block in enumerate(net.blocks):
        conv = block.conv
        plain = (
            conv.kernel_size == (3, 3)
            and conv.padding == (1, 1)
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and isinstance(block.act, nn.ReLU)
            and isinstance(block.norm, nn.Identity | nn.BatchNorm2d)
        )
        if not plain:
            return f"block {i} of {type(net).__name__} is not conv 3x3 (padding 1) -> ReLU"
    return None


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tinycnn_layers(model: Task) -> tuple[list[ConvLayer], np.ndarray, np.ndarray]:
    """The conv layers, head weight ``(K, C)`` and head bias ``(K,)`` of a TinyCNN task.

    Batch norm (in eval) is folded into its conv, as ONNX Runtime would fold it.
    """
    layers = []
    with torch.no_grad():
        for block in model.backbone.blocks:
            w = block.conv.weight.detach().double().cpu()
            b = (
                block.conv.bias.detach().double().cpu()
                if block.conv.bias is not None
                else torch.zeros(w.shape[0], dtype=torch.float64)
            )
            if isinstance(block.norm, nn.BatchNorm2d):
                bn = block.norm
                scale = bn.weight.double().cpu() / torch.sqrt(
                    bn.running_var.double().cpu() + bn.eps
                )
                w = w * scale[:, None, None, None]
                b = (b - bn.running_mean.double().cpu()) * scale + bn.bias.double().cpu()
            layers.append(ConvLayer(w.float().numpy(), b.float().numpy()))
        head = model.backbone.head
        return (
            layers,
            head.weight.detach().float().cpu().numpy(),
            head.bias.detach().float().cpu().numpy(),
        )


def stack_graph(
    layers: Sequence[ConvLayer],
    pools: Sequence[bool],
    head: tuple[np.ndarray, np.ndarray] | None = None,
    standardize: tuple[np.ndarray, np.ndarray] | None = None,
    phases: bool = False,
    pad_time: bool = True,
) -> bytes:
    """A serialised ONNX model: optional standardisation, conv blocks, optional head.

    Input ``x`` float32 ``(N, C, F, W)``; output ``y``: the last block's map, or with
    ``head`` the logits ``(N, K)`` of the mean over frequency and time then the linear
    layer (TinyCNN's global average pool and head). With ``phases`` (and no head) the
    last block is not pooled in the graph; instead ``y`` is its 2×2 max pool in the
    usual phase (time pairs ``(0, 1), (2, 3), …``) and a second output ``y1`` the pool
    of the time pairs ``(-1, 0), (1, 2), (3, 4), …`` (the first pairs the -inf padding
    with column 0): windows at odd offsets in a shared stream pool in that phase. A
    padded pool, not a shifted copy, so that ONNX Runtime keeps both pools in its blocked
    layout (20 % less time than a ``Slice`` and two pools, measured at a 0.5-s hop).
    With ``pad_time`` false the convs pad only frequency: a slab of columns gives only
    the conv columns whose neighbours it holds (two fewer), as the shared path's window
    edges need (:meth:`util.night.shared_windows.SharedWindowRunner._patches`).

    Args:
        layers: the conv blocks, in order.
        pools: per block, whether its 2×2 max pool follows.
        head: ``(weight (K, C), bias (K,))`` of the linear layer.
        standardize: ``(mean, std)`` of shape ``(C, F, 1)``: ``(x - mean) / std`` first.
    """
    nodes, inits = [], []
    name = "x"

    def const(label: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), label))
        return label

    if standardize is not None:
        mean, std = standardize
        nodes.append(helper.make_node("Sub", [name, const("band_mean", mean)], ["centred"]))
        nodes.append(helper.make_node("Div", ["centred", const("band_std", std)], ["std_x"]))
        name = "std_x"
    for i, (layer, pool) in enumerate(zip(layers, pools, strict=True)):
        w, b = const(f"w{i}", layer.weight), const(f"b{i}", layer.bias)
        pads = [1, 1, 1, 1] if pad_time else [1, 0, 1, 0]  # (F, T) begins, then ends
        nodes.append(helper.make_node("Conv", [name, w, b], [f"conv{i}"], pads=pads))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        name = f"relu{i}"
        if pool:
            nodes.append(
                helper.make_node(
                    "MaxPool", [name], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            name = f"pool{i}"
    if phases:
        if head is not None or (pools and pools[-1]):
            raise ValueError("phases pools the last block itself: give pools[-1] False, no head")
        pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
        nodes.append(helper.make_node("MaxPool", [name], ["y"], **pool))
        nodes.append(helper.make_node("MaxPool", [name], ["y1"], pads=[0, 1, 0, 0], **pool))
    elif head is not None:
        weight, bias = head
        nodes.append(helper.make_node("ReduceMean", [name], ["gap"], axes=[2, 3], keepdims=0))
        hw, hb = const("head_w", weight), const("head_b", bias)
        nodes.append(helper.make_node("Gemm", ["gap", hw, hb], ["y"], transB=1))
    else:
        nodes.append(helper.make_node("Identity", [name], ["y"]))
    dims = ["n", "c", "f", "w"]
    out_dims = ["n", "classes"] if head is not None else ["n", "c_out", "f_out", "w_out"]
    graph = helper.make_graph(
        nodes,
        "tinycnn_piece",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor_value_info(out, TensorProto.FLOAT, out_dims)
            for out in (("y", "y1") if phases else ("y",))
        ],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def session(graph: bytes, threads: int) -> ort.InferenceSession:
    """A CPU session of ``graph``: every optimisation, ``threads`` intra-op threads.

    The settings of :func:`util.deploy.runtime.ort_session` with spinning off (the front
    end and numpy run between the many short runs), from bytes instead of a file.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

"""How big and how fast a model is: parameters, MACs, bytes, activation memory, CPU latency.

Every function takes the per-sample ``input_shape`` (without the batch axis, e.g.
``(1, 64, 501)`` for a mono reference log-mel) and works at batch 1, on a CPU copy of
the model in eval mode, so the caller's model (its device, mode and weights) is never
touched.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "count_macs",
    "count_params",
    "measure_latency",
    "model_bytes",
    "peak_activation_bytes",
    "profile",
]


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()


def _example(input_shape: Sequence[int]) -> torch.Tensor:
    return torch.randn(1, *(int(d) for d in input_shape))


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass at batch 1.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and
    convolutions, including those inside a GRU/LSTM) and halved: one MAC is two FLOPs.
    Element-wise ops (activations, pooling, means, biases) are not counted.

    Args:
        model: any module taking one tensor.
        input_shape: per-sample input shape, without the batch axis.
    """
    model = _cpu_eval_copy(model)
    x = _example(input_shape)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Storage of the weights at three precisions.

    Returns:
        ``fp32``: parameters at 4 bytes each plus every buffer as stored (e.g. batch-norm
        running statistics); ``fp16``: parameters at 2 bytes; ``int8``: parameters at
        1 byte (buffers are folded away by a deployed fp16/int8 graph).
    """
    n = count_params(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"fp32": 4 * n + buffers, "fp16": 2 * n, "int8": n}


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def peak_activation_bytes(
    model: nn.Module, input_shape: Sequence[int], dtype_bytes: int = 4
) -> int:
    """Peak activation memory of one forward pass at batch 1.

    Definition: for every leaf module (one without children) the bytes of its input
    tensors plus the bytes of its output tensors, which must be alive at once while
    the op runs; the peak is the largest such sum over all leaf calls. Tensors that
    share storage (views such as ``Flatten``, in-place ops such as ``ReLU(inplace=True)``,
    ``Identity``) are counted once. Elements are counted at ``dtype_bytes`` each,
    whatever dtype the forward pass used. Weights, functional ops outside leaf modules
    and the allocator's overheads are not included: it is the working set that a
    layer-by-layer executor on a microcontroller needs, a lower bound of PyTorch's own
    peak.

    Args:
        model: any module taking one tensor.
        input_shape: per-sample input shape, without the batch axis.
        dtype_bytes: bytes per activation element (4 fp32, 2 fp16, 1 int8).
    """
    model = _cpu_eval_copy(model)
    peak = 0

    def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal peak
        by_storage: dict[int, int] = {}
        for t in (*_tensors(inputs), *_tensors(output)):
            key = t.untyped_storage().data_ptr()
            by_storage[key] = max(by_storage.get(key, 0), t.numel())
        peak = max(peak, sum(by_storage.values()) * dtype_bytes)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(_example(input_shape))
    finally:
        for h in handles:
            h.remove()
    return peak


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    runs: int = 100,
    warmup: int = 10,
    threads: int = 1,
) -> dict[str, float]:
    """Wall-clock CPU latency of one forward pass at batch 1.

    Runs a CPU copy of the model in eval mode under :func:`torch.inference_mode` with
    ``torch.set_num_threads(threads)``; the previous thread count is restored afterwards.

    Args:
        model: any module taking one tensor.
        input_shape: per-sample input shape, without the batch axis.
        runs: timed forward passes.
        warmup: untimed forward passes first.
        threads: intra-op CPU threads while timing.

    Returns:
        ``median_ms``, ``p90_ms`` (90th percentile), ``runs``, ``warmup``, ``threads``.
    """
    if runs < 1:
        raise ValueError(f"measure_latency needs runs >= 1, got {runs}")
    model = _cpu_eval_copy(model)
    x = _example(input_shape)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times_ms = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(runs):
                start = time.perf_counter_ns()
                model(x)
                times_ms.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        torch.set_num_threads(previous)
    times_ms.sort()
    p90 = times_ms[math.ceil(0.9 * len(times_ms)) - 1]  # nearest-rank percentile
    return {
        "median_ms": statistics.median(times_ms),
        "p90_ms": p90,
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
    }


def profile(
    model: nn.Module,
    input_shape: Sequence[int],
    runs: int = 100,
    warmup: int = 10,
    threads: int = 1,
    latency: bool = True,
) -> dict[str, Any]:
    """All complexity numbers of ``model`` at batch 1 in one flat dict.

    Args:
        model: any module taking one tensor.
        input_shape: per-sample input shape, without the batch axis.
        runs: timed forward passes for the latency.
        warmup: untimed forward passes before timing.
        threads: intra-op CPU threads while timing.
        latency: measure latency (``False`` leaves the latency fields ``None``).

    Returns:
        ``params``, ``macs``, ``bytes_fp32``, ``bytes_fp16``, ``bytes_int8``,
        ``peak_activation_bytes``, ``latency_median_ms``, ``latency_p90_ms``,
        ``latency_threads``, ``input_shape`` (list, without batch).
    """
    sizes = model_bytes(model)
    timing = measure_latency(model, input_shape, runs, warmup, threads) if latency else {}
    return {
        "params": count_params(model),
        "macs": count_macs(model, input_shape),
        "bytes_fp32": sizes["fp32"],
        "bytes_fp16": sizes["fp16"],
        "bytes_int8": sizes["int8"],
        "peak_activation_bytes": peak_activation_bytes(model, input_shape),
        "latency_median_ms": timing.get("median_ms"),
        "latency_p90_ms": timing.get("p90_ms"),
        "latency_threads": timing.get("threads"),
        "input_shape": [int(d) for d in input_shape],
    }

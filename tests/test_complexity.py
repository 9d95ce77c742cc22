"""util.complexity: parameter, MAC, byte and activation counts against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.backbones import CRNN, TinyCNN
from util.complexity import (
    count_macs,
    count_params,
    measure_latency,
    model_bytes,
    peak_activation_bytes,
    profile,
)


def tinycnn_macs_by_hand(in_channels: int, num_classes: int, n_mels: int, frames: int) -> int:
    """Conv MACs = Cout·Cin·3·3·Hout·Wout per 'same' conv (each followed by a 2×2 pool), + linear in·out."""
    macs, cin, h, w = 0, in_channels, n_mels, frames
    for cout in (16, 32, 64):
        macs += cout * cin * 3 * 3 * h * w
        cin, h, w = cout, h // 2, w // 2
    return macs + cin * num_classes


def test_tinycnn_reference_parameter_count():
    assert count_params(TinyCNN(1, 3)) == 23_491
    assert count_params(CRNN(1, 3)) == 73_411


@pytest.mark.parametrize("shape", [(1, 64, 501), (2, 64, 101)])
def test_macs_match_the_analytic_conv_and_linear_count(shape):
    model = TinyCNN(shape[0], 3)
    expected = tinycnn_macs_by_hand(shape[0], 3, shape[1], shape[2])
    assert count_macs(model, shape) == pytest.approx(expected, rel=0.01)


def test_macs_include_the_gru():
    # Per step and layer a GRU does 3 gates × (input·hidden + hidden·hidden) MACs.
    steps, n_in, hidden = 10, 8, 16
    gru = nn.GRU(n_in, hidden, batch_first=True)
    assert count_macs(gru, (steps, n_in)) == steps * 3 * (n_in * hidden + hidden * hidden)


def small_net(inplace: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(4 * 6 * 5, 3),
    )


def test_peak_activation_is_the_largest_input_plus_output_of_a_leaf():
    # Input (1, 1, 6, 5) = 30 elements; conv out 120; ReLU out 120; Flatten is a view; linear out 3.
    # Per leaf: conv 30+120, ReLU 120+120, Flatten 120 (shared storage), Linear 120+3 → peak 240.
    assert peak_activation_bytes(small_net(inplace=False), (1, 6, 5)) == 240 * 4
    assert peak_activation_bytes(small_net(inplace=False), (1, 6, 5), dtype_bytes=1) == 240
    # In place, ReLU's input and output are one tensor: the conv's 30+120 is the peak.
    assert peak_activation_bytes(small_net(inplace=True), (1, 6, 5)) == 150 * 4


def test_model_bytes_counts_parameters_per_precision_and_buffers_in_fp32():
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    params = 10 * 5 + 5 + 5 + 5
    buffers = 5 * 4 + 5 * 4 + 8  # running mean, running var (fp32), num_batches_tracked (int64)
    assert model_bytes(model) == {"fp32": 4 * params + buffers, "fp16": 2 * params, "int8": params}


def test_latency_reports_sane_fields_and_restores_threads():
    threads_before = torch.get_num_threads()
    result = measure_latency(
        TinyCNN(1, 3, channels=(4, 8)), (1, 16, 32), runs=5, warmup=1, threads=1
    )
    assert result["runs"] == 5 and result["threads"] == 1
    assert 0 < result["median_ms"] <= result["p90_ms"]
    assert torch.get_num_threads() == threads_before


def test_profile_combines_everything_and_leaves_the_model_alone():
    model = TinyCNN(2, 3)
    model.train()
    numbers = profile(model, (2, 64, 101), runs=3, warmup=1)
    assert model.training
    assert numbers["params"] == count_params(model)
    assert numbers["macs"] == tinycnn_macs_by_hand(2, 3, 64, 101)
    assert numbers["bytes_fp32"] == 4 * numbers["params"]
    assert numbers["bytes_int8"] == numbers["params"]
    assert numbers["peak_activation_bytes"] > 0
    assert 0 < numbers["latency_median_ms"] <= numbers["latency_p90_ms"]
    assert numbers["input_shape"] == [2, 64, 101]
    without = profile(model, (2, 64, 101), latency=False)
    assert without["latency_median_ms"] is None and without["macs"] == numbers["macs"]

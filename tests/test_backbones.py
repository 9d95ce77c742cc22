"""Backbones honour the contract and the published reference sizes."""

import pytest
import torch

from models.backbones import CBAM, CRNN, Backbone, TinyCNN, TinyCNNCBAM


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_parameter_counts():
    assert n_params(TinyCNN(1, 3)) == 23_491
    assert n_params(CRNN(1, 3, rnn_hidden=64, rnn_layers=2)) == 73_411


@pytest.mark.parametrize(
    ("reduction", "sizes"),
    [(4, (24_061, 24_141, 24_285)), (8, (23_801, 23_881, 24_025)), (16, (23_671, 23_751, 23_895))],
)
def test_cbam_grid_parameter_counts(reduction, sizes):
    got = tuple(n_params(TinyCNNCBAM(1, 3, reduction, k)) for k in (3, 7, 11))
    assert got == sizes


@pytest.mark.parametrize("cls", [TinyCNN, TinyCNNCBAM, CRNN])
@pytest.mark.parametrize("shape", [(1, 64, 501), (2, 64, 101)])
def test_forward_shapes_and_maps(cls, shape):
    model = cls(shape[0], 4)
    assert isinstance(model, Backbone)
    x = torch.randn(3, *shape)
    logits, maps = model.forward_with_maps(x)
    assert logits.shape == (3, 4)
    assert torch.equal(model(x), logits)
    assert [m.shape[1] for m in maps] == [16, 32, 64]
    # maps halve in frequency per block, so a student and the CRNN teacher align layer by layer
    assert [m.shape[2] for m in maps] == [shape[1], shape[1] // 2, shape[1] // 4]


def test_batch_norm_switch_changes_size_only_when_on():
    assert n_params(TinyCNN(1, 3, batch_norm=True)) != 23_491
    assert any(
        isinstance(m, torch.nn.BatchNorm2d) for m in TinyCNN(1, 3, batch_norm=True).modules()
    )
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in TinyCNN(1, 3).modules())


@pytest.mark.parametrize("mode", ["cbam", "channel", "spatial"])
def test_cbam_modes(mode):
    block = CBAM(32, reduction=8, kernel_size=5, mode=mode)
    x = torch.randn(2, 32, 16, 20)
    out = block(x)
    assert out.shape == x.shape
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in block.modules())
    has_mlp = any(isinstance(m, torch.nn.Linear) for m in block.modules())
    assert has_conv == (mode != "channel")
    assert has_mlp == (mode != "spatial")


def test_cbam_rejects_even_kernel_and_bad_mode():
    with pytest.raises(ValueError, match="odd"):
        CBAM(32, kernel_size=4)
    with pytest.raises(ValueError, match="mode"):
        CBAM(32, mode="both")


def test_crnn_pooling_modes_differ():
    torch.manual_seed(0)
    last = CRNN(2, 3, pooling="last")
    mean = CRNN(2, 3, pooling="mean")
    mean.load_state_dict(last.state_dict())
    x = torch.randn(2, 2, 64, 101)
    assert not torch.allclose(last(x), mean(x))
    with pytest.raises(ValueError, match="pooling"):
        CRNN(2, 3, pooling="max")

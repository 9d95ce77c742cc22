"""BC-ResNet: shapes, the size budget against TinyCNN, sub-spectral norm, export, training, KD."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import onnx
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from main import main
from models.backbones import CRNN, Backbone, BCResNet, TinyCNN
from models.backbones.bcresnet import SubSpectralNorm
from models.classifier import Classifier
from models.distillation import DistillationClassifier
from tests.helpers import build_like_cli, tiny_args
from util import deploy as ex
from util.complexity import count_macs, count_params

NATIVE = (2, 64, 101)
REFERENCE = (1, 64, 501)
CLASSES = ["quiet", "breathe", "snore"]
BACKBONE = "models.backbones.BCResNet"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: BC-ResNet's many small ops slow down tenfold on a busy shared CPU
    when two threads wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def calibrate_norms(model: torch.nn.Module, batches: list[np.ndarray]) -> torch.nn.Module:
    """Batch-norm statistics from ``batches`` (as training would leave them), then eval mode.

    With the initial statistics (mean 0, variance 1) an untrained deep model's activations
    shrink layer after layer and its logits hardly depend on the input.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(torch.from_numpy(batch))
    return model.eval()


# -- shapes and size -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [REFERENCE, NATIVE])
def test_forward_shapes_and_maps_align_with_tinycnn(shape):
    model = BCResNet(shape[0], 4).eval()
    assert isinstance(model, Backbone)
    x = torch.randn(3, *shape)
    logits, maps = model.forward_with_maps(x)
    assert logits.shape == (3, 4)
    assert torch.equal(model(x), logits)
    # one map per resolution, the spatial sizes of TinyCNN's (and the CRNN teacher's) maps,
    # so attention transfer pairs them layer by layer
    _, tiny_maps = TinyCNN(shape[0], 4).forward_with_maps(x)
    assert [m.shape[2:] for m in maps] == [m.shape[2:] for m in tiny_maps]


def test_size_and_macs_within_tinycnn_at_the_native_input():
    ours, tiny = BCResNet(NATIVE[0], 3), TinyCNN(NATIVE[0], 3)
    assert count_params(ours) <= count_params(tiny)
    assert count_macs(ours, NATIVE) <= count_macs(tiny, NATIVE)


def test_docstring_sizes_are_the_measured_ones():
    doc = BCResNet.__doc__
    for shape in (NATIVE, REFERENCE):
        model = BCResNet(shape[0], 3)
        assert f"{count_params(model):,}" in doc
        assert f"{count_macs(model, shape) / 1e6:.2f} M" in doc


def test_width_multiplier_scales_size_and_channels():
    sizes = [count_params(BCResNet(2, 3, width=w)) for w in (0.5, 1.0, 1.75, 3.5)]
    assert sizes == sorted(set(sizes))
    assert count_params(BCResNet(2, 3)) == sizes[2]  # the default is width 1.75
    _, maps = BCResNet(2, 3, width=3.5).forward_with_maps(torch.randn(1, *NATIVE))
    _, base = BCResNet(2, 3).forward_with_maps(torch.randn(1, *NATIVE))
    assert [m.shape[1] for m in maps] == [2 * m.shape[1] for m in base]


def test_bad_arguments_get_one_line_errors():
    with pytest.raises(ValueError, match="width"):
        BCResNet(2, 3, width=0)
    with pytest.raises(ValueError, match="one entry per stage"):
        BCResNet(2, 3, stage_channels=(8, 12), blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="sub-bands"):
        BCResNet(2, 3, sub_bands=5)(torch.randn(1, 2, 64, 20))


# -- sub-spectral norm -----------------------------------------------------------------------


def test_sub_spectral_norm_normalises_each_channel_and_sub_band_on_its_own():
    g = torch.Generator().manual_seed(0)
    offset = 5 * torch.randn(3, 4, 1, 1, generator=g)  # per (channel, sub-band)
    scale = 0.5 + 3 * torch.rand(3, 4, 1, 1, generator=g)
    x = (torch.randn(16, 3, 4, 8, 10, generator=g) * scale + offset).flatten(2, 3)  # F = 32

    def per_band(y: torch.Tensor) -> torch.Tensor:
        return y.unflatten(2, (4, 8)).permute(1, 2, 0, 3, 4).reshape(3, 4, -1)

    y = per_band(SubSpectralNorm(3, sub_bands=4).train()(x))
    assert y.mean(-1).abs().max() < 1e-4
    assert (y.std(-1) - 1).abs().max() < 1e-2
    # one batch norm over the channels alone would leave the bands apart
    plain = per_band(torch.nn.BatchNorm2d(3).train()(x))
    assert plain.mean(-1).abs().max() > 0.5


# -- export ----------------------------------------------------------------------------------


def native_classifier(seed: int = 0) -> Classifier:
    """An untrained native BC-ResNet classifier with calibrated norms and band statistics."""
    torch.manual_seed(seed)  # the same weights every run
    model = build_like_cli(
        Classifier,
        BACKBONE,
        {},
        num_classes=3,
        in_channels=2,
        class_names=CLASSES,
        input_shape=list(NATIVE),
    )
    g = torch.Generator().manual_seed(seed)
    model.band_mean.copy_(torch.randn(model.band_mean.shape, generator=g) - 6)
    model.band_std.copy_(torch.rand(model.band_std.shape, generator=g) + 0.5)
    return calibrate_norms(model, [features((16, *NATIVE), seed=100 + i) for i in range(3)])


def features(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Log-mel-like inputs whose clips differ in their spectral shape, not only in noise."""
    rng = np.random.default_rng(seed)
    tilt = rng.uniform(-3, 3, (shape[0], 1, shape[2], 1))
    return (rng.standard_normal(shape) * 2 - 6 + tilt).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Classifier, Path]:
    model = native_classifier()
    return model, ex.export_onnx(model, tmp_path_factory.mktemp("onnx") / "bc.onnx", NATIVE)


def test_onnx_export_matches_pytorch_on_dynamic_batch_and_time(exported):
    model, path = exported
    session = ex.ort_session(path)
    assert session.get_inputs()[0].shape == ["batch", 2, 64, "time"]
    outputs = []
    for shape in [(1, 2, 64, 101), (5, 2, 64, 57), (2, 2, 64, 8)]:
        x = features(shape, seed=shape[0])
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        got = session.run(None, {"features": x})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4
        outputs.append(got)
    assert np.ptp(outputs[1], axis=0).max() > 1e-3  # the logits depend on the input


def test_int8_export_runs_and_stays_close(exported, tmp_path: Path):
    model, fp32 = exported
    reader = ex.CalibrationReader(
        lambda: iter([features((8, *NATIVE), seed) for seed in range(10, 14)])
    )
    int8 = ex.quantize_int8(fp32, tmp_path / "bc.int8.onnx", reader)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {
        n.op_type for n in onnx.load(str(int8)).graph.node
    }
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    session = ex.ort_session(int8)
    assert session.get_inputs()[0].shape == ["batch", 2, 64, "time"]
    x = features((16, 2, 64, 64), seed=20)
    got = session.run(None, {"features": x})[0]
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    # an untrained model's logits are small and close together: int8 must follow how they
    # vary from clip to clip (the accuracy guard on real data is python -m util.deploy's)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9


# -- training --------------------------------------------------------------------------------


def test_cli_fit_trains_and_tests_a_bcresnet(tmp_path: Path):
    """A real (tiny) ``main.py fit`` on the synthetic corpus, then ``test`` from its checkpoint."""
    extra = ["--model.init_args.backbone", BACKBONE, "--trainer.max_epochs", "1"]
    cli = main(["fit", *tiny_args(tmp_path, *extra)])
    assert cli.trainer.state.finished
    assert isinstance(cli.model.backbone, BCResNet)
    best = cli.trainer.checkpoint_callback.best_model_path
    tested = main(["test", *tiny_args(tmp_path, *extra), "--ckpt_path", best])
    assert isinstance(tested.model.backbone, BCResNet)
    assert 0.0 <= float(tested.trainer.callback_metrics["test/f1_macro"]) <= 1.0


SMALL = (1, 16, 24)  # (C, F, T): a second of training


def _loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(48) % 3
    x = torch.randn(48, *SMALL, generator=g) + y[:, None, None, None] * 0.5
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=16)


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def test_kd_student_with_attention_transfer_from_a_crnn_teacher(tmp_path: Path):
    common = {"num_classes": 3, "in_channels": 1, "class_names": CLASSES, "input_shape": SMALL}
    pl.seed_everything(0)
    teacher = build_like_cli(
        Classifier, "models.backbones.CRNN", {"rnn_hidden": 8, "channels": [4, 8, 8]}, **common
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "teacher", monitor="val/f1_macro", mode="max")
    _trainer(tmp_path, max_epochs=1, callbacks=[ckpt]).fit(teacher, *_loaders())
    assert isinstance(teacher.backbone, CRNN)

    student = build_like_cli(
        DistillationClassifier,
        BACKBONE,
        {"width": 0.5},
        teacher_checkpoint=ckpt.best_model_path,
        beta=1.0,  # attention transfer on all three maps: they must align with the teacher's
        **common,
    )
    fit = _trainer(tmp_path, max_epochs=1, log_every_n_steps=1)
    fit.fit(student, *_loaders(1))
    assert {"train/kd_loss", "train/ce_loss", "train/at_loss"} <= set(fit.callback_metrics)
    assert float(fit.callback_metrics["train/at_loss"]) > 0
    assert isinstance(student.backbone, BCResNet)
    assert not any("teacher" in k for k in student.state_dict())

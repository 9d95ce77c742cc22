"""util.deploy: ONNX that matches PyTorch on dynamic axes, INT8 that still classifies, loud failures."""

from __future__ import annotations

import collections
import contextlib
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

from data.cache import build_cache, open_cache
from data.datamodule import SleepSoundDataModule
from data.features import LogMelFrontEnd
from data.sources.synthetic import Synthetic
from models.backbones import Backbone
from models.classifier import Classifier
from models.distillation import DistillationClassifier
from tests.helpers import build_like_cli, save_checkpoint
from util import deploy as ex
from util.callbacks.engine import PredictEngine
from util.cpu import parse_cpu_flags
from util.deploy import export as pipeline
from util.deploy import quantize
from util.deploy.__main__ import build_parser
from util.deploy.__main__ import main as export_main

CLASSES = ["quiet", "breathe", "snore"]
NATIVE = (2, 64, 101)
CLIPS = {"train": 480, "validation": 160, "test": 160}
SEED = 3
TOL = 1e-4
#: int8 file bytes / fp32 file bytes, at most: int8 weights are a quarter of fp32 ones, and both
#: files carry the same ~3 KB of metadata (band statistics, front end, classes).
INT8_RATIO = 0.31


# -- helpers ------------------------------------------------------------------------------


def cli_style(cls: type, backbone: str, backbone_args: dict[str, Any] | None = None, **kwargs: Any):
    """Build ``cls`` as LightningCLI does, so its checkpoint carries ``_class_path``/``_instantiator``."""
    backbone_args = backbone_args or {}
    return build_like_cli(cls, backbone, backbone_args, **kwargs)


def native_classifier(backbone: str = "models.backbones.TinyCNN", **kwargs: Any) -> Classifier:
    """An untrained native-input classifier with non-trivial band statistics."""
    model = cli_style(
        Classifier,
        backbone,
        num_classes=3,
        in_channels=2,
        class_names=CLASSES,
        input_shape=list(NATIVE),
        **kwargs,
    )
    g = torch.Generator().manual_seed(0)
    model.band_mean.copy_(torch.randn(model.band_mean.shape, generator=g) - 6)
    model.band_std.copy_(torch.rand(model.band_std.shape, generator=g) + 0.5)
    return model.eval()


def data_section(cache_dir: Path) -> dict[str, Any]:
    """The ``data`` section of a run config over the small synthetic corpus."""
    return {
        "source": {
            "class_path": "data.sources.synthetic.Synthetic",
            "init_args": {"seed": SEED, "clips_per_split": CLIPS},
        },
        "features": {
            "class_path": "data.features.LogMelFrontEnd",
            "init_args": {"preset": "native"},
        },
        "classes": CLASSES,
        "cache_dir": str(cache_dir),
        "batch_size": 32,
        "progress": False,
    }


def make_run(root: Path, model: pl.LightningModule, cache_dir: Path) -> Path:
    """A LightningCLI-like run folder: ``config.yaml`` beside ``checkpoints/model.ckpt``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"data": data_section(cache_dir)}))
    return save_checkpoint(model, root / "checkpoints" / "model.ckpt")


def random_batches(shapes: list[tuple[int, ...]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 2 - 6).astype(np.float32) for s in shapes]


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caches of the small synthetic corpus (train/validation/test), built once."""
    folder = tmp_path_factory.mktemp("cache")
    dm = SleepSoundDataModule(**{**data_section(folder), "source": _synthetic(), "features": None})
    dm.prepare_data()
    return folder


def _synthetic() -> Synthetic:
    return Synthetic(seed=SEED, clips_per_split=CLIPS)


@pytest.fixture(scope="module")
def tinycnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Classifier, Path]:
    """An untrained TinyCNN classifier and its fp32 ONNX export."""
    model = native_classifier()
    path = ex.export_onnx(model, tmp_path_factory.mktemp("onnx") / "tinycnn.onnx", NATIVE)
    return model, path


# -- the fp32 export ----------------------------------------------------------------------


def test_onnx_matches_pytorch_at_two_batch_sizes_and_lengths(tinycnn) -> None:
    model, path = tinycnn
    session = ex.ort_session(path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ("features", ["batch", 2, 64, "time"])
    assert (out.name, out.shape) == ("logits", ["batch", 3])
    for batch in random_batches([(1, 2, 64, 101), (6, 2, 64, 57)]):
        with torch.inference_mode():
            ref = model(torch.from_numpy(batch)).numpy()
        got = session.run(None, {"features": batch})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= TOL
    # the standardisation is inside the graph: raw features in, same logits out
    assert model.normalize and not torch.all(model.band_mean == 0)


def test_parity_check_fails_loudly_with_the_measured_difference(tinycnn) -> None:
    _, path = tinycnn
    other = native_classifier()  # same architecture, other random weights
    with pytest.raises(ex.ParityError) as info:
        ex.check_parity(other, ex.ort_session(path), random_batches([(2, 2, 64, 101)]), TOL)
    assert info.value.max_abs_diff > TOL
    assert f"{info.value.max_abs_diff:.3g}" in str(info.value)


def test_crnn_exports_with_dynamic_time(tmp_path: Path) -> None:
    """The GRU becomes ONNX GRU nodes and follows any time length."""
    model = native_classifier("models.backbones.CRNN")
    path = ex.export_onnx(model, tmp_path / "crnn.onnx", NATIVE)
    assert "GRU" in {n.op_type for n in onnx.load(str(path)).graph.node}
    stats = ex.check_parity(
        model, ex.ort_session(path), random_batches([(1, 2, 64, 101), (3, 2, 64, 40)]), TOL
    )
    assert stats["clips"] == 4


class CumMaxBackbone(Backbone):
    """A backbone with an operator (cummax) the ONNX exporter cannot translate."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.head = nn.Linear(in_channels, num_classes)

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = torch.cummax(x, dim=3).values
        return self.head(x.mean(dim=(2, 3))), [x]


def test_unexportable_backbone_names_operator_and_backbone(tmp_path: Path) -> None:
    model = Classifier(backbone=CumMaxBackbone, num_classes=3, in_channels=2, input_shape=NATIVE)
    with pytest.raises(ex.UnsupportedOperatorError) as info:
        ex.export_onnx(model, tmp_path / "bad.onnx", NATIVE)
    assert info.value.operator == "aten.cummax.default"
    assert info.value.backbone == "CumMaxBackbone"
    assert "aten.cummax.default" in str(info.value) and "CumMaxBackbone" in str(info.value)


# -- caches, calibration, students ------------------------------------------------------


def test_calibration_cache_with_other_features_is_refused(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = make_run(tmp_path / "run", native_classifier(), cache_dir)
    other = LogMelFrontEnd(eps=1e-3)  # same shape, other features
    ours = LogMelFrontEnd().config_hash()
    assert other.config_hash() != ours
    bad = build_cache(_synthetic(), "validation", other, CLASSES, cache_dir=tmp_path / "other",
                      progress=False)  # fmt: skip
    with pytest.raises(ex.FeatureMismatchError) as info:
        ex.export_checkpoint(ckpt, calib_cache=bad, progress=False)
    assert other.config_hash() in str(info.value) and ours in str(info.value)
    assert not (tmp_path / "run" / "export").exists()  # refused before exporting anything
    # the CLI says the same on stderr and exits non-zero
    assert (
        export_main(["--ckpt_path", str(ckpt), "--calib_cache", str(bad), "--progress", "false"])
        == 1
    )
    err = capsys.readouterr().err
    assert "export failed" in err and other.config_hash() in err and ours in err


def test_kd_student_exports_without_its_teacher(tmp_path: Path, cache_dir: Path) -> None:
    """A student checkpoint whose teacher file does not exist exports like a classifier."""
    student = cli_style(
        DistillationClassifier,
        "models.backbones.TinyCNN",
        teacher_checkpoint=str(tmp_path / "gone" / "teacher.ckpt"),
        num_classes=3,
        in_channels=2,
        class_names=CLASSES,
        input_shape=list(NATIVE),
    )
    ckpt = make_run(tmp_path / "run", student, cache_dir)
    loaded = ex.load_classifier(ckpt)
    assert type(loaded) is DistillationClassifier
    report = ex.export_checkpoint(
        ckpt,
        out=tmp_path / "out",
        int8=True,
        parity_clips=64,
        calib_clips=64,
        progress=False,
        max_int8_drop_pp=float("inf"),  # an untrained student: the guard is tested elsewhere
    )
    assert report["model_class"] == "models.distillation.DistillationClassifier"
    assert report["parity"]["max_abs_diff"] <= TOL
    assert json.loads((tmp_path / "out" / ex.REPORT_NAME).read_text())["backbone"] == "TinyCNN"
    # the student's int8 file is compacted like a plain classifier's
    assert report["files"]["int8"]["ratio_to_fp32"] <= INT8_RATIO
    meta = {p.key: p.value for p in onnx.load(report["files"]["int8"]["path"]).metadata_props}
    assert meta["earsleep.model_class"] == "models.distillation.DistillationClassifier"


# -- INT8 on a trained model ---------------------------------------------------------------


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: on a loaded 2-core machine two OpenMP threads run 5x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synthetic_dm(cache_dir: Path, **overrides: Any) -> SleepSoundDataModule:
    section = {**data_section(cache_dir), "source": _synthetic(), "features": None}
    return SleepSoundDataModule(**{**section, "in_memory": True, **overrides})


def fit_head(model: Classifier, dm: SleepSoundDataModule, steps: int = 300) -> Classifier:
    """Train only the linear head of a TinyCNN on the train split: seconds, not minutes.

    The random conv trunk is a fixed random-feature extractor. Its last conv's output
    channels are rescaled to unit variance of their pooled features (ReLU commutes
    with a positive scale), so that, as after real training, no channel's signal
    hides below another's int8 step; then a class-weighted logistic regression on the
    centred features becomes the head. Test macro-F1 is about 0.74 (chance: 0.33).
    """
    dm.setup("fit")
    mean, std = dm.feature_stats
    model.band_mean.copy_(mean.reshape_as(model.band_mean))
    model.band_std.copy_(std.reshape_as(model.band_std).clamp_min(1e-5))
    split = dm.dataset("train")
    x, y = torch.from_numpy(split.features).float(), split.labels

    def pooled() -> torch.Tensor:
        with torch.no_grad():
            return model.backbone.trunk(model.standardize(x))[0].mean(dim=(2, 3))

    sd = pooled().std(0)
    scale = torch.where(sd > 1e-4, sd, torch.ones_like(sd))  # dead channels stay as they are
    conv = model.backbone.blocks[-1].conv
    with torch.no_grad():
        conv.weight.div_(scale[:, None, None, None])
        conv.bias.div_(scale)
    feats = pooled()
    mu = feats.mean(0)
    head = nn.Linear(feats.shape[1], model.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(feats - mu), y, weight=dm.class_weights).backward()
        opt.step()
    with torch.no_grad():
        model.backbone.head.weight.copy_(head.weight)
        model.backbone.head.bias.copy_(head.bias - head.weight @ mu)
    return model.eval()


def test_int8_is_smaller_and_still_classifies(fitted_run: Path) -> None:
    """Fast: a TinyCNN with a fitted head, quantised in the scheme exact on this CPU, scored.

    Its trunk is random, not trained, so int8 costs it more than a trained model (the demo
    model of corpus v3 loses 0.40 pp of validation macro-F1, inside the default 0.5 pp
    allowance; this one about 3-4 pp on 139 clips): it is judged with a 5 pp allowance.
    """
    report = ex.export_checkpoint(fitted_run, int8=True, progress=False, max_int8_drop_pp=5.0)
    files, test, val = report["files"], report["test"], report["validation"]
    # int8 weights are 25% of fp32; QDQ scales, int32 biases and the fp32 band statistics
    # add under 4% once compacted (the target: at most 30%)
    assert files["int8"]["bytes"] <= INT8_RATIO * files["fp32"]["bytes"]
    assert test["clips"] == open_cache(test["cache"]).n_rows  # every test clip scored
    # chance macro-F1 for three classes is about 0.33; this model reaches about 0.74
    assert test["fp32"]["f1_macro"] > 0.6
    assert test["int8"]["f1_macro"] > 0.6
    assert abs(test["fp32"]["f1_macro"] - test["int8"]["f1_macro"]) < 0.05
    # judged on every validation clip, within the default allowance, and said so
    assert val["clips"] == open_cache(val["cache"]).n_rows
    assert val["accepted"] and val["f1_macro_drop_pp"] <= 5.0
    assert report["calibration"]["clips"] == open_cache(report["calibration"]["cache"]).n_rows
    assert report["calibration"]["scheme"] in ex.INT8_SCHEMES
    assert report["calibration"]["kernels_agree_with_reference"] >= quantize.MIN_KERNEL_AGREEMENT
    assert "int8 scheme" in ex.format_report(report)
    assert ex.ort_session(files["int8"]["path"]).get_inputs()[0].shape == ["batch", 2, 64, "time"]


@pytest.mark.slow
def test_lightning_trained_tinycnn_exports_through_the_cli(tmp_path: Path, cache_dir: Path) -> None:
    """Train a TinyCNN with Lightning, then ``python -m util.deploy --int8 true`` on its run folder."""
    pl.seed_everything(0, workers=True)
    model = native_classifier(freq_mask=0, time_mask=0)
    model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=3e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with one_thread():
        trainer.fit(model, synthetic_dm(cache_dir, batch_size=16))
    ckpt = make_run(tmp_path / "run", model, cache_dir)
    assert (
        export_main(
            [
                "--ckpt_path",
                str(ckpt),
                "--int8",
                "true",
                "--progress",
                "false",
                "--max_int8_drop_pp",
                "3",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "run" / "export" / ex.REPORT_NAME).read_text())
    files, test = report["files"], report["test"]
    # int8 weights are 25% of fp32; QDQ scales, int32 biases and the fp32 band statistics
    # add under 4% once compacted (the target: at most 30%)
    assert files["int8"]["bytes"] <= INT8_RATIO * files["fp32"]["bytes"]
    assert report["parity"]["max_abs_diff"] <= TOL
    assert test["fp32"]["f1_macro"] > 0.7  # about 0.83 after 8 epochs
    assert test["fp32"]["f1_macro"] - test["int8"]["f1_macro"] < 0.03


def test_int8_quantization_keeps_dynamic_axes_and_stays_close(tinycnn, tmp_path: Path) -> None:
    """An untrained model calibrated on random features: QDQ graph, metadata, dynamic axes."""
    model, fp32 = tinycnn
    reader = ex.CalibrationReader(lambda: iter(random_batches([(8, 2, 64, 101)] * 4, seed=1)))
    int8 = ex.quantize_int8(fp32, tmp_path / "tinycnn.int8.onnx", reader)
    graph = onnx.load(str(int8))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    meta = {p.key: p.value for p in graph.metadata_props}
    quantization = json.loads(meta["earsleep.quantization"])
    assert quantization["format"] == "static int8 QDQ"
    assert quantization["scheme"] == ex.choose_int8_scheme()[0].name
    assert json.loads(meta["earsleep.class_names"]) == CLASSES
    session = ex.ort_session(int8)
    for batch in random_batches([(1, 2, 64, 101), (5, 2, 64, 64)], seed=2):
        got = session.run(None, {"features": batch})[0]
        with torch.inference_mode():
            ref = model(torch.from_numpy(batch)).numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 0.1 * (np.abs(ref).max() + 1e-3) + 0.02


# -- the compacted INT8 file ----------------------------------------------------------------


def int8_kernels(path: Path) -> collections.Counter[str]:
    """The quantised kernels ONNX Runtime runs after graph optimisation ALL (QLinearConv, QGemm, …)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # not its warning that the optimised file is CPU-specific
    # keep every initializer inside the file: ORT writes external ones into the working
    # directory (uuid-named .data files at the repository root)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(2**62)
    )
    optimized = path.with_suffix(".optimized.onnx")
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    return collections.Counter(op for op in ops if op.startswith("Q") and op != "QuantizeLinear")


@pytest.mark.parametrize(
    "backbone",
    ["models.backbones.TinyCNN", "models.backbones.TinyCNNCBAM", "models.backbones.CRNN"],
)
def test_compacted_int8_computes_the_same_on_the_same_kernels(
    backbone: str, tinycnn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction only shrinks the file: same logits, same fused int8 kernels, every Q zero point."""
    workdir = tmp_path / "cwd"  # the quantiser leaves nothing in the working directory
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    if backbone.endswith(".TinyCNN"):
        _, fp32 = tinycnn
    else:
        fp32 = ex.export_onnx(native_classifier(backbone), tmp_path / "fp32.onnx", NATIVE)
    files = {}
    for compact in (False, True):
        reader = ex.CalibrationReader(lambda: iter(random_batches([(8, 2, 64, 101)] * 4, seed=1)))
        files[compact] = ex.quantize_int8(
            fp32, tmp_path / f"compact_{compact}.int8.onnx", reader, compact_graph=compact
        )
    full, small = files[False], files[True]
    assert small.stat().st_size < full.stat().st_size
    sessions = [ex.ort_session(f, threads=1) for f in (full, small)]
    for batch in random_batches([(1, 2, 64, 101), (5, 2, 64, 64)], seed=2):
        ref, got = (s.run(None, {"features": batch})[0] for s in sessions)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    kernels = int8_kernels(small)
    assert kernels["QLinearConv"] >= 3 and kernels["QGemm"] >= 1
    assert kernels == int8_kernels(full)
    proto = onnx.load(str(small))
    inits = {i.name: i for i in proto.graph.initializer}
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    # a QuantizeLinear's zero point gives its output type: never dropped
    assert quantize and all(len(n.input) == 3 and n.input[2] in inits for n in quantize)
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in quantize)
    assert not any(n.name for n in proto.graph.node)
    assert not list(workdir.iterdir())  # no sym_shape_infer_temp.onnx, no uuid.data


def test_int8_keeps_the_project_metadata_and_drops_the_quantisers(tinycnn, tmp_path: Path) -> None:
    _, fp32 = tinycnn
    reader = ex.CalibrationReader(lambda: iter(random_batches([(8, 2, 64, 101)] * 2, seed=1)))
    int8 = ex.quantize_int8(fp32, tmp_path / "tinycnn.int8.onnx", reader)
    before = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    after = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert set(after) == {*before, "earsleep.quantization"}
    assert after == {**before, "earsleep.quantization": after["earsleep.quantization"]}
    assert not any(key.startswith("onnx.quant") for key in after)
    assert {"earsleep.class_names", "earsleep.input_shape", "earsleep.normalize"} <= set(after)


# -- ONNX Runtime as the predict engine ---------------------------------------------------


def _predict_probs(model: Classifier, batches: list[torch.Tensor], runtime: str) -> torch.Tensor:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PredictEngine(runtime)])  # fmt: skip
    return torch.cat(trainer.predict(model, torch.utils.data.DataLoader(batches, batch_size=None)))


def _feature_batches() -> list[torch.Tensor]:
    # 40 clips span several runner chunks; the last batch is empty, as a recording
    # without windows ends; channels-last memory as the recording loader hands it over.
    sizes = [(40, *NATIVE), (5, *NATIVE), (0, *NATIVE)]
    return [
        torch.from_numpy(b).contiguous(memory_format=torch.channels_last)
        for b in random_batches(sizes, seed=4)
    ]


def test_predict_engine_onnxruntime_gives_pytorchs_probabilities(monkeypatch) -> None:
    """Every batch runs on ONNX Runtime: the exported model, or TinyCNN's own graphs."""
    from util.night.shared_windows import SharedWindowRunner

    calls = collections.Counter()
    for runner in (ex.OnnxRuntimeRunner, SharedWindowRunner):

        def counted(self, x: torch.Tensor, run=runner.__call__) -> torch.Tensor:
            calls[len(x)] += 1
            return run(self, x)

        monkeypatch.setattr(runner, "__call__", counted)
    batches = _feature_batches()
    torch.manual_seed(0)
    ort_probs = _predict_probs(native_classifier(), batches, "onnxruntime")
    assert calls == {40: 1, 5: 1, 0: 1}  # ONNX Runtime ran every batch
    torch.manual_seed(0)  # the same weights
    torch_probs = _predict_probs(native_classifier(), batches, "torch")
    assert sum(calls.values()) == 3  # and PyTorch ran these
    assert ort_probs.shape == torch_probs.shape == (45, 3)
    torch.testing.assert_close(ort_probs, torch_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ort_probs.sum(1), torch.ones(45))


def test_predict_engine_auto_falls_back_to_torch_when_the_export_fails() -> None:
    batches = _feature_batches()
    kwargs = {"backbone": CumMaxBackbone, "num_classes": 3, "in_channels": 2,
              "input_shape": NATIVE}  # fmt: skip
    model = Classifier(**kwargs)
    with pytest.warns(UserWarning, match=r"ONNX Runtime cannot run CumMaxBackbone.*with torch"):
        probs = _predict_probs(model, batches, "auto")
    with torch.inference_mode():
        want = model(torch.cat(batches)).softmax(1)
    torch.testing.assert_close(probs, want)
    with pytest.raises(ex.UnsupportedOperatorError, match="cummax"):
        _predict_probs(Classifier(**kwargs), batches, "onnxruntime")


def test_predict_engine_is_checked() -> None:
    with pytest.raises(ValueError, match="predict_engine.runtime must be one of"):
        PredictEngine("tensorrt")


# -- INT8 schemes: chosen for the CPU, refused when lossy -----------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes crc32 atomics asimddp
"""


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    assert {"avx2", "avx512f", "avx512bw"} <= parse_cpu_flags(X86_CPUINFO)
    assert "avx512_vnni" not in parse_cpu_flags(X86_CPUINFO)
    assert {"asimd", "asimddp"} <= parse_cpu_flags(ARM_CPUINFO)
    assert parse_cpu_flags("") == set()


@pytest.mark.parametrize(
    ("machine", "flags", "scheme"),
    [
        ("x86_64", {"sse4_2", "avx2", "fma"}, "u8s7"),  # AVX2 only: u8s8 saturates
        ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512vl"}, "u8s7"),  # AVX-512 without VNNI
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "u8s8"),
        ("x86_64", {"avx2", "avx_vnni"}, "u8s8"),  # AVX-VNNI (Alder Lake and later)
        ("x86_64", {"avx2", "amx_int8"}, "u8s8"),
        ("AMD64", None, "u8s7"),  # another x86 whose flags are not known: the safe scheme
        ("aarch64", None, "u8s8"),
        ("arm64", None, "u8s8"),
    ],
)
def test_auto_scheme_follows_the_cpu(machine: str, flags: set[str] | None, scheme: str) -> None:
    chosen, reason = ex.choose_int8_scheme(machine, flags)
    assert chosen.name == scheme
    assert reason  # the report and the metadata say why
    assert ex.INT8_SCHEMES[scheme] is chosen


def test_an_unknown_scheme_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="u8s7"):
        ex.resolve_int8_scheme("u4s4")
    assert build_parser().parse_args(["--ckpt_path", "x"]).int8_scheme == "auto"
    # the CLI's choices are the schemes, and it refuses another in one line
    assert set(typing.get_args(quantize.Int8SchemeName)) == {"auto", *ex.INT8_SCHEMES}
    assert export_main(["--ckpt_path", "x", "--int8_scheme", "u4s4"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "u4s4" in line and "--int8_scheme" in line


def test_the_cli_reads_its_options_from_a_config_file(tmp_path: Path) -> None:
    """``--config`` as in main.py: a YAML of options; the command line still wins."""
    options = tmp_path / "export.yaml"
    options.write_text(yaml.safe_dump({"ckpt_path": "run/best.ckpt", "int8": True, "seed": 3}))
    parsed = build_parser().parse_args(["--config", str(options), "--seed", "5"])
    assert (parsed.ckpt_path, parsed.int8, parsed.seed) == ("run/best.ckpt", True, 5)


def test_a_run_config_given_as_options_file_points_to_run_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config`` once named the run's config.yaml; that file now goes to ``--run_config``."""
    run_config = tmp_path / "config.yaml"
    run_config.write_text(yaml.safe_dump({"data": data_section(tmp_path / "cache")}))
    assert export_main(["--ckpt_path", "x.ckpt", "--config", str(run_config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "--run_config" in line and str(run_config) in line
    assert not (tmp_path / "cache").exists()


def _weights_and_zero_points(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The int8 weight initializers and the activation QuantizeLinear zero points of a QDQ file."""
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    weights = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    return weights, zero_points


@pytest.mark.parametrize("scheme", ["u8s8", "u8s7", "s8s8"])
def test_each_scheme_writes_the_integers_it_names(scheme: str, tinycnn, tmp_path: Path) -> None:
    """Integer types, weight range and symmetry, read back from the file (no kernel runs)."""
    _, fp32 = tinycnn
    reader = ex.CalibrationReader(lambda: iter(random_batches([(8, 2, 64, 101)] * 2, seed=1)))
    path = ex.quantize_int8(fp32, tmp_path / f"{scheme}.int8.onnx", reader, scheme=scheme)
    weights, zero_points = _weights_and_zero_points(path)
    assert weights and zero_points
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    if scheme == "u8s7":
        assert peak <= 64  # 7-bit weights: pair sums of u8 × s7 stay inside int16
    else:
        assert peak == 127  # per-channel symmetric: each channel's largest weight maps to 127
    if scheme == "s8s8":
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8
    else:
        assert all(z.dtype == np.uint8 for z in zero_points)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    quantization = json.loads(meta["earsleep.quantization"])
    assert quantization["scheme"] == scheme
    assert quantization["target"] == ex.INT8_SCHEMES[scheme].target


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A run folder with a TinyCNN whose head is fitted (test macro-F1 about 0.74)."""
    torch.manual_seed(0)
    with one_thread():
        model = fit_head(native_classifier(), synthetic_dm(cache_dir))
    return make_run(tmp_path_factory.mktemp("fitted"), model, cache_dir)


class SqueezedCalibration(ex.CalibrationReader):
    """Calibration on features squeezed to 5% of their spread: real clips then clip in int8."""

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = super().get_next()
        if item is not None:
            x = item["features"]
            item["features"] = (x - x.mean()) * 0.05 + x.mean()
        return item


def test_an_int8_file_that_loses_too_much_is_refused(
    fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(pipeline, "CalibrationReader", SqueezedCalibration)
    out = tmp_path / "out"
    with pytest.raises(ex.Int8LossError) as info:
        ex.export_checkpoint(fitted_run, out=out, int8=True, progress=False)
    err = info.value
    assert err.drop_pp > 0.5 and err.max_drop_pp == 0.5
    message = str(err)
    assert "\n" not in message
    assert f"{err.fp32_f1:.4f}" in message and f"{err.int8_f1:.4f}" in message
    assert "--max_int8_drop_pp" in message
    # nothing is lost: the refused file is kept under a name no one mistakes for a good one
    assert not (out / "tinycnn.int8.onnx").exists()
    assert (out / "tinycnn.int8.rejected.onnx").is_file()
    report = json.loads((out / ex.REPORT_NAME).read_text())
    assert report["validation"]["accepted"] is False
    assert report["files"]["int8"]["rejected"] is True
    # the CLI: exit 1, one line; the flag it names accepts the same file
    args = [
        "--ckpt_path",
        str(fitted_run),
        "--out",
        str(out),
        "--int8",
        "true",
        "--progress",
        "false",
    ]
    assert export_main(args) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("export failed")]
    assert len(lines) == 1 and "loses" in lines[0]
    assert export_main([*args, "--max_int8_drop_pp", ".inf"]) == 0
    assert (out / "tinycnn.int8.onnx").is_file()


def test_auto_takes_7_bit_weights_when_the_kernels_disagree_with_the_reference(
    fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CPU without VNNI does to u8s8, simulated on any CPU: the fallback and its report.

    The CPU is said to have VNNI, and the fused kernels of a u8s8 file are made to answer
    with the logits of other clips (as saturated sums do); ``auto`` must notice against the
    QDQ reference and re-quantise with 7-bit weights.
    """
    monkeypatch.setattr(
        quantize,
        "choose_int8_scheme",
        lambda: (ex.INT8_SCHEMES["u8s8"], "x86 CPU with avx512_vnni"),
    )
    real_session = ex.ort_session

    class Saturating:
        def __init__(self, session: ort.InferenceSession) -> None:
            self.session = session

        def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            (logits,) = self.session.run(names, feed)
            return [np.roll(logits, 1, axis=1)]  # every clip answered as another class

    def session(path: Path, threads: int = 0, spin: bool = True, optimize: bool = True):
        real = real_session(path, threads, spin, optimize)
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        scheme = json.loads(meta.get("earsleep.quantization", "{}")).get("scheme")
        return Saturating(real) if optimize and scheme == "u8s8" else real

    monkeypatch.setattr(pipeline, "ort_session", session)
    report = ex.export_checkpoint(
        fitted_run, out=tmp_path / "out", int8=True, progress=False, max_int8_drop_pp=5
    )
    calibration = report["calibration"]
    assert calibration["scheme"] == "u8s7"
    assert "saturation" in calibration["scheme_reason"]
    assert calibration["kernels_agree_with_reference"] >= quantize.MIN_KERNEL_AGREEMENT
    meta = {p.key: p.value for p in onnx.load(report["files"]["int8"]["path"]).metadata_props}
    assert json.loads(meta["earsleep.quantization"])["scheme"] == "u8s7"
    # asked for by name, a scheme is kept even when the kernels disagree: the guard decides
    with pytest.raises(ex.Int8LossError, match="scheme u8s8"):
        ex.export_checkpoint(
            fitted_run, out=tmp_path / "named", int8=True, int8_scheme="u8s8", progress=False
        )


def test_a_run_config_with_other_features_than_the_checkpoint_is_refused(
    tmp_path: Path, cache_dir: Path
) -> None:
    """The checkpoint records its front end; a config.yaml that disagrees is not believed."""
    model = native_classifier(features=LogMelFrontEnd().config())
    ckpt = make_run(tmp_path / "run", model, cache_dir)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["data"]["features"]["init_args"]["eps"] = 0.1
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ex.FeatureMismatchError, match="eps: trained 1e-06, given 0.1"):
        ex.export_checkpoint(ckpt, progress=False)

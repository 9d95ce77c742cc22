"""The microcontroller export: the CMSIS-DSP front end, C arrays, TFLite Micro, the CLI.

The CMSIS-DSP front end runs for real (``cmsisdsp`` is the ``mcu`` extra's, installed with
the tests). The conversion to ``.tflite`` needs ``litert-torch`` (the ``mcu-convert`` extra,
or ``$EARSLEEP_LITERT_PYTHON`` naming a Python that has it): its test is slow and skipped
without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.features import LogMelFrontEnd
from models.classifier import Classifier
from tests.helpers import build_like_cli, untrained_checkpoint
from util.deploy.errors import ExportError
from util.deploy.mcu.c_array import c_bytes, c_header, c_identifier
from util.deploy.mcu.frontend import CmsisLogMel, pcm16
from util.deploy.mcu.measure import MeasureError, TflmRunner, tflm_arena, vela_estimate

pytest.importorskip("cmsisdsp")  # the mcu extra; CI installs it

CLASSES = ["quiet", "breathe", "snore"]


def _audio(n: int = 2, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """Two-channel test clips: a tone with noise in the in-ear channel, faint noise outside."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    clips = []
    for k in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (200 + 300 * k) * t) + 0.02 * rng.standard_normal(t.size)
        clips.append(np.stack([tone, 0.003 * rng.standard_normal(t.size)]))
    return np.asarray(clips, dtype=np.float32)


def _reference(fe: LogMelFrontEnd, waves: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return fe(torch.from_numpy(waves)).numpy()


# -- the CMSIS-DSP front end -------------------------------------------------------------


def test_f32_front_end_matches_logmel_to_float_rounding() -> None:
    fe = LogMelFrontEnd("native")
    waves = _audio()
    out = CmsisLogMel(fe, "f32")(waves)
    assert out.shape == (2, *fe.output_shape)
    assert np.abs(out - _reference(fe, waves)).max() < 1e-3


def test_q31_front_end_adds_nothing_to_the_16_bit_rounding() -> None:
    """q31 FFT, spectrum re-normalised, 64-bit mel sums: LogMelFrontEnd on the same PCM."""
    fe = LogMelFrontEnd("native")
    waves = _audio(3, seed=1)
    out = CmsisLogMel(fe, "q31")(waves)
    assert np.abs(out - _reference(fe, pcm16(waves))).max() < 1e-3  # measured 1e-5
    diff = np.abs(out - _reference(fe, waves))  # what 16-bit samples change
    assert np.median(diff) < 0.01 and diff.max() < 0.5


def test_q15_front_end_stays_within_its_stated_tolerance() -> None:
    """16-bit PCM, a q15 FFT and q31 mel sums: within 0.05 (median) and 0.35 (p99) in log units."""
    fe = LogMelFrontEnd("native")
    waves = _audio(3, seed=1)
    diff = np.abs(CmsisLogMel(fe, "q15")(waves) - _reference(fe, waves))
    assert np.median(diff) < 0.05
    assert np.percentile(diff, 99) < 0.35
    assert diff.max() < 1.5


def test_fixed_point_paths_read_16_bit_pcm() -> None:
    x = np.array([[0.5, -1.0, 0.999999, 1.5, 1e-6, 3.1e-5]], dtype=np.float32)
    pcm = pcm16(x)
    assert pcm.dtype == np.float32 and pcm.shape == x.shape
    np.testing.assert_array_equal(pcm * 32768, np.round(pcm * 32768))  # whole 16-bit steps
    assert pcm[0, 0] == 0.5 and pcm[0, 1] == -1.0 and pcm[0, 3] == 32767 / 32768  # saturates


@pytest.mark.parametrize("precision", ["q31", "q15"])
def test_block_floating_point_keeps_a_quiet_clip(precision: str) -> None:
    """A clip 60 dB down is normalised per frame, so it loses no more than a loud one."""
    fe = LogMelFrontEnd("native")
    loud = _audio(1, seed=2)
    quiet = loud * 1e-3
    cms = CmsisLogMel(fe, precision)  # type: ignore[arg-type]
    # against the 16-bit audio: the front end's own error, not the rounding of the samples
    err_loud = np.median(np.abs(cms(loud) - _reference(fe, pcm16(loud))))
    err_quiet = np.median(np.abs(cms(quiet) - _reference(fe, pcm16(quiet))))
    assert err_quiet < 0.1 and err_quiet < 4 * err_loud + 0.02


def test_digital_silence_is_log_eps_in_every_precision() -> None:
    fe = LogMelFrontEnd("native")
    silence = np.zeros((1, 2, 16000), dtype=np.float32)
    for precision in ("f32", "q31", "q15"):
        out = CmsisLogMel(fe, precision)(silence)
        np.testing.assert_allclose(out, math.log(1e-6), atol=1e-4)


@pytest.mark.parametrize("precision", ["f32", "q31", "q15"])
def test_reference_preset_db_scale_matches_too(precision: str) -> None:
    fe = LogMelFrontEnd("reference")
    waves = _audio(1, seconds=5.0)
    out = CmsisLogMel(fe, precision)(waves)  # type: ignore[arg-type]
    assert out.shape == (1, *fe.output_shape)
    # the fixed-point paths round the mono downmix to 16 bits, as a microphone would
    mono = fe.adapt(torch.from_numpy(waves)).numpy()
    ref = _reference(fe, mono if precision == "f32" else pcm16(mono))
    # dB; q15's bound is its stated 1.5 log units (6.5 dB), f32 and q31 are exact to 0.01 dB
    assert np.abs(out - ref).max() < {"f32": 1e-2, "q31": 1e-2, "q15": 6.5}[precision]


def test_bad_precision_and_fft_size_are_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        CmsisLogMel(LogMelFrontEnd("native"), "q7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_fft"):
        CmsisLogMel(LogMelFrontEnd("native", n_fft=400), "f32")


def test_memory_and_ops_count_the_buffers_the_device_holds() -> None:
    fe = LogMelFrontEnd("native")
    f32, q31, q15 = (CmsisLogMel(fe, p) for p in ("f32", "q31", "q15"))  # type: ignore[arg-type]
    m = f32.memory()
    assert m["ram_fft_input"] == 512 * 4 and m["ram_power"] == 257 * 4
    assert m["ram_total"] == sum(
        v for k, v in m.items() if k.startswith("ram_") and k != "ram_total"
    )
    assert q15.memory()["ram_fft_input"] == 512 * 2  # 16-bit samples
    assert q31.memory()["ram_fft_input"] == 512 * 4 and q31.memory()["ram_frame_history"] == 800
    assert "ram_power" not in q31.memory()  # the bands read the spectrum itself
    assert q31.ops_per_frame()["mel"] == 6 * q31.bands.nonzero
    assert f32.ops_per_frame()["mel"] == 2 * f32.bands.nonzero
    # the sparse bank holds every non-zero weight of the dense one, and nothing else
    dense = fe.mel.mel_scale.fb.numpy()
    assert f32.bands.nonzero == int(np.count_nonzero(dense))


# -- the export module -------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_unrolled_crnn_computes_what_the_crnn_computes(pooling: str) -> None:
    """The CRNN's GRU is unrolled for TFLite Micro (no 25-input CONCATENATION): same logits."""
    from models.backbones import CRNN
    from util.deploy.mcu.convert import ExportableClassifier, UnrolledGRU

    model = build_like_cli(
        Classifier,
        "models.backbones.CRNN",
        {"pooling": pooling},
        num_classes=3,
        in_channels=2,
        class_names=CLASSES,
        input_shape=[2, 64, 101],
    ).eval()
    exportable = ExportableClassifier(model).eval()
    assert isinstance(exportable.backbone.rnn, UnrolledGRU)
    assert isinstance(model.backbone, CRNN) and isinstance(model.backbone.rnn, torch.nn.GRU)
    x = torch.randn(2, 2, 64, 101) - 6
    with torch.no_grad():
        torch.testing.assert_close(exportable(x), model(x), atol=1e-5, rtol=1e-5)


# -- C sources ---------------------------------------------------------------------------


def test_c_array_holds_exactly_the_bytes() -> None:
    data = bytes(range(256)) * 3 + b"\x01"
    text = c_bytes(data, "tiny-cnn.int8")
    assert "const unsigned char tiny_cnn_int8[]" in text
    assert f"tiny_cnn_int8_len = {len(data)};" in text
    assert "aligned(16)" in text
    back = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", text))
    assert back == data


def test_c_header_writes_tables_defines_and_names() -> None:
    text = c_header(
        "frontend.h",
        {"w": np.array([0.5, 1.0], np.float32), "m": np.arange(6, dtype=np.int16).reshape(2, 3)},
        {"N_FFT": 512, "EPS": 1e-6},
        {"names": ['qu"iet', "snore"]},
    )
    assert "#ifndef FRONTEND_H" in text and "#define N_FFT 512" in text
    assert "static const float w[2] = {0.5f, 1.0f};" in text
    assert "static const int16_t m[2][3]" in text
    assert '"qu\\"iet"' in text
    with pytest.raises(ValueError, match="dimensions"):
        c_header("x", {"t": np.zeros((1, 1, 1), np.float32)})
    assert c_identifier("2x-y") == "_2x_y"


# -- TensorFlow Lite Micro and vela ------------------------------------------------------


def _sine_model() -> bytes:
    """The float sine model that ships with the tflite-micro package."""
    spec = importlib.util.find_spec("tflite_micro")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tflite-micro (the mcu extra) is not installed")
    path = (
        Path(next(iter(spec.submodule_search_locations))) / "python/tflite_micro/sine_float.tflite"
    )
    return path.read_bytes()


def test_tflm_arena_is_the_smallest_that_runs() -> None:
    model = _sine_model()
    found = tflm_arena(model)
    arena = found["arena_bytes"]
    assert 0 < arena < 1 << 16
    assert any("Arena allocation total" in line for line in found["allocations"])
    TflmRunner(model, arena)(np.zeros((1, 1), np.float32))  # runs at that size
    with pytest.raises(RuntimeError):
        TflmRunner(model, arena - 64)(np.zeros((1, 1), np.float32))


def test_tflm_runner_computes_the_model() -> None:
    x = np.array([[0.5], [1.5], [3.0]], dtype=np.float32)
    y = TflmRunner(_sine_model())(x)
    np.testing.assert_allclose(y[:, 0], np.sin(x[:, 0]), atol=0.1)


def test_vela_leaves_a_float_model_to_the_cpu_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "sine.tflite"
    path.write_bytes(_sine_model())
    estimate = vela_estimate(path, tmp_path / "vela")
    assert "FULLY_CONNECTED" in estimate["cpu_ops"]  # float32: nothing runs on the NPU
    assert estimate["npu_cycles"] == 0
    assert "Float32" in estimate["cpu_reasons"]["FULLY_CONNECTED"]
    assert Path(estimate["vela_file"]).is_file()


def test_vela_failure_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.tflite"
    path.write_bytes(b"not a flatbuffer")
    with pytest.raises(MeasureError) as err:
        vela_estimate(path, tmp_path / "vela")
    assert "vela" in str(err.value) and "\n" not in str(err.value)


# -- the command line --------------------------------------------------------------------


def _run(tmp_path: Path) -> Path:
    """A run folder (config.yaml beside checkpoints/model.ckpt) of an untrained TinyCNN."""
    data = {
        "source": {
            "class_path": "data.sources.synthetic.Synthetic",
            "init_args": {
                "seed": 0,
                "clips_per_split": {"train": 24, "validation": 48, "test": 12},
            },
        },
        "features": {
            "class_path": "data.features.LogMelFrontEnd",
            "init_args": {"preset": "native"},
        },
        "classes": CLASSES,
        "cache_dir": str(tmp_path / "cache"),
        "batch_size": 16,
        "progress": False,
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    return untrained_checkpoint(tmp_path / "run" / "checkpoints" / "model.ckpt")


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    from util.deploy.mcu.__main__ import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--ckpt_path", "--out", "--calib_clips", "--frontend_clips", "--converter_python",
                   "--min_agreement", "--accelerator", "--vela"):  # fmt: skip
        assert option in text


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from util.deploy.mcu.__main__ import main

    assert main(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcu export failed:") and "\n" not in err


def test_a_converter_python_that_does_not_exist_is_named(tmp_path: Path) -> None:
    from util.deploy.mcu.convert import to_tflite

    with pytest.raises(ExportError, match="does not exist"):
        to_tflite(
            torch.nn.Identity(), np.zeros((1, 2, 64, 101), np.float32), tmp_path, tmp_path / "py"
        )


def _converter() -> str | None:
    given = os.environ.get("EARSLEEP_LITERT_PYTHON")
    if given and Path(given).is_file():
        return given
    return None if importlib.util.find_spec("litert_torch") is None else ""


@pytest.mark.slow
def test_bundle_is_written_measured_and_described(tmp_path: Path) -> None:
    converter = _converter()
    if converter is None:
        pytest.skip("needs litert-torch (the mcu-convert extra) or $EARSLEEP_LITERT_PYTHON")
    from util.deploy.mcu.__main__ import main

    ckpt = _run(tmp_path)
    out = tmp_path / "bundle"
    args = ["--ckpt_path", str(ckpt), "--out", str(out), "--calib_clips", "32", "--frontend_clips", "4",
            "--min_agreement", "0", "--progress", "false"]  # fmt: skip
    assert main([*args, *(["--converter_python", converter] if converter else [])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tflite = out / "tinycnn.int8.tflite"
    assert manifest["files"]["tinycnn.int8.tflite"]["bytes"] == tflite.stat().st_size
    assert manifest["model"]["float_ops"] == {}  # TinyCNN is int8 throughout
    assert manifest["tflm"]["arena_bytes"] > 0
    assert manifest["vela"]["cycles"] > 0 and manifest["vela"]["sram_bytes"] > 0
    assert 0.0 <= manifest["agreement"]["int8_vs_fp32"] <= 1.0
    assert manifest["frontend"]["clips"] == 4
    assert manifest["frontend"]["f32"]["max_abs_diff"] < 1e-3
    assert manifest["frontend"]["q31"]["vs_pcm16"]["max_abs_diff"] < 1e-3
    assert set(manifest["frontend"]["pcm16"]) >= {"max_abs_diff", "int8_model_agreement"}
    header = (out / "tinycnn_frontend.h").read_text()
    assert "EARSLEEP_INPUT_SCALE" in header and '"snore"' in header
    assert "int32_t earsleep_window_q31[400]" in header  # the q31 front end's window
    assert (out / "tinycnn_model_data.c").read_text().count("0x") == tflite.stat().st_size

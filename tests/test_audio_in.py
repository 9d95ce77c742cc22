"""The audio-in ONNX file: two-channel audio in, the PyTorch pipeline's probabilities out.

Real components throughout: Classifier checkpoints written and restored as the CLI does
(:mod:`tests.helpers`), the project's exporter, ONNX Runtime sessions, synthetic-corpus
sleep sounds. The reference is ``LogMelFrontEnd`` → ``Classifier`` → softmax in PyTorch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from data.features import LogMelFrontEnd
from data.sources.synthetic import Synthetic
from models.classifier import Classifier
from tests.helpers import build_like_cli, save_checkpoint
from util.deploy import audio_in as ai
from util.deploy.__main__ import build_parser
from util.deploy.errors import ExportError, ParityError
from util.deploy.export import load_classifier
from util.deploy.onnx import INPUT_NAME, export_onnx
from util.deploy.quantize import CalibrationReader, quantize_int8
from util.deploy.runtime import ort_session
from util.deploy.standalone import read_metadata

CLASSES = ["quiet", "breathe", "snore"]
#: The issue's bound on |ONNX − PyTorch| class probabilities.
PROB_TOL = 1e-4
#: Feature bounds of the front end alone (log values about -14…5; dB values -80…0).
FEATURE_TOL = {"log": 1e-4, "db": 1e-3}
#: (preset, backbone) of each exported model; the CRNN one runs with ``-m slow``.
CASES: dict[str, tuple[str, str]] = {
    "native-TinyCNN": ("native", "models.backbones.TinyCNN"),
    "reference-TinyCNN": ("reference", "models.backbones.TinyCNN"),
    "native-CRNN": ("native", "models.backbones.CRNN"),
}
FAST_CASES = ["native-TinyCNN", "reference-TinyCNN"]
EVERY_CASE = pytest.mark.parametrize(
    "case", [*FAST_CASES, pytest.param("native-CRNN", marks=pytest.mark.slow)]
)


def sleep_sounds(samples: int, clips: int, seed: int) -> np.ndarray:
    """Synthetic-corpus clips ``(clips, 2, samples)`` at 16 kHz (breathing, snoring, rooms)."""
    source = Synthetic(seed=seed, duration_s=samples / 16000)
    return np.stack([source.synthesize("test", i).waveform for i in range(clips)])


def pytorch_probabilities(model: Classifier, fe: LogMelFrontEnd, audio: np.ndarray) -> np.ndarray:
    """The PyTorch pipeline: front end → classifier → softmax (float64)."""
    with torch.no_grad():
        logits = model(fe(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))))
    return torch.softmax(logits.double(), dim=-1).numpy()


def run(session: ort.InferenceSession, audio: np.ndarray) -> np.ndarray:
    return session.run([ai.PROBABILITIES], {ai.AUDIO_INPUT: audio.astype(np.float32)})[0]


def inner_tensors(
    path: Path, names: list[str], audio: np.ndarray, optimize: bool = True
) -> list[np.ndarray]:
    """Tensors inside an ONNX file, made extra outputs of it, on ``audio``."""
    proto = onnx.load(str(path))
    for name in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(names, {ai.AUDIO_INPUT: audio.astype(np.float32)})


def build(case: str, folder: Path) -> dict[str, Any]:
    """A classifier of ``case`` saved as a CLI-style checkpoint, restored, and exported.

    Band statistics come from real features; the head is scaled so that logits spread by
    a few units: probabilities neither uniform nor saturated, so that a wrong input shows.
    """
    preset, backbone = CASES[case]
    fe = LogMelFrontEnd(preset)
    shape = fe.output_shape
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        model = build_like_cli(
            Classifier,
            backbone,
            num_classes=len(CLASSES),
            in_channels=shape[0],
            class_names=CLASSES,
            input_shape=list(shape),
            features=fe.config(),
            normalize=fe.scale == "log",
        ).eval()
        feats = fe(torch.from_numpy(sleep_sounds(fe.clip_samples, 6, seed=1)))
        model.band_mean.copy_(feats.mean(dim=(0, 3))[..., None])
        model.band_std.copy_(feats.std(dim=(0, 3))[..., None] + 0.1)
        head = model.backbone.head
        spread = (model(feats) - head.bias).std()
        head.weight.mul_(3.0 / float(spread))
    model = load_classifier(save_checkpoint(model, folder / "model.ckpt"))
    features_file = export_onnx(model, folder / "classifier.onnx", shape)
    path = ai.export_audio_onnx(model, folder / "model.audio.onnx", features_file)
    return {
        "fe": fe,
        "model": model,
        "path": path,
        "features_file": features_file,
        "session": ort_session(path, threads=1),
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """:func:`build` of a case, done once per case on first use."""

    @functools.cache
    def get(case: str) -> dict[str, Any]:
        return build(case, tmp_path_factory.mktemp(case))

    return get


# -- equality with the PyTorch pipeline ---------------------------------------------------


@EVERY_CASE
def test_probabilities_equal_the_pytorch_pipeline_on_sleep_sounds(exports, case: str) -> None:
    got = exports(case)
    fe, model, session = got["fe"], got["model"], got["session"]
    n = fe.clip_samples
    rng = np.random.default_rng(4)
    batches = [
        sleep_sounds(n, 6, seed=11),
        (0.05 * rng.standard_normal((3, 2, n))).astype(np.float32),  # loud noise
        (1e-4 * rng.standard_normal((2, 2, n))).astype(np.float32),  # near silence
    ]
    worst, peaks = 0.0, []
    for audio in batches:
        ours, ref = run(session, audio), pytorch_probabilities(model, fe, audio)
        assert ours.shape == (len(audio), len(CLASSES))
        np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-6)
        worst = max(worst, float(np.abs(ours - ref).max()))
        peaks.append(ref.max(axis=1))
    assert worst <= PROB_TOL
    assert np.concatenate(peaks).max() > 0.6  # not uniform: a wrong input would show


@pytest.mark.parametrize("case", FAST_CASES)
def test_other_lengths_are_padded_or_cropped_as_the_front_end_does(exports, case: str) -> None:
    got = exports(case)
    fe, model, session = got["fe"], got["model"], got["session"]
    n = fe.clip_samples
    long = sleep_sounds(2 * n + 123, 2, seed=21)
    for samples in (1, 400, n - 1, n + 1, 2 * n + 123):
        audio = long[:, :, :samples]
        ours, ref = run(session, audio), pytorch_probabilities(model, fe, audio)
        assert np.abs(ours - ref).max() <= PROB_TOL, samples
    # cropping keeps the start: what follows the clip length changes nothing
    tail = long.copy()
    tail[:, :, n:] = 0.5
    np.testing.assert_array_equal(run(session, tail), run(session, long))
    # batch axis is dynamic: one clip alone is what it is in a batch
    np.testing.assert_allclose(run(session, long[1:2]), run(session, long)[1:2], atol=1e-7)


@pytest.mark.parametrize("case", FAST_CASES)
def test_a_mono_recording_passed_twice_is_what_the_front_end_makes_of_one_channel(
    exports, case: str
) -> None:
    got = exports(case)
    fe, model, session = got["fe"], got["model"], got["session"]
    mono = sleep_sounds(fe.clip_samples, 3, seed=31)[:, :1]
    ours = run(session, np.repeat(mono, 2, axis=1))
    assert np.abs(ours - pytorch_probabilities(model, fe, mono)).max() <= PROB_TOL


# -- the file -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", FAST_CASES)
def test_the_file_says_what_it_takes_and_what_it_returns(exports, case: str) -> None:
    got = exports(case)
    fe, session = got["fe"], got["session"]
    (audio,), (probs,) = session.get_inputs(), session.get_outputs()
    assert (audio.name, audio.shape, audio.type) == (
        "audio",
        ["batch", 2, "samples"],
        "tensor(float)",
    )
    assert (probs.name, probs.shape) == ("probabilities", ["batch", len(CLASSES)])
    meta = read_metadata(got["path"])  # the reader of a copied standalone.py
    assert meta["input"] == "audio" and meta["output"] == "probabilities"
    assert json.loads(meta["audio_shape"]) == [2, fe.clip_samples]
    assert json.loads(meta["sample_rate"]) == 16000
    assert meta["class_names"] == CLASSES
    assert meta["feature_config"] == fe.config()
    assert meta["input_shape"] == list(fe.output_shape)  # the features', as in every file
    domains = [o.domain for o in onnx.load(str(got["path"])).opset_import]
    assert len(domains) == len(set(domains))
    with pytest.raises(Exception, match=r"invalid dimensions for input: audio"):
        run(session, np.zeros((1, 1, 16000), np.float32))  # one channel: pass it twice


@pytest.mark.parametrize("case", FAST_CASES)
def test_the_front_end_graph_rebuilds_its_constants_bit_for_bit(exports, case: str) -> None:
    got = exports(case)
    # as float32 initializers the DFT kernel (816 KB) and the mel filters (65 KB) would
    # dominate the file; the front end adds about 21 KB
    assert got["path"].stat().st_size - got["features_file"].stat().st_size < 30_000
    net = ai.AudioFrontEnd(got["fe"])
    audio = np.zeros((1, 2, 100), np.float32)
    for optimize in (False, True):
        kernel, mel = inner_tensors(
            got["path"], ["audio_in/dft", "audio_in/mel_t"], audio, optimize
        )
        np.testing.assert_array_equal(kernel, net.dft.numpy())
        np.testing.assert_array_equal(mel, net.mel_t.numpy())


OPTIONS = {
    "native": {"preset": "native"},
    "reference": {"preset": "reference"},
    "in_ear_zero_padding_no_window_offset": {
        "preset": "native",
        "channels": "in_ear",
        "pad_mode": "constant",
        "n_fft": 256,
        "win_length": 256,
        "hop_length": 128,
        "n_mels": 40,
        "f_min": 0.0,
    },
    "mono_log_slaney": {
        "preset": "native",
        "channels": "mono",
        "mel_scale": "slaney",
        "mel_norm": "slaney",
    },
    "db_half_second": {"preset": "reference", "clip_seconds": 0.5, "f_max": 7000.0},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_exportable_front_end_equals_logmelfrontend(name: str) -> None:
    fe = LogMelFrontEnd(**OPTIONS[name])
    audio = torch.from_numpy(sleep_sounds(int(1.2 * fe.clip_samples), 3, seed=41))
    for samples in (fe.clip_samples // 2, fe.clip_samples, audio.shape[-1]):
        with torch.no_grad():
            ref, ours = fe(audio[..., :samples]), ai.AudioFrontEnd(fe)(audio[..., :samples])
        assert ours.shape == ref.shape == (3, *fe.output_shape)
        assert (ours - ref).abs().max() <= FEATURE_TOL[fe.scale]


def test_an_unusual_front_end_exports_and_equals_logmelfrontend(tmp_path: Path) -> None:
    fe = LogMelFrontEnd(**OPTIONS["in_ear_zero_padding_no_window_offset"])
    session = ort_session(ai.export_front_end(fe, tmp_path / "fe.onnx"), threads=1)
    audio = sleep_sounds(fe.clip_samples + 500, 2, seed=51)
    with torch.no_grad():
        ref = fe(torch.from_numpy(audio)).numpy()
    ours = session.run([INPUT_NAME], {"audio": audio})[0]
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= FEATURE_TOL["log"]


# -- checks and refusals -------------------------------------------------------------------


def test_a_model_without_a_recorded_front_end_is_refused(tmp_path: Path) -> None:
    model = build_like_cli(Classifier, "models.backbones.TinyCNN", class_names=CLASSES)
    with pytest.raises(ExportError, match="records no front end"):
        ai.export_audio_onnx(model, tmp_path / "x.audio.onnx")
    with pytest.raises(ExportError, match=r"gives features \[1, 64, 501\].*takes \[2, 64, 101\]"):
        ai.export_audio_onnx(
            model, tmp_path / "x.audio.onnx", front_end=LogMelFrontEnd("reference")
        )
    assert not (tmp_path / "x.audio.onnx").exists()
    newer = {**LogMelFrontEnd().config(), "version": 99}
    with pytest.raises(ExportError, match="front end version 99 is not this project's"):
        ai.front_end_from_config(newer)


def test_parity_is_measured_on_three_lengths_and_a_file_beyond_it_is_refused(
    exports, tmp_path: Path
) -> None:
    got = exports("native-TinyCNN")
    model, fe = got["model"], got["fe"]
    batches = ai.parity_audio(fe, clips=2)
    assert [b.shape[-1] for b in batches] == [16000, 9600, 20800]  # exact, shorter, longer
    parity = ai.audio_parity(model, fe, got["session"], batches)
    assert parity["max_abs_diff"] <= PROB_TOL and parity["clips"] == 6
    with pytest.raises(ParityError, match=r"differ .* by up to [0-9.e-]+ on 6 clips"):
        ai.audio_parity(model, fe, got["session"], batches, tolerance=1e-12)
    # the CLI's step keeps a file beyond tolerance under another name, and says where
    path = tmp_path / "m.audio.onnx"
    with pytest.raises(ParityError, match="kept as .*m.audio.parity_failed.onnx") as err:
        ai.export_audio_checked(model, got["features_file"], path, fe, tolerance=1e-12, clips=2)
    assert err.value.max_abs_diff > 1e-12
    assert not path.exists() and path.with_name("m.audio.parity_failed.onnx").exists()


def test_the_int8_audio_file_quantises_the_classifier_and_keeps_the_front_end_float(
    exports, tmp_path: Path
) -> None:
    got = exports("native-TinyCNN")
    model, fe = got["model"], got["fe"]
    with torch.no_grad():
        calib = [fe(torch.from_numpy(sleep_sounds(16000, 8, seed=s))).numpy() for s in (61, 62)]
    # u8s7 on every CPU: its integer sums are exact with and without VNNI (``auto`` would
    # pick u8s8 where VNNI is, so the int8 arithmetic, and a borderline clip, would
    # depend on the machine)
    int8_file = quantize_int8(
        got["features_file"],
        tmp_path / "m.int8.onnx",
        CalibrationReader(lambda: iter(calib)),
        scheme="u8s7",
    )
    path = ai.export_audio_onnx(model, tmp_path / "m.audio.int8.onnx", int8_file, fe)
    graph = onnx.load(str(path)).graph
    front = [n for n in graph.node if any(o.startswith("audio_in/") for o in n.output)]
    assert {"Conv", "MatMul", "Log"} <= {n.op_type for n in front}
    assert not any("Quantize" in n.op_type for n in front)  # the front end stays float
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the classifier is int8
    # exactly the int8 file run on the float front end's features
    audio = sleep_sounds(16000, 6, seed=63)
    (x,) = inner_tensors(got["path"], ["audio_in/features"], audio)  # the fp32 file's
    logits = ort_session(int8_file, threads=1).run(["logits"], {INPUT_NAME: x})[0]
    ref = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    ours = run(ort_session(path, threads=1), audio)
    assert np.abs(ours - ref).max() <= 1e-6
    # int8 keeps the float pipeline's class wherever the float one is decisive (a clip
    # within 0.1 of a tie may go either way after quantisation)
    float_probs = pytorch_probabilities(model, fe, audio)
    top2 = np.sort(float_probs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 0.1
    assert clear.sum() >= 4
    assert np.array_equal(ours.argmax(axis=1)[clear], float_probs.argmax(axis=1)[clear])


# -- the command line ---------------------------------------------------------------------


def test_the_cli_documents_audio_in() -> None:
    text = build_parser().format_help()
    assert "--audio_in {true,false}" in text and "<backbone>.audio.onnx" in text


@pytest.mark.slow
def test_the_cli_writes_and_reports_the_audio_in_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m util.deploy --int8 true --audio_in true`` on a run folder (about a minute)."""
    from tests.test_export import make_run, native_classifier
    from util.deploy.__main__ import main

    model = native_classifier(features=LogMelFrontEnd().config())
    ckpt = make_run(tmp_path / "run", model, tmp_path / "cache")
    argv = ["--ckpt_path", str(ckpt), "--int8", "true", "--audio_in", "true"]
    assert main([*argv, "--progress", "false", "--max_int8_drop_pp", "100"]) == 0
    report = json.loads((tmp_path / "run" / "export" / "export_report.json").read_text())
    section = report["audio_in"]
    assert section["fp32"]["path"].endswith("tinycnn.audio.onnx")
    assert section["fp32"]["parity"]["max_abs_diff"] <= PROB_TOL
    assert section["int8"]["path"].endswith("tinycnn.audio.int8.onnx")
    assert section["int8"]["vs_int8_features_file"]["argmax_agreement"] == 1.0
    printed = capsys.readouterr().out
    assert "audio-in fp32" in printed and "audio-in int8" in printed


def test_the_standalone_predictor_refuses_an_audio_in_file_in_one_line(exports) -> None:
    from util.deploy.standalone import StandaloneError, StandaloneModel

    with pytest.raises(StandaloneError, match="takes audio, not features"):
        StandaloneModel(exports("native-TinyCNN")["path"])

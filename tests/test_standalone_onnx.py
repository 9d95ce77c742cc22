"""An exported ONNX file runs with only onnxruntime, numpy and its own metadata.

Real components throughout: a TinyCNN Classifier over a real LogMelFrontEnd's config,
exported by the project's exporter, run by ``util/deploy/standalone.py``.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from data.features import LogMelFrontEnd
from data.sources.synthetic import Synthetic
from models.classifier import Classifier
from tests.helpers import build_like_cli
from util.deploy.metadata import model_metadata
from util.deploy.onnx import export_onnx
from util.deploy.quantize import CalibrationReader, quantize_int8
from util.deploy.standalone import (
    FrontEnd,
    StandaloneError,
    StandaloneModel,
    main,
    read_metadata,
    read_wav,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "util" / "deploy" / "standalone.py"
CLASSES = ["quiet", "breathe", "snore"]
#: Two front ends: the default, and a non-default one (mono, dB scale, Slaney mel scale
#: and area norm, zero padding, 40 bands) whose model skips band standardisation.
FRONT_ENDS: dict[str, dict[str, Any]] = {
    "native": {"preset": "native"},
    "mono_db_slaney": {"preset": "reference", "clip_seconds": 1.0, "n_mels": 40},
}
#: Largest |numpy − LogMelFrontEnd| feature difference allowed, per scale (measured
#: 3.6e-5 on log features of about -14…5 and 9.2e-5 dB on dB features of -80…0).
FEATURE_TOL = {"log": 1e-4, "db": 1e-3}
PROB_TOL = 1e-4
#: What the standalone script must run without.
BLOCKED = ("torch", "torchaudio", "lightning", "torchmetrics", "onnx", "data", "models", "util")


@functools.cache
def clips() -> tuple[np.ndarray, ...]:
    """Synthetic-corpus clips plus a short mono and a long stereo clip (padding, cropping)."""
    syn = Synthetic(seed=5)
    rng = np.random.default_rng(0)
    out = [syn.synthesize("test", i).waveform for i in range(4)]
    out.append(0.2 * rng.standard_normal((1, 9000)).astype(np.float32))
    out.append(0.05 * rng.standard_normal((2, 20000)).astype(np.float32))
    for clip in out:
        clip.setflags(write=False)  # shared by every test
    return tuple(out)


def pytorch_probabilities(model: Classifier, fe: LogMelFrontEnd, wave_: np.ndarray) -> np.ndarray:
    """The PyTorch pipeline: front end → model → softmax."""
    with torch.no_grad():
        logits = model(fe(torch.tensor(wave_)[None]))
    return torch.softmax(logits.double(), dim=-1)[0].numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Callable[[str], dict[str, Any]]:
    """:func:`build_and_export` of a front end's name, done once per name on first use."""

    @functools.cache
    def get(name: str) -> dict[str, Any]:
        return build_and_export(name, tmp_path_factory.mktemp(name))

    return get


@pytest.fixture
def exported(exports, name: str) -> dict[str, Any]:
    """The exported model of front end ``name`` (each test parametrizes ``name``)."""
    return exports(name)


EVERY_FRONT_END = pytest.mark.parametrize("name", sorted(FRONT_ENDS))
NATIVE_ONLY = pytest.mark.parametrize("name", ["native"])


def build_and_export(name: str, folder: Path) -> dict[str, Any]:
    """A TinyCNN over front end ``name`` with band statistics of real features, exported."""
    fe = LogMelFrontEnd(**FRONT_ENDS[name])
    shape = fe.output_shape
    with torch.random.fork_rng(), torch.no_grad():  # the same weights in every run
        torch.manual_seed(0)
        model = build_like_cli(
            Classifier,
            "models.backbones.TinyCNN",
            num_classes=len(CLASSES),
            in_channels=shape[0],
            class_names=CLASSES,
            input_shape=list(shape),
            features=fe.config(),
            normalize=fe.scale == "log",
        ).eval()
        feats = fe(torch.from_numpy(np.stack(clips()[:4])))
        mean = feats.mean(dim=(0, 3))[..., None]
        model.band_mean.copy_(mean + 0.1 * torch.randn_like(mean))
        model.band_std.copy_(feats.std(dim=(0, 3))[..., None] + 0.3)
        # scale the head so that logits spread by a few units: probabilities neither
        # uniform nor saturated, so that a wrong input shows in them
        head = model.backbone.head
        spread = (model(feats) - head.bias).std()
        head.weight.mul_(3.0 / float(spread))
    path = export_onnx(model, folder / "tinycnn.onnx", shape)
    return {"name": name, "fe": fe, "model": model, "path": path}


# -- (a) metadata -------------------------------------------------------------------------


@EVERY_FRONT_END
def test_metadata_round_trips_config_classes_and_band_statistics(exported) -> None:
    fe, model = exported["fe"], exported["model"]
    meta = read_metadata(exported["path"])
    assert meta["feature_config"] == fe.config()
    assert meta["feature_hash"] == fe.config_hash()
    assert meta["class_names"] == CLASSES
    assert meta["input_shape"] == list(fe.output_shape)
    assert meta["normalize"] is model.normalize
    assert meta["standardized_in_graph"] is True
    assert meta["backbone"] == "TinyCNN"
    assert meta["model_class"] == "models.classifier.Classifier"
    for name in ("band_mean", "band_std"):
        theirs, ours = meta[name], getattr(model, name).numpy()
        assert theirs.dtype == np.float32 and theirs.shape == ours.shape
        assert np.array_equal(theirs, ours)  # bit for bit, not approximately


@EVERY_FRONT_END
def test_every_exported_key_is_the_model_metadata(exported) -> None:
    props = {p.key: p.value for p in onnx.load(str(exported["path"])).metadata_props}
    assert model_metadata(exported["model"]).items() <= props.items()


def test_band_statistics_survive_float32_values_that_print_long(tmp_path: Path) -> None:
    fe = LogMelFrontEnd("native")
    model = build_like_cli(
        Classifier, "models.backbones.TinyCNN", features=fe.config(), class_names=CLASSES
    )
    g = torch.Generator().manual_seed(1)
    model.band_mean.copy_(torch.randn(model.band_mean.shape, generator=g) * 1e-7 - 13.7)
    model.band_std.copy_(torch.rand(model.band_std.shape, generator=g) * 3e4 + 1e-5)
    meta = model_metadata(model)
    stored = json.loads(meta["earsleep.band_std"])
    assert stored["dtype"] == "<f4" and stored["shape"] == list(model.band_std.shape[:2])
    back = np.frombuffer(base64.b64decode(stored["base64"]), dtype="<f4").reshape(stored["shape"])
    assert np.array_equal(back[..., None], model.band_std.numpy())


# -- (b) features -------------------------------------------------------------------------


@EVERY_FRONT_END
def test_numpy_features_equal_the_front_end(exported) -> None:
    fe = exported["fe"]
    numpy_fe = FrontEnd(fe.config())
    assert numpy_fe.output_shape == fe.output_shape
    worst = 0.0
    for clip in clips():
        ours = numpy_fe(clip, fe.sample_rate)
        theirs = fe(torch.tensor(clip)[None])[0].numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= FEATURE_TOL[fe.scale]


@pytest.mark.parametrize(
    "options",
    [
        {"channels": "in_ear", "pad_mode": "constant", "mel_norm": "slaney"},
        {"n_fft": 400, "win_length": 256, "hop_length": 128, "f_min": 0.0, "f_max": 7600.0},
        {"scale": "db", "mel_scale": "slaney", "eps": 1e-3, "clip_seconds": 0.75},
    ],
)
def test_numpy_features_follow_every_option(options: dict[str, Any]) -> None:
    fe = LogMelFrontEnd("native", **options)
    numpy_fe = FrontEnd(fe.config())
    clip = clips()[0]
    theirs = fe(torch.tensor(clip)[None])[0].numpy()
    assert np.abs(numpy_fe(clip, fe.sample_rate) - theirs).max() <= FEATURE_TOL[fe.scale]


# -- (c) probabilities --------------------------------------------------------------------


@EVERY_FRONT_END
def test_standalone_probabilities_equal_the_pytorch_pipeline(exported) -> None:
    fe, model = exported["fe"], exported["model"]
    standalone = StandaloneModel(exported["path"])
    assert standalone.class_names == CLASSES
    ours = np.stack([standalone.probabilities(c, fe.sample_rate) for c in clips()])
    theirs = np.stack([pytorch_probabilities(model, fe, c) for c in clips()])
    assert ours.shape == (len(clips()), len(CLASSES))
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-9)
    assert np.abs(ours - theirs).max() <= PROB_TOL
    assert np.ptp(theirs, axis=0).max() > 0.02  # the clips do get different answers


@NATIVE_ONLY
def test_a_file_that_leaves_standardisation_to_the_caller_gets_it_applied(
    exported, tmp_path: Path
) -> None:
    """``standardized_in_graph: false`` (a backbone-only graph) is standardised in numpy."""
    fe, model = exported["fe"], exported["model"]
    assert model.normalize
    path = export_onnx(model.backbone, tmp_path / "backbone.onnx", fe.output_shape)
    proto = onnx.load(str(path))
    meta = model_metadata(model, standardized_in_graph=False)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    clip = clips()[0]
    ours = StandaloneModel(path).probabilities(clip, fe.sample_rate)
    assert np.abs(ours - pytorch_probabilities(model, fe, clip)).max() <= PROB_TOL


@NATIVE_ONLY
def test_an_int8_file_carries_the_same_metadata_and_runs(exported, tmp_path: Path) -> None:
    fe = exported["fe"]
    feats = [fe(torch.tensor(c)[None]).numpy() for c in clips()]
    int8 = quantize_int8(
        exported["path"], tmp_path / "tinycnn.int8.onnx", CalibrationReader(lambda: iter(feats))
    )
    fp32_meta, int8_meta = read_metadata(exported["path"]), read_metadata(int8)
    assert "quantization" in int8_meta
    for key, value in fp32_meta.items():
        theirs = int8_meta[key]
        same = np.array_equal(theirs, value) if isinstance(value, np.ndarray) else theirs == value
        assert same, key
    standalone = StandaloneModel(int8)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    for clip, x in zip(clips(), feats, strict=True):
        logits = session.run(None, {session.get_inputs()[0].name: x})[0][0].astype(np.float64)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        ours = standalone.probabilities(clip, fe.sample_rate)
        # int8 rounding can turn a 1e-5 feature difference into one quantisation step
        # of an activation (measured up to 5e-3 here), never into another answer
        assert np.abs(ours - expected).max() < 0.02 and ours.argmax() == expected.argmax()


# -- (d) without torch, lightning, torchaudio or the project ------------------------------

_BLOCKER = """
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked: standalone.py must not need it")
        return None

sys.meta_path.insert(0, _Blocked())
"""


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Write ``(C, N)`` float samples as 16-bit PCM; return what a reader gets back."""
    pcm = np.clip(np.round(waveform * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(waveform.shape[0])
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.T.tobytes())
    return pcm.astype(np.float32) / 32768.0


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreter refuses to import :data:`BLOCKED`."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=set(BLOCKED)))
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.parametrize(
    ("name", "where"), [("native", "in_repo"), ("mono_db_slaney", "copied_elsewhere")]
)
def test_the_script_runs_on_a_wav_without_torch_or_the_project(
    exported, tmp_path: Path, where: str
) -> None:
    fe, model = exported["fe"], exported["model"]
    clip = clips()[0]
    wav = tmp_path / "clip.wav"
    sent = write_wav(wav, clip, fe.sample_rate)
    waveform, rate = read_wav(wav)
    assert rate == fe.sample_rate and np.array_equal(waveform, sent)
    expected = pytorch_probabilities(model, fe, waveform)
    script, onnx_path = SCRIPT, exported["path"]
    if where == "copied_elsewhere":
        away = tmp_path / "elsewhere"
        away.mkdir()
        script = Path(shutil.copy(SCRIPT, away / "standalone.py"))
        onnx_path = Path(shutil.copy(exported["path"], away / "model.onnx"))
    env = blocked_env(tmp_path)
    guard = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, cwd=tmp_path, capture_output=True
    )
    assert guard.returncode != 0 and b"blocked" in guard.stderr  # the blocker is active
    done = subprocess.run(
        [sys.executable, str(script), str(onnx_path), str(wav)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.strip().splitlines()]
    assert [name for name, _ in rows] == CLASSES
    printed = np.array([float(p) for _, p in rows])
    assert np.abs(printed - expected).max() <= PROB_TOL + 1e-6  # printed to 6 decimals


@EVERY_FRONT_END
def test_main_prints_json_probabilities(exported, tmp_path: Path, capsys) -> None:
    fe = exported["fe"]
    wav = tmp_path / "clip.wav"
    waveform = write_wav(wav, clips()[1], fe.sample_rate)
    assert main([str(exported["path"]), str(wav), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = StandaloneModel(exported["path"]).probabilities(waveform, fe.sample_rate)
    assert list(printed) == CLASSES
    assert np.allclose(list(printed.values()), expected, rtol=0, atol=1e-12)


# -- (e) refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"power": 1.0}, "'power'"),
        ({"mel_scale": "kaldi"}, "mel_scale='kaldi'"),
        ({"pad_mode": "replicate"}, "pad_mode='replicate'"),
        ({"version": 2}, "version 2"),
        ({"class": "MFCCFrontEnd"}, "'MFCCFrontEnd'"),
    ],
)
def test_an_option_it_does_not_implement_is_refused_in_one_line(
    change: dict[str, Any], named: str
) -> None:
    config = {**LogMelFrontEnd("native").config(), **change}
    with pytest.raises(StandaloneError) as err:
        FrontEnd(config)
    message = str(err.value)
    assert named in message and "not implemented" in message and "\n" not in message


@NATIVE_ONLY
def test_a_file_with_an_unknown_option_is_refused_by_the_script(
    exported, tmp_path: Path, capsys
) -> None:
    proto = onnx.load(str(exported["path"]))
    for prop in proto.metadata_props:
        if prop.key == "earsleep.feature_config":
            prop.value = json.dumps({**json.loads(prop.value), "mel_scale": "kaldi"})
    path = tmp_path / "newer.onnx"
    onnx.save(proto, str(path))
    wav = tmp_path / "clip.wav"
    write_wav(wav, clips()[0], 16000)
    assert main([str(path), str(wav)]) == 1
    err = capsys.readouterr().err.strip()
    assert "mel_scale='kaldi'" in err and "\n" not in err


@NATIVE_ONLY
def test_wrong_rate_float_wav_and_missing_metadata_are_refused_in_one_line(
    exported, tmp_path: Path
) -> None:
    standalone = StandaloneModel(exported["path"])
    with pytest.raises(StandaloneError, match="44100 Hz but the model takes 16000 Hz"):
        standalone.probabilities(np.zeros((1, 44100), np.float32), 44100)
    with pytest.raises(StandaloneError, match="1 or 2 channels"):
        standalone.probabilities(np.zeros((3, 16000), np.float32), 16000)
    float_wav = tmp_path / "float.wav"
    sf.write(float_wav, np.zeros((1600, 1), np.float32), 16000, subtype="FLOAT")
    with pytest.raises(StandaloneError, match="not a 16-bit PCM WAV") as err:
        read_wav(float_wav)
    assert "\n" not in str(err.value)
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(exported["path"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    with pytest.raises(StandaloneError, match="carries no earsleep.class_names") as err:
        StandaloneModel(bare)
    assert "\n" not in str(err.value)

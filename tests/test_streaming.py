"""The streaming predictor emits the offline night's window probabilities, chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from data.features import LogMelFrontEnd
from data.recordings import RecordingWindows
from models.classifier import Classifier
from tests.helpers import build_like_cli
from util.night.streaming import StreamingPredictor

SR = 16000


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    net = build_like_cli(
        Classifier,
        "models.backbones.TinyCNN",
        num_classes=3,
        class_names=["quiet", "breathe", "snore"],
        features=LogMelFrontEnd().config(),
    ).eval()
    with torch.no_grad():
        net.band_mean.normal_(-6.0, 1.0)
        net.band_std.uniform_(0.5, 2.0)
    return net


def _night(path, seconds: float, rate: int = SR, channels: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    wave = 0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 0.3 * t)) ** 2
    audio = (wave + 0.05 * rng.standard_normal((channels, n))).astype(np.float32)
    sf.write(path, audio.T, rate, subtype="FLOAT")  # exact float samples on disk
    return audio


def _offline(model, path, hop_s: float) -> tuple[np.ndarray, np.ndarray]:
    windows = RecordingWindows(path, LogMelFrontEnd(), hop_s=hop_s, batch_size=16)
    index, probs = [], []
    with torch.inference_mode():
        for item in windows:
            if len(item["x"]):
                index.append(item["index"].numpy())
                probs.append(model(item["x"]).softmax(dim=1).numpy())
    return np.concatenate(index), np.concatenate(probs)


def _stream(predictor, audio, sizes) -> list:
    out, at, i = [], 0, 0
    while at < audio.shape[1]:
        n = sizes[i % len(sizes)]
        out += predictor.push(audio[:, at : at + n])
        at, i = at + n, i + 1
    return out + predictor.flush()


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
@pytest.mark.parametrize("sizes", [[512], [1, 7000, 333, 16001, 50]])  # 32 ms; ragged
def test_streamed_windows_match_the_offline_night(tmp_path, model, runtime, sizes):
    audio = _night(tmp_path / "night.wav", 9.3)
    index, expected = _offline(model, tmp_path / "night.wav", 0.5)
    predictor = StreamingPredictor(model, hop_s=0.5, runtime=runtime)
    results = _stream(predictor, audio, sizes)
    assert [r.index for r in results] == list(index) == list(range(17))  # whole windows only
    got = np.stack([r.probabilities for r in results])
    assert np.abs(got - expected).max() < 1e-5
    assert results[3].start_s == 1.5 and results[3].end_s == 2.5
    # the state is at most a window of samples (plus a chunk), however long the night
    assert predictor.state_bytes <= 2 * 4 * (16000 + max(sizes))


def test_a_stream_at_another_rate_is_resampled_like_the_recording(tmp_path, model):
    audio = _night(tmp_path / "night8k.wav", 6.2, rate=8000, channels=1)
    index, expected = _offline(model, tmp_path / "night8k.wav", 0.5)
    predictor = StreamingPredictor(model, hop_s=0.5, sample_rate=8000, channels=1)
    results = _stream(predictor, audio, [256])
    assert [r.index for r in results] == list(index)
    got = np.stack([r.probabilities for r in results])
    assert np.abs(got - expected).max() < 1e-5


def test_bad_chunks_are_refused_in_one_line(model):
    predictor = StreamingPredictor(model)
    with pytest.raises(ValueError, match=r"shape \(2, n\)"):
        predictor.push(np.zeros((3, 100), np.float32))
    with pytest.raises(ValueError, match="channels must be 1 or 2"):
        StreamingPredictor(model, channels=4)


def test_damaged_samples_are_zeroed_as_the_offline_path_zeroes_them(tmp_path, model):
    audio = _night(tmp_path / "night.wav", 4.0)
    audio[:, 12000:12100] = np.nan
    audio[:, 20000:20100] = 1e25  # finite, but far beyond any sound
    sf.write(tmp_path / "damaged.wav", audio.T, SR, subtype="FLOAT")
    index, expected = _offline(model, tmp_path / "damaged.wav", 0.5)
    results = _stream(StreamingPredictor(model, hop_s=0.5, runtime="torch"), audio, [512])
    got = np.stack([r.probabilities for r in results])
    assert np.isfinite(got).all()
    assert [r.index for r in results] == list(index)
    assert np.abs(got - expected).max() < 1e-5

"""Audio decoding: the fast WAV path agrees with soundfile, and bad bytes fail clearly."""

import io

import numpy as np
import pytest
import soundfile as sf

from data.audio import AudioDecodeError, check_waveform, decode, resample


def wav_bytes(audio: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.T, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("channels", "fmt", "subtype"),
    [(1, "WAV", "PCM_16"), (2, "WAV", "PCM_16"), (2, "WAV", "FLOAT"), (3, "WAV", "PCM_16"),
     (2, "WAV", "PCM_24"), (2, "FLAC", "PCM_16"), (2, "WAVEX", "PCM_16")],
)  # fmt: skip
def test_decode_matches_soundfile(channels, fmt, subtype):
    rng = np.random.default_rng(channels)
    audio = (rng.uniform(-0.9, 0.9, (channels, 1601))).astype(np.float32)
    data = wav_bytes(audio, 16000, fmt, subtype)
    got, sr = decode(data)
    ref, ref_sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert sr == ref_sr == 16000
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.shape == (channels, 1601)
    np.testing.assert_array_equal(got, ref.T)


def test_decode_keeps_nan_and_empty_for_the_policy_to_judge():
    audio = np.zeros((2, 800), np.float32)
    audio[1, 5] = np.nan
    got, sr = decode(wav_bytes(audio, 16000, subtype="FLOAT"))
    assert check_waveform(got, sr) == "nan"
    empty, sr = decode(wav_bytes(np.zeros((2, 0), np.float32), 16000))
    assert empty.shape == (2, 0) and check_waveform(empty, sr) == "empty"


def test_decode_refuses_garbage_and_truncated_bytes():
    with pytest.raises(AudioDecodeError):
        decode(b"not audio at all")
    data = wav_bytes(np.zeros((2, 16000), np.float32), 16000)
    try:  # a truncated data chunk must not be read past its end
        got, _ = decode(data[:1000])
    except AudioDecodeError:
        return
    assert got.shape[1] < 16000


def test_check_waveform_policy():
    ok = np.zeros((2, 16000), np.float32)
    assert check_waveform(ok, 16000) is None
    assert check_waveform(np.zeros((3, 16000), np.float32), 16000) == "bad_shape"
    assert check_waveform(np.zeros(16000, np.float32), 16000) == "bad_shape"
    assert check_waveform(np.zeros((1, 1000), np.float32), 16000) == "too_short"


def test_resample_changes_length_by_the_rate_ratio():
    x = np.random.default_rng(0).standard_normal((2, 22050)).astype(np.float32)
    y = resample(x, 22050, 16000)
    assert y.shape == (2, 16000)
    assert resample(x, 16000, 16000) is x

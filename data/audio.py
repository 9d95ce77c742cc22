"""Audio decoding and the one policy for malformed clips.

Decoding goes through soundfile (``torchaudio.load`` needs torchcodec and FFmpeg).
Every consumer (cache building, night-long prediction) uses these functions so
that a clip is judged the same way everywhere.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

#: Reasons a clip is skipped, in the order they are checked. Documented in the README.
SKIP_REASONS: dict[str, str] = {
    "corrupt": "soundfile could not decode the bytes",
    "unsafe_path": "archive member path is absolute or climbs with '..'",
    "bad_shape": "not (channels, samples) with 1 or 2 channels",
    "empty": "zero samples",
    "nan": "holds NaN or infinite samples",
    "too_short": "shorter than min_duration_s (default 0.25 s)",
}

#: Clip faults that are repaired rather than skipped; counted, never hidden.
REPAIRS: dict[str, str] = {
    "resampled": "sample rate differed from the front end's; resampled",
    "mono": "one channel where the front end wants two; the channel is duplicated",
}


class AudioDecodeError(ValueError):
    """Raised when bytes or a file cannot be decoded as audio."""


def decode(data: bytes | str | Path) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC bytes or a file path to float32 ``(channels, samples)`` and its rate."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else str(data)
        audio, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types (LibsndfileError, RuntimeError...)
        raise AudioDecodeError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
    return np.ascontiguousarray(audio.T), int(sr)


def check_waveform(
    waveform: np.ndarray, sample_rate: int, min_duration_s: float = 0.25
) -> str | None:
    """Return the skip reason for a decoded waveform, or ``None`` when it is usable."""
    if waveform.ndim != 2 or not 1 <= waveform.shape[0] <= 2:
        return "bad_shape"
    if waveform.shape[1] == 0:
        return "empty"
    if not np.isfinite(waveform).all():
        return "nan"
    if waveform.shape[1] < min_duration_s * sample_rate:
        return "too_short"
    return None


def resample(waveform: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample float32 ``(channels, samples)`` with torchaudio's windowed-sinc filter."""
    if orig_sr == new_sr:
        return waveform
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(waveform)), orig_sr, new_sr)
    return out.numpy()

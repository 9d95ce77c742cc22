"""Audio decoding and the one policy for malformed clips.

Decoding goes through soundfile (``torchaudio.load`` needs torchcodec and FFmpeg).
Every consumer (cache building, night-long prediction) uses these functions so
that a clip is judged the same way everywhere.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

#: Reasons a clip is skipped, in the order they are checked. Documented in the README.
SKIP_REASONS: dict[str, str] = {
    "corrupt": "soundfile could not decode the bytes",
    "unsafe_path": "archive member path is absolute or climbs with '..'",
    "wrong_split": "archive member sits under another split's folder than its tarball's",
    "unknown_label": "the label folder above the file is not one of the source's labels",
    "bad_shape": "not (channels, samples) with 1 or 2 channels",
    "empty": "zero samples",
    "nan": "holds NaN or infinite samples",
    "too_short": "shorter than min_duration_s (default 0.25 s)",
}

#: Clip faults that are repaired rather than skipped; counted, never hidden.
REPAIRS: dict[str, str] = {
    "resampled": "sample rate differed from the front end's; resampled",
    "mono": "one channel where the front end wants two; the channel is duplicated",
    "padded": "shorter than the front end's clip length; zero-padded at the end",
    "cropped": "longer than the front end's clip length; the start is kept",
}


class AudioDecodeError(ValueError):
    """Raised when bytes or a file cannot be decoded as audio."""


def decode(data: bytes | str | Path) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC bytes or a file path to float32 ``(channels, samples)`` and its rate.

    Plain 16-bit PCM and 32-bit float WAV bytes (DreamCatcher's clips, the synthetic
    corpus) are read straight from the RIFF chunks, several times faster than going
    through libsndfile; anything else, or anything odd about the header, goes to soundfile.
    """
    if isinstance(data, bytes | bytearray):
        fast = _decode_simple_wav(data)
        if fast is not None:
            return fast
    try:
        src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else str(data)
        audio, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types (LibsndfileError, RuntimeError...)
        raise AudioDecodeError(
            str(err).splitlines()[0] if str(err) else type(err).__name__
        ) from err
    return np.ascontiguousarray(audio.T), int(sr)


_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE


def _decode_simple_wav(data: bytes | bytearray) -> tuple[np.ndarray, int] | None:
    """Read a 16-bit PCM or 32-bit float RIFF/WAVE, or return ``None`` to defer to soundfile."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        chunk, size = bytes(data[pos : pos + 4]), int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt " and size >= 16:
            tag, channels, rate = struct.unpack_from("<HHI", data, body)
            block_align, bits = struct.unpack_from("<HH", data, body + 12)
            if tag == _WAVE_FORMAT_EXTENSIBLE and size >= 26:
                tag = struct.unpack_from("<H", data, body + 24)[
                    0
                ]  # first bytes of the subformat GUID
            fmt = (tag, channels, rate, block_align, bits)
        elif chunk == b"data":
            if fmt is None or body + size > len(data):
                return None  # data before fmt, or truncated: let soundfile judge it
            tag, channels, rate, block_align, bits = fmt
            if tag == _WAVE_FORMAT_PCM and bits == 16:
                dtype, scale = "<i2", 1.0 / 32768.0
            elif tag == _WAVE_FORMAT_FLOAT and bits == 32:
                dtype, scale = "<f4", None
            else:
                return None
            if channels < 1 or block_align != channels * bits // 8:
                return None
            frames = size // block_align
            raw = np.frombuffer(data, dtype=dtype, count=frames * channels, offset=body)
            audio = raw.reshape(frames, channels).T.astype(np.float32, order="C")
            if scale:
                audio *= np.float32(scale)
            return audio, int(rate)
        pos = body + size + (size & 1)  # chunks are word-aligned
    return None


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

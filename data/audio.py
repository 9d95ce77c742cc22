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

from data.errors import first_line

#: File name endings of each container format soundfile (libsndfile) reads, by its
#: format name in ``soundfile.available_formats()``. Left out: ``RAW`` (no header to
#: read), ``MAT4``/``MAT5`` and ``HTK`` (``.mat`` and ``.htk`` files are mostly data,
#: not sound) and ``MPC2K`` (no ending of its own); a file of those formats is still
#: read when named as a file.
AUDIO_FORMATS: dict[str, tuple[str, ...]] = {
    "WAV": (".wav", ".wave"),
    "WAVEX": (".wav",),
    "RF64": (".rf64",),
    "W64": (".w64",),
    "FLAC": (".flac",),
    "OGG": (".ogg", ".oga", ".opus"),  # Vorbis and Opus
    "MP3": (".mp3",),  # libsndfile >= 1.1
    "AIFF": (".aif", ".aiff", ".aifc"),
    "CAF": (".caf",),
    "AU": (".au", ".snd"),
    "IRCAM": (".sf",),
    "NIST": (".nist", ".sph"),
    "VOC": (".voc",),
    "SVX": (".iff", ".svx", ".8svx"),
    "PAF": (".paf",),
    "SD2": (".sd2",),
    "AVR": (".avr",),
    "WVE": (".wve",),
    "PVF": (".pvf",),
    "SDS": (".sds",),
    "XI": (".xi",),
}

#: File name endings read as audio (compared case-insensitively): by the audio-folder
#: source and when a folder of recordings is given for prediction. Every ending of
#: :data:`AUDIO_FORMATS`, whether or not this machine's libsndfile reads that format, so
#: that a file it cannot read is found and reported (skipped as ``corrupt``, or an
#: unreadable recording), never passed over.
AUDIO_SUFFIXES: tuple[str, ...] = tuple(
    dict.fromkeys(s for suffixes in AUDIO_FORMATS.values() for s in suffixes)
)


def is_audio_name(name: str | Path) -> bool:
    """Whether a file name ends in one of :data:`AUDIO_SUFFIXES` (any letter case)."""
    return str(name).lower().endswith(AUDIO_SUFFIXES)


def readable_formats() -> dict[str, tuple[str, ...]]:
    """The formats of :data:`AUDIO_FORMATS` this machine's libsndfile reads, with endings."""
    available = sf.available_formats()
    return {fmt: sfx for fmt, sfx in AUDIO_FORMATS.items() if fmt in available}


#: Reasons a clip is skipped, in the order they are checked. Documented in the README.
SKIP_REASONS: dict[str, str] = {
    "corrupt": "soundfile could not decode the bytes",
    "truncated": "a WAV cut short: its RIFF header promises more bytes than the file holds",
    "unsafe_path": "archive member path is absolute or climbs with '..'",
    "wrong_split": "archive member sits under another split's folder than its tarball's",
    "misspelled_split": "the split folder above the file is spelled with other case (Train/)",
    "misplaced": "a file in a split's folder (or the root, when splits are derived) but in "
    "none of its label folders; in an extracted DreamCatcher tree, not directly in one",
    "not_audio": "a file in a label folder whose name does not end in an audio suffix",
    "unknown_label": "the label folder above the file is not one of the source's labels",
    "duplicate_id": "another item of the split has the same clip_id; the first one is kept",
    "bad_shape": "not (channels, samples) with 1 or 2 channels",
    "empty": "zero samples",
    "nan": "holds NaN or infinite samples",
    "too_short": "shorter than min_duration_s (default 0.25 s), or the last window of a "
    "segmented recording shorter than segment.min_s",
    "nonfinite_features": "the front end's output holds NaN or inf (samples far outside ±1)",
}

#: Clip faults that are repaired rather than skipped; counted, never hidden.
REPAIRS: dict[str, str] = {
    "resampled": "sample rate differed from the front end's; resampled",
    "mono": "one channel where the front end wants two; the channel is duplicated",
    "padded": "shorter than the front end's clip length; zero-padded at the end",
    "cropped": "longer than the front end's clip length; the start is kept",
}


class AudioDecodeError(ValueError):
    """Raised when bytes or a file cannot be decoded as audio.

    Attributes:
        reason: the :data:`SKIP_REASONS` entry a source records for it: ``truncated``
            for a WAV cut short, else ``corrupt``.
    """

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason


def decode(data: bytes | str | Path) -> tuple[np.ndarray, int]:
    """Decode audio bytes or a file path to float32 ``(channels, samples)`` and its rate.

    Any format soundfile reads (:data:`AUDIO_FORMATS`): the container is recognised
    from the bytes, not from a file name.

    Plain 16-bit PCM and 32-bit float WAV bytes (DreamCatcher's clips, the synthetic
    corpus) are read straight from the RIFF chunks, several times faster than going
    through libsndfile; anything else, or anything odd about the header, goes to soundfile.
    """
    if isinstance(data, bytes | bytearray):
        missing = wav_missing_bytes(data)
        if missing:
            raise AudioDecodeError(
                f"WAV truncated: {missing} of its bytes are missing", reason="truncated"
            )
        try:
            fast = _decode_simple_wav(data)
        except (struct.error, ValueError):  # a malformed header: soundfile judges it
            fast = None
        if fast is not None:
            return fast
    try:
        src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else str(data)
        audio, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types (LibsndfileError, RuntimeError...)
        raise AudioDecodeError(first_line(err)) from err
    return np.ascontiguousarray(audio.T), int(sr)


_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
#: Sizes streaming writers put in a header before they know the length.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def wav_missing_bytes(data: bytes | bytearray) -> int:
    """How many bytes a RIFF/WAVE file cut short lacks; 0 when complete or not a WAV.

    A WAV is cut short when its RIFF size promises more bytes than ``data`` holds and
    its ``data`` chunk is absent or incomplete; the answer is what the RIFF size
    promises. A complete ``data`` chunk under a RIFF size that is merely wrong, and the
    placeholder sizes of streaming writers (0 and 0xFFFFFFFF), are not truncation.
    """
    if len(data) < 4 or data[:4] != b"RIFF":
        return 0
    if len(data) < 12:
        return 12 - len(data) if b"WAVE".startswith(bytes(data[8:12])) else 0
    if data[8:12] != b"WAVE":
        return 0
    riff = int.from_bytes(data[4:8], "little")
    promised = 0 if riff in _UNKNOWN_SIZES else riff + 8 - len(data)
    if promised <= 0:
        return 0
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        end = pos + 8 + size
        if data[pos : pos + 4] == b"data":
            return 0 if size in _UNKNOWN_SIZES or end <= len(data) else promised
        if end > len(data):
            break
        pos = end + (size & 1)
    return promised


def _decode_simple_wav(data: bytes | bytearray) -> tuple[np.ndarray, int] | None:
    """Read a 16-bit PCM or 32-bit float RIFF/WAVE, or return ``None`` to defer to soundfile."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        chunk, size = bytes(data[pos : pos + 4]), int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            if size < 16 or body + size > len(data):
                return None  # short or cut-off fmt chunk: let soundfile judge it
            tag, channels, rate = struct.unpack_from("<HHI", data, body)
            block_align, bits = struct.unpack_from("<HH", data, body + 12)
            if tag == _WAVE_FORMAT_EXTENSIBLE:
                if size < 26:
                    return None
                tag = struct.unpack_from("<H", data, body + 24)[0]  # the subformat GUID's start
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
            if channels < 1 or rate < 1 or block_align != channels * bits // 8:
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

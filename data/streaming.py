"""Long recordings (a whole night) read in blocks, never whole.

A night at 16 kHz in two channels is about 1.8 GB as float32, so nothing here
loads a recording whole: :func:`find_recordings` expands what the user named,
:func:`probe` reads a header, :func:`read_blocks` reads the audio in blocks with
soundfile and resamples block by block without seams (:class:`BlockResampler`).
:class:`data.recordings.RecordingWindows` cuts the blocks into model windows.

Input policy (the night writer reports each case; see the README, "Analyse a night"):

* **Rate**: any rate is resampled to the front end's with torchaudio's
  windowed-sinc filter, exactly as :func:`data.audio.resample` would do to the
  whole file.
* **Channels**: one channel into a two-channel (``stereo``) front end is
  duplicated, with a warning. More than two channels is an error by default;
  ``extra_channels="first_two"`` keeps channels 0 and 1 (in-ear, outer, the
  DreamCatcher order) with a warning.
* **Non-finite samples** (NaN, ±inf) are set to zero and counted; the night is not
  thrown away for a glitch.
* **Unreadable or zero-length** files are errors; **truncated** WAVs (the header
  promises more data than the file holds) are read up to where the data ends; a read
  error part-way ends the stream after the part read.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from data.audio import AUDIO_SUFFIXES, is_audio_name
from data.errors import first_line

#: ``lowpass_filter_width`` and ``rolloff`` of :func:`torchaudio.functional.resample`'s
#: defaults, which :func:`data.audio.resample` uses; the context below depends on them.
_SINC_WIDTH = 6
_ROLLOFF = 0.99

#: Seconds read per block (at the file's rate).
DEFAULT_BLOCK_S = 30.0

ExtraChannels = Literal["error", "first_two"]

log = logging.getLogger(__name__)


class RecordingError(RuntimeError):
    """A recording cannot be used; the message starts with its path."""


def find_recordings(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand a file, a folder (recursive: every audio file) or a glob into files.

    In a folder, every file below it, at any depth, whose name ends in one of
    :data:`data.audio.AUDIO_SUFFIXES` (any format soundfile reads: WAV, FLAC, OGG
    Vorbis/Opus, MP3, AIFF, CAF...; any letter case) is a recording; one that turns out
    unreadable is reported by the reader, not dropped here. The other files of the
    folder are counted and named in one logged warning.

    Args:
        spec: a file (any suffix), a folder, a glob pattern (``**`` recurses), or a
            sequence of these.

    Returns:
        Sorted, de-duplicated paths: files first as given, folders and globs sorted.

    Raises:
        FileNotFoundError: nothing matches ``spec``.
    """
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    found: list[Path] = []
    for item in specs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = _files_below(path)
            found += [p for p in files if is_audio_name(p.name)]
            other = [p.relative_to(path).as_posix() for p in files if not is_audio_name(p.name)]
            if other:
                shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
                log.warning(
                    "%s: passed over %d file(s) not named as audio (%s); audio endings: %s",
                    path,
                    len(other),
                    shown,
                    " ".join(AUDIO_SUFFIXES),
                )
        else:
            found += sorted(
                Path(p) for p in glob.glob(str(item), recursive=True) if _file_or_dead_link(Path(p))
            )
    unique = list(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError(
            f"no recordings match {spec!r}: give a file, a folder holding audio files "
            "(.wav, .flac, .ogg, .opus, .mp3, .aiff... any format soundfile reads), or a glob"
        )
    return unique


def _file_or_dead_link(path: Path) -> bool:
    """A file, or a link whose target is gone (kept, so the reader reports it)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _files_below(folder: Path) -> list[Path]:
    """Every file below ``folder``, sorted, at any depth and through linked folders.

    Each real folder is walked once, so two links to one folder do not read its
    recordings twice and a link back up does not loop. Links whose target is gone are
    kept: the reader reports them instead of their silently going missing.
    """
    seen: set[str] = set()
    found: list[Path] = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # of two links to one folder, the first in name order is walked
        found += [p for p in (Path(top, n) for n in names) if _file_or_dead_link(p)]
    return sorted(found)


@dataclass
class RecordingInfo:
    """What the header of a recording says.

    Attributes:
        path: the file.
        sample_rate: the file's own rate (Hz).
        channels: the file's channel count.
        frames: frames soundfile can read (for a truncated WAV: what is there).
        declared_frames: frames the header promises when it promises more than
            ``frames`` (a truncated WAV), else ``None``.
        format: soundfile's format and subtype, e.g. ``WAV/PCM_16``.
    """

    path: Path
    sample_rate: int
    channels: int
    frames: int
    declared_frames: int | None = None
    format: str = ""

    @property
    def duration_s(self) -> float:
        """Readable duration in seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0


_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def probe(path: str | Path) -> RecordingInfo:
    """Read the header of ``path``.

    Raises:
        RecordingError: the file cannot be opened as audio or holds no frames.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise RecordingError(
            f"{path}: unreadable (a link to {os.readlink(path)}, which does not exist)"
        )
    try:
        with sf.SoundFile(str(path)) as f:
            info = RecordingInfo(
                path=path,
                sample_rate=int(f.samplerate),
                channels=int(f.channels),
                frames=int(f.frames),
                format=f"{f.format}/{f.subtype}",
            )
            log = f.extra_info
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise RecordingError(f"{path}: unreadable ({first_line(err)})") from err
    # libsndfile reads a cut-off WAV up to where its data ends and logs what the
    # header promised: "data : <declared bytes> (should be <bytes present>)".
    match = _DATA_CHUNK.search(log)
    if match and info.frames > 0:
        declared, present = int(match.group(1)), int(match.group(2))
        # 0 and 0xFFFFFFFF are placeholders of recorders that never finalised the header.
        if present < declared < 0xFFFFFFFF:
            info.declared_frames = int(round(info.frames * declared / max(present, 1)))
    if info.frames == 0:
        raise RecordingError(f"{path}: zero-length (no audio frames)")
    return info


class BlockResampler:
    """Resample a stream block by block, equal to resampling the whole signal at once.

    :func:`torchaudio.functional.resample` convolves the zero-padded signal with a
    windowed-sinc kernel at a stride of ``orig / gcd`` input samples, each stride
    giving ``new / gcd`` outputs. Each push resamples whole strides together with
    enough real neighbouring samples on both sides (``context`` ≥ the kernel's
    half-width) and keeps only the outputs whose every tap fell on real samples,
    so blocks join without seams; the stream's first and last samples see the
    same zero padding as the whole-signal call.

    Args:
        orig_sr: input rate (Hz).
        new_sr: output rate (Hz).
    """

    def __init__(self, orig_sr: int, new_sr: int) -> None:
        g = math.gcd(int(orig_sr), int(new_sr))
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        self._o, self._n = self.orig_sr // g, self.new_sr // g
        width = math.ceil(_SINC_WIDTH * self._o / (min(self._o, self._n) * _ROLLOFF))
        #: Context kept on each side, a whole number of strides.
        self.context = math.ceil(width / self._o) * self._o
        self._buf: np.ndarray | None = None
        self._left = 0  # context samples at the start of _buf (already emitted)
        self._phases = _PhaseBlocks(self.orig_sr, self.new_sr) if self._n < PHASES else None

    def push(self, block: np.ndarray) -> np.ndarray:
        """Feed float32 ``(channels, n)`` input; return the output that is final so far."""
        buf = block if self._buf is None else np.concatenate([self._buf, block], axis=1)
        ready = (buf.shape[1] - self._left - self.context) // self._o * self._o
        if ready <= 0:
            self._buf = buf
            return buf[:, :0]
        segment = buf[:, : self._left + ready + self.context]
        out = self._resample(segment)[:, self._out(self._left) : self._out(self._left + ready)]
        keep = max(0, self._left + ready - self.context)
        self._buf = buf[:, keep:]
        self._left = self._left + ready - keep
        return out

    def flush(self) -> np.ndarray:
        """Return the rest of the output (the end of the stream is zero-padded)."""
        if self._buf is None:
            return np.zeros((0, 0), np.float32)
        out = self._resample(self._buf)[:, self._out(self._left) :]
        self._buf, self._left = None, 0
        return out

    def _out(self, n_in: int) -> int:
        return n_in // self._o * self._n  # n_in is a whole number of strides

    def _resample(self, x: np.ndarray) -> np.ndarray:
        wave = torch.from_numpy(np.ascontiguousarray(x))
        if self._phases is not None:
            return self._phases(wave).numpy()
        return AF.resample(wave, self.orig_sr, self.new_sr).numpy()


#: Output phases per stride below which :class:`BlockResampler` runs
#: :class:`_PhaseBlocks` instead of :func:`torchaudio.functional.resample`.
PHASES = 64
#: Kernel rows per product in :class:`_PhaseBlocks` (fastest of 8-128 measured).
GROUP = 16


class _PhaseBlocks:
    """:func:`torchaudio.functional.resample` with its own kernel, as matrix products.

    torchaudio convolves with a ``(new, 1, L)`` kernel at a stride of ``orig`` samples
    (rates divided by their gcd). Where ``new`` is small (48 kHz to 16 kHz: 1 phase of
    41 taps every 3 samples) that convolution has one output channel, and on a CPU it
    ran at well under 1 GFLOP/s. Here ``S`` strides are taken at once, so that each
    step of ``S·orig`` samples gives ``S·new`` ≥ :data:`PHASES` outputs: the kernel
    becomes ``S·new`` rows, each the old one shifted by its stride, cut into groups of
    :data:`GROUP` rows and each group trimmed to the columns where it is not zero; a
    group is one product of the signal's windows (a strided view) with its rows. Same
    taps, same padding, same length as torchaudio's: equal to float rounding (tested),
    2.4x faster at 48 kHz on a Zen 3 (``benchmarks/resample.py``).
    """

    def __init__(self, orig_sr: int, new_sr: int) -> None:
        g = math.gcd(orig_sr, new_sr)
        self.orig, self.new = orig_sr // g, new_sr // g
        kernel, self.pad = _sinc_kernel(orig_sr, new_sr, g)
        rows = kernel[:, 0, :]  # (new, L)
        self.strides = -(-PHASES // self.new)  # S
        taps = rows.shape[1]
        self.span = taps + (self.strides - 1) * self.orig  # samples one step reads
        shifted = torch.zeros(self.strides * self.new, self.span)
        for j in range(self.strides):
            shifted[j * self.new : (j + 1) * self.new, j * self.orig : j * self.orig + taps] = rows
        self.groups = []
        for first in range(0, len(shifted), GROUP):
            part = shifted[first : first + GROUP]
            used = part.ne(0).any(0).nonzero().flatten()  # every kernel row has taps
            lo, hi = int(used[0]), int(used[-1]) + 1
            self.groups.append((lo, hi, part[:, lo:hi].T.contiguous()))

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        c, n = wave.shape
        step = self.strides * self.orig
        steps = -(-(n // self.orig + 1) // self.strides)  # torchaudio's n // orig + 1 strides
        need = (steps - 1) * step + self.span
        padded = torch.nn.functional.pad(wave, (self.pad, need - n - self.pad))
        out = torch.empty(c, steps, self.strides * self.new)
        col = 0
        for lo, hi, weights in self.groups:
            windows = padded[:, lo:].unfold(-1, hi - lo, step)[:, :steps]
            out[:, :, col : col + weights.shape[1]] = torch.matmul(windows, weights)
            col += weights.shape[1]
        return out.reshape(c, -1)[:, : math.ceil(self.new * n / self.orig)]


def _sinc_kernel(orig_sr: int, new_sr: int, gcd: int) -> tuple[torch.Tensor, int]:
    """torchaudio's resampling kernel ``(new, 1, L)`` and its padding, for the defaults
    :func:`data.audio.resample` uses (a private function of torchaudio 2.11, its last
    release; ``tests/test_night.py`` holds the result to ``resample``'s)."""
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    return _get_sinc_resample_kernel(
        orig_sr, new_sr, gcd, _SINC_WIDTH, _ROLLOFF, "sinc_interp_hann", None,
        torch.device("cpu"), torch.float32,
    )  # fmt: skip


@dataclass
class StreamState:
    """What reading one recording found; filled in as blocks are read.

    Attributes:
        samples: samples delivered at the target rate.
        nonfinite_samples: NaN/inf samples, and samples beyond :data:`MAX_ABS_SAMPLE`,
            set to zero (all channels counted).
        repairs: human-readable repairs applied (resampled, mono duplicated...).
        error: the read error that ended the stream early, if any.
    """

    samples: int = 0
    nonfinite_samples: int = 0
    repairs: list[str] = field(default_factory=list)
    error: str | None = None


#: soundfile subtypes whose samples are integers (never NaN or infinite when decoded).
_INTEGER_SUBTYPES = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "ULAW", "ALAW")
#: Float samples beyond this magnitude are damage, not sound: audio lies within ±1, or
#: ±32768 where an integer scale was kept. Their power spectrum overflows float32 and
#: the model's probabilities turn NaN (1e25 did), so they are zeroed like NaN and inf.
MAX_ABS_SAMPLE = 1e12


def unusable_samples(block: np.ndarray) -> np.ndarray:
    """Where ``block`` holds NaN, inf or samples beyond :data:`MAX_ABS_SAMPLE` (a mask)."""
    return ~(np.abs(block) <= MAX_ABS_SAMPLE)  # NaN compares false: unusable too


#: 16-bit PCM (WAV, FLAC...) is read as its integers and scaled by 2^-15 here: the same
#: floats as soundfile's float32 read, bit for bit (the scale is a power of two), in 40 %
#: of the time (an 8-h two-channel night: 1.1 s instead of 2.9 s on a Zen 3 core).
PCM16_SCALE = np.float32(1.0 / 32768.0)


def read_blocks(
    info: RecordingInfo,
    sample_rate: int,
    want_channels: int = 2,
    extra_channels: ExtraChannels = "error",
    block_s: float = DEFAULT_BLOCK_S,
    state: StreamState | None = None,
) -> Iterator[np.ndarray]:
    """Yield float32 ``(channels, n)`` blocks of a recording at ``sample_rate``.

    Channels: 1 or 2 come out as in the file (the front end duplicates or mixes);
    more than 2 raise unless ``extra_channels="first_two"``. A read error part-way
    is stored in ``state.error`` and ends the stream (nothing raised), so the
    windows read so far can still be used.

    Args:
        info: the recording's header (:func:`probe`).
        sample_rate: rate of the blocks (the front end's).
        want_channels: channels the front end takes (2: one channel is duplicated,
            with a warning).
        extra_channels: ``error`` or ``first_two`` for files with more than two
            channels.
        block_s: seconds read per block.
        state: filled with sample counts, repairs and the error, if given.

    Raises:
        RecordingError: more than two channels with ``extra_channels="error"``,
            or the file cannot be opened.
    """
    state = state if state is not None else StreamState()
    path = info.path
    take = info.channels
    if info.channels > 2:
        if extra_channels != "first_two":
            raise RecordingError(
                f"{path}: {info.channels} channels; expected 1 or 2 (in-ear, outer). "
                "Pass --data.predict_extra_channels first_two (extra_channels='first_two' "
                "in Python) to use channels 0 and 1"
            )
        take = 2
        _repair(state, f"{info.channels} channels: kept channels 0 and 1 (in-ear, outer)", path)
    if take == 1 and want_channels == 2:
        _repair(state, "one channel: duplicated for the two-channel model", path)
    resampler = None
    if info.sample_rate != sample_rate:
        resampler = BlockResampler(info.sample_rate, sample_rate)
        state.repairs.append(f"resampled from {info.sample_rate} Hz to {sample_rate} Hz")
    frames = max(1, int(round(block_s * info.sample_rate)))
    # Integer PCM decodes to finite floats: skip the scan (a pass over every sample).
    may_be_nonfinite = not any(f"/{kind}" in info.format for kind in _INTEGER_SUBTYPES)
    pcm16 = info.format.endswith("/PCM_16")
    try:
        f = sf.SoundFile(str(path))
    except Exception as err:
        raise RecordingError(f"{path}: unreadable ({first_line(err)})") from err
    read = 0  # frames read at the file's rate
    with f:
        while True:
            buffer = np.empty((frames, info.channels), np.int16 if pcm16 else np.float32)
            failed = None
            try:
                data = f.read(frames, always_2d=True, out=buffer)
            except Exception as err:  # a FLAC that loses sync, a file cut under us...
                failed = err
                data = buffer[: _frames_decoded(f, read, frames)]
            if failed is None and len(data) == 0:
                if read < info.frames:  # the data stopped before the header's count
                    state.error = (
                        f"{path}: the audio ends after {read / info.sample_rate:.1f} s of the "
                        f"{info.duration_s:.1f} s its header declares"
                    )
                break
            read += len(data)
            if pcm16:
                block = np.empty((take, len(data)), np.float32)
                np.multiply(data[:, :take].T, PCM16_SCALE, out=block)
            else:
                block = np.ascontiguousarray(data[:, :take].T)
            if may_be_nonfinite:
                bad = unusable_samples(block)
                if bad.any():
                    state.nonfinite_samples += int(bad.sum())
                    block[bad] = 0.0
            if resampler is not None:
                block = resampler.push(block)
            if block.shape[1]:
                state.samples += block.shape[1]
                yield block
            if failed is not None:
                state.error = f"{path}: read error after {read / info.sample_rate:.1f} s ({first_line(failed)})"
                break
        if resampler is not None:
            tail = resampler.flush()
            if tail.shape[1]:
                state.samples += tail.shape[1]
                yield tail
    if state.nonfinite_samples:
        msg = (
            f"{state.nonfinite_samples} non-finite samples (NaN, inf, or beyond "
            f"±{MAX_ABS_SAMPLE:.0e}) set to zero"
        )
        _repair(state, msg, path)


def _frames_decoded(f: sf.SoundFile, before: int, most: int) -> int:
    """Frames that a read which raised had already decoded into its buffer.

    libsndfile decodes up to the damage (a FLAC that loses sync) before it reports the
    error, and its position has moved on by what it delivered; soundfile raises without
    returning them, so they are counted from the position.
    """
    try:
        return min(max(0, f.tell() - before), most)
    except Exception:  # no position to tell: keep nothing of the failed read
        return 0


def _repair(state: StreamState, message: str, path: Path) -> None:
    """Record a repair in the recording's summary and log it in one line."""
    state.repairs.append(message)
    log.warning("%s: %s", path, message)

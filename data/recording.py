"""Long recordings (a whole night) streamed into batches of model windows.

A night at 16 kHz in two channels is about 1.8 GB as float32, so nothing here
loads a recording whole: :func:`read_blocks` reads it in blocks with soundfile,
resamples block by block without seams (:class:`BlockResampler`), and
:class:`RecordingWindows` cuts windows of the front end's clip length every
``hop_s`` seconds and turns each batch of windows into features with the very
front end the model was trained with.

Input policy (the writer reports each case; see the README, "Analyse a night"):

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
  promises more data than the file holds) are processed up to where the data ends
  and reported; a read error part-way reports the part read. A recording shorter
  than one window gives no windows and is reported as too short. Every one of
  these is one batch with ``error``/``status`` set, so the other recordings go on.

Why about 640 lines: reading a long recording in blocks, the shared-frame windowing and
the data set over it are one streaming path measured as a whole (benchmarks/night.py);
the recordings data module is to move out of ``data/datamodule.py`` beside it (issue
14).
"""

from __future__ import annotations

import glob
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from data.malloc import keep_heap_flat

#: File suffixes picked up when a folder is given (case-insensitive).
AUDIO_SUFFIXES: tuple[str, ...] = (".wav", ".flac")

#: ``lowpass_filter_width`` and ``rolloff`` of :func:`torchaudio.functional.resample`'s
#: defaults, which :func:`data.audio.resample` uses; the context below depends on them.
_SINC_WIDTH = 6
_ROLLOFF = 0.99

#: Seconds read per block (at the file's rate).
DEFAULT_BLOCK_S = 30.0

ExtraChannels = Literal["error", "first_two"]
#: ``status`` values of a recording, in the order they are decided.
STATUSES: dict[str, str] = {
    "ok": "every window processed",
    "error": "could not be opened or decoded at all (unreadable, zero-length)",
    "partial": "a read error part-way: the windows before it were processed",
    "truncated": "the file holds less data than its header promises; processed what is there",
    "too_short": "shorter than one window: no windows",
}


class RecordingError(RuntimeError):
    """A recording cannot be used; the message starts with its path."""


class RecordingWarning(UserWarning):
    """A recording was repaired (mono duplicated, channels dropped, samples zeroed)."""


def find_recordings(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand a file, a folder (recursive ``*.wav``/``*.flac``) or a glob into files.

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
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
            )
        else:
            found += sorted(
                Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file()
            )
    unique = list(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError(
            f"no recordings match {spec!r}: give a file, a folder holding "
            f"{'/'.join(AUDIO_SUFFIXES)} files, or a glob"
        )
    return unique


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
        raise RecordingError(f"{path}: unreadable ({_first_line(err)})") from err
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
        y = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), self.orig_sr, self.new_sr)
        return y.numpy()


@dataclass
class StreamState:
    """What reading one recording found; filled in as blocks are read.

    Attributes:
        samples: samples delivered at the target rate.
        nonfinite_samples: NaN/inf samples set to zero (all channels counted).
        repairs: human-readable repairs applied (resampled, mono duplicated...).
        error: the read error that ended the stream early, if any.
    """

    samples: int = 0
    nonfinite_samples: int = 0
    repairs: list[str] = field(default_factory=list)
    error: str | None = None


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
                "Set extra_channels='first_two' to use channels 0 and 1"
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
    try:
        f = sf.SoundFile(str(path))
    except Exception as err:
        raise RecordingError(f"{path}: unreadable ({_first_line(err)})") from err
    read = 0  # frames read at the file's rate
    with f:
        while True:
            try:
                data = f.read(frames, dtype="float32", always_2d=True)
            except Exception as err:  # a FLAC that loses sync, a file cut under us...
                state.error = (
                    f"{path}: read error after {read / info.sample_rate:.1f} s ({_first_line(err)})"
                )
                break
            if len(data) == 0:
                if read < info.frames:  # the data stopped before the header's count
                    state.error = (
                        f"{path}: the audio ends after {read / info.sample_rate:.1f} s of the "
                        f"{info.duration_s:.1f} s its header declares"
                    )
                break
            read += len(data)
            block = np.ascontiguousarray(data[:, :take].T)
            bad = ~np.isfinite(block)
            if bad.any():
                state.nonfinite_samples += int(bad.sum())
                block[bad] = 0.0
            if resampler is not None:
                block = resampler.push(block)
            if block.shape[1]:
                state.samples += block.shape[1]
                yield block
        if resampler is not None:
            tail = resampler.flush()
            if tail.shape[1]:
                state.samples += tail.shape[1]
                yield tail
    if state.nonfinite_samples:
        msg = f"{state.nonfinite_samples} non-finite samples set to zero"
        _repair(state, msg, path)


def _repair(state: StreamState, message: str, path: Path) -> None:
    state.repairs.append(message)
    warnings.warn(f"{path}: {message}", RecordingWarning, stacklevel=3)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def window_count(samples: int, clip_samples: int, hop_samples: int) -> int:
    """Number of whole windows of ``clip_samples`` every ``hop_samples`` in ``samples``."""
    return 0 if samples < clip_samples else 1 + (samples - clip_samples) // hop_samples


class RecordingWindows(IterableDataset):
    """Batches of features of fixed-length windows over long recordings, in time order.

    Window ``k`` of a recording covers samples ``[k·hop, k·hop + clip)`` at the front
    end's rate (only whole windows: the last ``< hop`` seconds may be left out).
    Each item is one batch (use ``DataLoader(dataset, batch_size=None)``), a dict:

    * ``x``: float32 ``(B, C, F, T)``, the front end's raw output (``B`` may be 0 for
      a recording that gives no windows or fails);
    * ``recording``: the path (str); ``index``: int64 ``(B,)`` window indices;
      ``start_s``: float64 ``(B,)`` window starts in seconds;
    * ``last``: ``True`` on the recording's final item; then also ``n_windows``;
    * ``info``: recording metadata (rates, channels, window and hop, feature config
      hash, ``status``, ``error``, ``repairs``, ``duration_s``; final on the last item).

    Recordings come one after another, each from one process: with DataLoader
    workers (and DDP ranks) recordings are split between them, never a recording.

    Args:
        recordings: a file, a folder (recursive ``*.wav``/``*.flac``), a glob, or a
            list of these.
        front_end: the module that turns waveforms ``(B, C_in, S)`` into features
            (the model's own; needs ``sample_rate``, ``clip_samples``, ``out_channels``).
        hop_s: seconds between window starts (rounded to whole samples).
        batch_size: windows per item.
        extra_channels: ``error`` or ``first_two`` for files with more than two channels.
        block_s: seconds read from disk at a time.
        channels_last: hand ``x`` over in channels-last memory order (same values;
            CPU convolutions run about twice as fast on it).
    """

    def __init__(
        self,
        recordings: str | Path | Sequence[str | Path],
        front_end: nn.Module,
        hop_s: float = 0.5,
        batch_size: int = 64,
        extra_channels: ExtraChannels = "error",
        block_s: float = DEFAULT_BLOCK_S,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if hop_s <= 0 or batch_size < 1:
            raise ValueError(f"need hop_s > 0 and batch_size >= 1, got {hop_s}, {batch_size}")
        if extra_channels not in ("error", "first_two"):
            raise ValueError(
                f"extra_channels must be 'error' or 'first_two', got {extra_channels!r}"
            )
        self.paths = find_recordings(recordings)
        self.front_end = front_end.eval()
        self.sample_rate = int(front_end.sample_rate)
        self.clip_samples = int(front_end.clip_samples)
        self.hop_samples = max(1, int(round(hop_s * self.sample_rate)))
        self.batch_size = int(batch_size)
        self.extra_channels = extra_channels
        self.block_s = float(block_s)
        self.channels_last = channels_last
        self.in_channels = 1 if front_end.out_channels == 1 else 2
        config = getattr(front_end, "config", None)
        self.feature_config: dict[str, Any] = config() if callable(config) else {}
        hash_fn = getattr(front_end, "config_hash", None)
        self.feature_hash: str | None = hash_fn() if callable(hash_fn) else None
        self._len: int | None = None

    @property
    def hop_s(self) -> float:
        """Seconds between window starts, after rounding to whole samples."""
        return self.hop_samples / self.sample_rate

    @property
    def window_s(self) -> float:
        """Seconds per window (the front end's clip length)."""
        return self.clip_samples / self.sample_rate

    def my_paths(self) -> list[Path]:
        """The recordings this process handles (split by DDP rank, then by worker)."""
        paths = self.paths
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            paths = paths[rank::world]
        worker = get_worker_info()
        if worker is not None:
            paths = paths[worker.id :: worker.num_workers]
        return paths

    def __len__(self) -> int:
        """Items this process's loader yields, from the headers (for progress bars).

        Exact for intact files; for a file whose data ends before its header says, an
        upper bound (the loader then simply ends early).
        """
        if self._len is None:
            total = 0
            for path in self.my_paths():
                try:
                    info = probe(path)
                    samples = math.ceil(info.frames * self.sample_rate / info.sample_rate)
                    n = window_count(samples, self.clip_samples, self.hop_samples)
                    if info.channels > 2 and self.extra_channels == "error":
                        n = 0
                except RecordingError:
                    n = 0
                total += max(1, math.ceil(n / self.batch_size))
            self._len = total
        return self._len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        keep_heap_flat()  # in the process that computes the features (main or worker)
        for path in self.my_paths():
            yield from self.iter_recording(path)

    def iter_recording(self, path: str | Path) -> Iterator[dict[str, Any]]:
        """Items of one recording: its batches of windows, the last one flagged."""
        path = Path(path)
        meta: dict[str, Any] = {
            "sample_rate": self.sample_rate,
            "window_s": self.window_s,
            "hop_s": self.hop_s,
            "feature_config_hash": self.feature_hash,
            "feature_config": self.feature_config,
            "status": "ok",
            "error": None,
        }
        state = StreamState()
        n_windows = 0
        final: tuple[int, torch.Tensor] | None = None
        try:
            info = probe(path)
            meta.update(
                source_sample_rate=info.sample_rate,
                source_channels=info.channels,
                source_format=info.format,
                source_duration_s=info.duration_s,
            )
            if info.declared_frames is not None:
                meta["status"] = "truncated"
                meta["error"] = (
                    f"{path}: truncated: the header promises "
                    f"{info.declared_frames / info.sample_rate:.1f} s, the file holds "
                    f"{info.duration_s:.1f} s; processed what is there"
                )
            blocks = read_blocks(
                info, self.sample_rate, self.in_channels, self.extra_channels, self.block_s, state
            )
            for first, segment, count, last in self._batches(blocks):
                if last:  # the stream has ended: state is final
                    final = (first, segment, count)
                else:
                    yield self._item(path, meta, first, segment, count, last=False)
                n_windows += count
        except RecordingError as err:
            state.error = str(err)
            meta["status"] = "error"
        if state.error:
            meta["error"] = state.error
            if meta["status"] != "error":
                meta["status"] = "partial"
        elif n_windows == 0 and meta["status"] == "ok":
            meta["status"] = "too_short"
            meta["error"] = (
                f"{path}: too short: {state.samples / self.sample_rate:.2f} s is less than "
                f"one {self.window_s:g} s window"
            )
        meta.update(
            duration_s=state.samples / self.sample_rate,
            nonfinite_samples=state.nonfinite_samples,
            repairs=list(state.repairs),
        )
        if final is None:
            final = (n_windows, torch.zeros(self.in_channels, 0), 0)
        item = self._item(path, meta, *final, last=True)
        item["n_windows"] = n_windows
        yield item

    def _batches(
        self, blocks: Iterator[np.ndarray]
    ) -> Iterator[tuple[int, torch.Tensor, int, bool]]:
        """``(first window index, segment, windows, last)`` per batch, in order.

        ``segment`` ``(C, samples)`` holds the batch's windows back to back (see
        :meth:`_cut`). One batch is held back so the final one can be flagged once the
        stream ends.
        """
        clip, hop, batch = self.clip_samples, self.hop_samples, self.batch_size
        buf = np.zeros((0, 0), np.float32)
        buf_start = 0  # global sample index of buf[:, 0]
        k = 0  # next window index
        pending: tuple[int, torch.Tensor] | None = None
        for block in blocks:
            buf = block if buf.size == 0 else np.concatenate([buf, block], axis=1)
            while window_count(buf_start + buf.shape[1] - k * hop, clip, hop) >= batch:
                if pending is not None:
                    yield (*pending, False)
                pending = (k, self._cut(buf, k * hop - buf_start, batch), batch)
                k += batch
                drop = min(k * hop - buf_start, buf.shape[1])  # hop may exceed clip
                buf, buf_start = buf[:, drop:], buf_start + drop
        rest = window_count(buf_start + buf.shape[1] - k * hop, clip, hop) if buf.size else 0
        if rest:
            if pending is not None:
                yield (*pending, False)
            pending = (k, self._cut(buf, k * hop - buf_start, rest), rest)
        if pending is not None:
            yield (*pending, True)

    def _cut(self, buf: np.ndarray, offset: int, count: int) -> torch.Tensor:
        """The samples ``(C, span)`` of ``count`` windows starting ``offset`` into ``buf``.

        A copy of just this span, so that the batch does not keep the block alive.
        """
        span = (count - 1) * self.hop_samples + self.clip_samples
        return torch.from_numpy(np.ascontiguousarray(buf[:, offset : offset + span]))

    def _features(self, segment: torch.Tensor, count: int) -> torch.Tensor:
        """Features of the ``count`` windows in ``segment``.

        The front end's ``windows`` method when it has one (:class:`data.features.LogMelFrontEnd`
        computes frames shared by overlapping windows once), else its ``forward`` on the
        stacked windows: the same values either way.
        """
        windows = getattr(self.front_end, "windows", None)
        if callable(windows):
            return windows(segment, self.hop_samples, count)
        waves = segment.unfold(1, self.clip_samples, self.hop_samples).transpose(0, 1)
        return self.front_end(waves[:count])

    def _item(
        self,
        path: Path,
        meta: dict[str, Any],
        first: int,
        segment: torch.Tensor,
        count: int,
        last: bool,
    ) -> dict[str, Any]:
        n = count
        with torch.inference_mode():
            if n:
                x = self._features(segment, count)
                if self.channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = torch.zeros(0, *self._feature_shape())
        index = torch.arange(first, first + n, dtype=torch.int64)
        return {
            "x": x,
            "recording": str(path),
            "index": index,
            "start_s": index.double() * self.hop_s,
            "last": last,
            "info": dict(meta),
        }

    def _feature_shape(self) -> tuple[int, ...]:
        shape = getattr(self.front_end, "output_shape", None)
        if shape is None:
            with torch.inference_mode():
                shape = tuple(
                    self.front_end(torch.zeros(1, self.in_channels, self.clip_samples)).shape[1:]
                )
        return tuple(shape)


def load_windows_whole(
    path: str | Path, front_end: nn.Module, hop_s: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every window of a *short* file decoded and resampled whole.

    The reference the streaming path is tested against (and handy for a quick look
    at a clip): decode with :func:`data.audio.decode`, resample the whole signal with
    :func:`data.audio.resample`, cut windows, run the front end once.

    Returns:
        ``(x (N, C, F, T), start_s (N,))``.
    """
    from data.audio import decode, resample

    wave, sr = decode(path)
    wave = resample(wave, sr, int(front_end.sample_rate))
    clip = int(front_end.clip_samples)
    hop = max(1, int(round(hop_s * front_end.sample_rate)))
    n = window_count(wave.shape[1], clip, hop)
    waves = torch.stack([torch.from_numpy(wave[:, k * hop : k * hop + clip]) for k in range(n)])
    with torch.inference_mode():
        x = front_end(waves) if n else torch.zeros(0)
    return x, torch.arange(n, dtype=torch.float64) * (hop / front_end.sample_rate)

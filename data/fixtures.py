"""Writers of DreamCatcher-layout archives from the synthetic corpus, with hostile members.

:func:`write_dreamcatcher_archive` writes a :class:`~data.sources.synthetic.Synthetic`
corpus as DreamCatcher's ``data/{split}.tar.gz`` tarballs, so that the real reader
(:class:`~data.sources.dreamcatcher.DreamCatcher`) can be run, measured and tested without
the gated dataset; ``malformed=True`` adds the documented bad members of
:data:`MALFORMED_MEMBERS` (corrupt, empty, NaN, too short, wrong shape, unsafe paths,
unknown label, wrong split) that the reader and the cache must skip, count or repair.

Why a module of ``data`` and not of ``tests/``: besides the tests, the cache benchmark
(``benchmarks/cache_build.py``) writes its corpora with it and users write a demo archive
with it (README); the hostile members are an option of the same writer, and their
catalogue is what the reader's and the cache's tests check against. Why not in
``data/sources/``: it writes archives, it is not a source of clips.
"""

from __future__ import annotations

import io
import os
import queue
import struct
import tarfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf

from data.audio import resample
from data.sources.base import DREAMCATCHER_LABELS, SPLITS
from data.sources.synthetic import Synthetic

#: Default path prefix inside the written tarballs, as long as the real dataset's.
DEFAULT_PREFIX = "home/user/datasets/DreamCatcher/extracted/v1"


class MalformedMember(NamedTuple):
    """One deliberately bad member that ``write_dreamcatcher_archive(malformed=True)`` adds.

    Attributes:
        label: the label folder the member sits in.
        source_reason: the :class:`SkippedClip` reason DreamCatcher gives it, or
            ``None`` when it is yielded as a :class:`Clip`.
        cache_reason: the :func:`data.audio.check_waveform` reason the cache gives
            the yielded clip, or ``None`` when it is kept.
        repair: the :data:`data.audio.REPAIRS` entry applied when kept, if any.
    """

    label: str
    source_reason: str | None
    cache_reason: str | None
    repair: str | None


#: The bad members added to *each* split's tarball with ``malformed=True``, by key;
#: member ``key`` is named ``malformed_<key>_<split>.wav`` (see
#: :func:`malformed_member_name`). Per split: 5 skipped by the source (corrupt 1,
#: unsafe_path 2, unknown_label 1, wrong_split 1), 6 yielded as clips, of which the
#: cache skips 4 (empty, nan, too_short, bad_shape) and keeps 2 (a mono breathe
#: clip, duplicated to two channels, and a 22.05 kHz quiet clip, resampled).
MALFORMED_MEMBERS: dict[str, MalformedMember] = {
    "corrupt": MalformedMember("snore", "corrupt", None, None),
    "empty": MalformedMember("quiet", None, "empty", None),
    "nan": MalformedMember("breathe", None, "nan", None),
    "too_short": MalformedMember("quiet", None, "too_short", None),
    "three_channel": MalformedMember("snore", None, "bad_shape", None),
    "mono": MalformedMember("breathe", None, None, "mono"),
    "rate_22050": MalformedMember("quiet", None, None, "resampled"),
    "dotdot": MalformedMember("snore", "unsafe_path", None, None),
    "absolute": MalformedMember("quiet", "unsafe_path", None, None),
    "unknown_label": MalformedMember("gurgle", "unknown_label", None, None),
    "wrong_split": MalformedMember("quiet", "wrong_split", None, None),
}


def malformed_member_name(key: str, split: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Archive path of the bad member ``key`` in ``split``'s tarball."""
    label = MALFORMED_MEMBERS[key].label
    stem = f"malformed_{key}_{split}.wav"
    if key == "dotdot":
        return f"{prefix}/../data/{split}/{label}/{stem}"
    if key == "absolute":
        return f"/{prefix}/data/{split}/{label}/{stem}"
    if key == "wrong_split":
        other = SPLITS[(SPLITS.index(split) + 1) % len(SPLITS)] if split in SPLITS else "train"
        return f"{prefix}/data/{other}/{label}/{stem}"
    return f"{prefix}/data/{split}/{label}/{stem}"


def _wav_bytes(wave: np.ndarray, sample_rate: int, subtype: str) -> bytes:
    """WAV bytes of ``(channels, samples)``, equal for equal input on every platform.

    ``PCM_16`` is encoded here (a canonical 44-byte header and ``round(x * 32768)``,
    which soundfile decodes back within half a step): about ten times faster than
    soundfile's writer, whose file-like output goes through Python callbacks.
    Other subtypes go through soundfile, less libsndfile's time-stamped PEAK chunk.
    """
    if subtype == "PCM_16":
        channels = wave.shape[0]
        scaled = wave * np.float32(32768.0)
        np.rint(scaled, out=scaled)
        np.clip(scaled, -32768, 32767, out=scaled)
        planar = scaled.astype("<i2")
        frames = np.empty((wave.shape[1], channels), dtype="<i2")
        for channel in range(channels):  # interleave; faster than a strided tobytes()
            frames[:, channel] = planar[channel]
        data = frames.tobytes()
        fmt = struct.pack(
            "<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16
        )
        header = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data))
        return b"RIFF" + struct.pack("<I", len(header) + len(data)) + header + data
    buf = io.BytesIO()
    sf.write(buf, np.ascontiguousarray(wave.T), sample_rate, subtype=subtype, format="WAV")
    data = buf.getvalue()
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        end = pos + 8 + size + (size & 1)
        if data[pos : pos + 4] != b"PEAK":
            chunks.append(data[pos:end])
        pos = end
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def _malformed_payloads(source: Synthetic, split: str, subtype: str) -> dict[str, bytes]:
    sr = source.sample_rate
    base = source.synthesize(split, 0).waveform
    short = base[:, : int(0.1 * sr)]
    nan_wave = base.copy()
    nan_wave[:, 100:200] = np.nan
    valid = _wav_bytes(base, sr, subtype)
    return {
        "corrupt": b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4,
        "empty": _wav_bytes(np.zeros((2, 0), np.float32), sr, subtype),
        "nan": _wav_bytes(nan_wave, sr, "FLOAT"),
        "too_short": _wav_bytes(short, sr, subtype),
        "three_channel": _wav_bytes(np.concatenate([base, base[:1]]), sr, subtype),
        "mono": _wav_bytes(base[:1], sr, subtype),
        "rate_22050": _wav_bytes(resample(base, sr, 22050), 22050, subtype),
        "dotdot": valid,
        "absolute": valid,
        "unknown_label": valid,
        "wrong_split": valid,
    }


def write_dreamcatcher_archive(
    root: str | os.PathLike[str],
    source: Synthetic,
    splits: Sequence[str] = SPLITS,
    prefix: str = DEFAULT_PREFIX,
    malformed: bool = False,
    subtype: str = "PCM_16",
    compresslevel: int = 0,
) -> Path:
    """Write ``source`` as DreamCatcher tarballs ``root/data/{split}.tar.gz``.

    Every clip becomes ``<prefix>/data/<split>/<label>/<clip_name>.wav``. The
    tarballs are byte-for-byte reproducible (fixed member and gzip times) and each
    is written under a temporary name and renamed when complete.

    The gzip level defaults to 0 (stored): synthetic noise shrinks by only a third
    at level 1, while deflating and inflating it would dominate writing and reading
    (on a 2.5 GHz Xeon core zlib deflates about 500 and inflates about 1,700 such
    clips per second). Pass 1-9 to measure reading at the real archives' cost.

    Args:
        root: folder to write into (``DreamCatcher(root=root)`` reads it back).
        source: the synthetic corpus to write; its labels must be DreamCatcher's.
        splits: splits to write.
        prefix: path prefix of every member, like the real archive's long one.
        malformed: also add each entry of :data:`MALFORMED_MEMBERS` to every split,
            in the middle of the stream.
        subtype: soundfile subtype of the regular clips (``PCM_16``, ``FLOAT``...).
        compresslevel: gzip level, 0 (stored, fastest) to 9.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    bad = [label for label in source.labels if label not in DREAMCATCHER_LABELS]
    if bad:
        raise ValueError(f"labels {bad} are not DreamCatcher labels {DREAMCATCHER_LABELS}")
    prefix = prefix.strip("/")
    out = Path(root) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        count = source.size_hint(split) or 0
        extras: list[tuple[str, bytes]] = []
        if malformed:
            payloads = _malformed_payloads(source, split, subtype)
            extras = [(malformed_member_name(k, split, prefix), payloads[k]) for k in payloads]
        final = out / f"{split}.tar.gz"
        tmp = out / f".{split}.tar.gz.tmp"
        with (
            GzipDeflater(tmp, level=compresslevel) as gz,
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar,
        ):
            for index in range(count):
                if index == count // 2:
                    for name, payload in extras:
                        _add_member(tar, name, payload)
                clip = source.synthesize(split, index)
                name = f"{prefix}/data/{split}/{clip.label}/{source.clip_name(split, index)}.wav"
                _add_member(tar, name, _wav_bytes(clip.waveform, clip.sample_rate, subtype))
            if count == 0:
                for name, payload in extras:
                    _add_member(tar, name, payload)
        os.replace(tmp, final)
    return Path(root)


class GzipDeflater(io.RawIOBase):
    """A write-only gzip file whose compression runs in a background thread.

    zlib releases the GIL while it deflates, so compressing overlaps generating and
    encoding the next clips. The gzip header carries no name and time 0, so equal
    input gives equal bytes.

    Args:
        path: file to create.
        level: zlib compression level, 0 (stored) to 9.
        chunk: bytes gathered before handing them to the compressing thread.
    """

    def __init__(self, path: str | os.PathLike[str], level: int = 0, chunk: int = 1 << 20) -> None:
        super().__init__()
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._chunk = chunk
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gzip-deflater", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._error is not None:
            raise self._error
        block = bytes(data)
        self._pending.append(block)
        self._pending_size += len(block)
        if self._pending_size >= self._chunk:
            self._flush_pending()
        return len(block)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._flush_pending()
            self._queue.put(None)
            self._thread.join()
        finally:
            self._file.close()
            super().close()
        if self._error is not None:
            raise self._error

    def _flush_pending(self) -> None:
        if self._pending:
            self._queue.put(b"".join(self._pending))
            self._pending, self._pending_size = [], 0

    def _run(self) -> None:
        try:
            while (block := self._queue.get()) is not None:
                self._file.write(self._deflate.compress(block))
            self._file.write(self._deflate.flush())
        except BaseException as err:  # raised in the writing thread by write() or close()
            self._error = err
            while self._queue.get() is not None:  # unblock the writer until it closes
                pass


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))

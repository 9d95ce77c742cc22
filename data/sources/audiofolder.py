"""A folder of labelled audio files: ``<root>/<split>/<label>/*.wav|*.flac``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from data.audio import AudioDecodeError, decode
from data.sources.base import SPLITS, Clip, SkippedClip, Source

#: File name endings read as audio (compared case-insensitively).
AUDIO_SUFFIXES = (".wav", ".flac")


class AudioFolder(Source):
    """Labelled audio laid out as ``<root>/<split>/<label>/<file>.wav`` (or ``.flac``).

    The label is the folder directly above each file, nothing else. ``labels`` is
    the sorted set of label folders found under any split folder, so a folder
    holding a DreamCatcher subset offers exactly the classes it holds; a cache picks
    and orders the ones it trains on by name. Files are read in sorted path order;
    other files and deeper folders are passed over. A file soundfile cannot decode
    is yielded as a ``SkippedClip`` with reason ``corrupt``. ``clip_id`` is the
    path relative to ``root``.

    Args:
        root: folder holding one sub-folder per split (``train``, ``validation``,
            ``test``), each holding one sub-folder per label.
    """

    name = "audiofolder"

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"audio folder {self.root} does not exist")
        found = {
            d.name
            for split in SPLITS
            if (self.root / split).is_dir()
            for d in (self.root / split).iterdir()
            if d.is_dir()
        }
        self.labels = tuple(sorted(found))

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """Yield every audio file of ``split`` in sorted order."""
        for path in self._files(split):
            rel = path.relative_to(self.root).as_posix()
            label = path.parent.name
            try:
                waveform, sr = decode(path)
            except AudioDecodeError:
                yield SkippedClip(rel, split, label, "corrupt")
                continue
            yield Clip(waveform, sr, label, rel, split)

    def fingerprint(self, split: str) -> dict[str, str]:
        """A hash of the split's file list with sizes and modification times.

        A rewritten file almost always changes its time; a copied folder merely
        rebuilds its cache once.
        """
        sha = hashlib.sha256()
        files = self._files(split)
        for path in files:
            st = path.stat()
            rel = path.relative_to(self.root).as_posix()
            sha.update(
                f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape")
            )
        return {
            "source": self.name,
            "split": split,
            "files": str(len(files)),
            "listing_sha256": sha.hexdigest(),
        }

    def size_hint(self, split: str) -> int | None:
        """Number of audio files of ``split``."""
        return len(self._files(split))

    def _files(self, split: str) -> list[Path]:
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"no {split!r} folder in audio folder {self.root}")
        return sorted(
            path
            for label_dir in folder.iterdir()
            if label_dir.is_dir()
            for path in label_dir.iterdir()
            if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file()
        )

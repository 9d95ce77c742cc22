"""A folder of labelled audio files: ``<root>/<split>/<label>/*.wav|*.flac``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data.audio import AUDIO_SUFFIXES
from data.hashing import lines_sha256
from data.sources.base import SPLITS, Clip, SkippedClip, Source
from data.sources.tree import TreeFile, place_files, read_tree_file


class AudioFolder(Source):
    """Labelled audio laid out as ``<root>/<split>/<label>/<file>.wav`` (or ``.flac``).

    The label is the folder directly above each file, nothing else. ``labels`` is
    the sorted set of label folders found under any split folder, so a folder
    holding a DreamCatcher subset offers exactly the classes it holds; a cache picks
    and orders the ones it trains on by name. Files are read in sorted path order.
    No file under a split folder is passed over: one that is not an audio file is
    skipped as ``not_audio``, one in a deeper folder or directly in the split folder
    as ``misplaced``, one under a split folder spelled in other case (``Train/``) as
    ``misspelled_split``; a WAV cut short is skipped as ``truncated`` and a file
    soundfile cannot decode (or read) as ``corrupt``. Files in no split folder are counted in
    the fingerprint. ``clip_id`` is the path relative to ``root``.

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
        """Yield every file of ``split`` in sorted order: a clip or a counted skip."""
        for file in self._files(split):
            yield read_tree_file(file)

    def fingerprint(self, split: str) -> dict[str, str]:
        """A hash of the split's file list with sizes and modification times.

        A rewritten file almost always changes its time; a copied folder merely
        rebuilds its cache once.
        """
        files = self._files(split)
        listing = []
        for file in files:
            st = file.path.stat()
            listing.append(f"{file.rel}\0{st.st_size}\0{st.st_mtime_ns}")
        return {
            "source": self.name,
            "split": split,
            "files": str(len(files)),
            "listing_sha256": lines_sha256(listing),
            "outside_splits": str(len(place_files(self.root, AUDIO_SUFFIXES, True)[1])),
        }

    def size_hint(self, split: str) -> int | None:
        """Number of audio files of ``split``."""
        return len(self._files(split))

    def _files(self, split: str) -> list[TreeFile]:
        folder = self.root / split
        if not folder.is_dir():
            other = [d.name for d in self.root.iterdir() if d.is_dir() and d.name.lower() == split]
            hint = f" (found {other[0]}/: split folders are lower case)" if other else ""
            raise FileNotFoundError(f"no {split!r} folder in audio folder {self.root}{hint}")
        return place_files(self.root, AUDIO_SUFFIXES, top_level=True)[0][split]

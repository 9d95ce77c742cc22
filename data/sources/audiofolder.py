"""A folder of labelled audio files in any format soundfile reads, of any length.

``<root>/<split>/<label>/**/<file>``, or ``<root>/<label>/**/<file>`` with the splits
derived per recording (:class:`DerivedSplits`); long files can be cut into clip-length
windows (:class:`~data.sources.base.Segment`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import soundfile as sf

from data.audio import AUDIO_SUFFIXES
from data.hashing import lines_sha256
from data.sources.base import SPLITS, Clip, Segment, SkippedClip, Source, Windowing, parse_clip_id
from data.sources.tree import TreeFile, label_files, place_files, read_tree_file


@dataclass(frozen=True)
class DerivedSplits:
    """Fractions of each label's recordings held out for validation and test.

    Each label's files are put in a fixed order by a hash of their path (and ``seed``);
    the first ``round(n * validation)`` go to validation, the next ``round(n * test)`` to
    test, the rest to train. A file is one recording: all its windows go to its split.

    Attributes:
        validation: fraction of each label's files for the validation split.
        test: fraction of each label's files for the test split.
        seed: changes the order, hence which files are held out.
    """

    validation: float = 0.15
    test: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.validation < 0 or self.test < 0 or self.validation + self.test >= 1:
            raise ValueError(
                f"derive_splits needs validation, test >= 0 with a sum below 1, got "
                f"validation={self.validation}, test={self.test}"
            )


class AudioFolder(Source):
    """Labelled audio files of any length and any format soundfile reads.

    Layout: ``<root>/<split>/<label>/**/<file>``, one folder per split (``train``,
    ``validation``, ``test``). The label is the folder directly below the split folder,
    nothing else; files in deeper subfolders belong to that label. With
    ``derive_splits`` the layout is ``<root>/<label>/**/<file>`` (the label is the folder
    directly below ``root``) and each file is put in a split by :class:`DerivedSplits`.

    ``labels`` is the sorted set of label folders, so a folder holding a DreamCatcher
    subset offers exactly the classes it holds; a cache picks and orders the ones it
    trains on by name. Files are read in sorted path order. A file is audio when its
    name ends in one of :data:`data.audio.AUDIO_SUFFIXES` (WAV, FLAC, OGG Vorbis/Opus,
    MP3, AIFF, CAF, AU...; any letter case).

    With ``segment`` each file is cut into windows of the front end's clip length that
    start every ``segment.hop_s`` seconds (see :class:`~data.sources.base.Segment`);
    a window's ``clip_id`` is ``<path relative to root>#t=<start seconds>``, so
    ``train/snore/night1.flac#t=12.50`` names the file and the second; :meth:`read_clip`
    reads it back. Without ``segment`` a file is one clip (``clip_id``: its relative
    path) and the cache keeps its first clip length. A file is decoded whole before it
    is cut (an hour at 16 kHz in two channels is about 460 MB as float32); unlabelled
    nights go to ``predict``, which streams them.

    No file is passed over: one that is not an audio file is skipped as ``not_audio``,
    one directly in a split folder (or in ``root`` with ``derive_splits``) as
    ``misplaced``, one under a split folder spelled in other case (``Train/``) as
    ``misspelled_split``; a WAV cut short as ``truncated``, a file soundfile cannot
    decode or read (an MP3 under a libsndfile older than 1.1, a damaged file) as
    ``corrupt``; a last window shorter than ``segment.min_s`` as ``too_short``. Each is
    counted and listed in the cache. Files in no split folder are counted in the
    fingerprint.

    Args:
        root: the folder (see the layout above).
        segment: cut each file into clip-length windows, e.g. ``{hop_s: 0.5, min_s:
            0.25}``; ``None`` (default) reads each file as one clip.
        derive_splits: derive the splits from a folder without split folders, e.g.
            ``{validation: 0.15, test: 0.15}``; ``None`` (default) reads the split folders.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``derive_splits`` is given but ``root`` holds split folders.
    """

    name = "audiofolder"

    def __init__(
        self,
        root: str,
        segment: Segment | None = None,
        derive_splits: DerivedSplits | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"audio folder {self.root} does not exist")
        if isinstance(derive_splits, dict):
            derive_splits = DerivedSplits(**derive_splits)
        self.derive_splits = derive_splits
        self.windowing = Windowing(segment, "AudioFolder")
        self.segment = self.windowing.segment
        tops = [d for d in self.root.iterdir() if d.is_dir()]
        if derive_splits is not None:
            splits = sorted(d.name for d in tops if d.name.lower() in SPLITS)
            if splits:
                raise ValueError(
                    f"audio folder {self.root} has split folders ({', '.join(splits)}); "
                    "derive_splits reads <root>/<label>/**: drop derive_splits to use them"
                )
            self.labels = tuple(sorted(d.name for d in tops))
        else:
            found = {
                d.name
                for split in SPLITS
                if (self.root / split).is_dir()
                for d in (self.root / split).iterdir()
                if d.is_dir()
            }
            self.labels = tuple(sorted(found))

    def use_clip_seconds(self, seconds: float) -> None:
        """Make windows ``seconds`` long (the front end's clip length; see ``segment``)."""
        self.windowing.use_clip_seconds(seconds)

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """Yield every file (or window) of ``split`` in sorted order: a clip or a counted skip."""
        files = self._files(split)
        if self.segment is not None:
            _ = self.windowing.window_s  # fails before any reading when the length is unknown
        for file in files:
            yield from self.windowing.cut(read_tree_file(file))

    def read_clip(self, clip_id: str) -> Clip | SkippedClip:
        """The clip (or skip) a ``clip_id`` of this source names, read again from its file.

        Args:
            clip_id: as in a cache or a predictions file, e.g.
                ``test/snore/night1.flac#t=12.50``.

        Raises:
            KeyError: no file of the folder has that id.
        """
        recording, start = parse_clip_id(clip_id)
        for split in SPLITS:
            try:
                files = self._files(split)
            except FileNotFoundError:
                continue
            for file in files:
                if file.rel == recording:
                    for item in self.windowing.cut(read_tree_file(file)):
                        if item.clip_id == clip_id:
                            return item
        raise KeyError(
            f"no clip {clip_id!r} in audio folder {self.root}"
            + (f" (its file {recording} has no window at {start} s)" if start is not None else "")
        )

    def fingerprint(self, split: str) -> dict[str, str]:
        """A hash of the split's file list with sizes and modification times.

        A rewritten file almost always changes its time; a copied folder merely
        rebuilds its cache once. With ``derive_splits`` the list is the whole folder's:
        a file added to any label can move others between splits. The layout, the
        audio suffixes and the segment are part of it, so a cache is never reused
        under other reading rules.
        """
        files = self._files(split)
        listed = self._all_files() if self.derive_splits is not None else files
        listing = []
        for file in listed:
            st = file.path.stat()
            listing.append(f"{file.rel}\0{st.st_size}\0{st.st_mtime_ns}")
        fp = {
            "source": self.name,
            "split": split,
            "files": str(len(files)),
            "listing_sha256": lines_sha256(listing),
            "layout": "<split>/<label>/**/<file>",
            "suffixes_sha256": lines_sha256(list(AUDIO_SUFFIXES)),
            **self.windowing.fingerprint(),
        }
        if self.derive_splits is None:
            outside = place_files(self.root, AUDIO_SUFFIXES, True, recursive=True)[1]
            fp["outside_splits"] = str(len(outside))
        else:
            d = self.derive_splits
            fp["layout"] = "<label>/**/<file>"
            fp["derive_splits"] = f"validation={d.validation!r},test={d.test!r},seed={d.seed}"
        return fp

    def size_hint(self, split: str) -> int | None:
        """Items of ``split``: its files, or with ``segment`` their windows (from the headers)."""
        files = self._files(split)
        if self.segment is None:
            return len(files)
        total = 0
        for file in files:
            try:
                info = sf.info(str(file.path)) if file.reason is None else None
            except Exception:  # an unreadable file is one skipped item
                info = None
            total += self.windowing.count(info.frames, info.samplerate) if info else 1
        return total

    def _all_files(self) -> list[TreeFile]:
        return label_files(self.root, AUDIO_SUFFIXES)

    def _files(self, split: str) -> list[TreeFile]:
        if self.derive_splits is not None:
            if split not in SPLITS:
                raise FileNotFoundError(f"no {split!r} split in audio folder {self.root}")
            return [f for f in self._derived() if f.split == split]
        folder = self.root / split
        if not folder.is_dir():
            other = [d.name for d in self.root.iterdir() if d.is_dir() and d.name.lower() == split]
            hint = f" (found {other[0]}/: split folders are lower case)" if other else ""
            raise FileNotFoundError(f"no {split!r} folder in audio folder {self.root}{hint}")
        return place_files(self.root, AUDIO_SUFFIXES, top_level=True, recursive=True)[0][split]

    def _derived(self) -> list[TreeFile]:
        """Every file of the folder with its derived split (see :class:`DerivedSplits`)."""
        d = self.derive_splits
        assert d is not None
        by_label: dict[str, list[TreeFile]] = {}
        for file in self._all_files():
            by_label.setdefault(file.label, []).append(file)
        placed: list[TreeFile] = []
        for files in by_label.values():
            order = sorted(
                files, key=lambda f: hashlib.sha256(f"{d.seed}\0{f.rel}".encode()).hexdigest()
            )
            n_val, n_test = round(len(order) * d.validation), round(len(order) * d.test)
            for i, file in enumerate(order):
                split = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
                placed.append(replace(file, split=split))
        placed.sort(key=lambda f: f.rel)
        return placed

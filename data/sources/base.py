"""The clip contract every source honours.

A source turns some storage (a tarball, a folder, a parquet dataset, a random
generator) into a stream of :class:`Clip` records for one split. Audio that
cannot be decoded at all is reported as a :class:`SkippedClip` with a reason;
everything that *can* be decoded is yielded as a :class:`Clip`, even when it is
empty, too short or holds NaN, so that the cache applies one policy to all of
them (see :func:`data.audio.check_waveform`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The labels of DreamCatcher, in the dataset's own order.
DREAMCATCHER_LABELS: tuple[str, ...] = (
    "quiet",
    "non_wearer",
    "bruxism",
    "swallow",
    "somniloquy",
    "breathe",
    "cough",
    "snore",
    "movements",
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Clip:
    """One labelled piece of audio.

    Attributes:
        waveform: float32 array ``(channels, samples)``.
        sample_rate: samples per second of ``waveform``.
        label: the label name, taken from the source's documented place only.
        clip_id: stable identifier (the member path inside the archive).
        split: ``train``, ``validation`` or ``test``.
    """

    waveform: np.ndarray
    sample_rate: int
    label: str
    clip_id: str
    split: str


@dataclass(frozen=True)
class SkippedClip:
    """A member the source could not turn into audio (corrupt, unreadable, unsafe path)."""

    clip_id: str
    split: str
    label: str
    reason: str


class Source(abc.ABC):
    """Where clips come from.

    Subclasses implement :meth:`iter_clips` and :meth:`fingerprint`. ``labels`` lists
    every label the source can yield; a cache picks and orders a subset of them.
    """

    #: Short name used in cache folder names and artifacts.
    name: str = "source"
    #: Every label this source can yield.
    labels: tuple[str, ...] = ()

    @abc.abstractmethod
    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """Yield every clip (or skipped member) of ``split`` in a stable order."""

    @abc.abstractmethod
    def fingerprint(self, split: str) -> dict[str, str]:
        """Identify the exact data behind ``split`` (revision, member-list hash, seed...).

        Two sources with equal fingerprints yield equal clips; a cache built from
        another fingerprint is never reused.
        """

    def size_hint(self, split: str) -> int | None:
        """Number of members of ``split`` when cheaply known (for progress bars)."""
        return None


@dataclass(frozen=True)
class TreeFile:
    """One file of a folder tree, placed in a split.

    Attributes:
        rel: its path relative to the tree's root (``/``-separated): the ``clip_id``.
        path: its path.
        split: the split whose folder holds it.
        label: the folder directly above it when it sits at ``<split>/<label>/<file>``,
            else the folder below the split folder (or ``""``).
        reason: ``None`` when it is to be read as a clip, else the skip reason:
            ``misspelled_split`` (``Train/``), ``misplaced`` (not at
            ``<split>/<label>/<file>``) or ``not_audio`` (another file suffix).
    """

    rel: str
    path: Path
    split: str
    label: str
    reason: str | None


def place_files(
    root: Path, suffixes: tuple[str, ...], top_level: bool
) -> tuple[dict[str, list[TreeFile]], list[str]]:
    """Place every file under ``root`` in a split, or list it as outside every split.

    A file belongs to the split named by the nearest folder above it whose name is a
    split's in any letter case (``top_level``: only the first folder below ``root``
    counts). It is read when that folder is spelled exactly, the file sits at
    ``<split>/<label>/<file>`` and its name ends in one of ``suffixes`` (any case);
    otherwise it gets a skip reason, so no file under a split is passed over unseen.

    Returns:
        per split, its files sorted by ``rel``; and the ``rel`` of every file that is
        in no split's folder (sorted).
    """
    placed: dict[str, list[TreeFile]] = {s: [] for s in SPLITS}
    outside: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for fname in sorted(filenames):
            path = here / fname
            rel = path.relative_to(root).as_posix()
            parts = rel.split("/")
            n = len(parts)
            candidates = [0] if top_level else range(n - 2, -1, -1)
            k = next((i for i in candidates if i < n - 1 and parts[i].lower() in SPLITS), None)
            if k is None:
                outside.append(rel)
                continue
            split = parts[k].lower()
            label = parts[k + 1] if k + 1 < n - 1 else ""
            if parts[k] != split:
                reason: str | None = "misspelled_split"
            elif k != n - 3:
                reason = "misplaced"
            elif not fname.lower().endswith(suffixes):
                reason = "not_audio"
            else:
                reason = None
            placed[split].append(TreeFile(rel, path, split, label, reason))
    for files in placed.values():
        files.sort(key=lambda f: f.rel)
    return placed, sorted(outside)

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
from collections.abc import Iterator
from dataclasses import dataclass

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

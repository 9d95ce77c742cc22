"""The clip contract every source honours, and how a labelled recording becomes windows.

A source turns some storage (a tarball, a folder, a parquet dataset, a random
generator) into a stream of :class:`Clip` records for one split. Audio that
cannot be decoded at all is reported as a :class:`SkippedClip` with a reason;
everything that *can* be decoded is yielded as a :class:`Clip`, even when it is
empty, too short or holds NaN, so that the cache applies one policy to all of
them (see :func:`data.audio.check_waveform`).

A source given a :class:`Segment` cuts each labelled recording into windows of the
front end's clip length (:class:`Windowing`); every window keeps its recording's
identity in its ``clip_id``: ``<recording>#t=<start seconds>`` (the media-fragment
notation), which :func:`parse_clip_id` reads back.
"""

from __future__ import annotations

import abc
import math
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

#: What separates a recording's id from a window's start in a window's ``clip_id``.
WINDOW_MARK = "#t="


def parse_clip_id(clip_id: str) -> tuple[str, float | None]:
    """Split a ``clip_id`` into its recording's id and its window's start (seconds).

    ``train/snore/a.wav#t=12.50`` gives ``("train/snore/a.wav", 12.5)``; an id without
    a window part (a whole-file clip) gives ``(clip_id, None)``.
    """
    recording, mark, start = clip_id.rpartition(WINDOW_MARK)
    if not mark:
        return clip_id, None
    try:
        return recording, float(start)
    except ValueError:  # '#t=' inside a file name, not a window
        return clip_id, None


def window_clip_id(recording: str, start: int, sample_rate: int) -> str:
    """The ``clip_id`` of the window of ``recording`` that starts at sample ``start``.

    The start is written in seconds with two decimals, or more where two would not name
    the sample exactly (``a.wav#t=12.50``, ``a.wav#t=0.125``), so ids stay unique.
    """
    for decimals in range(2, 10):
        text = f"{start / sample_rate:.{decimals}f}"
        if round(float(text) * sample_rate) == start:
            break
    return f"{recording}{WINDOW_MARK}{text}"


class _Identified:
    """``recording`` and ``start_s`` read from ``clip_id`` (see :func:`parse_clip_id`)."""

    clip_id: str

    @property
    def recording(self) -> str:
        """The id of the recording this item comes from (its ``clip_id`` for a whole file)."""
        return parse_clip_id(self.clip_id)[0]

    @property
    def start_s(self) -> float | None:
        """Where the window starts in its recording (seconds); ``None`` for a whole file."""
        return parse_clip_id(self.clip_id)[1]


@dataclass(frozen=True)
class Clip(_Identified):
    """One labelled piece of audio: a whole file, or one window of a longer recording.

    Attributes:
        waveform: float32 array ``(channels, samples)``.
        sample_rate: samples per second of ``waveform``.
        label: the label name, taken from the source's documented place only.
        clip_id: stable identifier (the member path inside the archive; for a window,
            followed by ``#t=<start seconds>``). ``recording`` and ``start_s`` read it.
        split: ``train``, ``validation`` or ``test``.
    """

    waveform: np.ndarray
    sample_rate: int
    label: str
    clip_id: str
    split: str


@dataclass(frozen=True)
class SkippedClip(_Identified):
    """A member the source could not turn into audio (corrupt, unreadable, unsafe path),
    or a window it dropped (the last window of a recording, shorter than ``min_s``)."""

    clip_id: str
    split: str
    label: str
    reason: str


@dataclass(frozen=True)
class Segment:
    """How a source cuts each labelled recording into clip-length windows.

    Windows start every ``hop_s`` seconds from the recording's start; each is the
    front end's clip length long (``window_s``), so the cache neither pads nor crops
    them. While audio is left after the last whole window, one more window starts at
    the next hop and runs to the end: it is kept (the cache zero-pads it, as it pads
    any short clip, and counts it ``padded``) when it is at least ``min_s`` long, else
    skipped as ``too_short`` and counted. A recording no longer than one window is one
    window. So every second of a recording is in some window, except a last piece
    shorter than ``min_s``.

    Attributes:
        hop_s: seconds between window starts; at most the window length, so that no
            audio falls between windows.
        min_s: the shortest last window kept (seconds).
        window_s: window length in seconds; leave ``None`` to use the front end's clip
            length (the data module sets it). Given, it must equal that length.
    """

    hop_s: float = 0.5
    min_s: float = 0.25
    window_s: float | None = None

    def __post_init__(self) -> None:
        if not self.hop_s > 0 or not self.min_s >= 0:
            raise ValueError(
                f"segment needs hop_s > 0 and min_s >= 0, got hop_s={self.hop_s}, "
                f"min_s={self.min_s}"
            )
        if self.window_s is not None:
            if not self.window_s > 0:
                raise ValueError(f"segment window_s must be positive, got {self.window_s}")
            if self.hop_s > self.window_s + 1e-9:
                raise ValueError(
                    f"segment hop_s={self.hop_s} is longer than the {self.window_s} s window: "
                    "the audio between windows would be lost; use hop_s <= the window length"
                )


class Windowing:
    """A source's windowing: its :class:`Segment` (or none) and the window length.

    Args:
        segment: how to cut recordings; ``None`` yields each recording as one clip
            (the cache then crops it to the clip length).
        owner: the source's name, for messages.
    """

    def __init__(self, segment: Segment | None, owner: str) -> None:
        if isinstance(segment, dict):  # a plain mapping from Python code
            segment = Segment(**segment)
        self.segment = segment
        self.owner = owner
        self._clip_s = segment.window_s if segment is not None else None

    def use_clip_seconds(self, seconds: float) -> None:
        """Take the front end's clip length as the window length (see :meth:`Source.use_clip_seconds`)."""
        seg = self.segment
        if seg is None:
            return
        if seg.window_s is not None and not math.isclose(seg.window_s, seconds, rel_tol=1e-9):
            raise ValueError(
                f"{self.owner} segment.window_s={seg.window_s} differs from the front end's "
                f"{seconds:g} s clip: windows must be the clip length; drop segment.window_s"
            )
        if seg.hop_s > seconds + 1e-9:
            raise ValueError(
                f"{self.owner} segment.hop_s={seg.hop_s} is longer than the front end's "
                f"{seconds:g} s clip: the audio between windows would be lost"
            )
        self._clip_s = float(seconds)

    @property
    def window_s(self) -> float:
        """The window length (seconds).

        Raises:
            ValueError: segmenting, but the length is not known yet.
        """
        if self._clip_s is None:
            raise ValueError(
                f"{self.owner} was given a segment but not the window length: set "
                "segment.window_s to the front end's clip_seconds, or read the source "
                "through SleepSoundDataModule, which sets it"
            )
        return self._clip_s

    def fingerprint(self) -> dict[str, str]:
        """The windowing's part of a source fingerprint (empty without a segment)."""
        seg = self.segment
        if seg is None:
            return {}
        return {"segment": f"window_s={self.window_s!r},hop_s={seg.hop_s!r},min_s={seg.min_s!r}"}

    def count(self, frames: int, sample_rate: int) -> int:
        """Items (windows and dropped last windows) a recording of ``frames`` yields."""
        if self.segment is None:
            return 1
        return len(self._starts(frames, sample_rate))

    def cut(self, item: Clip | SkippedClip) -> Iterator[Clip | SkippedClip]:
        """Yield ``item``'s windows (see :class:`Segment`); a skip, or any item without a
        segment, passes through unchanged."""
        if self.segment is None or not isinstance(item, Clip):
            yield item
            return
        wave, sr = item.waveform, int(item.sample_rate)
        frames = wave.shape[-1] if wave.ndim else 0
        if wave.ndim != 2 or frames == 0:  # the cache's policy names the fault (bad_shape, empty)
            yield Clip(wave, sr, item.label, window_clip_id(item.clip_id, 0, sr), item.split)
            return
        shortest = self.segment.min_s * sr
        for start, end in self._starts(frames, sr):
            clip_id = window_clip_id(item.clip_id, start, sr)
            if end - start < shortest:
                yield SkippedClip(clip_id, item.split, item.label, "too_short")
            else:
                piece = np.ascontiguousarray(wave[:, start:end])
                yield Clip(piece, sr, item.label, clip_id, item.split)

    def _starts(self, frames: int, sample_rate: int) -> list[tuple[int, int]]:
        """``(start, end)`` samples of every window of a recording of ``frames``."""
        assert self.segment is not None
        width = max(1, round(self.window_s * sample_rate))
        hop = min(width, max(1, round(self.segment.hop_s * sample_rate)))
        if frames <= width:  # one window, however short (an empty file too: the cache names it)
            return [(0, max(frames, 0))]
        spans = [(s, s + width) for s in range(0, frames - width + 1, hop)]
        if spans[-1][1] < frames:  # audio left after the last whole window
            start = spans[-1][0] + hop
            spans.append((start, frames))
        return spans


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

    def use_clip_seconds(self, seconds: float) -> None:
        """Learn the front end's clip length, before any clip or fingerprint is asked for.

        The data module calls it; a source that cuts recordings into windows makes them
        this long. Sources of fixed clips ignore it.

        Raises:
            ValueError: the source was configured with another window length.
        """
        return None

"""A source with augmented copies of its train clips (:class:`Augmented`).

The copies are made on the waveform by :class:`data.augment.WaveAugment`, before the
cache computes features, so the train cache holds them like any other clip and its band
statistics and class counts include them. Other splits are the wrapped source's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from data.audio import check_waveform
from data.augment import WaveAugment
from data.sources.base import Clip, SkippedClip, Source

#: What separates a clip's id from its copy's number in a copy's ``clip_id``.
COPY_MARK = "#aug"


def copy_clip_id(clip_id: str, copy: int) -> str:
    """The ``clip_id`` of copy ``copy`` (1, 2...) of clip ``clip_id``: ``<clip_id>#aug<copy>``."""
    return f"{clip_id}{COPY_MARK}{copy}"


class Augmented(Source):
    """Any source, with ``augment.copies`` augmented copies of each train clip.

    ``iter_clips("train")`` yields each of the source's items and, after each clip,
    its copies 1 to ``copies`` with ``clip_id`` ``<clip_id>#aug<k>`` and the same label
    and split. A skipped item passes through once, and so does a clip the cache would
    refuse whatever its length (not ``(channels, samples)`` of 1 or 2 channels, empty,
    NaN: the cache skips and counts the original); copies of a clip too short for the
    cache's ``min_duration_s`` are skipped and counted like it. Every other split passes
    through untouched, with the source's fingerprint: its cache is the one the source
    alone builds. The train fingerprint adds the augmentation's, so each augmentation has
    its own train cache.

    Args:
        source: the source to augment.
        augment: how to make the copies.
    """

    def __init__(self, source: Source, augment: WaveAugment) -> None:
        if isinstance(source, Augmented):
            raise ValueError("source is already augmented: give one augment, not two")
        self.source = source
        self.augment = augment
        #: The source's name: caches of the splits left alone are shared with it.
        self.name = source.name
        self.labels = tuple(source.labels)

    def __repr__(self) -> str:
        return f"Augmented({self.source!r}, {self.augment!r})"

    def _augments(self, split: str) -> bool:
        return split == "train" and self.augment.copies > 0

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """The source's items of ``split``; for train, each clip followed by its copies."""
        if not self._augments(split):
            yield from self.source.iter_clips(split)
            return
        for item in self.source.iter_clips(split):
            yield item
            if not isinstance(item, Clip):
                continue
            if check_waveform(item.waveform, item.sample_rate, min_duration_s=0.0) is not None:
                continue
            for k in range(1, self.augment.copies + 1):
                wave = self.augment(item.waveform, item.sample_rate, item.clip_id, k)
                yield Clip(wave, item.sample_rate, item.label, copy_clip_id(item.clip_id, k), split)

    def fingerprint(self, split: str) -> dict[str, str]:
        """The source's fingerprint; for train, with the augmentation's (``augment``) added."""
        inner = dict(self.source.fingerprint(split))
        if not self._augments(split):
            return inner
        if "augment" in inner:
            raise ValueError(f"source {self.name!r} already has an 'augment' fingerprint entry")
        inner["augment"] = json.dumps(self.augment.fingerprint(), sort_keys=True)
        return inner

    def size_hint(self, split: str) -> int | None:
        """The source's count; for train, times ``1 + copies`` (an upper bound)."""
        n = self.source.size_hint(split)
        if n is None or not self._augments(split):
            return n
        return n * (1 + self.augment.copies)

    def use_clip_seconds(self, seconds: float) -> None:
        """Passed on to the source (see :meth:`Source.use_clip_seconds`)."""
        self.source.use_clip_seconds(seconds)

    def __getattr__(self, name: str):
        # Anything else a caller reads from a source (a synthetic corpus's sample_rate or
        # synthesize(), a folder's root) is the wrapped source's.
        if name.startswith("__") or name in ("source", "augment"):
            raise AttributeError(name)
        return getattr(self.source, name)

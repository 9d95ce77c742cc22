"""Reading the source ahead of the build, in a thread, with each clip's content digest.

Reading and decompressing a tarball and decoding WAVs release the GIL for most of
their time, so a thread that reads ahead overlaps them with the features and the
HDF5 writes; hashing each clip's samples there overlaps it too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from data.cache.format import content_digest
from data.sources.base import Clip, SkippedClip


def with_digests(
    items: Iterable[Clip | SkippedClip], wanted: set[str]
) -> Iterator[tuple[Clip | SkippedClip, bytes | None]]:
    """Pair each item with :func:`content_digest` when it is a clip of a wanted label.

    Runs in the prefetch thread, beside decoding, so hashing overlaps the features.
    """
    it = iter(items)
    try:
        for item in it:
            digest = None
            if isinstance(item, Clip) and item.label in wanted:
                digest = content_digest(item.waveform, item.sample_rate)
            yield item, digest
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


_DONE = object()


class Prefetch(Iterator[Any]):
    """Iterate ``iterable`` in a background thread, ``maxsize`` items ahead.

    Reading and decompressing a tarball and decoding WAVs release the GIL for
    most of their time, so they overlap the front end and HDF5 writes. Errors
    in the thread are raised in the consumer; ``close()`` stops the thread.
    """

    def __init__(self, iterable: Iterable[Any], maxsize: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(iterable,), name="cache-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, iterable: Iterable[Any]) -> None:
        it = iter(iterable)
        try:
            for item in it:
                if not self._put(item):
                    break
            else:
                self._put(_DONE)
        except BaseException as err:  # forwarded to the consumer
            self._put(err)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

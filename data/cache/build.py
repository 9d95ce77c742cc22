"""Building a split's cache: reuse a complete file, or build one under a lock and rename it.

:func:`build_cache` is the one entry point. It computes the key, takes the
inter-process lock, reuses a complete file with the same key, finishes a partial one
(or starts again when the source changed under it), checks the disk's free space and
renames the finished file into place; :class:`~data.cache.builder.Builder` writes the
rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_info

from data.cache.builder import Builder, ResumeMismatch
from data.cache.errors import CacheMismatchError
from data.cache.format import PARTIAL_SUFFIX
from data.cache.key import DEFAULT_CLASSES, check_classes, key_path, key_payload
from data.cache.space import check_free_space
from data.cache.store import is_complete, open_cache, summary_line, verify
from data.features import LogMelFrontEnd
from data.hashing import json_sha256
from data.malloc import share_one_arena
from data.sources.base import Source

log = logging.getLogger(__name__)


def build_cache(
    source: Source,
    split: str,
    front_end: LogMelFrontEnd,
    classes: Sequence[str] = DEFAULT_CLASSES,
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] = "cache",
    batch_size: int = 256,
    min_duration_s: float = 0.25,
    progress: bool = True,
    checkpoint_every: int = 4,
    others: dict[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Build (or finish, or reuse) the cache of ``split`` and return its path.

    A complete file with the same key is reused as is. The build writes
    ``<path>.partial`` and renames it when complete; every ``checkpoint_every``
    batches it records how many source items are safely stored, so an
    interrupted build resumes from there (a partial file from another key is
    discarded). Reading and decoding the source overlaps feature computation in
    a background thread; the front end gets all usable CPUs but one (torch's
    thread count is restored afterwards).

    Everything happens under an inter-process lock on ``<path>.lock``: a second
    process (another DDP node, a parallel sweep) waits for the first, then reuses
    its file. Before building, the free space of the disk is compared with the
    estimated size (when the source knows its size); during the build, each
    batch is written only while the disk keeps room for it. Either way a full disk
    is a :class:`CacheSpaceError` naming the bytes, and the partial file is kept to
    resume.

    Args:
        source: where the clips come from.
        split: ``train``, ``validation`` or ``test``.
        front_end: the feature front end (its config is part of the key).
        classes: the labels to keep, in label-index order.
        path: the cache file; default :func:`~data.cache.key.key_path` of its key under
            ``cache_dir``.
        cache_dir: root folder of caches when ``path`` is not given.
        batch_size: clips per front-end call and per write.
        min_duration_s: clips shorter than this are skipped (``too_short``).
        progress: show a tqdm progress bar.
        checkpoint_every: batches between resume checkpoints.
        others: complete caches of other splits by split name: stored clips whose
            decoded samples equal one of theirs are reported as leakage (in the
            attributes, the ``leaked`` dataset and the log). Not part of the key.

    Raises:
        CacheSpaceError: the disk has too little free space (nothing is lost: run
            again with more space to resume).
        CacheCorruptError: a complete file at ``path`` is damaged.
    """
    classes = check_classes(source, classes)
    if batch_size < 1 or checkpoint_every < 1:
        raise ValueError("batch_size and checkpoint_every must be at least 1")
    source.use_clip_seconds(front_end.clip_samples / front_end.sample_rate)
    fingerprint = source.fingerprint(split)
    payload = key_payload(source, split, front_end, classes, min_duration_s, fingerprint)
    key = json_sha256(payload)
    if path is None:
        path = key_path(cache_dir, source.name, split, key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        rank_zero_info(f"waiting for another process building {path}")
        lock.acquire()
    except OSError:  # a read-only folder: a complete cache is still read, never built
        if not path.exists():
            raise
        verify(path, key)
        return path
    try:
        return _build_locked(
            source,
            split,
            front_end,
            classes,
            path,
            payload,
            key,
            batch_size,
            min_duration_s,
            progress,
            checkpoint_every,
            others or {},
        )
    finally:
        lock.release()


def _build_locked(
    source: Source,
    split: str,
    front_end: LogMelFrontEnd,
    classes: tuple[str, ...],
    path: Path,
    payload: dict[str, Any],
    key: str,
    batch_size: int,
    min_duration_s: float,
    progress: bool,
    checkpoint_every: int,
    others: dict[str, str | os.PathLike[str]],
) -> Path:
    if path.exists():
        try:
            verify(path, key)
            log.info("cache %s is complete (key %s); reusing it", path, key[:16])
            return path
        except (CacheMismatchError, OSError) as err:
            log.warning("rebuilding %s: %s", path, err)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if partial.exists() and is_complete(partial, key):  # stopped just before its rename
        os.replace(partial, path)
        return path
    check_free_space(source, split, front_end, partial)
    builder = Builder(
        source, split, front_end, classes, payload, key, batch_size, min_duration_s, progress
    )
    builder.others = {s: Path(p) for s, p in others.items() if s != split}
    # Features run on one thread per core, each on its own slice of the batch, with torch
    # itself single-threaded: intra-op threads wait at every op for a core the reading
    # thread holds (measured 2x slower than one thread on 2 cores); independent slices
    # just take turns with the reader.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    share_one_arena()  # before the reader and feature threads start (see data.malloc)
    try:
        builder.run(partial, checkpoint_every, resume=True)
    except ResumeMismatch as err:
        log.warning("discarding %s: %s; building from the start", partial, err)
        partial.unlink(missing_ok=True)
        builder.run(partial, checkpoint_every, resume=False)
    finally:
        torch.set_num_threads(threads)
    os.replace(partial, path)
    log.info("wrote cache %s", path)
    info = open_cache(path)
    rank_zero_info(summary_line(info))
    for other, leak in info.leakage.items():
        if leak["rows"]:
            log.warning(
                "leakage: %d clips of %s share their decoded audio with %s (%s); "
                "the pairs are in its 'leaked' dataset",
                leak["rows"],
                split,
                other,
                leak["path"],
            )
    return path

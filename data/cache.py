"""The HDF5 spectrogram cache: one file per split, built once, atomic and resumable.

A cache file holds the front end's raw output for every usable clip of one split
of one source, in the order the source yields them:

* ``features`` float16 ``(N, C, n_mels, T)``, one row per HDF5 chunk, uncompressed,
  each chunk with HDF5's Fletcher-32 checksum;
* ``labels`` int64 ``(N,)``, indices into ``classes`` (checksummed);
* ``clip_ids`` utf-8 strings ``(N,)``;
* ``content_hash`` uint8 ``(N, 16)``: a digest of each stored clip's decoded samples
  (shape, rate and float32 values), to find the same audio in another split;
* ``skipped`` utf-8 string pairs ``(M, 2)``: ``(clip_id, reason)`` of every clip left
  out for a fault (see :data:`data.audio.SKIP_REASONS`, plus the source's own
  reasons such as ``corrupt`` or ``unsafe_path``);
* ``leaked`` utf-8 string triples ``(L, 3)``: ``(clip_id, other split, its clip_id)``
  of every stored clip whose samples equal a clip of another split's cache given to
  the build (see ``others`` of :func:`build_cache`);
* train split only: ``band_mean`` and ``band_std`` float32 ``(C, n_mels)`` over all
  rows and frames of the stored (float16) features, for the model's normalisation.

Attributes (JSON strings where structured) record the feature config and its hash,
the source's name and fingerprint, the hash of the member list, classes and their
counts, labels left out, skip and repair counts, the leakage found, the policy and
the cache key.

Integrity: every chunk of ``features`` and ``labels`` carries a Fletcher-32 checksum
that HDF5 checks whenever the chunk is read, so a damaged row is found when it is
read, at no extra I/O; :func:`open_cache` checks the structure and the labels
against the class counts (milliseconds), and ``open_cache(path, check_rows=True)``
reads every row (a full read of the file: seconds per GB). Non-finite features are
never stored (``nonfinite_features``) and the data module refuses one at read.

Items are sorted, in this order: an item whose label is a known label of the
source but not one of ``classes`` is counted in ``other_label_counts`` (decodable
or not); any other :class:`~data.sources.base.SkippedClip` and any clip that fails
:func:`data.audio.check_waveform` is listed in ``skipped``; the rest are repaired
where needed (resampled, mono duplicated, zero-padded or cropped to the clip
length: all counted in ``repair_counts``) and stored.

Why one row per chunk: a shuffled DataLoader reads single rows at random. With one
row per chunk every read touches exactly one contiguous block (26 KB native, 64 KB
reference); bigger chunks read and discard neighbours. Compression costs more CPU
than it saves on these already-dense log spectra (see ``benchmarks/cache_build.py``).

Why one module of about 1,200 lines: the build (resume, lock, disk reservation,
checksums, leakage) and the reader share the file format, its key and its version, and
the format is the contract this file owns. Splitting it into ``data/cache/`` (key,
build, read) is part of the layout issue (14), to be done with the data module split.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from data.audio import REPAIRS, check_waveform, resample
from data.features import LogMelFrontEnd
from data.malloc import share_one_arena
from data.sources.base import Clip, SkippedClip, Source

log = logging.getLogger(__name__)

#: Bump when the file layout or the build policy changes: every key changes with it.
FORMAT_VERSION = 2
DEFAULT_CLASSES: tuple[str, ...] = ("quiet", "breathe", "snore")
#: Repairs counted in ``repair_counts`` (always present, possibly zero).
REPAIR_NAMES: tuple[str, ...] = tuple(REPAIRS)
PARTIAL_SUFFIX = ".partial"
#: Rows per HDF5 chunk of ``features`` (see the module docstring).
ROWS_PER_CHUNK = 1
#: Internal attributes of a partial file, removed when the build completes.
_STATE_ATTRS = ("_state", "_band_sum", "_band_sumsq")
#: Datasets with one entry per stored row.
_ROW_DATASETS = ("features", "labels", "clip_ids", "content_hash")


class CacheMismatchError(ValueError):
    """A cache file was built from another feature config, source, classes or policy."""


class CacheCorruptError(RuntimeError):
    """A complete cache file is damaged: a checksum, a shape, a count or a value is wrong."""


class CacheSpaceError(OSError):
    """The disk holding a cache has not enough free space for its build."""


#: Bytes a digest of ``content_hash`` takes.
DIGEST_BYTES = 16
#: Free bytes kept beyond a batch's rows while building, for HDF5's metadata. HDF5 does
#: not recover from a full disk (closing the file then crashes the process), so the
#: build stops before one.
SPACE_MARGIN = 8 << 20


def check_classes(source: Source, classes: Sequence[str]) -> tuple[str, ...]:
    """Validate ``classes`` (a distinct, ordered subset of ``source.labels``) and return them."""
    if isinstance(classes, str | os.PathLike):
        raise TypeError(f"classes must be a list of label names, got {classes!r}")
    classes = tuple(classes)
    if not classes:
        raise ValueError("classes must name at least one label")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise ValueError(f"classes lists {dupes} more than once: {list(classes)}")
    if source.labels:
        unknown = [c for c in classes if c not in source.labels]
        if unknown:
            raise ValueError(
                f"unknown class name(s) {unknown} for source {source.name!r}; "
                f"its labels are: {', '.join(source.labels)}"
            )
    return classes


def key_payload(
    source: Source,
    split: str,
    front_end: LogMelFrontEnd,
    classes: Sequence[str],
    min_duration_s: float = 0.25,
    fingerprint: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Everything the cache key hashes: a change to any of it gives a new cache."""
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "source_name": source.name,
        "source_fingerprint": source.fingerprint(split) if fingerprint is None else fingerprint,
        "feature_config": front_end.config(),
        "classes": list(classes),
        "policy": {"min_duration_s": float(min_duration_s)},
    }


def cache_key(
    source: Source,
    split: str,
    front_end: LogMelFrontEnd,
    classes: Sequence[str] = DEFAULT_CLASSES,
    min_duration_s: float = 0.25,
) -> str:
    """sha256 (hex) of :func:`key_payload` as sorted-key JSON."""
    return _sha256_json(key_payload(source, split, front_end, classes, min_duration_s))


def cache_path(
    cache_dir: str | os.PathLike[str],
    source: Source,
    split: str,
    front_end: LogMelFrontEnd,
    classes: Sequence[str] = DEFAULT_CLASSES,
    min_duration_s: float = 0.25,
) -> Path:
    """Where the cache of ``split`` lives: ``<cache_dir>/<source>-<key[:16]>/<split>.h5``.

    The folder is named by the cache key, so another feature config, source
    fingerprint, class list or policy never lands on an existing file.
    """
    key = cache_key(source, split, front_end, check_classes(source, classes), min_duration_s)
    return key_path(cache_dir, source.name, split, key)


def key_path(cache_dir: str | os.PathLike[str], source_name: str, split: str, key: str) -> Path:
    """The cache file of ``split`` under ``cache_dir`` for a known ``key``."""
    return Path(cache_dir) / f"{source_name}-{key[:16]}" / f"{split}.h5"


@dataclass
class CacheInfo:
    """What a complete cache file says about itself (its attributes, not its rows)."""

    path: Path
    split: str
    n_rows: int
    feature_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    class_counts: dict[str, int]
    other_label_counts: dict[str, int]
    skip_counts: dict[str, int]
    repair_counts: dict[str, int]
    skipped: list[tuple[str, str]]
    feature_config: dict[str, Any]
    feature_hash: str
    source_name: str
    source_fingerprint: dict[str, str]
    member_list_hash: str
    min_duration_s: float
    cache_key: str
    format_version: int
    band_mean: np.ndarray | None = field(default=None, repr=False)
    band_std: np.ndarray | None = field(default=None, repr=False)
    #: Per other split: ``{"cache_key", "path", "rows"}``: stored clips whose samples
    #: equal one of that split's cache (the pairs are in the file's ``leaked``).
    leakage: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Stored rows whose samples equal an earlier row of this split.
    duplicate_content_rows: int = 0


def open_cache(path: str | os.PathLike[str], check_rows: bool = False) -> CacheInfo:
    """Read the attributes (and band statistics, if any) of a complete cache file.

    Checks the file's format version, its structure (datasets, shapes, checksum
    filters), that its labels agree with its class counts and that its band statistics
    are finite: a few milliseconds, plus reading the labels (8 bytes a row). With
    ``check_rows`` it also reads every feature row, which verifies each chunk's
    Fletcher-32 checksum and that every value is finite: a full read of the file
    (seconds per GB). Without it, a damaged row is found when it is read.

    Raises:
        FileNotFoundError: no file at ``path``.
        CacheMismatchError: an incomplete file, or one written by another cache format
            (an older earsleep): it must be rebuilt.
        CacheCorruptError: a damaged file, naming what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cache file at {path}")
    try:
        return _open_cache(path, check_rows)
    except (CacheMismatchError, CacheCorruptError):
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CacheCorruptError(
            f"cache {path} is damaged ({_first_line(err)}); delete it and build it again"
        ) from err


def _open_cache(path: Path, check_rows: bool) -> CacheInfo:
    with h5py.File(path, "r") as f:
        a = f.attrs
        if "_state" in a or "member_list_hash" not in a:
            raise CacheMismatchError(f"{path} is not a complete cache file")
        version = int(a.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise CacheMismatchError(
                f"cache {path} has format version {version}, this earsleep reads version "
                f"{FORMAT_VERSION} (checksummed rows); delete it (or point cache_dir "
                "elsewhere) to build it again"
            )
        feats = f["features"]
        damage = _check_structure(f)
        if damage:
            raise CacheCorruptError(
                f"cache {path} is damaged: {damage}; delete it and build it again"
            )
        if check_rows:
            _check_rows(feats, path)
        skipped = [(_str(i), _str(r)) for i, r in f["skipped"][()]]
        info = CacheInfo(
            path=path,
            split=_str(a["split"]),
            n_rows=int(feats.shape[0]),
            feature_shape=tuple(int(d) for d in feats.shape[1:]),  # type: ignore[arg-type]
            classes=tuple(json.loads(a["classes"])),
            class_counts=json.loads(a["class_counts"]),
            other_label_counts=json.loads(a["other_label_counts"]),
            skip_counts=json.loads(a["skip_counts"]),
            repair_counts=json.loads(a["repair_counts"]),
            skipped=skipped,
            feature_config=json.loads(a["feature_config"]),
            feature_hash=_str(a["feature_hash"]),
            source_name=_str(a["source_name"]),
            source_fingerprint=json.loads(a["source_fingerprint"]),
            member_list_hash=_str(a["member_list_hash"]),
            min_duration_s=float(a["min_duration_s"]),
            cache_key=_str(a["cache_key"]),
            format_version=int(a["format_version"]),
            band_mean=f["band_mean"][()] if "band_mean" in f else None,
            band_std=f["band_std"][()] if "band_std" in f else None,
            leakage=json.loads(a["leakage"]),
            duplicate_content_rows=int(a["duplicate_content_rows"]),
        )
    for name in ("band_mean", "band_std"):
        stats = getattr(info, name)
        if stats is not None and info.n_rows and not np.isfinite(stats).all():
            raise CacheCorruptError(
                f"cache {path} is damaged: {name} holds NaN or inf; delete it and build it again"
            )
    return info


def _check_structure(f: h5py.File) -> str | None:
    """What is wrong with a complete file's datasets, or ``None``."""
    feats = f["features"]
    n = feats.shape[0]
    if not feats.fletcher32 or not f["labels"].fletcher32:
        return "its features or labels carry no checksums"
    for name, width in (("labels", None), ("clip_ids", None), ("content_hash", DIGEST_BYTES)):
        ds = f[name]
        if ds.shape[0] != n or (width is not None and ds.shape[1:] != (width,)):
            return f"{name} has shape {ds.shape} for {n} feature rows"
    classes = json.loads(f.attrs["classes"])
    counts = json.loads(f.attrs["class_counts"])
    labels = f["labels"][()]  # every chunk's checksum is verified by this read
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        return f"labels outside 0..{len(classes) - 1}"
    found = np.bincount(labels, minlength=len(classes)).tolist()
    expected = [int(counts.get(c, -1)) for c in classes]
    if found != expected:
        return f"its labels count {found} clips per class, its attributes {expected}"
    return None


def _check_rows(feats: h5py.Dataset, path: Path, block: int = 1024) -> None:
    """Read every row of ``feats`` (checksums and finiteness), ``block`` rows at a time."""
    for lo in range(0, feats.shape[0], block):
        try:
            rows = feats[lo : lo + block]
        except OSError as err:
            raise CacheCorruptError(
                f"cache {path} is damaged: rows {lo}..{lo + block - 1} fail their checksum "
                f"({_first_line(err)}); delete it and build it again"
            ) from err
        bad = ~finite_rows(rows)
        if bad.any():
            raise CacheCorruptError(
                f"cache {path} is damaged: row {lo + int(np.argmax(bad))} holds NaN or inf; "
                "delete it and build it again"
            )


def finite_rows(rows: np.ndarray) -> np.ndarray:
    """Per row (first axis): whether every value is finite. float16 is judged by its bits
    (exponent all ones is inf or NaN), ten times faster than ``np.isfinite`` on it."""
    flat = rows.reshape(len(rows), -1)
    if flat.dtype == np.float16:
        return ((flat.view(np.uint16) & 0x7C00) != 0x7C00).all(axis=1)
    return np.isfinite(flat).all(axis=1)


def summary_line(info: CacheInfo) -> str:
    """One line of what a cache holds and what it left out, for the console."""

    def counts(d: dict[str, int]) -> str:
        items = [(k, v) for k, v in d.items() if v]
        if not items:
            return "none"
        return f"{sum(v for _, v in items)} (" + ", ".join(f"{k} {v}" for k, v in items) + ")"

    leaks = {s: int(v.get("rows", 0)) for s, v in info.leakage.items()}
    text = (
        f"cache {info.split}: {info.n_rows} clips ("
        + ", ".join(f"{c} {info.class_counts.get(c, 0)}" for c in info.classes)
        + f"); other labels left out: {counts(info.other_label_counts)}"
        + f"; skipped: {counts(info.skip_counts)}"
        + f"; repaired: {counts(info.repair_counts)}"
    )
    if any(leaks.values()):
        text += "; LEAKAGE: " + ", ".join(
            f"{n} clips share their audio with {s}" for s, n in leaks.items() if n
        )
    if info.duplicate_content_rows:
        text += f"; {info.duplicate_content_rows} clips repeat another's audio"
    return text + f" [{info.path}]"


def verify(path: str | os.PathLike[str], expected_key: str) -> CacheInfo:
    """Open ``path`` and check that it was built under ``expected_key``.

    Raises:
        CacheMismatchError: naming both keys (and the file's feature hash and
            source fingerprint) when the file was built from anything else, or when
            it was written by another cache format.
        CacheCorruptError: when the file is damaged (see :func:`open_cache`).
    """
    info = open_cache(path)
    if info.cache_key != expected_key:
        raise CacheMismatchError(
            f"cache {info.path} was built with cache key {info.cache_key} "
            f"(feature hash {info.feature_hash}, source {info.source_name} "
            f"{json.dumps(info.source_fingerprint, sort_keys=True)}), but key {expected_key} "
            "is expected: another feature config, source, class list or policy. "
            "Delete the file or point cache_dir elsewhere."
        )
    return info


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
        path: the cache file; default :func:`cache_path` under ``cache_dir``.
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
    fingerprint = source.fingerprint(split)
    payload = key_payload(source, split, front_end, classes, min_duration_s, fingerprint)
    key = _sha256_json(payload)
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
    if partial.exists() and _is_complete(partial, key):  # stopped just before its rename
        os.replace(partial, path)
        return path
    _check_free_space(source, split, front_end, partial)
    builder = _Builder(
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
    except _ResumeMismatch as err:
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


def _check_free_space(source: Source, split: str, front_end: LogMelFrontEnd, partial: Path) -> None:
    """Refuse a build whose estimated size exceeds the disk's free space."""
    items = source.size_hint(split)
    if not items:  # unknown until read: the build reserves room batch by batch
        if _free(partial.parent) < SPACE_MARGIN:
            raise CacheSpaceError(
                errno.ENOSPC,
                f"not enough free space for the {split} cache in {partial.parent}: "
                f"{_mb(_free(partial.parent))} free; free some space or set cache_dir to "
                "another disk",
            )
        return
    row = _row_bytes(front_end)
    done = partial.stat().st_size if partial.exists() else 0
    need = int(items * row * 1.02) + SPACE_MARGIN - done
    free = _free(partial.parent)
    if need > free:
        raise CacheSpaceError(
            errno.ENOSPC,
            f"not enough free space for the {split} cache in {partial.parent}: about "
            f"{_mb(need)} needed ({items} clips x {row / 1024:.0f} KiB), {_mb(free)} free; "
            "free some space or set cache_dir to another disk",
        )


def _row_bytes(front_end: LogMelFrontEnd) -> int:
    c, fbins, t = front_end.output_shape
    return c * fbins * t * 2 + 8 + DIGEST_BYTES + 64  # features, label, digest, id and index


def _free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _load_fallocate() -> Any:
    """libc's ``fallocate`` (Linux), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()
_FALLOC_FL_KEEP_SIZE = 1


def _reserve(path: Path, nbytes: int) -> bool:
    """Reserve ``nbytes`` of disk past the end of ``path``; ``False`` when the disk is full.

    HDF5 cannot recover from a failed write (closing the file afterwards crashes the
    process), so the build reserves room before HDF5 writes into it. On Linux the blocks
    are allocated without growing the file (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``),
    so no other writer can take them; elsewhere, or on a file system without it, the
    disk's free space is compared instead.
    """
    if _fallocate is not None:
        fd = os.open(path, os.O_RDWR)
        try:
            if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, os.fstat(fd).st_size, nbytes) == 0:
                return True
            code = ctypes.get_errno()
        finally:
            os.close(fd)
        if code in (errno.ENOSPC, errno.EDQUOT):
            return False
    return _free(path.parent) >= nbytes


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _is_disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_complete(path: Path, key: str) -> bool:
    try:
        verify(path, key)
    except Exception:
        return False
    return True


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _ResumeMismatch(RuntimeError):
    """The source no longer yields the items a partial file recorded."""


class _Builder:
    """One build of one split: source items in, rows and counts out."""

    def __init__(
        self,
        source: Source,
        split: str,
        front_end: LogMelFrontEnd,
        classes: tuple[str, ...],
        payload: dict[str, Any],
        key: str,
        batch_size: int,
        min_duration_s: float,
        progress: bool,
    ) -> None:
        self.source = source
        self.split = split
        self.front_end = front_end
        self.classes = classes
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.known_labels = set(source.labels)
        self.payload = payload
        self.key = key
        self.batch_size = batch_size
        self.min_duration_s = float(min_duration_s)
        self.progress = progress
        self.with_stats = split == "train"
        self.shape = front_end.output_shape
        self.clip_samples = front_end.clip_samples
        self.in_channels = 2 if front_end.channels == "stereo" else 1
        self._batch: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.workers = _usable_cpus()
        #: Complete caches of other splits to look for this split's audio in.
        self.others: dict[str, Path] = {}
        self.row_bytes = _row_bytes(front_end)

    # -- state ------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.items = 0  # source items consumed and recorded
        self.rows = 0
        self.n_skipped = 0
        self.class_counts = Counter({c: 0 for c in self.classes})
        self.other = Counter()
        self.skip_counts = Counter()
        self.repairs = Counter({r: 0 for r in REPAIR_NAMES})
        self.prefix_hash = hashlib.sha256().hexdigest()
        c, fbins, _ = self.shape
        self.band_sum = np.zeros((c, fbins), np.float64)
        self.band_sumsq = np.zeros((c, fbins), np.float64)

    def _state_json(self) -> str:
        return json.dumps(
            {
                "items": self.items,
                "rows": self.rows,
                "n_skipped": self.n_skipped,
                "class_counts": self.class_counts,
                "other": self.other,
                "skip_counts": self.skip_counts,
                "repairs": self.repairs,
                "prefix_hash": self.prefix_hash,
            }
        )

    def _load_state(self, f: h5py.File) -> None:
        s = json.loads(f.attrs["_state"])
        self.items, self.rows, self.n_skipped = s["items"], s["rows"], s["n_skipped"]
        self.class_counts = Counter(s["class_counts"])
        self.other = Counter(s["other"])
        self.skip_counts = Counter(s["skip_counts"])
        self.repairs = Counter(s["repairs"])
        self.prefix_hash = s["prefix_hash"]
        if self.with_stats:
            self.band_sum = np.array(f.attrs["_band_sum"], np.float64)
            self.band_sumsq = np.array(f.attrs["_band_sumsq"], np.float64)
        # Rows written after the last checkpoint are not counted: drop them.
        for name in _ROW_DATASETS:
            f[name].resize(self.rows, axis=0)
        f["skipped"].resize(self.n_skipped, axis=0)

    # -- file -------------------------------------------------------------------

    def _open(self, partial: Path, resume: bool) -> h5py.File:
        if partial.exists() and resume:
            f = None
            try:
                f = h5py.File(partial, "r+")
                found = _str(f.attrs.get("cache_key", ""))
                if found == self.key and "_state" in f.attrs:
                    self._load_state(f)
                    log.info(
                        "resuming %s: %d source items (%d rows) already stored",
                        partial,
                        self.items,
                        self.rows,
                    )
                    return f
                log.warning(
                    "discarding partial cache %s: built with key %s, expected %s%s",
                    partial,
                    found[:16] or "(none)",
                    self.key[:16],
                    "" if found != self.key else " (but it holds no resume state)",
                )
            except Exception as err:  # unreadable or damaged (e.g. killed mid-write)
                log.warning("discarding unreadable partial cache %s (%s)", partial, err)
            if f is not None:
                f.close()
        partial.unlink(missing_ok=True)
        self._reset_state()
        f = h5py.File(partial, "w")
        c, fbins, t = self.shape
        text = h5py.string_dtype("utf-8")
        # Fletcher-32: HDF5 checks each chunk's checksum whenever it reads it (a
        # 1 MiB overwrite of a finished file trained a NaN model without one).
        f.create_dataset(
            "features",
            shape=(0, c, fbins, t),
            maxshape=(None, c, fbins, t),
            dtype=np.float16,
            chunks=(ROWS_PER_CHUNK, c, fbins, t),
            fletcher32=True,
        )
        f.create_dataset(
            "labels",
            shape=(0,),
            maxshape=(None,),
            dtype=np.int64,
            chunks=(4096,),
            fletcher32=True,
        )
        f.create_dataset("clip_ids", shape=(0,), maxshape=(None,), dtype=text, chunks=(1024,))
        f.create_dataset(
            "content_hash",
            shape=(0, DIGEST_BYTES),
            maxshape=(None, DIGEST_BYTES),
            dtype=np.uint8,
            chunks=(4096, DIGEST_BYTES),
            fletcher32=True,
        )
        f.create_dataset("skipped", shape=(0, 2), maxshape=(None, 2), dtype=text, chunks=(256, 2))
        p = self.payload
        f.attrs["cache_key"] = self.key
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["split"] = self.split
        f.attrs["feature_config"] = json.dumps(p["feature_config"], sort_keys=True)
        f.attrs["feature_hash"] = self.front_end.config_hash()
        f.attrs["source_name"] = self.source.name
        f.attrs["source_fingerprint"] = json.dumps(p["source_fingerprint"], sort_keys=True)
        f.attrs["classes"] = json.dumps(list(self.classes))
        f.attrs["min_duration_s"] = self.min_duration_s
        try:
            self._checkpoint(f)
        except CacheSpaceError:
            f.close()
            raise
        return f

    def _checkpoint(self, f: h5py.File) -> None:
        # Rows are already written; the counter comes after them, then the flush.
        if self.with_stats:
            f.attrs["_band_sum"] = self.band_sum
            f.attrs["_band_sumsq"] = self.band_sumsq
        f.attrs["_state"] = self._state_json()
        f.flush()
        self._reserve(f, SPACE_MARGIN)  # HDF5's flush truncates the file, freeing reserved room

    def _reserve(self, f: h5py.File, nbytes: int) -> None:
        """Make sure the next ``nbytes`` of ``f`` fit on its disk, or stop the build.

        Stopping here leaves the last checkpoint on disk and the room it reserved for
        HDF5 to close the file: the partial file resumes once there is space.
        """
        path = Path(f.filename)
        if _reserve(path, nbytes):
            return
        raise CacheSpaceError(
            errno.ENOSPC,
            f"the disk holding {path.parent} is full: {_mb(_free(path.parent))} free, the "
            f"{self.split} cache needs {_mb(nbytes)} more to go on; its {self.rows} rows so "
            f"far are kept in {path} to resume; free some space or set cache_dir to "
            "another disk, then run again",
        )

    def _finish(self, f: h5py.File, member_hash: str) -> None:
        f.attrs["source_items"] = self.items
        f.attrs["class_counts"] = json.dumps({c: self.class_counts[c] for c in self.classes})
        f.attrs["other_label_counts"] = json.dumps(dict(sorted(self.other.items())))
        f.attrs["skip_counts"] = json.dumps(dict(sorted(self.skip_counts.items())))
        f.attrs["repair_counts"] = json.dumps({r: self.repairs[r] for r in REPAIR_NAMES})
        self._record_leakage(f)
        if self.with_stats:
            frames = max(self.rows * self.shape[2], 1)
            mean = self.band_sum / frames
            var = np.maximum(self.band_sumsq / frames - mean**2, 0.0)
            if self.rows == 0:
                mean = np.full_like(mean, np.nan)
                var = np.full_like(var, np.nan)
            for name, value in (("band_mean", mean), ("band_std", np.sqrt(var))):
                if name in f:  # a finished build that was stopped before its rename
                    del f[name]
                f.create_dataset(name, data=value.astype(np.float32))
        # The completeness marker goes last: without it a file is never read as complete.
        f.attrs["member_list_hash"] = member_hash
        for name in _STATE_ATTRS:
            if name in f.attrs:
                del f.attrs[name]
        f.flush()

    def _record_leakage(self, f: h5py.File) -> None:
        """Find stored clips whose samples equal another row's, here or in ``others``."""
        digests = [bytes(d) for d in f["content_hash"][()]]
        ids = f["clip_ids"].asstr()[()]
        f.attrs["duplicate_content_rows"] = len(digests) - len(set(digests))
        leakage: dict[str, dict[str, Any]] = {}
        pairs: list[tuple[str, str, str]] = []
        for other, other_path in sorted(self.others.items()):
            if not other_path.exists():
                continue
            with h5py.File(other_path, "r") as g:
                theirs = g["content_hash"][()]
                their_ids = g["clip_ids"].asstr()[()]
                their_key = _str(g.attrs.get("cache_key", ""))
            first = {bytes(d): j for j, d in reversed(list(enumerate(theirs)))}
            found = [
                (str(ids[i]), other, str(their_ids[first[d]]))
                for i, d in enumerate(digests)
                if d in first
            ]
            leakage[other] = {"cache_key": their_key, "path": str(other_path), "rows": len(found)}
            pairs += found
        f.attrs["leakage"] = json.dumps(leakage, sort_keys=True)
        if "leaked" in f:  # a finished build that was stopped before its rename
            del f["leaked"]
        f.create_dataset(
            "leaked",
            data=np.array(pairs, dtype=object).reshape(-1, 3),
            dtype=h5py.string_dtype("utf-8"),
        )

    # -- the build ---------------------------------------------------------------

    def run(self, partial: Path, checkpoint_every: int, resume: bool) -> None:
        f = self._open(partial, resume)
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="features") as pool:
                self._pool = pool
                self._fill(f, checkpoint_every)
        except BaseException as err:
            self._pool = None
            if not _is_disk_full(err) or isinstance(err, CacheSpaceError):
                f.close()
                raise
            # HDF5 met the full disk itself: its file can no longer be closed normally
            # (a close then a segfault at exit). Truncating the file gives HDF5 room to
            # finish closing it; the partial file is lost, not the process.
            os.truncate(partial, 0)
            with contextlib.suppress(Exception):  # it may still report the full disk
                f.close()
            partial.unlink(missing_ok=True)
            raise CacheSpaceError(
                errno.ENOSPC,
                f"the disk holding {partial.parent} is full ({_mb(_free(partial.parent))} "
                f"free): the {self.split} cache needs about {self.row_bytes // 1024} KiB a "
                "clip; free some space or set cache_dir to another disk, then run again",
            ) from None
        else:
            self._pool = None
            f.close()

    def _features(self, batch: torch.Tensor) -> np.ndarray:
        """float16 features of ``batch``: its slices computed by the pool's threads at once."""

        def work(part: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():  # thread-local: set in the worker
                return self.front_end(part).to(torch.float16)

        parts = [p for p in batch.tensor_split(self.workers) if len(p)]
        if self._pool is None or len(parts) == 1:
            return work(batch).numpy()
        return torch.cat(list(self._pool.map(work, parts))).numpy()

    def _fill(self, f: h5py.File, checkpoint_every: int) -> None:
        done = self.items
        hasher = hashlib.sha256()
        bar = tqdm(
            total=self.source.size_hint(self.split),
            desc=f"cache {self.source.name}/{self.split}",
            unit="clip",
            disable=not self.progress,
            mininterval=0.5,
            smoothing=0.1,
        )
        pending: list[_Pending] = []
        skipped: list[tuple[str, str]] = []
        batches = 0
        seen = 0
        ids: set[bytes] = set()  # digests of every clip_id so far, to find repeated ones
        items = _Prefetch(
            _with_digests(self.source.iter_clips(self.split), set(self.classes)),
            2 * self.batch_size,
        )
        try:
            for item, digest in items:
                clip_id = item.clip_id.encode("utf-8", "surrogateescape")
                hasher.update(clip_id + b"\n")
                seen += 1
                id_digest = hashlib.blake2b(clip_id, digest_size=16).digest()
                repeated = id_digest in ids
                ids.add(id_digest)
                if seen <= done:  # stored by the interrupted build: only re-hash its id
                    bar.update(1)
                    if seen == done and hasher.hexdigest() != self.prefix_hash:
                        raise _ResumeMismatch(
                            f"the first {done} items of the source differ from the stored ones"
                        )
                    continue
                if repeated:
                    skipped.append((item.clip_id, "duplicate_id"))
                    self.skip_counts["duplicate_id"] += 1
                else:
                    self._sort(item, digest, pending, skipped)
                if len(pending) >= self.batch_size:
                    self._write(f, pending, skipped, seen)
                    bar.update(seen - bar.n)
                    pending, skipped = [], []
                    self.prefix_hash = hasher.hexdigest()
                    batches += 1
                    if batches % checkpoint_every == 0:
                        self._checkpoint(f)
                        bar.set_postfix(skipped=self.n_skipped, refresh=False)
            if seen < done:
                raise _ResumeMismatch(f"the source yields {seen} items, {done} were stored")
            self._write(f, pending, skipped, seen)
            bar.update(seen - bar.n)
            self.prefix_hash = hasher.hexdigest()
            self._checkpoint(f)
            self._finish(f, hasher.hexdigest())
        finally:
            items.close()
            bar.close()

    def _sort(
        self,
        item: Clip | SkippedClip,
        digest: bytes | None,
        pending: list[_Pending],
        skipped: list[tuple[str, str]],
    ) -> None:
        """File one source item: other label, skipped, or a (repaired) pending row."""
        label = item.label
        if label not in self.class_index and (label in self.known_labels or isinstance(item, Clip)):
            self.other[label] += 1
            return
        if isinstance(item, SkippedClip):
            skipped.append((item.clip_id, item.reason))
            self.skip_counts[item.reason] += 1
            return
        wave, sr = item.waveform, item.sample_rate
        reason = check_waveform(wave, sr, self.min_duration_s)
        if reason is not None:
            skipped.append((item.clip_id, reason))
            self.skip_counts[reason] += 1
            return
        if sr != self.front_end.sample_rate:
            wave = resample(np.asarray(wave, np.float32), sr, self.front_end.sample_rate)
            self.repairs["resampled"] += 1
        if wave.shape[0] == 1 and self.in_channels == 2:
            self.repairs["mono"] += 1
        n = wave.shape[1]
        if n < self.clip_samples:
            self.repairs["padded"] += 1
        elif n > self.clip_samples:
            self.repairs["cropped"] += 1
        assert digest is not None  # computed for every clip of a class
        pending.append((wave, self.class_index[label], item.clip_id, digest))

    def _waves_to_batch(self, pending: list[_Pending]) -> np.ndarray:
        """Stack clips as the front end adapts them: channel mode, zero-pad/crop at the end."""
        n = self.clip_samples
        if self._batch is None or len(self._batch) < len(pending):
            # Reused across batches: a fresh 32 MB buffer per batch costs its page faults.
            self._batch = np.zeros((len(pending), self.in_channels, n), np.float32)
        batch = self._batch[: len(pending)]
        mode = self.front_end.channels
        for row, (wave, *_) in zip(batch, pending, strict=True):
            m = min(n, wave.shape[1])
            if mode == "stereo":
                row[:, :m] = wave[:, :m]  # broadcasts a mono clip onto both channels
            elif mode == "mono" and wave.shape[0] == 2:
                np.add(wave[0, :m], wave[1, :m], out=row[0, :m])
                row[0, :m] *= 0.5
            else:  # mono of a mono clip, or in_ear
                row[0, :m] = wave[0, :m]
            row[:, m:] = 0.0
        return batch

    def _accumulate_stats(self, feats: np.ndarray) -> None:
        """Add the float64 band sums and sums of squares of stored (float16) rows."""
        c, fbins, _ = self.shape
        flat = torch.from_numpy(feats).flatten(1, 2)  # (B, C·F, T)
        # A few rows at a time keeps the float64 copy small; reducing the contiguous frame
        # axis first is 1.5x faster than dim=(0, 3).
        for part in flat.split(32):
            x = part.to(torch.float64)
            self.band_sum += x.sum(dim=-1).sum(dim=0).view(c, fbins).numpy()
            self.band_sumsq += x.square_().sum(dim=-1).sum(dim=0).view(c, fbins).numpy()

    def _write(
        self,
        f: h5py.File,
        pending: list[_Pending],
        skipped: list[tuple[str, str]],
        items: int,
    ) -> None:
        """Append ``pending`` rows and ``skipped`` pairs; account for ``items`` source items."""
        self._reserve(f, len(pending) * self.row_bytes + SPACE_MARGIN)
        if pending:
            feats = self._features(torch.from_numpy(self._waves_to_batch(pending)))
            finite = finite_rows(feats)
            if not finite.all():  # e.g. samples of 1e30 overflow the power spectrum
                for i in np.flatnonzero(~finite):
                    skipped.append((pending[i][2], "nonfinite_features"))
                    self.skip_counts["nonfinite_features"] += 1
                keep = np.flatnonzero(finite)
                feats, pending = feats[keep], [pending[i] for i in keep]
        if pending:
            k = len(pending)
            lo, hi = self.rows, self.rows + k
            for name in _ROW_DATASETS:
                f[name].resize(hi, axis=0)
            f["features"][lo:hi] = feats
            labels = np.fromiter((p[1] for p in pending), np.int64, count=k)
            f["labels"][lo:hi] = labels
            f["clip_ids"][lo:hi] = np.array([p[2] for p in pending], dtype=object)
            digests = b"".join(p[3] for p in pending)
            f["content_hash"][lo:hi] = np.frombuffer(digests, np.uint8).reshape(k, DIGEST_BYTES)
            self.rows = hi
            for i, count in enumerate(np.bincount(labels, minlength=len(self.classes))):
                self.class_counts[self.classes[i]] += int(count)
            if self.with_stats:
                self._accumulate_stats(feats)
        if skipped:
            ds = f["skipped"]
            ds.resize(self.n_skipped + len(skipped), axis=0)
            ds[self.n_skipped :] = np.array(skipped, dtype=object)
            self.n_skipped += len(skipped)
        self.items = items


#: A clip waiting for its features: waveform, label index, clip_id, content digest.
_Pending = tuple[np.ndarray, int, str, bytes]


def content_digest(waveform: np.ndarray, sample_rate: int) -> bytes:
    """Digest of decoded samples (shape, rate, float32 values): equal audio, equal digest."""
    wave = np.ascontiguousarray(waveform, np.float32)
    sha = hashlib.sha256(f"{wave.shape}/{int(sample_rate)}".encode())
    sha.update(wave.data)  # hashlib releases the GIL on large buffers
    return sha.digest()[:DIGEST_BYTES]


def _with_digests(
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


class _Prefetch(Iterator[Any]):
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


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

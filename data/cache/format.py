"""The cache file's layout: its version, datasets, chunking and per-clip content digest.

The builder writes these and the reader checks them; the package docstring
(:mod:`data.cache`) describes the file as a whole.
"""

from __future__ import annotations

import hashlib
from typing import Any

import h5py
import numpy as np

from data.audio import REPAIRS

#: Bump when the file layout or the build policy changes: every key changes with it.
FORMAT_VERSION = 2
#: Repairs counted in ``repair_counts`` (always present, possibly zero).
REPAIR_NAMES: tuple[str, ...] = tuple(REPAIRS)
#: Suffix of the file a build writes before it renames it to its cache path.
PARTIAL_SUFFIX = ".partial"
#: Rows per HDF5 chunk of ``features`` (see the package docstring).
ROWS_PER_CHUNK = 1
#: Bytes a digest of ``content_hash`` takes.
DIGEST_BYTES = 16
#: Internal attributes of a partial file, removed when the build completes.
STATE_ATTRS = ("_state", "_band_sum", "_band_sumsq")
#: Datasets with one entry per stored row.
ROW_DATASETS = ("features", "labels", "clip_ids", "content_hash")


def create_datasets(f: h5py.File, shape: tuple[int, int, int]) -> None:
    """Create the empty, growable row datasets of a new file for features of ``shape``."""
    c, fbins, t = shape
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


def content_digest(waveform: np.ndarray, sample_rate: int) -> bytes:
    """Digest of decoded samples (shape, rate, float32 values): equal audio, equal digest."""
    wave = np.ascontiguousarray(waveform, np.float32)
    sha = hashlib.sha256(f"{wave.shape}/{int(sample_rate)}".encode())
    sha.update(wave.data)  # hashlib releases the GIL on large buffers
    return sha.digest()[:DIGEST_BYTES]


def attr_str(value: Any) -> str:
    """An HDF5 string attribute as ``str`` (h5py returns ``bytes`` for some)."""
    return value.decode() if isinstance(value, bytes) else str(value)

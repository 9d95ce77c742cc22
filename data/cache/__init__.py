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

The package, one concept a module: :mod:`~data.cache.key` (what a cache depends on and
where it lives), :mod:`~data.cache.format` (the layout above), :mod:`~data.cache.store`
(opening and checking a complete file), :mod:`~data.cache.build` (the locked, atomic
entry point), :mod:`~data.cache.builder` (the resumable writer),
:mod:`~data.cache.prefetch` (reading ahead) and :mod:`~data.cache.space` (disk space).
Import the public names from ``data.cache``.
"""

from data.cache.build import build_cache
from data.cache.errors import CacheCorruptError, CacheMismatchError, CacheSpaceError
from data.cache.format import (
    DIGEST_BYTES,
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    REPAIR_NAMES,
    ROWS_PER_CHUNK,
    content_digest,
)
from data.cache.key import DEFAULT_CLASSES, cache_key, check_classes, key_path, key_payload
from data.cache.space import SPACE_MARGIN
from data.cache.store import CacheInfo, finite_rows, open_cache, summary_line, verify

__all__ = [
    "DEFAULT_CLASSES",
    "DIGEST_BYTES",
    "FORMAT_VERSION",
    "PARTIAL_SUFFIX",
    "REPAIR_NAMES",
    "ROWS_PER_CHUNK",
    "SPACE_MARGIN",
    "CacheCorruptError",
    "CacheInfo",
    "CacheMismatchError",
    "CacheSpaceError",
    "build_cache",
    "cache_key",
    "check_classes",
    "content_digest",
    "finite_rows",
    "key_path",
    "key_payload",
    "open_cache",
    "summary_line",
    "verify",
]

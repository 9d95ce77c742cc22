"""The cache key: everything a cache's content depends on, hashed, and where its file lives.

A change to the feature config, the source's fingerprint, the class list or the
skip policy gives a new key, hence a new folder: an old file is never reused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.cache.format import FORMAT_VERSION
from data.features import LogMelFrontEnd
from data.hashing import json_sha256
from data.sources.base import Source

DEFAULT_CLASSES: tuple[str, ...] = ("quiet", "breathe", "snore")


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
    source.use_clip_seconds(front_end.clip_samples / front_end.sample_rate)
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
    return json_sha256(key_payload(source, split, front_end, classes, min_duration_s))


def key_path(cache_dir: str | os.PathLike[str], source_name: str, split: str, key: str) -> Path:
    """Where the cache of ``split`` lives: ``<cache_dir>/<source_name>-<key[:16]>/<split>.h5``.

    The folder is named by the cache key, so another feature config, source
    fingerprint, class list or policy never lands on an existing file.
    """
    return Path(cache_dir) / f"{source_name}-{key[:16]}" / f"{split}.h5"

"""The sha256 digests every layer shares: of a file, of a file's ends, of a listing, of JSON.

Sources fingerprint their storage with these, the cache keys its files with
:func:`json_sha256`, and run artifacts name checkpoints by :func:`file_sha256`.
One definition each, so two places never disagree about how a thing is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

_MIB = 1 << 20


def file_sha256(path: str | os.PathLike[str], chunk: int = _MIB) -> str:
    """sha256 (hex) of a whole file, read ``chunk`` bytes at a time."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def head_tail_digest(path: str | os.PathLike[str]) -> dict[str, str]:
    """Cheap, stable identity of a large file: its size and a sha256 of its first and last MiB.

    Returns:
        ``{"size": ..., "head_tail_sha256": ...}`` (both strings, for fingerprints).
    """
    size = os.path.getsize(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        sha.update(f.read(_MIB))
        if size > 2 * _MIB:
            f.seek(size - _MIB)
            sha.update(f.read(_MIB))
        elif size > _MIB:
            sha.update(f.read())
    return {"size": str(size), "head_tail_sha256": sha.hexdigest()}


def lines_sha256(lines: Iterable[str]) -> str:
    """sha256 (hex) of ``lines``, each followed by a newline.

    Lines are encoded as UTF-8 with ``surrogateescape``, so a file name that is not
    valid UTF-8 still hashes (to its original bytes). This is how listings (a folder's
    files with their sizes) and member lists (``clip_id`` per line) are hashed.
    """
    sha = hashlib.sha256()
    for line in lines:
        sha.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return sha.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as compact, sorted-key JSON (the cache key, the feature hash)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()

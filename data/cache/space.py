"""Disk space for a build: the estimate before it, the reservation of each batch during it.

HDF5 does not recover from a full disk (closing the file then crashes the process),
so a build never lets it meet one: it compares the estimated size with the free space
first, then reserves room for each batch before HDF5 writes it (:func:`reserve`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from data.cache.errors import CacheSpaceError
from data.cache.format import DIGEST_BYTES
from data.features import LogMelFrontEnd
from data.sources.base import Source

#: Free bytes kept beyond a batch's rows while building, for HDF5's metadata.
SPACE_MARGIN = 8 << 20


def check_free_space(source: Source, split: str, front_end: LogMelFrontEnd, partial: Path) -> None:
    """Refuse a build whose estimated size exceeds the disk's free space."""
    items = source.size_hint(split)
    if not items:  # unknown until read: the build reserves room batch by batch
        if free_bytes(partial.parent) < SPACE_MARGIN:
            raise CacheSpaceError(
                errno.ENOSPC,
                f"not enough free space for the {split} cache in {partial.parent}: "
                f"{mb(free_bytes(partial.parent))} free; free some space or set cache_dir to "
                "another disk",
            )
        return
    row = row_bytes(front_end)
    done = partial.stat().st_size if partial.exists() else 0
    need = int(items * row * 1.02) + SPACE_MARGIN - done
    free = free_bytes(partial.parent)
    if need > free:
        raise CacheSpaceError(
            errno.ENOSPC,
            f"not enough free space for the {split} cache in {partial.parent}: about "
            f"{mb(need)} needed ({items} clips x {row / 1024:.0f} KiB), {mb(free)} free; "
            "free some space or set cache_dir to another disk",
        )


def row_bytes(front_end: LogMelFrontEnd) -> int:
    """Bytes one stored clip takes on disk, about (its features, label, digest, id, index)."""
    c, fbins, t = front_end.output_shape
    return c * fbins * t * 2 + 8 + DIGEST_BYTES + 64  # features, label, digest, id and index


def free_bytes(folder: Path) -> int:
    """Free bytes of the disk holding ``folder``."""
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


def reserve(path: Path, nbytes: int) -> bool:
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
    return free_bytes(path.parent) >= nbytes


def mb(n: int) -> str:
    """``n`` bytes for a message, in MB."""
    return f"{n / 1e6:.1f} MB"


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` reports a full disk (an ``OSError`` or HDF5's own wording)."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)

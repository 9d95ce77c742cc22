"""What can go wrong with a cache file, as the three errors a user sees."""

from __future__ import annotations


class CacheMismatchError(ValueError):
    """A cache file was built from another feature config, source, classes or policy."""


class CacheCorruptError(RuntimeError):
    """A complete cache file is damaged: a checksum, a shape, a count or a value is wrong."""


class CacheSpaceError(OSError):
    """The disk holding a cache has not enough free space for its build."""

"""glibc malloc settings for the package's long loops (Linux; a no-op elsewhere).

Feature computation allocates and frees buffers of a few MB many times a second.
How glibc serves them decides both speed (page faults) and whether memory stays
flat; the two loops need different settings, each set by the code that runs it:

* :func:`keep_heap_flat` (prediction over long recordings): a fixed mmap threshold,
  so the model's large activations are mapped on their own and returned when freed,
  instead of fragmenting the heap over hours, and a trim threshold that keeps the
  batches' buffers instead of faulting them in again every batch.
* :func:`share_one_arena` (cache building, and the feature threads of a night): every thread allocates from the main
  arena. Feature threads otherwise get arenas of their own, which glibc shrinks and
  grows again around every batch: measured 2.9 million page faults and 8 s of system
  time for 20,000 clips, against 0.35 million and 2 s with one arena.

Both are process-wide and harmless to repeat; they return ``False`` where glibc's
``mallopt`` is unavailable. :func:`release_free_memory` hands the heap's free pages back
between phases (the night writer calls it before a recording's outputs are written).
"""

from __future__ import annotations

import ctypes
import sys

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: glibc's mmap threshold while streaming (see :func:`keep_heap_flat`): 8 MB keeps the
#: front end's pieces (up to about 7 MB) on the fast heap path and maps the model's
#: larger activations on their own.
HEAP_MMAP_THRESHOLD = 8 << 20
#: Free bytes at the heap's top that glibc keeps while streaming (see :func:`keep_heap_flat`).
HEAP_TRIM_THRESHOLD = 32 << 20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def mallopt(param: int, value: int) -> bool:
    """Call glibc's ``mallopt``; ``False`` when it is unavailable or refuses."""
    libc = _libc()
    return bool(libc.mallopt(int(param), int(value))) if libc is not None else False


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the system (glibc ``malloc_trim(0)``).

    The heap keeps what the loop freed (the front end's pieces, audio blocks) resident;
    at the end of a night that is about 20 MB that the writing and plotting would add
    to. ``False`` where glibc is unavailable or had nothing to release.
    """
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def keep_heap_flat(threshold: int = HEAP_MMAP_THRESHOLD, trim: int = HEAP_TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds so that memory stays flat over a long night
    without being handed back and faulted in again on every batch.

    glibc raises its mmap threshold to the largest buffer freed so far (up to 32 MB),
    after which the model's large activations come from the heap; over hours of batches
    the heap fragments and grows (measured: +0.3 to +0.6 GB of RSS within an hour of
    audio with a DataLoader worker). A fixed threshold maps larger buffers on their
    own and returns them to the system when freed. Fixing it also fixes the trim
    threshold at its 128 kB default: whenever more than that is free at the heap's top
    it goes back to the system, so each batch's buffers were given back and faulted in
    afresh (the user's command over an 8-h night on a 2-core Zen 1: 570-674 thousand page
    faults and 2.5-5.2 s of system time; with ``trim`` 32 MB, 171 thousand and 1.7-2.1 s,
    the peak RSS within 25 MB with :func:`share_one_arena`). :func:`release_free_memory` still hands the free pages
    back between phases.

    Args:
        threshold: bytes above which a buffer is mapped on its own.
        trim: free bytes the heap's top may keep.
    """
    return mallopt(M_MMAP_THRESHOLD, threshold) and mallopt(M_TRIM_THRESHOLD, trim)


def share_one_arena() -> bool:
    """Make threads started from now on allocate from the main arena (``M_ARENA_MAX`` 1)."""
    return mallopt(M_ARENA_MAX, 1)

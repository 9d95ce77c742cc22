"""Resident memory a CPU run holds for nothing: the pages of torch's GPU libraries.

torch's Linux wheel (a CUDA build: torchaudio 2.11 has no other) loads its CUDA
libraries, and Lightning loads Triton's, even on a machine with no GPU. Loading them
maps in hundreds of MB of their code and read-only data: ``import torch`` alone was
620 MB resident on a Zen 3 with Linux 6.18, 260 MB of it the pages of ``nvidia/*``,
``libtorch_cuda`` and Triton, which a run on the CPU never executes. The resident set
that the operating system, ``time -v`` and a container's memory limit count is then
set by start-up instead of by the work: an 8-h night peaked at 1.08 GB there, of which
the night's own buffers were 144 MB.

:func:`page_out_gpu_libraries` asks the kernel to reclaim those pages
(``madvise(MADV_PAGEOUT)``, Linux 5.4+). The contents do not change: file pages are
read again from the file if anything touches them, and written (private) pages stay,
since without swap the kernel keeps them. A page that another process maps too (a
second earsleep from the same environment) is left alone by the kernel: it is shared,
not this process's own. It does nothing where a GPU is present, since there the
libraries run. ``main.py`` calls it twice: once right after torch is
imported, before Lightning's imports add their own 300 MB to the peak, and once when
the CLI starts (:func:`util.cli.main`), for what those imports mapped.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "GPU_LIBRARY_PARTS",
    "gpu_library_mappings",
    "gpu_library_resident_mb",
    "page_out_gpu_libraries",
]

log = logging.getLogger(__name__)

#: A mapped file is a GPU library when its path holds one of these: the CUDA wheels'
#: ``nvidia/`` packages, torch's CUDA halves, Triton's.
GPU_LIBRARY_PARTS = ("/nvidia/", "/libtorch_cuda", "/libc10_cuda", "/triton/")

#: ``madvise`` advice: reclaim the pages now (Linux ``mman-common.h``).
MADV_PAGEOUT = 21


def gpu_library_mappings(maps: Iterable[str]) -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of each file-backed GPU-library mapping in ``/proc/*/maps`` lines."""
    found = []
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0":  # anonymous: no file to read pages back from
            continue
        path = fields[5].strip()
        if any(part in path for part in GPU_LIBRARY_PARTS):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end, path))
    return found


def gpu_library_resident_mb() -> float:
    """Resident MB of this process's GPU libraries (Linux smaps); ``nan`` where unreadable.

    Each library's file pages plus the zero-initialised data mapped right after it
    (which stays: it has no file to be read back from).
    """
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return float("nan")
    total, owner, current = 0, False, False
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header
            name = fields[5] if len(fields) > 5 else None
            if name is not None:
                owner = any(part in name for part in GPU_LIBRARY_PARTS)
            current = owner and (name is None or not name.startswith("["))
        elif fields[0] == "Rss:" and current:
            total += int(fields[1])
    return total / 1024.0


def _resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def page_out_gpu_libraries() -> int | None:
    """Hand back this process's resident pages of GPU libraries when no GPU can use them.

    Returns the bytes by which the resident set shrank (0 when nothing was mapped or
    resident), or ``None`` where it does not apply: not Linux, a GPU present, or a
    kernel that refuses the advice (older than 5.4, or a sandbox without it).
    """
    if not sys.platform.startswith("linux") or torch.cuda.is_available():
        return None
    try:
        mappings = gpu_library_mappings(Path("/proc/self/maps").read_text().splitlines())
        before = _resident_bytes()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, end, path in mappings:
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            log.debug("madvise(MADV_PAGEOUT) refused for %s (errno %d)", path, ctypes.get_errno())
            return None
    try:
        released = max(0, before - _resident_bytes())
    except OSError:
        return None
    log.debug("paged out %.0f MB of %d GPU-library mappings", released / 2**20, len(mappings))
    return released

"""glibc heap settings for long nights: buffers are kept, not faulted in again each batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data.malloc import _libc

ROOT = Path(__file__).resolve().parents[1]

#: A night's batches in miniature: 4-MB buffers (under the 8-MB mmap threshold) made and
#: freed 60 times; prints the minor page faults.
_BATCHES = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from data import malloc
    if sys.argv[1] == "flat":
        assert malloc.keep_heap_flat()
    else:  # the mmap threshold alone, which leaves glibc's trim threshold at 128 kB
        assert malloc.mallopt(malloc.M_MMAP_THRESHOLD, malloc.HEAP_MMAP_THRESHOLD)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(60):
        buf = np.ones(1 << 20, np.float32)
        del buf
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _BATCHES, mode],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None, reason="glibc's mallopt (Linux) only")
def test_a_flat_heap_keeps_each_batchs_buffers_instead_of_faulting_them_in_again():
    pages = 60 * (4 << 20) // 4096  # one fault per page per batch
    regrown, kept = _faults("mmap_only"), _faults("flat")
    assert regrown > 0.25 * pages  # given back at every free, faulted in at the next batch
    assert kept < 0.05 * pages  # kept: about the first batch's pages only

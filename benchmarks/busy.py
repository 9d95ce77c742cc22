"""A known competing load for benchmarks: processes that each keep one core busy.

``benchmarks/train_throughput.py --load N`` and ``benchmarks/night.py --load N`` start N of
them beside the measurement, so that "loaded" means the same everywhere. Imports nothing
heavy (the night benchmark's parent process stays small).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` processes that each keep one core busy (a spinning Python loop) until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(0, n))]
    try:
        if procs:
            time.sleep(1.0)  # let them reach the run queue
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

"""What this CPU is and how much of it a process gets.

Its model name and feature flags (for reports and int8 schemes), the cores this process
may run on, and the intra-op thread count earsleep uses by default
(:func:`choose_threads`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "THREADS_ENV",
    "ThreadChoice",
    "available_cores",
    "choose_threads",
    "cpu_flags",
    "cpu_model",
    "other_load",
    "parse_cpu_flags",
]

#: Environment variable that fixes the thread count of every earsleep process (an integer).
THREADS_ENV = "EARSLEEP_THREADS"


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def parse_cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of a Linux ``/proc/cpuinfo`` text (x86 ``flags``, ARM ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags, or ``None`` where they cannot be read.

    Linux: ``/proc/cpuinfo``. macOS: ``sysctl machdep.cpu`` (lower-cased, ``.``
    spelled ``_``, e.g. ``AVX512VNNI`` → ``avx512vnni``, so the VNNI names are added).
    """
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        flags = {f.lower().replace(".", "_") for f in out.split()}
        if "avx512vnni" in flags:
            flags.add("avx512_vnni")
        if "avxvnni" in flags:
            flags.add("avx_vnni")
        return flags
    return None


def other_load(samples: int = 5, interval_s: float = 0.02) -> float:
    """Cores that other work keeps busy now, as far as this process can tell (0 where unknown).

    The larger of two measurements over ``samples × interval_s`` seconds (Linux):

    * the CPU time the cores this process may run on spent busy (``/proc/stat``), less
      this process's own, per second: a job that computes counts, however recently it
      started;
    * the median number of tasks runnable right now besides this one (``/proc/loadavg``,
      sampled ``samples`` times): it sees a job that is waiting for a core.

    Not the one-minute load average: it decays over minutes, so work that has just ended
    (the previous run of a benchmark, the previous step of a script) would still count
    and ``auto`` would take one thread on an idle machine. Elsewhere (no ``/proc``) the
    one-minute load average is what there is.
    """
    cpus = _allowed_cpus()
    before = _busy_jiffies(cpus)
    own0, wall0 = time.process_time(), time.perf_counter()
    now = []
    for i in range(max(1, samples)):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            now.append(max(0, int(running) - 1))
        except (OSError, IndexError, ValueError):
            break
        if i + 1 < samples:
            time.sleep(interval_s)
    after = _busy_jiffies(cpus)
    if before is None or after is None or not now:
        try:
            return max(0.0, os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    busy, total = after[0] - before[0], after[1] - before[1]
    elapsed = time.perf_counter() - wall0
    busy_cores = len(cpus) * busy / total if total > 0 else 0.0
    own = (time.process_time() - own0) / elapsed if elapsed > 0 else 0.0
    return max(busy_cores - own, float(statistics.median(now)), 0.0)


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


#: The fields of a ``/proc/stat`` CPU line that :func:`cpu_ticks` sums, in order.
TICK_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_ticks(cpus: set[int] | None = None) -> dict[str, int] | None:
    """Clock ticks since boot of ``cpus`` (default: the cores this process may use), summed
    per field of ``/proc/stat`` (:data:`TICK_FIELDS`); ``None`` where it cannot be read.

    ``steal`` is the time a virtual machine's CPUs were ready while the hypervisor ran
    another machine; ``guest`` time is already in ``user``.
    """
    cpus = _allowed_cpus() if cpus is None else cpus
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    sums = [0] * len(TICK_FIELDS)
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(v) for v in rest.split()[: len(TICK_FIELDS)]]
        if len(ticks) < len(TICK_FIELDS):
            return None
        sums = [a + b for a, b in zip(sums, ticks, strict=True)]
        seen += 1
    return dict(zip(TICK_FIELDS, sums, strict=True)) if seen else None


def _busy_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """``(busy, total)`` clock ticks of ``cpus`` since boot, or ``None``: busy is
    everything but ``idle`` and ``iowait``."""
    ticks = cpu_ticks(cpus)
    if ticks is None:
        return None
    total = sum(ticks.values())
    return total - ticks["idle"] - ticks["iowait"], total


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container's or ``taskset``'s
    limit), else :func:`os.cpu_count`."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """An intra-op thread count and why it was chosen (for logs and benchmark tables).

    ``requested``: the count was given (``--threads N`` or :data:`THREADS_ENV`), not
    chosen by ``auto``.
    """

    threads: int
    reason: str
    requested: bool = False


def choose_threads(
    requested: int | str | None = "auto",
    cores: int | None = None,
    load: float | None = None,
    processes: int = 1,
) -> ThreadChoice:
    """The intra-op thread count for one process.

    ``auto`` gives each process the cores that are free now: the cores it may run on
    (:func:`available_cores`), less the other work (:func:`other_load`: the CPU time
    other processes take on those cores over a tenth of a second, or the tasks runnable
    right now where that is higher, so that a job started a moment ago counts and one
    that ended a moment ago does not), shared by ``processes`` processes, rounded, at
    least 1. Why: on 2 cores two threads trained 1.5-1.7x faster than one on an idle
    machine, and 1.6-2.3x slower while each core ran another job's busy process, because
    every op then waits for a core another job holds
    (``benchmarks/train_throughput.py --load N``). An integer ``requested`` (or the
    :data:`THREADS_ENV` environment variable, which ``auto`` reads first) is used as given.

    Args:
        requested: ``auto``/``None``, or a thread count >= 1 (an int or its string).
        cores: cores available (default :func:`available_cores`).
        load: the other work, in busy cores (default :func:`other_load`).
        processes: processes that share the cores (a sweep's parallel runs).

    Raises:
        ValueError: ``requested`` (or the environment variable) is not ``auto`` or an
            integer >= 1; the message names the setting.
    """
    source = "requested"
    if requested is None or requested == "auto":
        env = os.environ.get(THREADS_ENV, "").strip()
        if not env:
            return _auto_threads(cores, load, processes)
        requested, source = env, THREADS_ENV
    try:
        threads = int(requested)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1 or (isinstance(requested, float) and requested != threads):
        name = THREADS_ENV if source == THREADS_ENV else "threads"
        raise ValueError(f"{name} must be 'auto' or an integer >= 1, got {requested!r}")
    return ThreadChoice(threads, f"{threads} thread(s) as {source}", requested=True)


def _auto_threads(cores: int | None, load: float | None, processes: int) -> ThreadChoice:
    cores = available_cores() if cores is None else max(1, int(cores))
    if load is None:
        load = other_load()
    free = max(0.0, cores - max(0.0, float(load)))
    threads = max(1, min(cores, round(free / max(1, processes))))
    return ThreadChoice(
        threads,
        f"{threads} thread(s): {cores} core(s) available, load {load:.1f}, {processes} process(es)",
    )

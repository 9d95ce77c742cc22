"""What this CPU is: its model name and feature flags (for reports and int8 schemes)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["cpu_flags", "cpu_model", "parse_cpu_flags"]


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

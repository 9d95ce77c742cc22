"""An int8 ``.tflite`` measured by the embedded runtimes' own tools.

- :func:`tflm_arena`: the smallest tensor arena the TensorFlow Lite Micro interpreter
  (``tflite_micro``, the microcontroller runtime built for the host) runs the model in,
  found by bisection on the arena size it is given, and its own allocation report
  (``print_allocations``: where the arena's bytes go).
- :class:`TflmRunner`: runs clips through that interpreter (int8 in and out, quantised and
  dequantised with the file's own scales) for the agreement check.
- :func:`vela_estimate`: Arm's Ethos-U compiler (``vela``) on the file: SRAM and flash it
  needs, the cycles and inference time it estimates on the configured NPU system, and
  which operators stay on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "VELA_DEFAULTS",
    "MeasureError",
    "TflmRunner",
    "tflm_arena",
    "vela_estimate",
]

#: The reference Ethos-U target vela models: a 128-MAC Ethos-U55 in Arm's high-end
#: embedded system (the Corstone-300 class: SRAM plus external flash), sharing its SRAM.
VELA_DEFAULTS = {
    "accelerator": "ethos-u55-128",
    "system_config": "Ethos_U55_High_End_Embedded",
    "memory_mode": "Shared_Sram",
}


class MeasureError(RuntimeError):
    """A runtime refused the model (the message says which and why)."""


def _tflm() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise MeasureError(
            "measuring needs the tflite-micro package: pip install -e '.[mcu]'"
        ) from err
    return runtime


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what C code writes to file descriptor 2 (the interpreter's reports)."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _runs_in(model: bytes, arena: int, sample: np.ndarray) -> bool:
    runtime = _tflm()
    with _captured_stderr():
        try:
            interp = runtime.Interpreter.from_bytes(model, arena_size=arena)
            interp.set_input(sample, 0)
            interp.invoke()
        except (RuntimeError, ValueError):
            return False
    return True


def _zero_input(model: bytes) -> np.ndarray:
    runtime = _tflm()
    with _captured_stderr():
        interp = runtime.Interpreter.from_bytes(model, arena_size=max(1 << 22, 20 * len(model)))
        details = interp.get_input_details(0)
    return np.zeros(details["shape"], dtype=details["dtype"])


def tflm_arena(model: bytes, granularity: int = 16) -> dict[str, Any]:
    """The smallest arena TFLite Micro runs ``model`` in, and its allocation report.

    Args:
        model: the ``.tflite`` bytes.
        granularity: bytes the bisection resolves (TFLM aligns to 16).

    Returns:
        ``arena_bytes`` (the smallest size that allocates and invokes), and
        ``allocations`` (the interpreter's own ``print_allocations`` lines at that size).

    Raises:
        MeasureError: the interpreter cannot run the model at any size tried (an
            operator TFLite Micro lacks, say), with its own message.
    """
    runtime = _tflm()
    sample = _zero_input(model)
    hi = max(1 << 16, 4 * len(model))
    while not _runs_in(model, hi, sample):
        if hi > 1 << 28:
            with _captured_stderr() as log:
                try:
                    interp = runtime.Interpreter.from_bytes(model, arena_size=hi)
                    interp.set_input(sample, 0)
                    interp.invoke()
                except (RuntimeError, ValueError) as err:
                    reason = str(err)
            lines = [x for x in "".join(log).splitlines() if x.strip()]
            raise MeasureError(
                f"TFLite Micro cannot run the model: {lines[-1] if lines else reason}"
            )
        hi *= 2
    lo = 0
    while hi - lo > granularity:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs_in(model, mid, sample) else (mid, hi)
    with _captured_stderr() as log:
        interp = runtime.Interpreter.from_bytes(model, arena_size=hi)
        interp.set_input(sample, 0)
        interp.invoke()
        interp.print_allocations()
    lines = [x.strip() for x in "".join(log).splitlines() if x.strip()]
    return {"arena_bytes": int(hi), "allocations": lines}


class TflmRunner:
    """Clips through the TensorFlow Lite Micro interpreter, one at a time as on the device.

    Args:
        model: the ``.tflite`` bytes (int8 or float input).
        arena_bytes: the arena to give the interpreter (default: ample).
    """

    def __init__(self, model: bytes, arena_bytes: int | None = None) -> None:
        runtime = _tflm()
        with _captured_stderr():
            self.interp = runtime.Interpreter.from_bytes(
                model, arena_size=arena_bytes or max(1 << 22, 20 * len(model))
            )
            self.input = self.interp.get_input_details(0)
            self.output = self.interp.get_output_details(0)

    @staticmethod
    def _qparams(details: dict[str, Any]) -> tuple[float, int] | None:
        q = details.get("quantization_parameters") or {}
        scales = list(np.ravel(q.get("scales", [])))
        if not scales:
            return None
        return float(scales[0]), int(np.ravel(q.get("zero_points", [0]))[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``(B, K)`` float32 of float features ``(B, *input_shape)``."""
        dtype = np.dtype(self.input["dtype"])
        qin, qout = self._qparams(self.input), self._qparams(self.output)
        rows = []
        for clip in np.asarray(x, dtype=np.float32):
            value = clip[None]
            if np.issubdtype(dtype, np.integer) and qin is not None:
                info = np.iinfo(dtype)
                value = np.clip(np.round(value / qin[0]) + qin[1], info.min, info.max)
            self.interp.set_input(value.astype(dtype), 0)
            self.interp.invoke()
            y = np.asarray(self.interp.get_output(0))
            if np.issubdtype(y.dtype, np.integer) and qout is not None:
                y = (y.astype(np.float32) - qout[1]) * qout[0]
            rows.append(y.reshape(-1).astype(np.float32))
        return np.stack(rows)


def vela_estimate(
    tflite_path: str | Path,
    out_dir: str | Path,
    accelerator: str = VELA_DEFAULTS["accelerator"],
    system_config: str = VELA_DEFAULTS["system_config"],
    memory_mode: str = VELA_DEFAULTS["memory_mode"],
) -> dict[str, Any]:
    """Compile ``tflite_path`` with vela and read its performance summary.

    Args:
        tflite_path: an int8 ``.tflite``.
        out_dir: where vela writes the NPU-compiled ``*_vela.tflite`` and its summary.
        accelerator: the Ethos-U configuration (``vela --help`` lists them).
        system_config: the system in vela's ``Arm/vela.ini`` (clocks, memory).
        memory_mode: the memory mode in that file.

    Returns:
        ``target``, ``sram_bytes``, ``flash_bytes`` (off- or on-chip flash used),
        ``cycles`` (total estimated), ``npu_cycles``, ``inference_ms`` (at the system's
        core clock), ``nn_macs``, ``cpu_ops`` (operators vela leaves to the CPU, counted),
        ``cpu_reasons`` (the first reason vela gives for each) and ``vela_file``.

    Raises:
        MeasureError: vela is missing or fails (its last line says why).
    """
    tflite_path, out_dir = Path(tflite_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vela = Path(sys.executable).with_name("vela")
    cmd = [
        str(vela) if vela.exists() else "vela",
        str(tflite_path),
        "--output-dir", str(out_dir),
        "--accelerator-config", accelerator,
        "--config", "Arm/vela.ini",
        "--system-config", system_config,
        "--memory-mode", memory_mode,
        "--show-cpu-operations",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    except FileNotFoundError as err:
        raise MeasureError("vela is not installed: pip install -e '.[mcu]'") from err
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise MeasureError(f"vela failed on {tflite_path.name}: {last}")
    summaries = sorted(out_dir.glob(f"{tflite_path.stem}_summary_*.csv"))
    if not summaries:
        raise MeasureError(f"vela wrote no summary for {tflite_path.name} in {out_dir}")
    with summaries[-1].open() as f:
        row = next(csv.DictReader(f))
    flash = sum(
        float(row.get(k) or 0) for k in ("off_chip_flash_memory_used", "on_chip_flash_memory_used")
    )
    cpu_ops, reasons = _cpu_operators(done.stdout + done.stderr)
    return {
        "target": f"{accelerator} ({system_config}, {memory_mode})",
        "sram_bytes": int(round(float(row.get("sram_memory_used") or 0) * 1024)),
        "flash_bytes": int(round(flash * 1024)),
        "cycles": int(float(row["cycles_total"])),
        "npu_cycles": int(float(row.get("cycles_npu") or 0)),
        "inference_ms": float(row["inference_time"]) * 1000.0,
        "nn_macs": int(float(row.get("nn_macs") or 0)),
        "cpu_ops": cpu_ops,
        "cpu_reasons": reasons,
        "vela_file": str(out_dir / f"{tflite_path.stem}_vela.tflite"),
    }


def _cpu_operators(log: str) -> tuple[dict[str, int], dict[str, str]]:
    """Operators vela's "supported operators" warnings leave to the CPU, and why."""
    counts: dict[str, int] = {}
    reasons: dict[str, str] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"Warning \(supported operators\) operator: (\w+),", line.strip())
        if not found:
            continue
        op = found.group(1)
        counts[op] = counts.get(op, 0) + 1
        why = next((x for x in lines[i + 1 : i + 3] if x.startswith("Reason:")), "")
        reasons.setdefault(op, why.removeprefix("Reason:").strip())
    return dict(sorted(counts.items())), reasons

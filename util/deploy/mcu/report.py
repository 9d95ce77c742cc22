"""A bundle's manifest as the deployment table's rows (model and front end)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["MODEL_COLUMNS", "format_manifest", "frontend_rows", "model_row", "table"]

#: The deployment table's model columns, in order.
MODEL_COLUMNS = (
    "model",
    "params",
    "MACs",
    "flash B (.tflite)",
    "TFLM arena B",
    "U55 SRAM B",
    "U55 flash B",
    "U55 cycles",
    "U55 ms",
    "int8 agree",
    "ops off the NPU",
)


def _kib(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, int | float) else "-"


def model_row(manifest: dict[str, Any]) -> list[str]:
    """One model's cells of :data:`MODEL_COLUMNS`."""
    vela = manifest.get("vela") or {}
    m = manifest["model"]
    cpu = ", ".join(f"{k}×{v}" for k, v in (vela.get("cpu_ops") or {}).items()) or "none"
    return [
        manifest["backbone"],
        _kib(m["params"]),
        _kib(m["macs"]),
        _kib(m["flash_bytes"]),
        _kib(manifest["tflm"]["arena_bytes"]),
        _kib(vela.get("sram_bytes")),
        _kib(vela.get("flash_bytes")),
        _kib(vela.get("cycles")),
        f"{vela['inference_ms']:.3f}" if "inference_ms" in vela else "-",
        f"{manifest['agreement']['int8_vs_fp32']:.2%} of {manifest['agreement']['clips']}",
        cpu if vela and "error" not in vela else vela.get("error", "-"),
    ]


def frontend_rows(manifest: dict[str, Any]) -> list[list[str]]:
    """The CMSIS-DSP front end's rows (:data:`FRONTEND_COLUMNS`).

    Agreement: the top class of the model fed the CMSIS-DSP features (fp32 PyTorch, and the
    int8 file in TensorFlow Lite Micro) against fp32 PyTorch fed LogMelFrontEnd's. The
    ``LogMelFrontEnd 16-bit`` row is LogMelFrontEnd fed the audio rounded to 16-bit PCM, as
    the fixed-point paths read it; their "vs 16-bit" column is the arithmetic's own error.
    """
    check = manifest.get("frontend") or {}
    rows = []
    for key in ("f32", "pcm16", "q31", "q15"):
        c = check.get(key)
        if not c:
            continue
        mem, ops = c.get("memory"), c.get("ops_per_frame")
        vs = c.get("vs_pcm16")
        rows.append(
            [
                "LogMelFrontEnd 16-bit" if key == "pcm16" else f"CMSIS-DSP {key}",
                f"{c['median_abs_diff']:.2g} / {c['p99_abs_diff']:.2g} / {c['max_abs_diff']:.2g}",
                f"{vs['p99_abs_diff']:.2g} / {vs['max_abs_diff']:.2g}" if vs else "-",
                f"{c['fp32_model_agreement']:.2%}",
                f"{c['int8_model_agreement']:.2%}",
                f"{check['clips']}",
                _kib(mem["ram_total"]) if mem else "-",
                _kib(mem["flash_total"]) if mem else "-",
                _kib(ops["total"]) if ops else "-",
            ]
        )
    return rows


FRONTEND_COLUMNS = (
    "front end",
    "abs Δ (log) median / p99 / max",
    "vs 16-bit p99 / max",
    "fp32 agree (CMSIS in)",
    "int8 TFLM agree (CMSIS in)",
    "clips",
    "RAM B / channel",
    "flash B",
    "ops (≈cycles) / frame",
)


def table(columns: Iterable[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table."""
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_manifest(manifest: dict[str, Any]) -> str:
    """The model's row and the front end's rows as two Markdown tables."""
    text = table(MODEL_COLUMNS, [model_row(manifest)])
    fe = frontend_rows(manifest)
    if fe:
        text += "\n\n" + table(FRONTEND_COLUMNS, fe)
    return text

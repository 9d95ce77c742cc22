"""The microcontroller bundle: an int8 model, its C array, the front end's constants, a manifest.

:func:`write_bundle` is ``python -m util.deploy.mcu``. From a checkpoint and its run's
validation split it writes into ``out``:

- ``<backbone>.int8.tflite``: the classifier (band standardisation included; raw log-mel
  ``(1, C, n_mels, T)`` int8 in, logits int8 out), from :func:`util.deploy.mcu.convert.to_tflite`;
- ``<backbone>_model_data.c`` / ``.h``: the same bytes as an aligned C array;
- ``<backbone>_frontend.h``: window, sparse mel filter bank (f32 and q31), band statistics,
  the model input's scale and zero point, class names and calibrated thresholds;
- ``manifest.json``: every fact above, the files' sizes and sha256, and the measurements:
  the TensorFlow Lite Micro arena (:func:`~util.deploy.mcu.measure.tflm_arena`), vela's SRAM,
  flash and cycle estimate on an Ethos-U55 (:func:`~util.deploy.mcu.measure.vela_estimate`),
  MACs, the int8 file's agreement with the fp32 PyTorch model on the validation split (run by
  the TFLM interpreter), and the CMSIS-DSP front end (:mod:`util.deploy.mcu.frontend`) against
  :class:`~data.features.LogMelFrontEnd` on validation audio: feature difference, the model's
  agreement when fed it, RAM and operations per frame;
- ``build/``: the intermediate files (the ``torch.export`` program, the float ``.tflite``, the
  converter's ``convert.json``, vela's compiled file and summary).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.audio import resample
from util.checkpoint import read_checkpoint
from util.complexity import count_macs, count_params
from util.deploy.audio_in import front_end_from_config
from util.deploy.data import Split, export_data, run_datamodule
from util.deploy.errors import ExportError
from util.deploy.export import load_classifier
from util.deploy.mcu.c_array import c_bytes, c_header, c_identifier
from util.deploy.mcu.convert import to_tflite
from util.deploy.mcu.frontend import PRECISIONS, CmsisLogMel, cycles_per_frame, pcm16
from util.deploy.mcu.measure import (
    VELA_DEFAULTS,
    MeasureError,
    TflmRunner,
    tflm_arena,
    vela_estimate,
)
from util.deploy.onnx import backbone_name
from util.night.thresholds import CalibrationError, load_calibration

__all__ = ["MANIFEST_NAME", "MIN_AGREEMENT", "write_bundle"]

log = logging.getLogger("util.deploy")

MANIFEST_NAME = "manifest.json"
#: The least int8-vs-fp32 agreement (share of validation clips with the same top class).
MIN_AGREEMENT = 0.98


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _macro_f1(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    scores = []
    for k in range(n_classes):
        tp = float(np.sum((pred == k) & (labels == k)))
        denom = float(np.sum(pred == k) + np.sum(labels == k))
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def _logits(model: torch.nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
        )


def _features(split: Split, rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*split.batches(batch_size, rows), strict=True)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def _validation_audio(dm: Any, front_end: Any, class_names: list[str], n: int | None) -> np.ndarray:
    """Up to ``n`` (``None``: all) finite validation clips of the model's classes, resampled."""
    waves: list[np.ndarray] = []
    if n is not None and n <= 0:
        return np.zeros((0, 2, front_end.clip_samples), dtype=np.float32)
    for clip in dm.source.iter_clips("validation"):
        wave = getattr(clip, "waveform", None)
        if wave is None or clip.label not in class_names or not np.isfinite(wave).all():
            continue
        wave = resample(wave.astype(np.float32), clip.sample_rate, front_end.sample_rate)
        s = front_end.clip_samples
        wave = (
            wave[:2, :s]
            if wave.shape[-1] >= s
            else np.pad(wave[:2], ((0, 0), (0, s - wave.shape[-1])))
        )
        waves.append(np.repeat(wave, 2, axis=0) if wave.shape[0] == 1 else wave)
        if n is not None and len(waves) >= n:
            break
    return np.stack(waves) if waves else np.zeros((0, 2, front_end.clip_samples), np.float32)


def _differences(feats: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(feats - ref)
    return {
        "max_abs_diff": float(diff.max()),
        "p99_abs_diff": float(np.percentile(diff, 99)),
        "median_abs_diff": float(np.median(diff)),
    }


def _frontend_check(
    model: torch.nn.Module,
    runner: TflmRunner,
    front_end: Any,
    waves: np.ndarray,
    precisions: list[str],
) -> dict[str, Any]:
    """Each CMSIS-DSP precision against LogMelFrontEnd on ``waves``.

    Agreement is with fp32 PyTorch fed LogMelFrontEnd's features of the float audio. The
    fixed-point precisions read 16-bit PCM, so ``pcm16`` (LogMelFrontEnd fed the same
    audio rounded to 16 bits) separates what the rounding of the samples changes from what
    the front end's arithmetic adds (each fixed-point entry's ``vs_pcm16``).
    """
    with torch.inference_mode():
        ref = front_end(torch.from_numpy(waves)).numpy()
    ref_top = _logits(model, ref).argmax(1)

    def agreement(feats: np.ndarray) -> dict[str, float]:
        return {
            "fp32_model_agreement": float(np.mean(_logits(model, feats).argmax(1) == ref_top)),
            "int8_model_agreement": float(np.mean(runner(feats).argmax(1) == ref_top)),
        }

    out: dict[str, Any] = {"clips": int(len(waves))}
    pcm16_ref = None
    if any(p != "f32" for p in precisions):
        with torch.inference_mode():  # rounded after the channel mode, as CmsisLogMel does
            adapted = front_end.adapt(torch.from_numpy(waves)).numpy()
            pcm16_ref = front_end(torch.from_numpy(pcm16(adapted))).numpy()
        out["pcm16"] = {
            "what": "LogMelFrontEnd (float arithmetic) fed the audio rounded to 16-bit PCM",
            **_differences(pcm16_ref, ref),
            **agreement(pcm16_ref),
        }
    for precision in precisions:
        fe = CmsisLogMel(front_end, precision)  # type: ignore[arg-type]
        started = time.perf_counter()
        feats = fe(waves)
        seconds = time.perf_counter() - started
        ops = fe.ops_per_frame()
        out[precision] = {
            **_differences(feats, ref),
            **agreement(feats),
            "memory": fe.memory(),
            "ops_per_frame": ops,
            "cycles_per_frame_estimate": cycles_per_frame(ops),
            "host_seconds_per_clip": seconds / max(1, len(waves)),
        }
        if precision != "f32" and pcm16_ref is not None:
            out[precision]["vs_pcm16"] = _differences(feats, pcm16_ref)
    return out


def _frontend_header(
    path: Path, model: Any, front_end: Any, quant: tuple[float, int] | None, thresholds: Any
) -> None:
    cfg = front_end.config()
    fe = CmsisLogMel(front_end, "f32")
    bands = fe.bands
    weights = np.concatenate(bands.weights).astype(np.float32)
    lengths = np.array([w.size for w in bands.weights], dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint16)
    q31 = np.round(np.clip(weights.astype(np.float64), 0, 1 - 2**-31) * 2**31).astype(np.int64)
    defines: dict[str, int | float] = {
        "EARSLEEP_SAMPLE_RATE": int(cfg["sample_rate"]),
        "EARSLEEP_N_FFT": int(cfg["n_fft"]),
        "EARSLEEP_WIN_LENGTH": int(cfg["win_length"]),
        "EARSLEEP_HOP_LENGTH": int(cfg["hop_length"]),
        "EARSLEEP_N_MELS": int(cfg["n_mels"]),
        "EARSLEEP_CHANNELS": int(front_end.output_shape[0]),
        "EARSLEEP_FRAMES": int(front_end.output_shape[-1]),
        "EARSLEEP_CLIP_SAMPLES": int(front_end.clip_samples),
        "EARSLEEP_LOG_EPS": float(cfg["eps"]),
        "EARSLEEP_N_CLASSES": len(model.class_names),
        "EARSLEEP_MEL_WEIGHTS": int(weights.size),
    }
    if quant is not None:
        defines["EARSLEEP_INPUT_SCALE"] = float(quant[0])
        defines["EARSLEEP_INPUT_ZERO_POINT"] = int(quant[1])
    tables: dict[str, np.ndarray] = {
        "earsleep_window": fe._window_f32,
        # the fixed-point paths' windows, as CmsisLogMel rounds them (arm_float_to_q31/q15)
        "earsleep_window_q31": fe.dsp.arm_float_to_q31(fe._window_f32),
        "earsleep_window_q15": fe.dsp.arm_float_to_q15(fe._window_f32),
        "earsleep_mel_first_bin": bands.starts.astype(np.uint16),
        "earsleep_mel_length": lengths,
        "earsleep_mel_offset": offsets,
        "earsleep_mel_weights_f32": weights,
        "earsleep_mel_weights_q31": q31.astype(np.int32),
        "earsleep_band_mean": model.band_mean.detach().float().numpy()[..., 0],
        "earsleep_band_std": model.band_std.detach().float().numpy()[..., 0],
    }
    if thresholds is not None:
        for name, value in thresholds.items():
            if isinstance(value, dict):
                row = [
                    float(value.get(c, value.get("default", math.nan))) for c in model.class_names
                ]
            else:
                row = [float(value)] * len(model.class_names)
            tables[f"earsleep_{name}"] = np.asarray(row, dtype=np.float32)
    text = c_header(
        "EARSLEEP_FRONTEND_H", tables, defines, {"earsleep_class_names": list(model.class_names)}
    )
    path.write_text(text)


def write_bundle(
    ckpt_path: str | Path,
    out: str | Path | None = None,
    run_config: str | Path | None = None,
    calib_clips: int = 300,
    val_clips: int | None = None,
    frontend_clips: int | None = None,
    frontend_precision: list[str] | None = None,
    min_agreement: float = MIN_AGREEMENT,
    converter_python: str | Path | None = None,
    vela: bool = True,
    accelerator: str = VELA_DEFAULTS["accelerator"],
    system_config: str = VELA_DEFAULTS["system_config"],
    memory_mode: str = VELA_DEFAULTS["memory_mode"],
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the device bundle of a checkpoint and measure it (see the module docstring).

    Args:
        ckpt_path: the Lightning checkpoint.
        out: output folder (default: <run>/mcu next to checkpoints/).
        run_config: the run's config.yaml (default: next to the checkpoint or one up).
        calib_clips: validation clips the int8 ranges are calibrated on.
        val_clips: validation clips int8 agreement is measured on (default: all).
        frontend_clips: validation clips (audio) the CMSIS-DSP front end is checked on
            (default: all of them; 0 skips the check).
        frontend_precision: CMSIS-DSP precisions to check: f32, q31, q15 (default: all).
        min_agreement: refuse (after writing everything) an int8 file whose top class
            agrees with fp32 PyTorch on less than this share of validation clips.
        converter_python: a Python interpreter with litert-torch, when this one has none
            (default: this one, or $EARSLEEP_LITERT_PYTHON).
        vela: compile with vela for the Ethos-U estimate (SRAM, flash, cycles).
        accelerator: vela's Ethos-U configuration.
        system_config: vela's system in Arm/vela.ini.
        memory_mode: vela's memory mode in Arm/vela.ini.
        batch_size: clips per PyTorch batch.
        seed: seed of the clip samples.
        progress: show progress bars while a missing cache is built.

    Returns:
        The manifest (also written to ``<out>/manifest.json``).

    Raises:
        ExportError: any failure, with one line saying what and where; an int8 file below
            ``min_agreement`` after the bundle and manifest are written.
    """
    precisions = list(frontend_precision or PRECISIONS)
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ExportError(f"--frontend_precision {unknown} unknown; choose from {list(PRECISIONS)}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ExportError(f"--min_agreement must be in [0, 1], got {min_agreement}")
    ckpt_path = Path(ckpt_path)
    model = load_classifier(ckpt_path)
    try:
        checkpoint = read_checkpoint(ckpt_path, what="--ckpt_path")
        calibration = load_calibration(checkpoint, what=str(ckpt_path))
    except CalibrationError as err:
        raise ExportError(str(err)) from err
    data = export_data(ckpt_path, model.hparams, run_config, progress=progress)
    front_end = front_end_from_config(data.feature_config)
    backbone = backbone_name(model)
    stem = c_identifier(backbone.lower())
    out_dir = Path(out) if out else ckpt_path.parent.parent / "mcu"
    out_dir.mkdir(parents=True, exist_ok=True)
    build = out_dir / "build"

    val = data.validation
    calib_x, _ = _features(val, val.sample(calib_clips, seed + 1), batch_size)
    log.info("converting %s (%s) to int8 .tflite on %d clips", ckpt_path, backbone, len(calib_x))
    converted = to_tflite(model, calib_x, build, converter_python)
    tflite = out_dir / f"{stem}.int8.tflite"
    shutil.copyfile(converted["int8"]["path"], tflite)
    model_bytes = tflite.read_bytes()
    (out_dir / f"{stem}_model_data.c").write_text(c_bytes(model_bytes, f"{stem}_model_data"))
    (out_dir / f"{stem}_model_data.h").write_text(
        f"#ifndef {stem.upper()}_MODEL_DATA_H\n#define {stem.upper()}_MODEL_DATA_H\n"
        "#include <stddef.h>\n"
        f"extern const unsigned char {stem}_model_data[];\n"
        f"extern const size_t {stem}_model_data_len;\n#endif\n"
    )

    log.info("measuring: TFLite Micro arena and agreement on the validation split")
    try:
        arena = tflm_arena(model_bytes)
        runner = TflmRunner(model_bytes, arena["arena_bytes"])
    except MeasureError as err:
        raise ExportError(str(err)) from err
    val_x, val_y = _features(val, val.sample(val_clips, seed + 3), batch_size)
    ref = _logits(model, val_x)
    int8 = runner(val_x)
    n_classes = len(data.class_names)
    agreement = float(np.mean(int8.argmax(1) == ref.argmax(1)))
    quant = runner._qparams(runner.input)

    estimate: dict[str, Any] | None = None
    if vela:
        log.info("estimating with vela on %s", accelerator)
        try:
            estimate = vela_estimate(
                tflite, build / "vela", accelerator, system_config, memory_mode
            )
        except MeasureError as err:
            estimate = {"error": str(err)}

    thresholds = calibration.values() if calibration is not None else None
    _frontend_header(out_dir / f"{stem}_frontend.h", model, front_end, quant, thresholds)
    check: dict[str, Any] | None = None
    if frontend_clips is None or frontend_clips > 0:
        dm, _ = run_datamodule(ckpt_path, model.hparams, run_config, progress)
        waves = _validation_audio(dm, front_end, list(data.class_names), frontend_clips)
        log.info("checking the CMSIS-DSP front end on %d validation clips", len(waves))
        check = _frontend_check(model, runner, front_end, waves, precisions) if len(waves) else None

    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(out_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest: dict[str, Any] = {
        "format": "earsleep.mcu-bundle",
        "version": 1,
        "checkpoint": str(ckpt_path),
        "backbone": backbone,
        "class_names": list(data.class_names),
        "input_shape": list(data.input_shape),
        "input": "raw log-mel (LogMelFrontEnd output, natural log); the model standardises "
        "each band itself. int8: q = round(x / scale) + zero_point",
        "input_quantization": {"scale": quant[0], "zero_point": quant[1]} if quant else None,
        "feature_config": data.feature_config,
        "feature_hash": data.feature_hash,
        "thresholds": thresholds,
        "thresholds_source": calibration.source()
        if calibration is not None
        else "not calibrated (python -m util.night.calibrate --ckpt_path <file>)",
        "files": files,
        "model": {
            "params": count_params(model.backbone),
            "macs": int(count_macs(model, data.input_shape)),
            "flash_bytes": len(model_bytes),
            "ops": converted["int8"]["ops"],
            "float_ops": converted["int8"]["float_ops"],
            "fp32_tflite_max_abs_diff": converted["fp32_max_abs_diff"],
            "calibration_clips": int(len(calib_x)),
        },
        "tflm": {"arena_bytes": arena["arena_bytes"], "allocations": arena["allocations"]},
        "vela": estimate,
        "agreement": {
            "clips": int(len(val_x)),
            "int8_vs_fp32": agreement,
            "min_agreement": min_agreement,
            "fp32_macro_f1": _macro_f1(ref.argmax(1), val_y, n_classes),
            "int8_macro_f1": _macro_f1(int8.argmax(1), val_y, n_classes),
            "runtime": "tflite_micro (TensorFlow Lite Micro Python interpreter)",
            "cache": str(val.path),
        },
        "frontend": check,
        "versions": _versions(),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default))
    if agreement < min_agreement:
        raise ExportError(
            f"int8 agrees with fp32 on {agreement:.1%} of {len(val_x)} validation clips, below "
            f"--min_agreement {min_agreement:.0%} (bundle kept in {out_dir} for inspection)"
        )
    return manifest


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "torch",
        "litert-torch",
        "ai-edge-quantizer",
        "tflite-micro",
        "ethos-u-vela",
        "cmsisdsp",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed here"
    return found

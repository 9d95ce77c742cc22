"""A checkpoint to checked ONNX files: fp32, optionally static INT8, and a report.

:func:`export_checkpoint` is the whole pipeline behind ``python -m util.deploy``: restore
the classifier (:func:`load_classifier`), find its run's data (:mod:`util.deploy.data`),
export fp32 (:mod:`util.deploy.onnx`) and check it against PyTorch on validation clips
(:mod:`util.deploy.runtime`), quantise and judge int8 (:mod:`util.deploy.quantize`), score
every file on the test split and write ``export_report.json``; :func:`format_report` prints
it as a table.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from models.classifier import Classifier
from util.checkpoint import CheckpointError, read_checkpoint
from util.deploy.audio_in import export_audio_checked, front_end_from_config
from util.deploy.data import Split, export_data
from util.deploy.errors import ExportError, Int8LossError, ParityError
from util.deploy.onnx import INPUT_NAME, OUTPUT_NAME, backbone_name, export_onnx
from util.deploy.quantize import (
    DEFAULT_MAX_INT8_DROP_PP,
    INT8_SCHEMES,
    MIN_KERNEL_AGREEMENT,
    CalibrateMethod,
    CalibrationReader,
    Int8Scheme,
    Int8SchemeName,
    cpu_summary,
    int8_guard,
    quantize_int8,
    resolve_int8_scheme,
)
from util.deploy.runtime import DEFAULT_TOLERANCE, check_parity, evaluate_onnx, ort_session

__all__ = ["REPORT_NAME", "export_checkpoint", "format_report", "load_classifier"]

log = logging.getLogger("util.deploy")  # not __name__: "__main__" under python -m

REPORT_NAME = "export_report.json"


def load_classifier(ckpt_path: str | Path) -> Classifier:
    """Restore a :class:`Classifier` (or subclass, e.g. a KD student) in eval mode on CPU.

    The class is the checkpoint's own ``_class_path`` hyper-parameter (written by
    LightningCLI) when it names a Classifier subclass: ``Classifier.load_from_checkpoint``
    alone would silently build a plain Classifier from a student's checkpoint, since
    Lightning drops hyperparameters that ``Classifier.__init__`` does not take,
    ``_class_path`` included. A KD student never reads its teacher file here.

    Raises:
        ExportError: the checkpoint is missing, unreadable, holds more than weights
            (it is read weights-only, never unpickled), or cannot be restored.
    """
    ckpt_path = Path(ckpt_path)
    try:
        checkpoint = read_checkpoint(ckpt_path, what="--ckpt_path")
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    cls: type[Classifier] = Classifier
    if class_path:
        module_name, _, name = str(class_path).rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ExportError(
                f"{ckpt_path} names class {class_path}, which cannot be imported"
            ) from err
        if not (isinstance(found, type) and issubclass(found, Classifier)):
            raise ExportError(f"{ckpt_path} holds a {class_path}, not a Classifier")
        cls = found
    try:
        model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(
            f"cannot restore {ckpt_path} as {cls.__name__}: {type(err).__name__}: {err}"
        ) from err
    return model.eval()


def export_checkpoint(
    ckpt_path: str | Path,
    run_config: str | Path | None = None,
    out: str | Path | None = None,
    int8: bool = False,
    calib_cache: str | Path | None = None,
    test_cache: str | Path | None = None,
    calib_clips: int = 300,
    parity_clips: int = 512,
    test_clips: int | None = None,
    batch_size: int = 64,
    tolerance: float = DEFAULT_TOLERANCE,
    min_time: int = 8,
    opset: int | None = None,
    per_channel: bool = True,
    int8_scheme: Int8SchemeName = "auto",
    max_int8_drop_pp: float = DEFAULT_MAX_INT8_DROP_PP,
    val_clips: int | None = None,
    calibrate_method: CalibrateMethod = "minmax",
    threads: int = 0,
    seed: int = 0,
    progress: bool = True,
    audio_in: bool = False,
) -> dict[str, Any]:
    """Export a trained earsleep checkpoint (plain or KD student) to checked ONNX files.

    Writes ``<backbone>.onnx`` (dynamic batch and time axes, checked against PyTorch on
    validation clips), with ``int8`` also ``<backbone>.int8.onnx`` (static QDQ), and
    ``export_report.json``; every file is scored on the test split. The int8 file is
    judged against fp32 on the validation split: if it loses more than
    ``max_int8_drop_pp`` points of macro-F1 it is kept as ``<backbone>.int8.rejected.onnx``,
    the report is written, and :class:`~util.deploy.errors.Int8LossError` is raised.

    Args:
        ckpt_path: the Lightning checkpoint to export.
        run_config: the run's config.yaml, whose data section gives the features and
            caches (default: config.yaml next to the checkpoint or in its run folder).
        out: output folder (default: <run>/export next to checkpoints/).
        int8: also write a static INT8 (QDQ) model.
        calib_cache: validation cache file for calibration, parity and the int8 guard
            (default: the run's own); refused if built with other features or classes.
        test_cache: test cache file to score on (default: the run's own); same checks.
        calib_clips: validation clips to calibrate on.
        parity_clips: validation clips to check parity on.
        test_clips: score on this many test clips (default: all).
        batch_size: clips per inference batch.
        tolerance: largest allowed |logit difference| between ONNX fp32 and PyTorch.
        min_time: shortest time axis the ONNX model must accept.
        opset: ONNX opset (default: the exporter's).
        per_channel: per-output-channel weight scales.
        int8_scheme: integer types of the int8 file. auto: exact on this CPU (u8s8 on
            x86 with VNNI and on ARM, u8s7 on x86 without VNNI). u8s8: uint8
            activations, 8-bit int8 weights. u8s7: the same with 7-bit weights (x86
            without VNNI saturates 8-bit ones). s8s8: the microcontroller flavour
            (CMSIS-NN, TFLite Micro), symmetric int8 activations and weights, scored as
            its 32-bit-accumulating target computes it.
        max_int8_drop_pp: refuse an int8 file that loses more validation macro-F1 than
            this against fp32 (percentage points; it is kept as
            <backbone>.int8.rejected.onnx); .inf accepts any.
        val_clips: validation clips to judge int8 against fp32 on (default: all).
        calibrate_method: how activation ranges are calibrated.
        threads: ONNX Runtime threads for scoring (0: all cores).
        seed: seed of the clip samples.
        progress: show progress bars.
        audio_in: also write <backbone>.audio.onnx, the whole pipeline (two-channel audio
            (batch, 2, samples) at the front end's rate in, softmax probabilities out:
            front end, standardisation, backbone), checked against the PyTorch pipeline
            on synthetic audio within 1e-4; with int8 also <backbone>.audio.int8.onnx
            (float front end, the int8 file's classifier). See util/deploy/audio_in.py.

    Returns:
        The report (also written to ``<out>/export_report.json``).

    Raises:
        ExportError: any failure (no config, mismatched cache, unsupported operator,
            parity beyond ``tolerance``, an int8 file that loses too much).
    """
    ckpt_path = Path(ckpt_path)
    model = load_classifier(ckpt_path)
    backbone = backbone_name(model)
    data = export_data(ckpt_path, model.hparams, run_config, calib_cache, test_cache, progress)
    val, test = data.validation, data.test
    out_dir = Path(out) if out else _default_out(ckpt_path)
    stem = backbone.lower()
    fp32_path = out_dir / f"{stem}.onnx"
    metadata = {  # the run's front end, also for a checkpoint that does not record it
        "earsleep.feature_hash": data.feature_hash,
        "earsleep.feature_config": json.dumps(data.feature_config, sort_keys=True),
        "earsleep.checkpoint": str(ckpt_path),
    }
    log.info("exporting %s (%s) to %s", ckpt_path, backbone, fp32_path)
    export_onnx(
        model, fp32_path, data.input_shape, min_time=min_time, opset=opset, metadata=metadata
    )
    fp32 = ort_session(fp32_path, threads)
    parity_rows = val.sample(parity_clips, seed)
    try:
        parity = check_parity(
            model, fp32, (x for x, _ in val.batches(batch_size, parity_rows)), tolerance
        )
    except ParityError as err:
        failed = fp32_path.with_name(f"{stem}.parity_failed.onnx")
        fp32_path.replace(failed)
        raise ParityError(
            f"{err} (kept as {failed})", max_abs_diff=err.max_abs_diff, tolerance=err.tolerance
        ) from None
    log.info("parity: max |logit diff| %.3g over %d clips", parity["max_abs_diff"], parity["clips"])

    report: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "config": str(data.config_path),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "backbone": backbone,
        "class_names": data.class_names,
        "input_shape": list(data.input_shape),
        "feature_hash": data.feature_hash,
        "dynamic_axes": {INPUT_NAME: {"0": "batch", "3": "time"}, OUTPUT_NAME: {"0": "batch"}},
        "min_time": min_time,
        "parity": {**parity, "cache": str(val.path)},
        "files": {"fp32": {"path": str(fp32_path), "bytes": fp32_path.stat().st_size}},
        "versions": _versions(),
    }
    sessions = {"fp32": fp32}
    rejected: Int8LossError | None = None
    if int8:
        n_classes = len(data.class_names)
        scorer = _Scorer(val, val.sample(val_clips, seed + 3), batch_size, n_classes, progress)
        int8_path = out_dir / f"{stem}.int8.onnx"
        calib_rows = val.sample(calib_clips, seed + 1)
        done = _quantize_checked(
            fp32_path,
            int8_path,
            val,
            calib_rows,
            scorer,
            int8_scheme,
            threads,
            batch_size=batch_size,
            per_channel=per_channel,
            calibrate_method=calibrate_method,
        )
        scheme, reason = done.scheme, done.reason
        # The device flavour is scored as its target computes it (32-bit sums), not with
        # this host's fused kernels; the host schemes with the kernels a user will run.
        sessions["int8"] = done.reference if scheme.reference_scoring else done.kernels
        int8_scores = done.reference_scores if scheme.reference_scoring else done.kernel_scores
        size = int8_path.stat().st_size
        report["files"]["int8"] = {
            "path": str(int8_path),
            "bytes": size,
            "ratio_to_fp32": size / report["files"]["fp32"]["bytes"],
        }
        report["calibration"] = {
            "cache": str(val.path),
            "clips": int(len(calib_rows)),
            "method": calibrate_method,
            "format": "QDQ",
            "per_channel": per_channel,
            "scheme": scheme.name,
            "scheme_reason": reason,
            "scheme_target": scheme.target,
            "activation_type": scheme.activation_type,
            "symmetric_activations": scheme.symmetric_activations,
            "weight_type": "int8",
            "reduce_range": scheme.reduce_range,
            "scored_with": "QDQ reference (no graph optimisation)"
            if scheme.reference_scoring
            else "ONNX Runtime's fused int8 kernels (ORT_ENABLE_ALL)",
            "kernels_agree_with_reference": done.kernel_agreement,
            "cpu": cpu_summary(),
        }
        guard = int8_guard(scorer(fp32, "fp32"), int8_scores, max_int8_drop_pp)
        n_val = len(scorer.rows)
        report["validation"] = {"cache": str(val.path), "clips": n_val, **guard}
        log.info(
            "int8 on %d validation clips: macro-F1 %.4f vs fp32 %.4f (%+.2f pp), agreement %.2f%%",
            n_val,
            guard["int8"]["f1_macro"],
            guard["fp32"]["f1_macro"],
            -guard["f1_macro_drop_pp"],
            100 * guard["int8_agreement_with_fp32"],
        )
        if not guard["accepted"]:
            kept = int8_path.with_name(f"{stem}.int8.rejected.onnx")
            int8_path.replace(kept)
            report["files"]["int8"].update(path=str(kept), rejected=True)
            rejected = _int8_loss(guard, scheme, reason, n_val, max_int8_drop_pp, kept)
            del sessions["int8"]

    if audio_in:
        report["audio_in"] = export_audio_checked(
            model,
            fp32_path,
            out_dir / f"{stem}.audio.onnx",
            front_end=front_end_from_config(data.feature_config),
            int8_path=int8_path if "int8" in sessions else None,
            seed=seed,
            threads=threads,
        )

    rows = test.sample(test_clips, seed + 2)
    tester = _Scorer(test, rows, batch_size, len(data.class_names), progress, "test")
    scores = {name: tester(session, name) for name, session in sessions.items()}
    report["test"] = {"cache": str(test.path), "clips": int(len(rows))}
    for name, s in scores.items():
        report["test"][name] = {"acc": s["acc"], "f1_macro": s["f1_macro"]}
    if "int8" in scores:
        agree = float(np.mean(scores["int8"]["predictions"] == scores["fp32"]["predictions"]))
        report["test"]["int8_agreement_with_fp32"] = agree
        report["test"]["f1_macro_drop_pp"] = 100 * (
            scores["fp32"]["f1_macro"] - scores["int8"]["f1_macro"]
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["report_path"] = str(out_dir / REPORT_NAME)
    if rejected is not None:
        raise rejected
    return report


@dataclass
class _Scorer:
    """Scores a session on fixed rows of one split (:func:`evaluate_onnx`)."""

    split: Split
    rows: np.ndarray
    batch_size: int
    num_classes: int
    progress: bool
    name: str = "validation"

    def __call__(self, session: ort.InferenceSession, file: str) -> dict[str, Any]:
        return evaluate_onnx(
            session,
            self.split.batches(self.batch_size, self.rows),
            self.num_classes,
            progress=self.progress,
            desc=f"{self.name} {file}",
            total=-(-len(self.rows) // self.batch_size),
        )


@dataclass
class _Quantized:
    """The int8 file's scheme and its two sessions, scored on the validation rows."""

    scheme: Int8Scheme
    reason: str
    kernels: ort.InferenceSession
    reference: ort.InferenceSession
    kernel_scores: dict[str, Any]
    reference_scores: dict[str, Any]
    kernel_agreement: float


def _quantize_checked(
    fp32_path: Path,
    int8_path: Path,
    val: Split,
    calib_rows: np.ndarray,
    score: _Scorer,
    int8_scheme: str,
    threads: int,
    batch_size: int,
    per_channel: bool,
    calibrate_method: str,
) -> _Quantized:
    """Quantise; for ``auto``, again with 7-bit weights when the kernels prove inexact.

    ``auto`` read the CPU's flags; scoring the file with this CPU's fused int8 kernels
    and with the QDQ reference arithmetic measures what the kernels really compute (an
    emulator or a hypervisor can report flags the kernels do not get).
    """
    scheme, reason = resolve_int8_scheme(int8_scheme)
    while True:
        reader = CalibrationReader(lambda: (x for x, _ in val.batches(batch_size, calib_rows)))
        log.info(
            "quantising to %s with scheme %s (%s), calibrated on %d validation clips",
            int8_path,
            scheme.name,
            reason,
            len(calib_rows),
        )
        quantize_int8(
            fp32_path,
            int8_path,
            reader,
            scheme=scheme,
            reason=reason,
            per_channel=per_channel,
            calibrate_method=calibrate_method,
        )
        kernels = ort_session(int8_path, threads)
        reference = ort_session(int8_path, threads, optimize=False)
        kernel_scores, reference_scores = score(kernels, "int8"), score(reference, "int8 ref")
        agreement = float(np.mean(kernel_scores["predictions"] == reference_scores["predictions"]))
        if int8_scheme == "auto" and scheme.name == "u8s8" and agreement < MIN_KERNEL_AGREEMENT:
            reason = (
                f"{reason}, but its int8 kernels agreed with the QDQ reference on only "
                f"{100 * agreement:.1f}% of validation clips (saturation): 7-bit weights instead"
            )
            log.warning("int8: %s", reason)
            scheme = INT8_SCHEMES["u8s7"]
            continue
        return _Quantized(
            scheme, reason, kernels, reference, kernel_scores, reference_scores, agreement
        )


def _int8_loss(
    guard: dict[str, Any],
    scheme: Int8Scheme,
    reason: str,
    clips: int,
    max_drop_pp: float,
    kept: Path,
) -> Int8LossError:
    """The refusal of an int8 file that loses too much, with the flag that accepts it."""
    drop = guard["f1_macro_drop_pp"]
    fp32_f1, int8_f1 = guard["fp32"]["f1_macro"], guard["int8"]["f1_macro"]
    return Int8LossError(
        f"int8 (scheme {scheme.name}: {reason}) loses {drop:.2f} pp of validation macro-F1 "
        f"(fp32 {fp32_f1:.4f}, int8 {int8_f1:.4f}, agreement "
        f"{100 * guard['int8_agreement_with_fp32']:.1f}% on {clips} clips), more than "
        f"--max_int8_drop_pp {max_drop_pp:g}; kept as {kept}; try another --int8_scheme "
        f"(one of {', '.join(INT8_SCHEMES)}) or pass --max_int8_drop_pp "
        f"{math.ceil(drop + 0.5):g} to accept it",
        fp32_f1=fp32_f1,
        int8_f1=int8_f1,
        drop_pp=drop,
        max_drop_pp=max_drop_pp,
    )


def _default_out(ckpt_path: Path) -> Path:
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent / "export"
    return ckpt_path.parent / f"{ckpt_path.stem}_export"


def _versions() -> dict[str, str]:
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": getattr(onnxscript, "__version__", "?"),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a small text table: file size, accuracy and macro-F1 per file."""
    names = [n for n in ("fp32", "int8") if n in report["files"]]
    test, parity = report["test"], report["parity"]
    width = 14
    lines = [
        f"{report['backbone']} ({report['model_class']}), input {report['input_shape']}, "
        f"{test['clips']} test clips",
        f"parity fp32 vs PyTorch: max |logit diff| {parity['max_abs_diff']:.2e} "
        f"on {parity['clips']} validation clips (tolerance {parity['tolerance']:g})",
        "",
        f"{'':<12}" + "".join(f"{'ONNX ' + n:>{width}}" for n in names),
        f"{'file (KiB)':<12}"
        + "".join(f"{report['files'][n]['bytes'] / 1024:>{width}.1f}" for n in names),
        f"{'accuracy':<12}" + "".join(f"{test[n]['acc']:>{width}.4f}" for n in names),
        f"{'macro-F1':<12}" + "".join(f"{test[n]['f1_macro']:>{width}.4f}" for n in names),
    ]
    if "int8" in names:
        cal, val = report["calibration"], report["validation"]
        lines += [
            "",
            f"int8 scheme {cal['scheme']}: {cal['scheme_reason']}; for {cal['scheme_target']}",
            f"int8 file is {100 * report['files']['int8']['ratio_to_fp32']:.1f}% of fp32; "
            f"test macro-F1 change {-test['f1_macro_drop_pp']:+.2f} pp, "
            f"agreement with fp32 {100 * test['int8_agreement_with_fp32']:.2f}%; "
            f"validation {-val['f1_macro_drop_pp']:+.2f} pp, "
            f"{100 * val['int8_agreement_with_fp32']:.2f}% (allowed loss {val['max_drop_pp']:g} pp)",
        ]
    for name, file in report.get("audio_in", {}).items():
        if name in ("fp32", "int8"):
            check = file.get("parity") or file["vs_int8_features_file"]
            versus = "PyTorch" if name == "fp32" else "the int8 file on PyTorch features"
            lines.append(
                f"audio-in {name} {file['path']} ({file['bytes'] / 1024:.1f} KiB): max "
                f"|probability diff| vs {versus} {check['max_abs_diff']:.2e} on "
                f"{check['clips']} synthetic clips"
            )
    lines.append(f"report: {report.get('report_path', '')}")
    return "\n".join(lines)

"""Single-thread batch-1 CPU latency: eager PyTorch, ONNX Runtime fp32 and int8.

For TinyCNN, TinyCNN-CBAM (r8/k3), CRNN and BC-ResNet (width 1.75) at the ``reference``
(1×64×501) and ``native`` (2×64×101) inputs, each whole
:class:`~models.classifier.Classifier` (band standardisation included, as exported) is
timed at batch 1 on one thread:

- **eager**: :func:`util.complexity.measure_latency` (``torch.inference_mode``);
- **ORT fp32**: the dynamo-exported ONNX file (:func:`util.deploy.onnx.export_onnx`);
- **ORT int8**: that file after static QDQ quantisation (:func:`util.deploy.quantize.quantize_int8`),
  calibrated on random inputs shaped like the front end's output (latency does not
  depend on the calibration; accuracy does, and ``python -m util.deploy`` measures it on
  real caches).

ONNX Runtime sessions run with ``intra_op_num_threads=1``, ``inter_op_num_threads=1``
and every graph optimisation (``ORT_ENABLE_ALL``). Median and p90 over ``--runs``
runs after ``--warmup``; the three engines take turns ``--repeats`` times and each
cell keeps the repeat with the lowest median (load from other processes only adds
time). Weights are random: latency does not depend on them.

The compute floor is the model's FLOPs (2 × the MACs of
:func:`util.complexity.count_macs`) divided by the single-core fp32 GEMM peak,
measured in the same run as the best rate of ``torch.mm`` products of 256³ to 1024³
with ``torch.set_num_threads(1)`` (before and after the timings; the higher is used;
see :func:`gemm_peak_gflops` for why not 1024³ alone).
Each latency is also given as a multiple of that floor.

``--profile`` adds, for the native TinyCNN, ONNX Runtime's per-operator times at
each graph-optimisation level and the latency of variants (see :func:`investigate`).

    .venv/bin/python benchmarks/latency.py
    .venv/bin/python benchmarks/latency.py --runs 300 --inputs native --backbones TinyCNN --profile
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import typing
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from models.backbones import CRNN, BCResNet, TinyCNN, TinyCNNCBAM  # noqa: E402
from models.classifier import Classifier  # noqa: E402
from util.complexity import count_macs, count_params, measure_latency  # noqa: E402
from util.deploy.onnx import export_onnx  # noqa: E402
from util.deploy.quantize import (  # noqa: E402
    CalibrationReader,
    Int8SchemeName,
    quantize_int8,
    resolve_int8_scheme,
)

INPUTS = {"reference": (1, 64, 501), "native": (2, 64, 101)}
BACKBONES: dict[str, Callable[..., Any]] = {
    "TinyCNN": TinyCNN,
    "TinyCNN-CBAM r8k3": functools.partial(TinyCNNCBAM, reduction=8, kernel_size=3),
    "CRNN": CRNN,
    "BC-ResNet": BCResNet,
}
NUM_CLASSES = 3
#: Plausible per-band statistics of the native log-mel input, for the standardisation.
NATIVE_MEAN, NATIVE_STD = -6.0, 2.5


def build(backbone: str, input_name: str) -> Classifier:
    """The Classifier as trained on ``input_name``: ``normalize`` only for ``native``."""
    shape = INPUTS[input_name]
    native = input_name == "native"
    model = Classifier(
        backbone=BACKBONES[backbone],
        num_classes=NUM_CLASSES,
        in_channels=shape[0],
        input_shape=shape,
        normalize=native,
    ).eval()
    if native:
        model.band_mean.fill_(NATIVE_MEAN)
        model.band_std.fill_(NATIVE_STD)
    return model


def example_inputs(input_name: str, batch: int, seed: int) -> np.ndarray:
    """Random inputs in the front end's range: dB in [-80, 0] or log-mel around the mean."""
    shape = (batch, *INPUTS[input_name])
    rng = np.random.default_rng(seed)
    if input_name == "reference":
        return rng.uniform(-80.0, 0.0, shape).astype(np.float32)
    return (NATIVE_MEAN + NATIVE_STD * rng.standard_normal(shape)).astype(np.float32)


def gemm_peak_gflops(sizes: tuple[int, ...] = (256, 384, 512, 1024), repeats: int = 30) -> float:
    """Single-core fp32 GEMM peak: the best ``n×n @ n×n`` ``torch.mm`` on one thread.

    Several sizes, best of ``repeats`` each, the highest rate wins. Why not only a
    1024³ product: on a shared machine its 17-40 ms runs are nearly always preempted
    and its 12 MB working set competes for the shared cache, so it reads about half of
    the rate that 256³-512³ products (within L2, a few ms) sustain back to back.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    best_rate = 0.0
    try:
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            out = torch.empty(n, n)
            for _ in range(3):  # warm-up
                torch.mm(a, b, out=out)
            best = math.inf
            for _ in range(repeats if n <= 512 else max(3, repeats // 3)):
                start = time.perf_counter()
                torch.mm(a, b, out=out)
                best = min(best, time.perf_counter() - start)
            best_rate = max(best_rate, 2 * n**3 / best / 1e9)
    finally:
        torch.set_num_threads(previous)
    return best_rate


def session(path: str | Path, level: ort.GraphOptimizationLevel | None = None, **extra: Any):
    """One-thread CPU session (intra 1, inter 1), graph optimisation ALL unless given."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level is None else level
    )
    for key, value in extra.items():
        setattr(options, key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_session(sess: ort.InferenceSession, x: np.ndarray, runs: int, warmup: int) -> dict:
    """Median and p90 (nearest rank, as util.complexity) of ``sess.run`` in milliseconds."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        sess.run(None, feed)
        times.append((time.perf_counter_ns() - start) / 1e6)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[math.ceil(0.9 * runs) - 1]}


def export_pair(
    model: Classifier, input_name: str, folder: Path, stem: str, scheme: str = "auto"
) -> tuple[Path, Path]:
    """fp32 ONNX and its int8 QDQ twin (calibrated on 8 random batches of 8)."""
    fp32 = export_onnx(model, folder / f"{stem}.onnx", INPUTS[input_name])
    reader = CalibrationReader(
        lambda: (example_inputs(input_name, 8, seed) for seed in range(100, 108))
    )
    int8 = quantize_int8(fp32, folder / f"{stem}.int8.onnx", reader, scheme=scheme)
    return fp32, int8


def measure(
    backbone: str,
    input_name: str,
    folder: Path,
    runs: int,
    warmup: int,
    repeats: int,
    scheme: str = "auto",
) -> dict[str, Any]:
    """Every number of one table row."""
    model = build(backbone, input_name)
    shape = INPUTS[input_name]
    stem = f"{backbone.split()[0].lower()}_{input_name}"
    fp32, int8 = export_pair(model, input_name, folder, stem, scheme)
    x = example_inputs(input_name, 1, seed=0)
    row: dict[str, Any] = {
        "backbone": backbone,
        "input": input_name,
        "shape": "×".join(map(str, shape)),
        "params": count_params(model),
        "macs": count_macs(model, shape),
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": int8.stat().st_size,
    }
    timers = {
        "eager": lambda: measure_latency(model, shape, runs=runs, warmup=warmup, threads=1),
        "ort_fp32": functools.partial(time_session, session(fp32), x, runs, warmup),
        "ort_int8": functools.partial(time_session, session(int8), x, runs, warmup),
    }
    # Engines take turns, ``repeats`` times; the repeat with the lowest median counts:
    # other processes on a shared machine only ever add time.
    for _ in range(repeats):
        for key, timer in timers.items():
            t = timer()
            if key not in row or t["median_ms"] < row[key]["median_ms"]:
                row[key] = {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"]}
    return row


def op_profile(path: Path, x: np.ndarray, level: ort.GraphOptimizationLevel, runs: int) -> dict:
    """Median microseconds per run spent in each operator type (ONNX Runtime's profiler).

    Kernel events are assigned to the ``model_run`` that contains them; the first
    10 runs (allocation, weight pre-packing) are left out.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(
            path, level, enable_profiling=True, profile_file_prefix=os.path.join(tmp, "p")
        )
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(10 + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    spans = sorted(
        (ev["ts"], ev["ts"] + ev["dur"]) for ev in events if ev.get("name") == "model_run"
    )[10:]
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in spans]
    starts = [s for s, _ in spans]
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, ev["ts"]) - 1
        if 0 <= i < len(spans) and ev["ts"] <= spans[i][1]:
            per_run[i][ev["args"].get("op_name", "?")] += ev["dur"]
    ops = {op for run in per_run for op in run}
    medians = {op: statistics.median(run.get(op, 0.0) for run in per_run) for op in ops}
    return dict(sorted(medians.items(), key=lambda kv: -kv[1]))


def investigate(folder: Path, runs: int, warmup: int, peak: float, scheme: str = "auto") -> None:
    """Why ORT fp32 TinyCNN (native) sits where it does relative to the floor.

    Prints per-operator time at each graph-optimisation level; the latency without
    standardisation (``normalize=False``: the input Sub/Div removed, the most that
    folding it into the first conv could save); the optimised graphs of the fp32 and
    int8 files (node kinds after ``ORT_ENABLE_ALL``: NCHWc reorders, fused convs,
    QLinearConv) with their per-operator times; and the three conv layers alone as
    single-conv models (how close each conv gets to its own floor).
    """
    model = build("TinyCNN", "native")
    fp32 = export_onnx(model, folder / "inv_tinycnn.onnx", INPUTS["native"])
    x = example_inputs("native", 1, seed=0)
    levels = {
        "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    print("\nORT fp32 TinyCNN native, per graph-optimisation level:")
    for name, level in levels.items():
        t = time_session(session(fp32, level), x, runs, warmup)
        ops = op_profile(fp32, x, level, runs)
        top = ", ".join(f"{op} {us:.0f}" for op, us in list(ops.items())[:6])
        print(f"  {name:<12} median {t['median_ms']:.3f} ms | per-op µs/run: {top}")

    raw = build("TinyCNN", "native")
    raw.normalize = False
    no_std = export_onnx(raw, folder / "inv_tinycnn_nostd.onnx", INPUTS["native"])
    t = time_session(session(no_std), x, runs, warmup)
    print(f"  without standardisation (ALL): median {t['median_ms']:.3f} ms")

    _, int8 = export_pair(model, "native", folder, "inv_tinycnn", scheme)
    for label, path in (("fp32", fp32), ("int8", int8)):
        optimised = folder / f"inv_optimised_{label}.onnx"
        session(path, optimized_model_filepath=str(optimised))
        kinds: dict[str, int] = defaultdict(int)
        for node in onnx.load(str(optimised)).graph.node:
            kinds[node.op_type] += 1
        ops = op_profile(path, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, runs)
        top = ", ".join(f"{op} {us:.0f}" for op, us in list(ops.items())[:6])
        print(f"  {label} after ALL: nodes {dict(kinds)}\n    per-op µs/run: {top}")

    print("  single conv layers (Conv+ReLU, ORT ALL) vs their own floor:")
    blocks = model.backbone.blocks
    f, t_len = INPUTS["native"][1], INPUTS["native"][2]
    for i, block in enumerate(blocks):
        conv = block.conv
        h, w = f // 2**i, t_len // 2**i
        net = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
        path = folder / f"inv_conv{i}.onnx"
        with torch.no_grad():
            torch.onnx.export(
                net,
                (torch.randn(1, conv.in_channels, h, w),),
                str(path),
                dynamo=True,
                verbose=False,
            )
        macs = conv.out_channels * conv.in_channels * 9 * h * w
        floor_ms = 2 * macs / (peak * 1e9) * 1e3
        xi = (
            np.random.default_rng(i).standard_normal((1, conv.in_channels, h, w)).astype(np.float32)
        )
        ti = time_session(session(path), xi, runs, warmup)
        print(
            f"    conv{i} {conv.in_channels}->{conv.out_channels} at {h}x{w}: {macs / 1e6:.2f} M MACs, "
            f"floor {floor_ms:.3f} ms, ORT {ti['median_ms']:.3f} ms ({ti['median_ms'] / floor_ms:.2f}x)"
        )


def fmt_row(row: dict[str, Any], peak: float) -> str:
    floor_ms = 2 * row["macs"] / (peak * 1e9) * 1e3
    row["floor_ms"] = floor_ms
    cells = [
        f"{row['backbone']:<18}",
        f"{row['shape']:<9}",
        f"{row['params']:>7,}",
        f"{row['macs'] / 1e6:>8.2f}",
        f"{floor_ms:>7.3f}",
    ]
    for key in ("eager", "ort_fp32", "ort_int8"):
        t = row[key]
        cells.append(
            f"{t['median_ms']:>7.3f} {t['p90_ms']:>7.3f} {t['median_ms'] / floor_ms:>5.1f}x"
        )
    cells.append(
        f"{row['fp32_bytes'] / 1024:>7.1f} {row['int8_bytes'] / 1024:>6.1f} "
        f"{100 * row['int8_bytes'] / row['fp32_bytes']:>4.0f}%"
    )
    return " | ".join(cells)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table.

    Args:
        argv: command-line arguments (see ``--help``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per cell (>= 100)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measurements per cell; the lowest median is kept"
    )
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument(
        "--profile", action="store_true", help="investigate ORT fp32 TinyCNN native"
    )
    parser.add_argument(
        "--int8_scheme",
        default="auto",
        choices=typing.get_args(Int8SchemeName),
        help="int8 integer types (the export's --int8_scheme; auto: exact on this CPU)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--keep", default=None, help="keep the ONNX files in this folder")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # exporter and quantiser chatter
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger("root").setLevel(logging.ERROR)

    scheme, reason = resolve_int8_scheme(args.int8_scheme)
    peak_before = gemm_peak_gflops()
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; batch 1, 1 thread, {args.runs} runs "
        f"after {args.warmup} warm-up, best median of {args.repeats} repeats; "
        f"int8 scheme {scheme.name} ({reason})"
    )
    with tempfile.TemporaryDirectory(prefix="earsleep-latency-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [
            measure(b, i, folder, args.runs, args.warmup, args.repeats, args.int8_scheme)
            for i in args.inputs
            for b in args.backbones
        ]
        peak = max(peak_before, gemm_peak_gflops())
        print(
            f"single-core fp32 GEMM peak (torch.mm 256³-1024³, best): {peak:.1f} GFLOP/s "
            f"(before {peak_before:.1f}); floor = 2·MACs / peak\n"
        )
        header = (
            f"{'model':<18} | {'input':<9} | {'params':>7} | {'MMACs':>8} | {'floor':>7} | "
            f"{'eager med/p90 ms, ×floor':>23} | {'ORT fp32 med/p90, ×floor':>23} | "
            f"{'ORT int8 med/p90, ×floor':>23} | {'fp32 KiB / int8 KiB':>20}"
        )
        print(header)
        print("-" * len(header))
        for row in rows:
            print(fmt_row(row, peak))
        if args.profile:
            investigate(folder, args.runs, args.warmup, peak, args.int8_scheme)
    if args.json:
        Path(args.json).write_text(json.dumps({"gemm_peak_gflops": peak, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

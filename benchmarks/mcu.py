"""The deployment table: each model on a microcontroller, measured by the runtimes' own tools.

For each checkpoint this runs ``python -m util.deploy.mcu`` (:func:`util.deploy.mcu.bundle.write_bundle`)
and prints one row per model: parameters, MACs, flash (the int8 ``.tflite``), the TensorFlow
Lite Micro arena (the smallest the interpreter runs in), vela's Ethos-U55 SRAM, flash, cycles
and inference time (NPU operators only; those it leaves to the CPU are named), and the int8
file's agreement with fp32 PyTorch on the validation split. Then the CMSIS-DSP front end per
precision (f32, q31, q15) on the audio of the whole validation split (``--frontend_clips``
fewer): its feature difference from LogMelFrontEnd, the difference from LogMelFrontEnd fed the
same 16-bit PCM (the fixed-point arithmetic's own error), the model's agreement when fed it,
its RAM per channel and its operations per frame, with the host's median time per clip over
``--repeats`` runs of the Python bindings (a host figure, not the device's).

    .venv/bin/python benchmarks/mcu.py --ckpt A.ckpt B.ckpt C.ckpt --out /tmp/mcu-bench \\
        [--converter_python /tmp/venv-mcu/bin/python]

A checkpoint's run folder must hold its config.yaml (the validation split comes from it). With
no ``--ckpt`` it trains nothing: it says how to get demo checkpoints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def frontend_timing(repeats: int) -> list[list[str]]:
    """Median host seconds per 1 s two-channel clip of each CMSIS-DSP precision (bindings)."""
    import numpy as np

    from data.features import LogMelFrontEnd
    from util.deploy.mcu.frontend import PRECISIONS, CmsisLogMel, cycles_per_frame

    fe = LogMelFrontEnd("native")
    wave = (0.1 * np.random.default_rng(0).standard_normal((1, 2, fe.clip_samples))).astype(
        np.float32
    )
    rows = []
    frames = fe.output_shape[0] * fe.output_shape[-1]
    for precision in PRECISIONS:
        cms = CmsisLogMel(fe, precision)  # type: ignore[arg-type]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cms(wave)
            times.append(time.perf_counter() - start)
        ops = cms.ops_per_frame()
        mem = cms.memory()
        rows.append(
            [
                precision,
                f"{mem['ram_total']:,}",
                f"{mem['flash_total']:,}",
                f"{ops['total']:,}",
                f"{cycles_per_frame(ops):,.0f} – {cycles_per_frame(ops, 2.0):,.0f}",
                f"{100 * frames * cycles_per_frame(ops, 2.0) / 64e6:.1f} %",
                f"{1000 * statistics.median(times):.1f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from util.deploy.mcu.bundle import write_bundle
    from util.deploy.mcu.report import (
        FRONTEND_COLUMNS,
        MODEL_COLUMNS,
        frontend_rows,
        model_row,
        table,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="*", default=[], help="checkpoints to measure")
    parser.add_argument("--out", type=Path, default=Path("/tmp/earsleep-mcu-bench"))
    parser.add_argument("--converter_python", default=None, help="a Python with litert-torch")
    parser.add_argument(
        "--frontend_clips", type=int, default=None, help="default: the whole validation split"
    )
    parser.add_argument("--repeats", type=int, default=5, help="front-end timing repeats")
    parser.add_argument(
        "--reuse", action="store_true", help="read <out>/<run>/manifest.json where it exists"
    )
    args = parser.parse_args(argv)
    if not args.ckpt:
        print(
            "no --ckpt given; demo checkpoints: python main.py fit --config config/demo.yaml "
            "--model.init_args.backbone models.backbones.{TinyCNN,TinyCNNCBAM,CRNN}",
            file=sys.stderr,
        )
    manifests = []
    for ckpt in args.ckpt:
        # <log>/<name>/version_N/checkpoints/x.ckpt: the run's name
        name = Path(ckpt).parents[2].name if len(Path(ckpt).parents) > 2 else Path(ckpt).stem
        written = args.out / name / "manifest.json"
        if args.reuse and written.is_file():
            manifests.append(json.loads(written.read_text()))
            continue
        manifest = write_bundle(
            ckpt,
            args.out / name,
            converter_python=args.converter_python,
            frontend_clips=args.frontend_clips,
            min_agreement=0.0,  # report every model, the table shows its agreement
            progress=False,
        )
        manifests.append(manifest)
    if manifests:
        print(table(MODEL_COLUMNS, [model_row(m) for m in manifests]))
        print()
        rows = [[m["backbone"], *r] for m in manifests for r in frontend_rows(m)]
        print(table(("model", *FRONTEND_COLUMNS), rows))
        print()
        print("float ops left in the int8 file (TFLite Micro runs them in float):")
        for m in manifests:
            print(f"  {m['backbone']}: {m['model']['float_ops'] or 'none'}")
        print()
    columns = ("CMSIS-DSP", "RAM B/channel", "flash B", "ops/frame", "cycles/frame est.",
               "CPU @64 MHz (2 ch, ×2)", "host ms/clip (median)")  # fmt: skip
    print(table(columns, frontend_timing(args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

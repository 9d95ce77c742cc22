"""CPU time of the night's log-mel front end, and of its mel filter bank product.

Times, on one thread, what :class:`data.recordings.RecordingWindows` does for every batch
of a night: :meth:`data.features.LogMelFrontEnd.windows` over ``--batch`` one-second
windows every ``--hop_s`` seconds of two-channel noise, scaled to an 8-hour night; and,
on the same power spectra, the filter bank product two ways: the whole matmul
``power @ fb`` and the banded one the front end uses (:func:`data.features.band_groups`:
each group of 16 bands times only the bins it covers). The two products take turns
``--repeats`` times and each keeps its best median (other processes only add time).

    python benchmarks/front_end.py
    python benchmarks/front_end.py --frames 7168 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _median_us(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="windows per batch (the demo's)")
    parser.add_argument("--hop_s", type=float, default=0.5, help="seconds between windows")
    parser.add_argument("--frames", type=int, default=3584, help="spectra per filter bank product")
    parser.add_argument("--runs", type=int, default=41, help="timed calls per median")
    parser.add_argument("--repeats", type=int, default=3, help="turns of the two products")
    args = parser.parse_args()

    import torch

    from data.features import LogMelFrontEnd, band_groups
    from util.cpu import cpu_model

    torch.set_num_threads(1)
    fe = LogMelFrontEnd("native")
    hop = int(round(args.hop_s * fe.sample_rate))
    signal = torch.randn(2, (args.batch - 1) * hop + fe.clip_samples) * 0.1
    with torch.inference_mode():
        for _ in range(3):
            fe.windows(signal, hop, args.batch)
        batch_us = _median_us(lambda: fe.windows(signal, hop, args.batch), args.runs)
    night_batches = 8 * 3600 / args.hop_s / args.batch

    fb = fe.mel.mel_scale.fb
    groups = band_groups(fb)
    power = torch.rand(args.frames, fb.shape[0]) ** 4
    out = torch.empty(args.frames, fb.shape[1])

    def whole() -> None:
        torch.matmul(power, fb, out=out)

    def banded() -> None:
        for j0, j1, lo, hi in groups:
            torch.matmul(power[:, lo:hi], fb[lo:hi, j0:j1], out=out[:, j0:j1])

    best = {"whole": float("inf"), "banded": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("whole", whole), ("banded", banded)):
            fn()
            best[name] = min(best[name], _median_us(fn, args.runs))
    weights = sum((hi - lo) * (j1 - j0) for j0, j1, lo, hi in groups)
    per_1024 = {k: v * 1024 / args.frames for k, v in best.items()}
    print(f"front end benchmark: {cpu_model()}, 1 thread, torch {torch.__version__}")
    print("| what | time | an 8-h night |")
    print("|---|---:|---:|")
    print(
        f"| `windows`: {args.batch} windows every {args.hop_s:g} s, 2 channels | "
        f"{batch_us / 1e3:.2f} ms per batch | {batch_us * night_batches / 1e6:.1f} CPU-s |"
    )
    frames_8h = 2 * 8 * 3600 * fe.sample_rate / fe.hop_length
    for name, label in (("whole", f"{fb.numel():,} weights"), ("banded", f"{weights:,} weights")):
        print(
            f"| filter bank, {name} ({label}) | {per_1024[name]:.0f} µs per 1,024 frames | "
            f"{per_1024[name] * frames_8h / 1024 / 1e6:.1f} CPU-s |"
        )
    print(f"banded / whole: {best['banded'] / best['whole']:.2f}")


if __name__ == "__main__":
    main()

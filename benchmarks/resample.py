"""CPU time of resampling a night to 16 kHz: torchaudio's resample against the reader's.

    python benchmarks/resample.py                      # 48, 44.1, 32, 22.05, 96 and 8 kHz
    python benchmarks/resample.py --rates 48000 --repeats 15

A night recorded at another rate than the model's is resampled block by block on the
reading thread (:class:`data.streaming.BlockResampler`, 30-s blocks). Each rate's
block, two channels, goes through :func:`data.audio.resample` (torchaudio's
``resample``) and through the block resampler's own step, taking turns on one thread;
the medians are scaled to an 8-hour night. Where the reduced output rate has few
phases (48 kHz → 16 kHz: 1 phase every 3 samples) the reader runs torchaudio's
kernel as matrix products (``data.streaming._PhaseBlocks``); elsewhere it calls
torchaudio itself and the two columns measure the same code.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.audio import resample  # noqa: E402
from data.streaming import DEFAULT_BLOCK_S, BlockResampler  # noqa: E402
from util.cpu import cpu_model  # noqa: E402

#: Blocks of DEFAULT_BLOCK_S in an 8-hour night.
NIGHT_BLOCKS = 8 * 3600 / DEFAULT_BLOCK_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates",
        type=int,
        nargs="+",
        default=[48000, 44100, 32000, 22050, 96000, 8000],
        help="recording sample rates (Hz) resampled to 16 kHz",
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed turns of each (median shown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"resample benchmark: {cpu_model()}, 1 thread, {DEFAULT_BLOCK_S:g}-s two-channel blocks")
    print(
        "| rate (Hz) | reader's path | torchaudio (ms per block) | reader (ms per block) | 8-h night: torchaudio / reader (CPU-s) | max abs difference |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for rate in args.rates:
        block = (0.1 * rng.standard_normal((2, int(DEFAULT_BLOCK_S * rate)))).astype(np.float32)
        reader = BlockResampler(rate, 16000)
        runs = {
            "torchaudio": functools.partial(resample, block, rate, 16000),
            "reader": functools.partial(reader._resample, block),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats + 1):  # the first turn warms up and is dropped
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        ta, tr = (statistics.median(times[k][1:]) for k in ("torchaudio", "reader"))
        diff = float(np.abs(resample(block, rate, 16000) - reader._resample(block)).max())
        path = "matrix products" if reader._phases is not None else "torchaudio"
        print(
            f"| {rate} | {path} | {ta * 1e3:.1f} | {tr * 1e3:.1f} | "
            f"{ta * NIGHT_BLOCKS:.1f} / {tr * NIGHT_BLOCKS:.1f} | {diff:.0e} |"
        )


if __name__ == "__main__":
    main()

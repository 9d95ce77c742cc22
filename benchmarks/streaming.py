"""Streaming prediction as a device would run it: latency per window, memory, offline agreement.

Writes a synthetic two-channel 16 kHz night (:mod:`util.night.generate`), feeds it to
:class:`util.night.streaming.StreamingPredictor` in chunks of ``--chunk_ms`` (32 ms by
default) with an untrained TinyCNN (as fast as a trained one; ``--ckpt_path`` for a
trained ``config/demo.yaml`` checkpoint), and reports:

* latency from a window's end to its probability, as if the audio arrived in real time:
  the chunk that holds the window's last sample arrives when the chunk ends, so the
  latency is (chunk end - window end) + the compute of that push; median, 95th
  percentile and maximum, and the compute alone;
* memory: the predictor's state (the audio it holds between pushes, at most a window
  plus a chunk) and the process's peak RSS before and after streaming;
* the largest probability difference from the offline path (``RecordingWindows`` +
  the same model, as ``main.py predict`` computes it) over every window.

    python benchmarks/streaming.py                      # 10 minutes, 32-ms chunks
    python benchmarks/streaming.py --minutes 60 --chunk_ms 16 --runtime torch
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from data.features import LogMelFrontEnd  # noqa: E402
from data.recordings import RecordingWindows  # noqa: E402
from models.classifier import Classifier  # noqa: E402
from tests.helpers import build_like_cli  # noqa: E402
from util.cpu import available_cores, choose_threads, cpu_model  # noqa: E402
from util.night.generate import write_night  # noqa: E402
from util.night.streaming import StreamingPredictor  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model(ckpt_path: str | None) -> Classifier:
    if ckpt_path:
        return Classifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    return build_like_cli(
        Classifier,
        "models.backbones.TinyCNN",
        num_classes=3,
        class_names=["quiet", "breathe", "snore"],
        features=LogMelFrontEnd().config(),
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the night")
    parser.add_argument("--chunk_ms", type=float, default=32.0, help="audio per push")
    parser.add_argument("--hop_s", type=float, default=0.5, help="seconds between windows")
    parser.add_argument("--runtime", choices=["onnxruntime", "torch"], default="onnxruntime")
    parser.add_argument("--threads", default="1", help="intra-op threads (auto: choose_threads)")
    parser.add_argument("--ckpt_path", default=None, help="a config/demo.yaml checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    choice = choose_threads(args.threads)
    torch.set_num_threads(choice.threads)
    model = _model(args.ckpt_path).eval()
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        path = Path(tmp) / "night.wav"
        write_night(path, hours=args.minutes / 60.0, seed=args.seed)
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        audio = np.ascontiguousarray(audio.T)
        rss_before = _peak_rss_mb()
        predictor = StreamingPredictor(
            model, hop_s=args.hop_s, sample_rate=rate, channels=audio.shape[0],
            runtime=args.runtime, threads=choice.threads,
        )  # fmt: skip
        chunk = max(1, int(round(args.chunk_ms / 1000 * rate)))
        results, latency, compute, state = [], [], [], 0
        t0 = time.perf_counter()
        for at in range(0, audio.shape[1], chunk):
            emitted = predictor.push(audio[:, at : at + chunk])
            chunk_end_s = min(at + chunk, audio.shape[1]) / rate
            for r in emitted:
                latency.append(chunk_end_s - r.end_s + r.compute_s)
                compute.append(r.compute_s)
            results += emitted
            state = max(state, predictor.state_bytes)
        results += predictor.flush()
        wall = time.perf_counter() - t0
        rss_after = _peak_rss_mb()
        windows = RecordingWindows(path, LogMelFrontEnd(), hop_s=args.hop_s, batch_size=64)
        offline = []
        with torch.inference_mode():
            for item in windows:
                if len(item["x"]):
                    offline.append(model(item["x"]).softmax(dim=1).numpy())
        offline = np.concatenate(offline)
    got = np.stack([r.probabilities for r in results])
    same = len(got) == len(offline)
    diff = float(np.abs(got - offline).max()) if same else float("nan")
    ms = 1000.0
    print(
        f"\nstreaming benchmark: TinyCNN {'(' + args.ckpt_path + ')' if args.ckpt_path else '(untrained)'}, "
        f"runtime {args.runtime}, {choice.reason}; {args.minutes:g} min night, "
        f"{args.chunk_ms:g}-ms chunks, hop {predictor.hop_s:g} s; {cpu_model()}, "
        f"{available_cores()} cores"
    )
    print(
        "| windows | RTF (x real time) | latency median (ms) | p95 (ms) | max (ms) | "
        "compute median (ms) | p95 (ms) | state max (kB) | peak RSS before / after (MB) | "
        "max abs diff vs offline |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {len(results)} | {audio.shape[1] / rate / wall:.0f} | "
        f"{statistics.median(latency) * ms:.1f} | {_pct(latency, 0.95) * ms:.1f} | "
        f"{max(latency) * ms:.1f} | {statistics.median(compute) * ms:.2f} | "
        f"{_pct(compute, 0.95) * ms:.2f} | {state / 1024:.0f} | "
        f"{rss_before:.0f} / {rss_after:.0f} | "
        f"{diff:.2g}{'' if same else ' (window counts differ: ' + str(len(got)) + ' vs ' + str(len(offline)) + ')'} |"
    )
    print(
        "latency: from the window's last sample to its probability, audio arriving in real "
        "time (the wait for the rest of its chunk + that push's compute); compute: the push "
        "alone. state: audio held between pushes."
    )


if __name__ == "__main__":
    main()

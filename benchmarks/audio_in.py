"""The audio-in ONNX file: its equality with the PyTorch pipeline, its size, its latency.

For TinyCNN and CRNN at the ``native`` and ``reference`` presets, a Classifier (random
trunk, real band statistics, head scaled so that probabilities spread: the models of
``tests/test_audio_in.py``) is exported features-in and audio-in
(:func:`util.deploy.audio_in.export_audio_onnx`) and measured on synthetic-corpus sleep
sounds at the clip length, 0.6x and 1.3x of it (``--clips`` each):

- **max |dp|**: largest |probability difference| of the audio-in file from the PyTorch
  pipeline (``LogMelFrontEnd`` -> Classifier -> softmax);
- **max |dfeat|**: largest feature difference of the front-end graph alone from
  ``LogMelFrontEnd`` (log units for ``native``, dB for ``reference``);
- the bytes of both files;
- single-thread batch-1 latency (median over ``--runs`` after ``--warmup``, best of
  ``--repeats`` rounds): **torch** (``LogMelFrontEnd`` + eager model, one thread),
  **numpy+ORT** (``util/deploy/standalone.py``'s numpy front end + the features-in file)
  and **audio ORT** (the audio-in file alone).

    .venv/bin/python benchmarks/audio_in.py
    .venv/bin/python benchmarks/audio_in.py --clips 8 --runs 50 --cases native-TinyCNN
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from tests.test_audio_in import (  # noqa: E402
    CASES,
    build,
    inner_tensors,
    pytorch_probabilities,
    run,
    sleep_sounds,
)
from util.cpu import cpu_model  # noqa: E402
from util.deploy.runtime import ort_session  # noqa: E402
from util.deploy.standalone import FrontEnd  # noqa: E402

ALL_CASES = {**CASES, "reference-CRNN": ("reference", "models.backbones.CRNN")}


def median_ms(fn: Callable[[], object], runs: int, warmup: int, repeats: int) -> float:
    """Best of ``repeats`` medians (ms): load from other processes only adds time."""
    best = float("inf")
    for _ in range(repeats):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best = min(best, 1000 * statistics.median(times))
    return best


def measure(case: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        got = build(case, Path(tmp))
        fe, model, audio_session = got["fe"], got["model"], got["session"]
        n = fe.clip_samples
        worst = feat = 0.0
        for samples, seed in ((n, 100), (int(0.6 * n), 101), (int(1.3 * n), 102)):
            audio = sleep_sounds(samples, args.clips, seed)
            ref = pytorch_probabilities(model, fe, audio)
            worst = max(worst, float(np.abs(run(audio_session, audio) - ref).max()))
            with torch.no_grad():
                x = fe(torch.from_numpy(audio)).numpy()
            (ours,) = inner_tensors(got["path"], ["audio_in/features"], audio)
            feat = max(feat, float(np.abs(ours - x).max()))
        clip = sleep_sounds(n, 1, 200)
        features = ort_session(got["features_file"], threads=1)
        numpy_fe = FrontEnd(fe.config())
        wave = torch.from_numpy(clip)

        def eager() -> object:
            with torch.inference_mode():
                return model(fe(wave))

        def numpy_ort() -> object:
            return features.run(None, {"features": numpy_fe(clip[0], fe.sample_rate)[None]})

        timing = {"runs": args.runs, "warmup": args.warmup, "repeats": args.repeats}
        torch.set_num_threads(1)
        return {
            "clips": 3 * args.clips,
            "max_dp": worst,
            "max_dfeat": feat,
            "features_bytes": got["features_file"].stat().st_size,
            "audio_bytes": got["path"].stat().st_size,
            "torch_ms": median_ms(eager, **timing),
            "numpy_ort_ms": median_ms(numpy_ort, **timing),
            "audio_ort_ms": median_ms(lambda: run(audio_session, clip), **timing),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(ALL_CASES), choices=list(ALL_CASES))
    parser.add_argument("--clips", type=int, default=32, help="clips at each of three lengths")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, onnxruntime {ort.__version__}")
    head = f"{'case':<19}{'clips':>6}{'max |dp|':>10}{'max |dfeat|':>12}"
    head += f"{'feat B':>9}{'audio B':>9}{'torch ms':>10}{'np+ORT ms':>11}{'audio ms':>10}"
    print(head)
    for case in args.cases:
        CASES[case] = ALL_CASES[case]  # build() reads CASES
        r = measure(case, args)
        print(
            f"{case:<19}{r['clips']:>6}{r['max_dp']:>10.2e}{r['max_dfeat']:>12.2e}"
            f"{r['features_bytes']:>9}{r['audio_bytes']:>9}{r['torch_ms']:>10.2f}"
            f"{r['numpy_ort_ms']:>11.2f}{r['audio_ort_ms']:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

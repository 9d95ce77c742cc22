"""Does a model trained on the synthetic corpus hear sounds it was not generated from?

``python benchmarks/transfer.py --ckpt_path log/demo/version_0/checkpoints/best-<...>.ckpt``

The demo model is meant for real recordings, which the project does not have. This is
the next best check, and only a proxy: a labelled folder of five-second recordings made by
*other* sound models, written here independently of :mod:`data.sources.synthetic` (no
code, banks or parameters shared), at 44.1 kHz, mono and stereo, as WAV, FLAC and OGG,
then scored by the real ``main.py test`` over :class:`data.sources.AudioFolder` cut into
one-second windows, the way a user's labelled folder would be:

* ``snore``: Rosenberg glottal pulses (f0 55-150 Hz, drifting) through a cascade of
  all-pole formant resonators (F1 350-800, F2 1000-2000, F3 2200-3200 Hz) with
  aspiration noise and lip radiation, during inspirations of a 2.5-4.5 s cycle;
* ``breathe``: noise through a resonant band-pass (0.5-1.5 kHz inhaling, 0.25-0.8 kHz exhaling)
  whose amplitude follows the square of a sinusoidal airflow, plus a nasal hiss;
* ``quiet``: Voss-McCartney pink noise, leaky-integrated brown noise, mains hum and a
  rare rustle, under a microphone's self-noise.

Each recording is labelled as a whole, as real labelled files are: a one-second window of a
snoring file can fall between two snores. So the scores are a floor, and they say whether
the model learnt snoring and breathing rather than the corpus's generator; they are not a
measurement on real recordings.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
SECONDS = 5.0
FORMATS = (("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS"))


def _lfilter(b: list[float], a: list[float], x: np.ndarray) -> np.ndarray:
    """``x`` through the IIR filter ``b / a`` (torchaudio's, in float64)."""
    size = max(len(a), len(b))
    b, a = [*b, *[0.0] * (size - len(b))], [*a, *[0.0] * (size - len(a))]
    y = AF.lfilter(
        torch.from_numpy(np.ascontiguousarray(x, np.float64)),
        torch.tensor(a, dtype=torch.float64),
        torch.tensor(b, dtype=torch.float64),
        clamp=False,
    )
    return y.numpy()


def _band(fc: float, q: float) -> tuple[list[float], list[float]]:
    """A two-pole band-pass of 0 dB peak gain at ``fc`` (the audio-EQ cookbook's)."""
    w0 = 2 * np.pi * fc / SR
    alpha = np.sin(w0) / (2 * q)
    a0 = 1 + alpha
    return [alpha / a0, 0.0, -alpha / a0], [1.0, -2 * np.cos(w0) / a0, (1 - alpha) / a0]


def _highpass(fc: float) -> tuple[list[float], list[float]]:
    """A second-order Butterworth high-pass at ``fc`` (the audio-EQ cookbook's)."""
    w0 = 2 * np.pi * fc / SR
    alpha = np.sin(w0) / np.sqrt(2.0)
    c, a0 = np.cos(w0), 1 + alpha
    b = [(1 + c) / 2 / a0, -(1 + c) / a0, (1 + c) / 2 / a0]
    return b, [1.0, -2 * c / a0, (1 - alpha) / a0]


def _resonators(x: np.ndarray, formants: list[tuple[float, float]]) -> np.ndarray:
    """``x`` through a cascade of two-pole resonators ``(centre Hz, bandwidth Hz)``."""
    for fc, bw in formants:
        r = np.exp(-np.pi * bw / SR)
        a = [1.0, -2.0 * r * np.cos(2 * np.pi * fc / SR), r * r]
        x = _lfilter([1.0 - r], a, x)
    return x


def _pink(rng: np.random.Generator, n: int, rows: int = 12) -> np.ndarray:
    """Voss-McCartney pink noise: ``rows`` random generators updated at halving rates."""
    out = np.zeros(n)
    for k in range(rows):
        step = 1 << k
        values = rng.standard_normal(n // step + 2)
        out += np.repeat(values, step)[:n]
    return out / np.std(out)


def _room(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    brown = _lfilter([1.0], [1.0, -0.995], rng.standard_normal(n))
    room = _pink(rng, n) * rng.uniform(0.2, 1.0) + brown / np.std(brown) * rng.uniform(0.0, 1.0)
    if rng.random() < 0.4:
        mains = 50.0 if rng.random() < 0.5 else 60.0
        room += sum(
            rng.uniform(0.05, 0.4) / k * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 6.3))
            for k in (1, 2, 3)
        )
    if rng.random() < 0.15:  # a rustle
        a = int(rng.uniform(0, n - SR // 4))
        burst = np.diff(rng.standard_normal(SR // 4 + 1))
        room[a : a + SR // 4] += burst * np.hanning(SR // 4) * rng.uniform(1.0, 4.0)
    room /= np.std(room)
    return room + rng.standard_normal(n) * 10 ** (-rng.uniform(25, 45) / 20)


def _cycles(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inspiration and expiration flow envelopes (0..1) of a breathing rhythm."""
    t = np.arange(n) / SR
    period = rng.uniform(2.5, 4.5)
    insp = rng.uniform(0.3, 0.45)
    phase = (t / period + rng.random()) % 1.0
    inhale = np.where(phase < insp, np.sin(np.pi * phase / insp), 0.0)
    ex = (phase - insp) / rng.uniform(0.35, 0.5)
    exhale = np.where((ex > 0) & (ex < 1), np.sin(np.pi * np.clip(ex, 0, 1)), 0.0)
    return inhale, exhale


def _snore(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A snoring recording and where it snores (a boolean per sample)."""
    inhale, exhale = _cycles(rng, n)
    t = np.arange(n) / SR
    f0 = rng.uniform(55, 150) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = np.cumsum(f0 / SR) % 1.0
    open_q = rng.uniform(0.4, 0.7)  # Rosenberg pulse: rise, fall, closed
    rise = 0.6 * open_q
    pulse = np.where(
        phase < rise,
        0.5 * (1 - np.cos(np.pi * phase / rise)),
        np.where(phase < open_q, np.cos(0.5 * np.pi * (phase - rise) / (open_q - rise)), 0.0),
    )
    gate = np.clip((inhale - rng.uniform(0.1, 0.3)) / 0.7, 0, 1)
    source = pulse * gate + rng.standard_normal(n) * gate * 10 ** (-rng.uniform(15, 25) / 20)
    formants = [
        (rng.uniform(350, 800), rng.uniform(80, 200)),
        (rng.uniform(1000, 2000), rng.uniform(100, 250)),
        (rng.uniform(2200, 3200), rng.uniform(150, 300)),
    ]
    voiced = np.diff(_resonators(source, formants), prepend=0.0)  # lip radiation
    low = _lfilter([1.0], [1.0, -0.97], pulse * gate)  # the low rumble of the flutter
    snore = voiced / np.std(voiced) + low / np.std(low) * rng.uniform(0.5, 2.0)
    breath, _ = _breath(rng, n, inhale * 0.3, exhale * 0.3)
    return snore / np.std(snore) + breath * 10 ** (-rng.uniform(12, 25) / 20), gate > 0


def _breath(
    rng: np.random.Generator, n: int, inhale: np.ndarray | None = None, exhale=None
) -> tuple[np.ndarray, np.ndarray]:
    """A breathing recording and where the breath is audible (within 20 dB of its peak)."""
    if inhale is None:
        inhale, exhale = _cycles(rng, n)
    noise = rng.standard_normal(n)
    fc_in, fc_ex = rng.uniform(500, 1500), rng.uniform(250, 800)
    q = rng.uniform(0.7, 2.0)
    b_in, a_in = _band(fc_in, q)
    b_ex, a_ex = _band(fc_ex, q)
    hiss = _lfilter(*_highpass(2500.0), noise)
    power = rng.uniform(1.5, 2.0)  # turbulence sound grows with the flow squared
    out = _lfilter(b_in, a_in, noise) * inhale**power
    out += _lfilter(b_ex, a_ex, noise) * exhale**power * rng.uniform(0.4, 1.0)
    out += hiss * inhale**power * rng.uniform(0.0, 0.5)
    flow = np.maximum(inhale, exhale) ** power
    return out / max(np.std(out), 1e-12), flow > 0.1 * flow.max()


def write_folder(root: Path, per_class: int, seed: int) -> dict[str, float]:
    """Write ``per_class`` recordings of each label under ``root/test/<label>/``.

    Returns the share of each one-second window (``<clip id>#t=<start>``) in which the
    file's sound is present (1.0 for every window of a quiet file).
    """
    n = int(SECONDS * SR)
    present: dict[str, float] = {}
    for split in ("train", "validation"):  # empty: only the test split is scored
        (root / split).mkdir(parents=True, exist_ok=True)
    for li, label in enumerate(("quiet", "breathe", "snore")):
        folder = root / "test" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, li, i])
            channels = 2 if i % 3 == 2 else 1
            room = [_room(rng, n) for _ in range(channels)]
            if label == "quiet":
                sound = [np.zeros(n)] * channels
                active = np.ones(n, bool)
            else:
                dry, active = _snore(rng, n) if label == "snore" else _breath(rng, n)
                snr = rng.uniform(5, 30) if label == "snore" else rng.uniform(0, 25)
                sound = [dry * 10 ** (snr / 20) * rng.uniform(0.7, 1.0) for _ in range(channels)]
            mix = np.stack([s + r for s, r in zip(sound, room, strict=True)], axis=1)
            mic = _highpass(rng.uniform(40, 150))
            mix = np.stack([_lfilter(*mic, ch) for ch in mix.T], axis=1)
            mix *= 10 ** (rng.uniform(-30, -1) / 20) / np.abs(mix).max()
            ext, subtype = FORMATS[i % len(FORMATS)]
            name = f"{label}_{i:03d}.{ext}"
            sf.write(folder / name, mix.astype(np.float32), SR, subtype=subtype)
            for w in range(int(SECONDS)):
                share = float(active[w * SR : (w + 1) * SR].mean())
                present[f"test/{label}/{name}#t={float(w):.2f}"] = share
    return present


def _scores(rows: list[dict[str, str]], classes: list[str]) -> dict[str, float]:
    """Macro-F1 and per-class recall of ``rows`` (clip_id, target, pred)."""
    out: dict[str, float] = {}
    f1s = []
    for k, name in enumerate(classes):
        tp = sum(r["target"] == r["pred"] == str(k) for r in rows)
        fp = sum(r["pred"] == str(k) != r["target"] for r in rows)
        fn = sum(r["target"] == str(k) != r["pred"] for r in rows)
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
        out[f"recall {name}"] = tp / max(tp + fn, 1)
    out["macro-F1"] = float(np.mean(f1s))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a model trained with config/demo.yaml")
    parser.add_argument("--per_class", type=int, default=40, help="recordings per label")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recordings")
    parser.add_argument(
        "--workdir", default=None, help="where the folder is written (default: temp)"
    )
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="earsleep-transfer-"))
    t0 = time.perf_counter()
    present = write_folder(work / "folder", args.per_class, args.seed)
    print(f"wrote {3 * args.per_class} recordings in {time.perf_counter() - t0:.1f} s under {work}")
    started = time.time()
    cmd = [
        sys.executable, "main.py", "test", "--config", "config/demo.yaml",
        "--ckpt_path", args.ckpt_path,
        "--data.source", "data.sources.AudioFolder",
        "--data.source.init_args.root", str(work / "folder"),
        "--data.source.init_args.segment", '{"hop_s": 1.0}',
        "--data.cache_dir", str(work / "cache"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"main.py test failed:\n{done.stderr[-3000:]}")
    run = Path(args.ckpt_path).resolve().parents[1]
    csvs = [
        p for p in run.glob("test/version_*/test_predictions.csv") if p.stat().st_mtime >= started
    ]
    if not csvs:
        sys.exit(f"no test_predictions.csv written under {run}/test since the run started")
    with max(csvs, key=lambda p: p.stat().st_mtime).open() as f:
        rows = list(csv.DictReader(f))
    classes = [c.removeprefix("prob_") for c in rows[0] if c.startswith("prob_")]
    sounding = [r for r in rows if present.get(r["clip_id"], 0.0) >= 0.3]
    table = {"every window, as labelled": _scores(rows, classes)}
    table["windows where the sound is (>= 30 %)"] = _scores(sounding, classes)
    keys = list(next(iter(table.values())))
    print(f"\ncheckpoint {args.ckpt_path}; {len(rows)} windows ({len(sounding)} with the sound)")
    print("| windows | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, scores in table.items():
        print(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in keys) + " |")
    (work / "transfer.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()

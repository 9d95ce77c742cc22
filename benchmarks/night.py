"""How fast, and in how much memory, a whole night is turned into a snore timeline.

Writes synthetic two-channel 16 kHz nights (8 h and 1 h by default) with
:mod:`util.night.generate`, then runs the user's command on each,
``main.py predict --config config/demo.yaml --ckpt_path ... --data.predict_audio ...``
(in-process, through :func:`main.main`), every run in a fresh process so its peak
memory is its own. That is :class:`data.recordings.RecordingWindows` (blocks from disk →
windows → log-mel front end, frames shared by overlapping windows) →
``Trainer.predict`` with the TinyCNN :class:`models.classifier.Classifier`
(:class:`util.callbacks.PredictEngine` runtime auto: exported to ONNX Runtime when
prediction starts, which the wall time includes) → :class:`util.callbacks.night.NightWriter` (events, summary,
timeline). Prints the real-time factor (recording seconds per wall second) and peak
RSS; the two lengths show whether memory stays flat as the night grows.

    python benchmarks/night.py                      # 8 h and 1 h, untrained TinyCNN
    python benchmarks/night.py --ckpt_path best.ckpt --hours 1
    python benchmarks/night.py --num_workers 1 --threads 1
    python benchmarks/night.py --engine torch --hours 2     # eager PyTorch instead

Untrained weights run as fast as trained ones; pass ``--ckpt_path`` (a checkpoint
trained with ``config/demo.yaml``) to also see sensible events. Targets on a 2-core
CPU: an 8-hour night in at most 60 s (RTF ≥ 480) under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The demo's classes (``config/demo.yaml``), which the untrained checkpoint must match.
CLASSES = ("quiet", "breathe", "snore")


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # kB on Linux


def _rss_now_mb() -> float:
    """Current resident set size (Linux), for the baseline before any audio is read."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    return int(status.split("VmRSS:")[1].split()[0]) / 1024.0


def untrained_checkpoint(path: Path, seed: int) -> Path:
    """A TinyCNN checkpoint as ``main.py fit --config config/demo.yaml`` writes it, untrained.

    Untrained weights run as fast as trained ones; the seed fixes the events.
    """
    import torch

    from models.classifier import Classifier
    from tests.helpers import build_like_cli, save_checkpoint

    torch.manual_seed(seed)
    model = build_like_cli(
        Classifier, "models.backbones.TinyCNN", num_classes=3, class_names=list(CLASSES)
    )
    return save_checkpoint(model, path)


def run_one(args: argparse.Namespace) -> dict:
    """One timed ``main.py predict`` over ``args.audio`` in this process; returns the numbers."""
    import soundfile as sf
    import torch

    from main import main as cli

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt_path or str(untrained_checkpoint(out / "untrained.ckpt", args.seed))
    command = [
        "predict",
        "--config", str(ROOT / "config" / "demo.yaml"),
        "--ckpt_path", ckpt,
        "--data.predict_audio", args.audio,
        "--data.batch_size", str(args.batch_size),
        "--data.predict_hop_s", str(args.hop_s),
        "--data.num_workers", str(args.num_workers),
        "--predict_engine.runtime", args.engine,
        "--night.output_dir", str(out),
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(out),  # where the CLI saves its config.yaml
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    seconds = sf.info(args.audio).duration
    baseline = _rss_now_mb()  # torch, Lightning and the project imported; no model, no audio
    t0 = time.perf_counter()
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    cpu0 = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    cli(command)
    wall = time.perf_counter() - t0
    summary = json.loads(next(out.glob("*/summary.json")).read_text())
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return {
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu0,
        "hours": seconds / 3600.0,
        "windows": summary["n_windows"],
        "wall_s": wall,
        "rtf": seconds / wall,
        "rss_main_mb": _peak_rss_mb(resource.RUSAGE_SELF),
        "rss_baseline_mb": baseline,
        "rss_workers_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN) if args.num_workers else 0.0,
        "snore_episodes": summary["snore"]["episodes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, nargs="+", default=[8.0, 1.0], help="night lengths")
    parser.add_argument(
        "--ckpt_path",
        default=None,
        help="a checkpoint trained with config/demo.yaml (default: untrained TinyCNN weights)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="windows per batch")
    parser.add_argument("--hop_s", type=float, default=0.5, help="seconds between windows")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument(
        "--engine",
        choices=["auto", "torch", "onnxruntime"],
        default="auto",
        help="the predict engine's runtime (auto: ONNX Runtime on CPU; its export is timed)",
    )
    parser.add_argument("--workdir", default=None, help="where nights are written (default: temp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic nights")
    parser.add_argument("--audio", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.audio:  # the child: one measured run, numbers as JSON on the last line
        print(json.dumps(run_one(args)))
        return

    from util.night.generate import write_night

    tmp = tempfile.TemporaryDirectory(prefix="night-bench-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for hours in args.hours:
        audio = workdir / f"night_{hours:g}h.wav"
        t0 = time.perf_counter()
        if not audio.exists():
            write_night(audio, hours=hours, seed=args.seed)
        made = time.perf_counter() - t0
        child = [
            sys.executable,
            __file__,
            "--audio", str(audio),
            "--output_dir", str(workdir / f"out_{hours:g}h"),
            "--batch_size", str(args.batch_size),
            "--hop_s", str(args.hop_s),
            "--num_workers", str(args.num_workers),
            "--threads", str(args.threads),
            "--seed", str(args.seed),
            "--engine", args.engine,
        ]  # fmt: skip
        if args.ckpt_path:
            child += ["--ckpt_path", args.ckpt_path]
        res = subprocess.run(child, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            sys.stderr.write(res.stdout + res.stderr)
            raise SystemExit(f"benchmark run for {hours} h failed")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["generate_s"] = made
        rows.append(row)
    load = os.getloadavg()[0]
    print(
        f"\nnight benchmark: TinyCNN {'(' + args.ckpt_path + ')' if args.ckpt_path else '(untrained)'}, "
        f"engine {args.engine}, batch {args.batch_size}, hop {args.hop_s} s, "
        f"workers {args.num_workers}, "
        f"torch threads {args.threads}, {os.cpu_count()} CPUs, load average {load:.1f}"
    )
    print(
        "| night (h) | windows | wall (s) | RTF (x real time) | CPU (s) | RSS before (MB) | "
        "peak RSS main (MB) | peak RSS workers (MB) | generate night (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['hours']:.2f} | {r['windows']} | {r['wall_s']:.1f} | {r['rtf']:.0f} | "
            f"{r['cpu_s']:.1f} | {r['rss_baseline_mb']:.0f} | {r['rss_main_mb']:.0f} | "
            f"{r['rss_workers_mb']:.0f} | {r['generate_s']:.1f} |"
        )
    print(
        "CPU (s): user + system time of the prediction, main process and workers; on an "
        "otherwise idle machine the wall time approaches CPU / cores. RSS before: the main "
        "process with torch, Lightning and the project imported, before the CLI starts."
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""How fast, and in how much memory, a whole night is turned into a snore timeline.

Writes synthetic two-channel 16 kHz nights (8 h and 1 h by default) with
:mod:`util.night.generate`, then runs the user's command on each,
``main.py predict --config config/demo.yaml --ckpt_path ... --data.predict_audio ...
--threads ...`` (in-process, through :func:`main.main`), every run in a fresh process so
its peak memory is its own. That is :class:`data.recordings.RecordingWindows` (blocks
from disk → windows → log-mel front end, frames shared by overlapping windows) →
``Trainer.predict`` with the TinyCNN :class:`models.classifier.Classifier`
(:class:`util.callbacks.PredictEngine` runtime auto: ONNX Runtime, the TinyCNN's layers
as hand-written graphs, :class:`util.night.shared_windows.SharedWindowRunner`; set up
when prediction starts, which the wall time includes) →
:class:`util.callbacks.night.NightWriter` (events, summary, timeline, probabilities).
Prints the real-time factor (recording seconds per wall second), CPU time and peak RSS;
the two lengths show whether memory stays flat as the night grows.

Features are computed on ``--feature_threads`` threads of their own, each batch on one,
ahead of the model (``data.predict_prefetch``, the default, and
``predict_engine.feature_threads``; ``--prefetch false`` measures without), and the
TinyCNN's pieces run on ``--workers`` threads side by side (``predict_engine.workers``;
auto: the ``--threads`` number, else every core), one intra-op thread each. Each night runs for
every ``--threads`` value (``1`` and ``auto``, earsleep's default:
:func:`util.cpu.choose_threads`, the cores free now) on an idle machine and with
``--load`` busy processes (one spinning Python loop each, started by the benchmark, as
``benchmarks/train_throughput.py --load`` does), by default none and one per core. A
machine that is already busy (other jobs) shows in the load-average column.

    python benchmarks/night.py                       # 8 h and 1 h, threads 1 and auto, load 0 and cores
    python benchmarks/night.py --hours 1 --repeats 3 # medians over three runs
    python benchmarks/night.py --hop_s 0.48          # a hop the pooling strides divide
    python benchmarks/night.py --engine torch --hours 2 --threads 1 --load 0
    python benchmarks/night.py --prefetch false      # one thread reads, computes features, runs the model
    python benchmarks/night.py --workers 1           # the model's pieces in turn, as before
    python benchmarks/night.py --feature_threads 1   # one feature thread, as before

Untrained weights run as fast as trained ones; pass ``--ckpt_path`` (a checkpoint
trained with ``config/demo.yaml``) to also see sensible events. Targets on a 2-core
CPU: an 8-hour night in at most 20 s idle and 40 s with one busy process per core,
peak RSS under 1 GB.
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

from benchmarks.busy import busy_processes  # noqa: E402

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


def _steal_pct(before: dict[str, int] | None, after: dict[str, int] | None) -> float:
    """Percent of the cores' time between two :func:`util.cpu.cpu_ticks` the hypervisor
    gave to other machines (steal: it slows a night without showing in the load average)."""
    if before is None or after is None:
        return float("nan")
    total = sum(after.values()) - sum(before.values())
    return 100.0 * (after["steal"] - before["steal"]) / max(1, total)


def untrained_checkpoint(path: Path, seed: int) -> Path:
    """A TinyCNN checkpoint as ``main.py fit --config config/demo.yaml`` writes it, untrained.

    Untrained weights run as fast as trained ones; the seed fixes the events.
    """
    import torch

    from models.classifier import Classifier
    from tests.helpers import build_like_cli, save_checkpoint
    from util.memory import page_out_gpu_libraries

    torch.manual_seed(seed)
    model = build_like_cli(
        Classifier, "models.backbones.TinyCNN", num_classes=3, class_names=list(CLASSES)
    )
    saved = save_checkpoint(model, path)
    # The measured runs page out their GPU libraries as the user's command does; the
    # kernel leaves a page alone while another process maps it, so this one lets go first.
    page_out_gpu_libraries()
    return saved


def run_one(args: argparse.Namespace) -> dict:
    """One timed ``main.py predict`` over ``args.audio`` in this process; returns the numbers."""
    import psutil
    import soundfile as sf
    import torch

    from main import main as cli
    from util.callbacks import PredictEngine
    from util.cpu import choose_threads, cpu_ticks
    from util.memory import gpu_library_resident_mb

    choice = choose_threads(args.threads)  # what the CLI's --threads will choose
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = [
        "predict",
        "--config", str(ROOT / "config" / "demo.yaml"),
        "--ckpt_path", args.ckpt_path,  # the parent writes the untrained one
        "--data.predict_audio", args.audio,
        "--data.batch_size", str(args.batch_size),
        "--data.predict_hop_s", str(args.hop_s),
        "--data.num_workers", str(args.num_workers),
        "--data.predict_prefetch", args.prefetch,
        "--predict_engine.runtime", args.engine,
        "--predict_engine.workers", args.workers,
        "--predict_engine.feature_threads", args.feature_threads,
        "--threads", str(args.threads),
        "--night.output_dir", str(out),
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(out),  # where the CLI saves its config.yaml
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    seconds = sf.info(args.audio).duration
    baseline = _rss_now_mb()  # torch, Lightning and the project imported; no model, no audio
    gpu_libraries = gpu_library_resident_mb()
    t0 = time.perf_counter()
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    cpu0 = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    ticks0 = cpu_ticks()
    run = cli(command)
    ticks1 = cpu_ticks()
    wall = time.perf_counter() - t0
    engine = next(c for c in run.trainer.callbacks if isinstance(c, PredictEngine))
    threads = torch.get_num_threads()
    summary = json.loads(next(out.glob("*/summary.json")).read_text())
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    started = psutil.Process().create_time()  # the interpreter's start: imports included
    return {
        "command_s": time.time() - started,
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu0,
        "hours": seconds / 3600.0,
        "windows": summary["n_windows"],
        "wall_s": wall,
        "rtf": seconds / wall,
        "rss_main_mb": _peak_rss_mb(resource.RUSAGE_SELF),
        "rss_baseline_mb": baseline,
        "rss_gpu_libraries_mb": gpu_libraries,
        "rss_workers_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN) if args.num_workers else 0.0,
        "snore_episodes": summary["snore"]["episodes"],
        "threads": threads,
        "model_threads": engine.ran_with["threads"],
        "model_workers": engine.ran_with["workers"],
        "feature_threads": engine.ran_with["feature_threads"],
        "thread_reason": choice.reason,
        "load_start": os.getloadavg()[0],
        "steal_pct": _steal_pct(ticks0, ticks1),
    }


def _median(rows: list[dict]) -> dict:
    """The run with the median wall time (its own CPU and RSS figures kept together)."""
    ordered = sorted(rows, key=lambda r: r["wall_s"])
    row = dict(ordered[len(ordered) // 2])
    row["walls"] = [r["wall_s"] for r in rows]
    return row


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
    parser.add_argument(
        "--threads",
        nargs="+",
        default=["1", "auto"],
        help="main.py's --threads values to measure (auto: util.cpu.choose_threads)",
    )
    parser.add_argument(
        "--load",
        type=int,
        nargs="+",
        default=None,
        help="busy processes during each run (default: 0 and one per core)",
    )
    parser.add_argument(
        "--prefetch",
        choices=["true", "false"],
        default="true",
        help="data.predict_prefetch: features in threads of their own, ahead of the model",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (median shown)")
    parser.add_argument(
        "--engine",
        choices=["auto", "torch", "onnxruntime"],
        default="auto",
        help="the predict engine's runtime (auto: ONNX Runtime on CPU; its set-up is timed)",
    )
    parser.add_argument(
        "--workers",
        default="auto",
        help="predict_engine.workers: TinyCNN pieces side by side (auto: the --threads "
        "number, else every core)",
    )
    parser.add_argument(
        "--feature_threads",
        default="auto",
        help="predict_engine.feature_threads: batches' features computed at once ahead of the "
        "model (auto: the --threads number, else every core)",
    )
    parser.add_argument("--workdir", default=None, help="where nights are written (default: temp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic nights")
    parser.add_argument("--audio", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.audio:  # the child: one measured run, numbers as JSON on the last line
        args.threads = args.threads[0]
        row = json.dumps(run_one(args))
        with open(Path(args.output_dir).parent / "runs.jsonl", "a") as log:
            log.write(row + "\n")  # every run also kept beside the nights
        print(row)
        return

    from util.cpu import available_cores, cpu_model
    from util.night.generate import write_night

    loads = args.load if args.load is not None else [0, available_cores()]
    tmp = tempfile.TemporaryDirectory(prefix="night-bench-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt_path or str(untrained_checkpoint(workdir / "untrained.ckpt", args.seed))
    rows = []
    for hours in args.hours:
        audio = workdir / f"night_{hours:g}h.wav"
        t0 = time.perf_counter()
        if not audio.exists():
            write_night(audio, hours=hours, seed=args.seed)
        made = time.perf_counter() - t0
        for load in loads:
            for threads in args.threads:
                runs = []
                for _ in range(args.repeats):
                    child = [
                        sys.executable,
                        __file__,
                        "--audio", str(audio),
                        "--output_dir", str(workdir / f"out_{hours:g}h"),
                        "--batch_size", str(args.batch_size),
                        "--hop_s", str(args.hop_s),
                        "--num_workers", str(args.num_workers),
                        "--threads", str(threads),
                        "--seed", str(args.seed),
                        "--engine", args.engine,
                        "--prefetch", args.prefetch,
                        "--workers", args.workers,
                        "--feature_threads", args.feature_threads,
                        "--ckpt_path", ckpt,
                    ]  # fmt: skip
                    with busy_processes(load):
                        res = subprocess.run(child, capture_output=True, text=True, cwd=ROOT)
                    if res.returncode:
                        sys.stderr.write(res.stdout + res.stderr)
                        raise SystemExit(f"benchmark run for {hours} h failed")
                    runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
                row = _median(runs)
                row.update(generate_s=made, load=load, requested=threads)
                rows.append(row)
    print(
        f"\nnight benchmark: TinyCNN {'(' + args.ckpt_path + ')' if args.ckpt_path else '(untrained)'}, "
        f"engine {args.engine}, batch {args.batch_size}, hop {args.hop_s} s, "
        f"prefetch {args.prefetch}, model workers {args.workers}, "
        f"feature threads {args.feature_threads}, "
        f"workers {args.num_workers}; {cpu_model()}, {available_cores()} cores; "
        f"median of {args.repeats} run(s)"
    )
    print(
        "| night (h) | windows | busy procs | load avg | --threads | threads | model workers × threads + feature threads | wall (s) | with imports (s) | "
        "RTF (x real time) | CPU (s) | CPU stolen (%) | RSS before (MB) | of which GPU libraries (MB) | "
        "peak RSS (MB) | night's own (MB) | peak RSS workers (MB) |"
    )
    print("|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        walls = "/".join(f"{w:.1f}" for w in r["walls"]) if len(r["walls"]) > 1 else ""
        print(
            f"| {r['hours']:.2f} | {r['windows']} | {r['load']} | {r['load_start']:.1f} | "
            f"{r['requested']} | {r['threads']} | {r['model_workers']} × {r['model_threads']} + {r['feature_threads']} | {r['wall_s']:.1f}{' (' + walls + ')' if walls else ''} | "
            f"{r.get('command_s', float('nan')):.1f} | "
            f"{r['rtf']:.0f} | {r['cpu_s']:.1f} | {r.get('steal_pct', float('nan')):.0f} | "
            f"{r['rss_baseline_mb']:.0f} | "
            f"{r.get('rss_gpu_libraries_mb', float('nan')):.0f} | {r['rss_main_mb']:.0f} | {r['rss_main_mb'] - r['rss_baseline_mb']:.0f} | "
            f"{r['rss_workers_mb']:.0f} |"
        )
    print(
        "wall: main.main(...) alone; with imports: from the measured process's start to the "
        "end of the command, interpreter, imports and the benchmark's own set-up included "
        "(about what `python main.py predict` takes). "
        "busy procs: spinning processes the benchmark ran beside the night; load avg: the "
        "1-minute load average as the night ended (other jobs included). threads: what "
        "--threads chose (util.cpu.choose_threads); model workers × threads + feature threads: "
        "the threads that run the model's pieces side by side (predict_engine.workers), "
        "ONNX Runtime's intra-op threads in each, and the threads that compute "
        "features ahead of them (predict_engine.feature_threads, beside one that reads; "
        "0: no prefetch, the same thread does all in turn). CPU (s): user + system time of the "
        "prediction, main process and workers. CPU stolen: the share of all CPUs' time during the "
        "night that the hypervisor gave to other machines (/proc/stat steal; 0 on bare metal). RSS before: the main process with torch, "
        "Lightning and the project imported, before the CLI starts; GPU libraries: the part "
        "of it that torch's CUDA wheel and Triton load even on a CPU (files and their "
        "zero-initialised data); night's own: peak minus RSS before."
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

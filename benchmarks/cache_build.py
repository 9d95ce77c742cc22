"""How fast the spectrogram cache builds, end to end, and whether memory stays flat.

For each corpus size this writes a synthetic train split in the DreamCatcher tarball
layout (not timed), then times ``build_cache`` on ``DreamCatcher(root=...)``: reading
the gzip tarball, decoding the WAVs, computing features and writing HDF5. Each
build runs in a fresh process so that its peak RSS (``ru_maxrss``) is its own.
Before the build the process reads the source alone once (``read-only``: the
ceiling the source sets; it also warms the page cache for the timed build); after
it, it times random single-row reads through the data module's dataset (what a
shuffled DataLoader does). CPU seconds count every thread of the process, so
``clips/CPU-s`` is the throughput that stays meaningful on a busy machine.

    .venv/bin/python benchmarks/cache_build.py                  # 5,000 and 20,000 clips
    .venv/bin/python benchmarks/cache_build.py --clips 40000 --preset reference
    .venv/bin/python benchmarks/cache_build.py --compresslevel 6   # gzip-compressed, as DreamCatcher's
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def generate(root: Path, clips: int, compresslevel: int) -> float:
    """Write ``root/data/train.tar.gz`` with ``clips`` synthetic clips; return seconds."""
    from data.fixtures import write_dreamcatcher_archive
    from data.sources.synthetic import Synthetic

    tarball = root / "data" / "train.tar.gz"
    if tarball.exists():
        return 0.0
    start = time.perf_counter()
    source = Synthetic(seed=0, clips_per_split={"train": clips})
    write_dreamcatcher_archive(root, source, splits=("train",), compresslevel=compresslevel)
    return time.perf_counter() - start


def measure(root: Path, preset: str, reads: int) -> dict[str, float]:
    """Build the cache of ``root`` in this process; return timings and peak RSS."""
    import numpy as np

    from data.cache import build_cache, open_cache
    from data.clips import CachedSplit
    from data.features import LogMelFrontEnd
    from data.sources.dreamcatcher import DreamCatcher

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    source = DreamCatcher(root=str(root))
    front_end = LogMelFrontEnd(preset)
    cache_dir = root / f"cache-{preset}"
    shutil.rmtree(cache_dir, ignore_errors=True)

    # The source alone (tar read, inflate, decode): the ceiling for the whole build.
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    read_items = sum(1 for _ in source.iter_clips("train"))
    read_only = read_items / (time.perf_counter() - start)
    read_cpu = _cpu_seconds() - cpu0

    load = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    path = build_cache(source, "train", front_end, cache_dir=cache_dir, progress=False)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    load = max(load, os.getloadavg()[0])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = open_cache(path)
    with __import__("h5py").File(path, "r") as f:
        items = int(f.attrs["source_items"])

    dataset = CachedSplit(path)
    order = np.random.default_rng(0).permutation(len(dataset))[:reads]
    dataset[0]  # open the file outside the timing
    t0 = time.perf_counter()
    for i in order:
        dataset[int(i)]
    read_s = time.perf_counter() - t0
    dataset.close()
    return {
        "clips": items,
        "rows": info.n_rows,
        "seconds": seconds,
        "clips_per_s": items / seconds,
        "read_only_per_s": read_only,
        "read_cpu_s": read_cpu,
        "cpu_s": cpu,
        "load": load,
        "peak_rss_mb": peak_rss,
        "base_rss_mb": base_rss,
        "reads_per_s": len(order) / read_s if len(order) else float("nan"),
        "file_mb": path.stat().st_size / 2**20,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=20000, help="largest corpus size")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="corpus sizes to measure (default: clips/4 and clips)",
    )
    parser.add_argument("--preset", choices=("native", "reference"), default="native")
    parser.add_argument("--workdir", type=Path, default=None, help="where tarballs and caches go")
    parser.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    parser.add_argument("--reads", type=int, default=5000, help="random row reads to time")
    parser.add_argument("--repeat", type=int, default=1, help="builds per size (best is shown)")
    parser.add_argument(
        "--compresslevel",
        type=int,
        choices=range(10),
        default=0,
        metavar="0-9",
        help="gzip level of the synthetic tarball: 0 stores (default), 6 is what `tar czf` "
        "writes, as in DreamCatcher's own tarballs (then inflating is part of the cost)",
    )
    parser.add_argument("--_measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure is not None:  # child process: one build, JSON out
        print(json.dumps(measure(args._measure, args.preset, args.reads)))
        return

    sizes = args.sizes or sorted({max(1, args.clips // 4), args.clips})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="earsleep-cache-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in sizes:
            root = workdir / f"train-{size}-gz{args.compresslevel}"
            gen = generate(root, size, args.compresslevel)
            if gen:
                print(f"generated {size} clips in {gen:.1f} s (not timed)", file=sys.stderr)
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run(
                    [sys.executable, __file__, "--_measure", str(root), "--preset", args.preset]
                    + ["--reads", str(args.reads)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rows.append(max(runs, key=lambda r: r["clips_per_s"]))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\ncache build, preset {args.preset}, gzip level {args.compresslevel} "
        "(tar.gz read + decode + features + HDF5 write)"
    )
    from data.system import usable_cpus

    print(f"{usable_cpus()} usable CPUs; 'load' is the 1-minute load average during the build")
    header = (
        f"{'clips':>7} {'rows':>7} {'seconds':>8} {'clips/s':>8} {'CPU s':>7} "
        f"{'clips/CPU-s':>11} {'read-only/s':>11} {'read CPU s':>10} {'load':>5} {'peak RSS MB':>11} "
        f"{'startup MB':>10} {'file MB':>7} {'rand reads/s':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['clips']:>7} {r['rows']:>7} {r['seconds']:>8.1f} {r['clips_per_s']:>8.0f} "
            f"{r['cpu_s']:>7.1f} {r['clips'] / r['cpu_s']:>11.0f} {r['read_only_per_s']:>11.0f} "
            f"{r['read_cpu_s']:>10.1f} "
            f"{r['load']:>5.1f} {r['peak_rss_mb']:>11.0f} {r['base_rss_mb']:>10.0f} "
            f"{r['file_mb']:>7.0f} {r['reads_per_s']:>12.0f}"
        )


if __name__ == "__main__":
    main()

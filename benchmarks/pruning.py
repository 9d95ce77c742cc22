"""The pruning study: run the six scenarios over seeds, then the table and the pareto picture.

Two steps, each optional:

``--run`` trains the grid in this process (``main.py fit`` then ``main.py test`` on the best
checkpoint, through :func:`main.main`): every ``scenario@sparsity`` of ``--grid`` for every
seed of ``--seeds``, from ``config/prune/<scenario>.yaml``, starting from ``--baseline`` (and
distilling from ``--teacher`` in the ``kd_*`` scenarios). Run folders are
``<out>/prune_<scenario>_s<percent>/seed<k>``; a folder whose test already finished is
skipped, so an interrupted study resumes. ``--fit-args`` adds options to every fit (a
shorter budget, another data config).

The report reads every run folder under ``--runs`` that was fitted and tested (any backbone,
pruned or not: the baselines, a teacher, BC-ResNet's runs) and groups them by backbone,
scenario and sparsity (the checkpoint's pruning record, :func:`models.pruning.pruning_record`;
``trained`` for an unpruned run). For each group: parameters and MACs
(:mod:`util.complexity`), fp32 and int8 ONNX bytes (the dynamo export and static QDQ of
:mod:`util.deploy`, int8 calibrated on random inputs shaped like the front end's output),
single-thread ONNX Runtime latency at batch 1 (median, the best of ``--repeats`` repeats of
``--latency-runs`` runs, fp32 and int8) against the compute floor (2·MACs / the single-core
GEMM peak of :func:`benchmarks.latency.gemm_peak_gflops`), and the test macro-F1 as mean ±
sample std over seeds with a 95 % Student-t confidence interval. It prints a Markdown table,
writes ``pruning_table.csv`` and ``pruning_table.json`` under ``--out`` and draws test
macro-F1 against MACs with the pareto front (``--figure``).

    .venv/bin/python benchmarks/pruning.py --run --baseline B.ckpt --teacher T.ckpt --out log/prune
    .venv/bin/python benchmarks/pruning.py --runs log/prune --figure docs/pruning_pareto.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.latency import gemm_peak_gflops, session, time_session  # noqa: E402
from models.pruning import layer_widths, pruning_record  # noqa: E402
from util.checkpoint import read_checkpoint  # noqa: E402
from util.complexity import count_macs, count_params  # noqa: E402
from util.deploy.export import load_classifier  # noqa: E402
from util.deploy.onnx import export_onnx  # noqa: E402
from util.deploy.quantize import CalibrationReader, quantize_int8  # noqa: E402

SCENARIOS = ("finetune", "single", "progressive", "kd_finetune", "kd_single", "kd_progressive")
DEFAULT_GRID = (
    "finetune@0",
    "single@0.5",
    "progressive@0.5",
    "kd_finetune@0",
    "kd_single@0.5",
    "kd_progressive@0.5",
    "single@0.25",
    "single@0.75",
)
#: Two-sided 95 % Student-t quantiles by degrees of freedom (n - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# -- running the grid ---------------------------------------------------------------------------


def parse_grid(items: list[str]) -> list[tuple[str, float]]:
    """``["single@0.5", ...]`` to ``[("single", 0.5), ...]``, with one-line errors."""
    grid = []
    for item in items:
        name, _, value = item.partition("@")
        if name not in SCENARIOS:
            raise SystemExit(f"error: unknown scenario {name!r} in --grid (one of {SCENARIOS})")
        sparsity = float(value or (0 if name.endswith("finetune") else 0.5))
        if name.endswith("finetune") != (sparsity == 0):
            raise SystemExit(f"error: {item}: finetune scenarios have sparsity 0, the others > 0")
        grid.append((name, sparsity))
    return grid


def _finished(run: Path) -> bool:
    return any(
        (m.parent / "test_metrics.csv").is_file() for m in run.glob("test/version_*/metrics.json")
    )


def run_folder(ckpt: str | Path) -> Path | None:
    """The run folder of ``<run>/checkpoints/<file>.ckpt`` (with its config.yaml), else ``None``."""
    path = Path(ckpt).resolve()
    run = path.parents[1]
    return run if path.parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


def test_checkpoint(ckpt: str | Path) -> None:
    """``main.py test`` of a trained checkpoint with its run's own config (once).

    A checkpoint copied out of its run folder is not tested: pass its run with ``--runs``.
    """
    from main import main

    run = run_folder(ckpt)
    if run is None:
        print(f"{ckpt}: not in a run folder, not tested (add its run with --runs)", flush=True)
    elif not _finished(run):
        main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)])


def run_grid(args: argparse.Namespace) -> None:
    """Test the baseline and the teacher, then fit and test every ``scenario@sparsity`` × seed."""
    from main import main

    for ckpt in (args.baseline, args.teacher):
        if ckpt:
            test_checkpoint(ckpt)
    out = Path(args.out)
    for name, sparsity in parse_grid(args.grid):
        for seed in args.seeds:
            group = f"prune_{name}_s{round(sparsity * 100)}"
            run = out / group / f"seed{seed}"
            if _finished(run):
                print(f"{group}/seed{seed}: done before, skipped", flush=True)
                continue
            common = ["--config", str(ROOT / "config" / "prune" / f"{name}.yaml")]
            common += shlex.split(args.fit_args)
            common += ["--data.cache_dir", str(out / "cache"), "--data.progress", "false"]
            common += ["--leaderboard.path", str(out / "leaderboard.csv")]
            common += ["--trainer.enable_progress_bar", "false"]
            common += ["--trainer.callbacks.init_args.init_checkpoint", str(args.baseline)]
            common += ["--trainer.callbacks.init_args.sparsity", str(sparsity)]
            if name.startswith("kd_"):
                common += ["--model.init_args.teacher_checkpoint", str(args.teacher)]
            fit = main(
                ["fit", *common, "--seed_everything", str(seed),
                 "--trainer.logger.init_args.save_dir", str(out),
                 "--trainer.logger.init_args.name", group,
                 "--trainer.logger.init_args.version", f"seed{seed}"]
            )  # fmt: skip
            best = fit.trainer.checkpoint_callback.best_model_path
            main(["test", *common, "--ckpt_path", best])
            print(f"{group}/seed{seed}: fitted and tested ({best})", flush=True)


# -- reading the runs ---------------------------------------------------------------------------


def _test_f1(run: Path) -> float | None:
    found = sorted(run.glob("test/version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        test = json.loads(path.read_text()).get("test") or {}
        for key in ("f1_macro", "test/f1_macro"):
            if test.get(key) is not None:
                return float(test[key])
    return None


def collect(roots: list[Path]) -> list[dict[str, Any]]:
    """One row per fitted and tested run folder under ``roots``: its group and test macro-F1."""
    rows = []
    for root in roots:
        for metrics in sorted(Path(root).rglob("metrics.json")):
            run = metrics.parent
            if run.parent.name == "test" or not (run / "checkpoints").is_dir():
                continue
            summary = json.loads(metrics.read_text())
            best, f1 = summary.get("best_model_path"), _test_f1(run)
            if not best or not Path(best).is_file() or f1 is None:
                continue
            checkpoint = read_checkpoint(best)
            record = pruning_record(checkpoint) or {}
            backbone = checkpoint["hyper_parameters"]["backbone"]
            backbone = backbone.get("class_path", "") if isinstance(backbone, dict) else backbone
            scenario = record.get("scenario", "trained")
            sparsity = float(record.get("sparsity", 0.0))
            rows.append(
                {
                    "backbone": str(backbone).rsplit(".", 1)[-1],
                    "scenario": scenario,
                    "sparsity": sparsity,
                    "seed": summary.get("seed"),
                    "test_f1_macro": f1,
                    "checkpoint": best,
                    "run": str(run),
                }
            )
    return rows


# -- measuring one architecture ------------------------------------------------------------------


def _inputs(model: Any, batch: int, seed: int) -> np.ndarray:
    """Random inputs in the front end's range: the model's band mean ± std."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_shape, generator=g)
    if model.normalize:
        x = model.band_mean + model.band_std * x
    return x.numpy().astype(np.float32)


def measure(checkpoint: str, folder: Path, runs: int, repeats: int) -> dict[str, Any]:
    """Params, MACs, ONNX bytes and ORT latency of the model in ``checkpoint``."""
    model = load_classifier(checkpoint)
    shape = tuple(model.input_shape)
    fp32 = export_onnx(model, folder / "model.onnx", shape)
    reader = CalibrationReader(lambda: (_inputs(model, 8, s) for s in range(100, 108)))
    int8 = quantize_int8(fp32, folder / "model.int8.onnx", reader)
    x = _inputs(model, 1, 0)
    sessions = {"fp32": session(fp32), "int8": session(int8)}
    best: dict[str, float] = {}
    for _ in range(repeats):  # engines take turns; other processes only ever add time
        for key, sess in sessions.items():
            median = time_session(sess, x, runs, max(5, runs // 10))["median_ms"]
            best[key] = min(best.get(key, math.inf), median)
    widths = layer_widths(model.backbone)
    return {
        "params": count_params(model.backbone),
        "macs": count_macs(model.backbone, shape),
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": int8.stat().st_size,
        "ort_fp32_ms": best["fp32"],
        "ort_int8_ms": best["int8"],
        "widths": widths,
    }


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = T95.get(n - 1, 1.96) * std / math.sqrt(n) if std is not None else None
    return {"n": n, "mean": mean, "std": std, "ci95": half}


def table(rows: list[dict[str, Any]], runs: int, repeats: int) -> tuple[list[dict], float]:
    """One row per (backbone, scenario, sparsity): measured sizes, latency and F1 statistics."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["backbone"], row["scenario"], row["sparsity"])].append(row)
    peak = gemm_peak_gflops()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (key, members) in enumerate(sorted(groups.items())):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            numbers = measure(members[0]["checkpoint"], folder, runs, repeats)
            f1 = _stats([m["test_f1_macro"] for m in members])
            floor = 2 * numbers["macs"] / (peak * 1e9) * 1e3
            out.append(
                {
                    "backbone": key[0],
                    "scenario": key[1],
                    "sparsity": key[2],
                    **numbers,
                    "floor_ms": floor,
                    "seeds": sorted(str(m["seed"]) for m in members),
                    "f1_mean": f1["mean"],
                    "f1_std": f1["std"],
                    "f1_ci95": f1["ci95"],
                    "n": f1["n"],
                }
            )
    return out, max(peak, gemm_peak_gflops())


def markdown(rows: list[dict[str, Any]], peak: float) -> str:
    """The table as Markdown."""
    lines = [
        f"Compute floor = 2·MACs / {peak:.1f} GFLOP/s (single-core fp32 GEMM peak, this run).",
        "",
        "| backbone | scenario | sparsity | params | MMACs | fp32 KiB | int8 KiB | "
        "ORT fp32 ms (×floor) | ORT int8 ms | test macro-F1 (mean ± std) | 95 % CI | n |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        std = f" ± {r['f1_std']:.3f}" if r["f1_std"] is not None else ""
        ci = f"± {r['f1_ci95']:.3f}" if r["f1_ci95"] is not None else "–"
        lines.append(
            f"| {r['backbone']} | {r['scenario']} | {r['sparsity']:.0%} | {r['params']:,} | "
            f"{r['macs'] / 1e6:.2f} | {r['fp32_bytes'] / 1024:.1f} | {r['int8_bytes'] / 1024:.1f} | "
            f"{r['ort_fp32_ms']:.3f} ({r['ort_fp32_ms'] / r['floor_ms']:.1f}×) | "
            f"{r['ort_int8_ms']:.3f} | {r['f1_mean']:.3f}{std} | {ci} | {r['n']} |"
        )
    return "\n".join(lines)


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats in both MACs (fewer) and mean macro-F1 (higher)."""
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r["macs"], -r["f1_mean"])):
        if r["f1_mean"] > best:
            front.append(r)
            best = r["f1_mean"]
    return front


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Test macro-F1 (mean, with the 95 % CI) against MACs; the pareto front as a line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    markers = {"trained": "s", "finetune": "o", "kd_finetune": "o"}
    for r in rows:
        kd = r["scenario"].startswith("kd_")
        ax.errorbar(
            r["macs"] / 1e6,
            r["f1_mean"],
            yerr=r["f1_ci95"] or 0,
            fmt=markers.get(r["scenario"], "^" if "progressive" in r["scenario"] else "D"),
            color="tab:red" if kd else ("tab:gray" if r["scenario"] == "trained" else "tab:blue"),
            capsize=3,
        )
        label = f"{r['backbone']} {r['scenario']}"
        label += f" {r['sparsity']:.0%}" if r["sparsity"] else ""
        same = sorted((o for o in rows if o["macs"] == r["macs"]), key=lambda o: -o["f1_mean"])
        dy = 3 - 4 * same.index(r)  # labels of one size fanned out, in the order of their points
        ax.annotate(label, (r["macs"] / 1e6, r["f1_mean"]), fontsize=7, xytext=(6, dy),
                    textcoords="offset points")  # fmt: skip
    front = pareto(rows)
    ax.plot([r["macs"] / 1e6 for r in front], [r["f1_mean"] for r in front], "k--", lw=1,
            label="pareto front")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("MACs per clip (millions, log scale)")
    ax.set_ylabel("test macro-F1 (mean over seeds, 95 % CI)")
    ax.set_title("Structured pruning: accuracy against compute (blue: no KD, red: KD)")
    ax.legend(loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="train and test the grid first")
    parser.add_argument("--baseline", help="the trained checkpoint every scenario starts from")
    parser.add_argument("--teacher", help="the teacher checkpoint of the kd_* scenarios")
    parser.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID), help="scenario@sparsity")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fit-args", default="", help="options added to every fit and test")
    parser.add_argument("--out", default="log/prune", help="where the grid's runs go")
    parser.add_argument("--runs", nargs="*", help="folders of runs to report (default: --out)")
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figure", default=str(ROOT / "docs" / "pruning_pareto.png"))
    args = parser.parse_args(argv)
    if args.run:
        if not args.baseline or (any(g.startswith("kd_") for g in args.grid) and not args.teacher):
            parser.error("--run needs --baseline (and --teacher for kd_* scenarios)")
        torch.set_num_threads(1)
        run_grid(args)
    roots = [Path(p) for p in (args.runs or [args.out])]
    if args.run and not args.runs:  # the starting points belong in the picture too
        roots += [r for c in (args.baseline, args.teacher) if c and (r := run_folder(c))]
    rows = collect(roots)
    if not rows:
        raise SystemExit("error: no fitted and tested run folders found")
    measured, peak = table(rows, args.latency_runs, args.repeats)
    print(markdown(measured, peak))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning_table.json").write_text(json.dumps(measured, indent=2) + "\n")
    with open(out / "pruning_table.csv", "w", newline="") as f:
        fields = [k for k in measured[0] if k != "widths"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(measured)
    figure(measured, Path(args.figure))
    print(f"\n{len(rows)} runs; table in {out}/pruning_table.csv, picture in {args.figure}")


if __name__ == "__main__":
    main()

"""Two-phase sweeps: baselines, a teacher gate, then a distillation grid, over seeds.

Usage (from the repository root)::

    python -m util.sweep --manifest config/sweep/reference.yaml --dry-run
    python -m util.sweep --manifest config/sweep/demo.yaml [--out log/sweeps/demo] [--resume]

Flow:

1. **phase 1** trains every baseline of the manifest for every seed.
2. **gate**: the teacher (a phase-1 run, normally the CRNN) must beat the best
   student by at least ``margin`` in mean *validation* macro-F1. If it does not, the
   ``tuning`` runs train first and the candidate with the best mean validation
   macro-F1 (the original teacher included) becomes the teacher.
3. **phase 2** distils each student of the grid from that teacher, seed by seed
   (the student of seed ``s`` learns from the teacher of seed ``s``), and passes the
   student's own phase-1 validation score as ``baseline_f1`` so the leaderboard
   gets ``gap_closed``.

Each run is ``main.py fit`` followed by ``test`` on the best checkpoint, in its own
subprocess (:func:`fit_and_test`): a crash is recorded as failed and the sweep goes
on. A run lives in ``<out>/runs/<name>/seed<s>/`` (TensorBoard events, checkpoints,
the artifacts of :class:`~util.callbacks.RunArtifacts`, ``run.log`` and
``sweep_run.json``); its leaderboard row goes to ``<out>/leaderboard.csv``. The
sweep writes ``runs.csv`` (one row per run), ``gate.json``, ``summary.csv`` and
``summary.md``: per configuration the mean ± std over seeds and a bootstrap 95%
interval of the test macro-F1 from the stored ``test_predictions.csv``. The best
configuration is chosen on validation macro-F1 only; test numbers are reported,
never used to choose.

``--resume`` skips every run whose ``metrics.json`` holds test metrics and whose
recorded configuration hash (command line and the text of its YAML files) matches;
other runs are trained again from scratch.

Manifest (YAML)::

    name: reference                     # default output: log/sweeps/<name>
    seeds: [0, 1, 2]
    common_args: {trainer.enable_progress_bar: false}   # every run, dotted keys
    bootstrap: {resamples: 1000, seed: 0}
    models:                             # base configs (and pinned settings) per model
      tinycnn: {configs: [config/tinycnn.yaml]}
      tinycnn_cbam:
        configs: [config/tinycnn_cbam.yaml]
        args: {model.init_args.backbone.init_args.reduction: 8}
    phase1:                             # run specs
      - {name: tinycnn, model: tinycnn}
      - name: tinycnn_cbam_r{reduction}  # {axis} takes the grid value
        model: tinycnn_cbam
        grid:
          reduction: {key: model.init_args.backbone.init_args.reduction, values: [4, 8, 16]}
    gate:
      teacher: crnn                     # a phase-1 run name
      students: null                    # phase-1 names; default: all but the teacher
      margin: 0.01
      tuning: [run specs...]            # trained only when the gate fails
    phase2:
      - name: kd_tinycnn_a{alpha}_T{temperature}
        model: kd_tinycnn               # its configs use models.distillation.DistillationClassifier
        baseline: tinycnn               # phase-1 run of the same student without a teacher
        grid: {alpha: {key: model.init_args.alpha, values: [0.3, 0.6, 0.9]}, ...}

A run spec has ``name`` (a template over its grid axes), ``model``, optional
``args`` (dotted key → value) and ``grid`` (axis → ``{key, values}``, or
``{values: [{label, args}, ...]}`` when one grid value sets several keys). A run's
command line is its model's configs, then the model's ``args``, ``common_args``,
the spec's ``args`` and the grid's, in that order (later wins). Two specs of a
phase whose configs and merged settings are equal are one run (the first name is
kept): that is how a default configuration and the same point of a grid collapse.

Why about 1,130 lines, for now: manifest plan, runner and statistics live together until
the sweep moves to ``util/sweep/`` on Ray Tune (issues 14 and 16), which replaces most
of the runner.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from util.redact import mask_text, mask_tree

__all__ = [
    "GateDecision",
    "Manifest",
    "Run",
    "RunResult",
    "Sweep",
    "bootstrap_macro_f1",
    "fit_and_test",
    "load_manifest",
    "macro_f1_from_confusion",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("phase1", "tuning", "phase2")
PHASE_TITLES = {"phase1": "phase 1", "tuning": "teacher tuning", "phase2": "phase 2"}
RUN_RECORD = "sweep_run.json"
#: Runner: ``(run, argv, run_dir, log_path) -> return code``.
Runner = Callable[["Run", list[str], Path, Path], int]


class ManifestError(ValueError):
    """The sweep manifest is malformed; the message says where."""


# -- the manifest ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One seed-independent run of a phase: a name, a model and its command-line settings."""

    name: str
    model: str
    args: tuple[tuple[str, Any], ...]
    labels: tuple[tuple[str, Any], ...] = ()
    baseline: str | None = None
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass
class Manifest:
    """A parsed sweep manifest (see the module docstring for the YAML)."""

    name: str
    seeds: list[int]
    models: dict[str, dict[str, Any]]
    common_args: dict[str, Any]
    phase1: list[Spec]
    phase2: list[Spec]
    teacher: str
    students: list[str]
    margin: float
    tuning: list[Spec]
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    path: Path | None = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", name)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def _settings(configs: Sequence[str], args: Iterable[tuple[str, Any]]) -> str:
    """Identity of a run's configuration: configs plus merged, flattened settings."""
    merged: dict[str, Any] = {}
    for key, value in args:
        flat: dict[str, Any] = {}
        _flatten(key, value, flat)
        # Nothing set earlier is dropped: jsonargparse may keep inner values when a
        # whole value (``--model X``) follows, and two runs wrongly taken for one is
        # worse than a duplicate run.
        merged.update(flat)
    return json.dumps([list(configs), sorted(merged.items())], sort_keys=True, default=str)


def _expand(raw: Any, where: str, models: Mapping[str, Any]) -> list[Spec]:
    if not isinstance(raw, Mapping) or "name" not in raw or "model" not in raw:
        raise ManifestError(f"{where}: a run spec needs 'name' and 'model', got {raw!r}")
    unknown = set(raw) - {"name", "model", "args", "grid", "baseline"}
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    if raw["model"] not in models:
        raise ManifestError(f"{where}: model {raw['model']!r} is not under 'models:'")
    base_args = list((raw.get("args") or {}).items())
    axes = []
    for axis, spec in (raw.get("grid") or {}).items():
        if not isinstance(spec, Mapping) or not spec.get("values"):
            raise ManifestError(f"{where}: grid axis {axis!r} needs a non-empty 'values' list")
        points = []
        for value in spec["values"]:
            if "key" in spec:
                points.append((value, [(spec["key"], value)]))
            elif isinstance(value, Mapping) and "args" in value:
                points.append((value.get("label", len(points)), list(value["args"].items())))
            else:
                raise ManifestError(
                    f"{where}: grid axis {axis!r} needs a 'key', or values of the form "
                    "{label: ..., args: {...}}"
                )
        axes.append((axis, points))
    specs = []
    for combo in itertools.product(*(points for _, points in axes)) if axes else [()]:
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo, strict=True)}
        try:
            name = str(raw["name"]).format(**{k: _fmt(v) for k, v in labels.items()})
        except (KeyError, IndexError) as err:
            raise ManifestError(
                f"{where}: name template {raw['name']!r} uses {err}, not a grid axis"
            ) from err
        args = base_args + [kv for _, point_args in combo for kv in point_args]
        specs.append(
            Spec(
                _safe_name(name),
                raw["model"],
                tuple(args),
                tuple(labels.items()),
                raw.get("baseline"),
            )
        )
    return specs


def _dedupe(
    specs: list[Spec], models: Mapping[str, Any], common: Mapping[str, Any], known: dict[str, Spec]
) -> list[Spec]:
    """Drop specs equal to an earlier one (kept in ``known``: settings → spec)."""
    kept = []
    for spec in specs:
        model = models[spec.model]
        key = _settings(model["configs"], [*model["args"].items(), *common.items(), *spec.args])
        if key in known:
            first = known[key]
            known[key] = dataclasses.replace(first, aliases=(*first.aliases, spec.name))
            kept = [known[key] if s.name == first.name else s for s in kept]
            continue
        known[key] = spec
        kept.append(spec)
    names = [s.name for s in kept]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"run names {dupes} are used by different configurations")
    return kept


def load_manifest(path: str | os.PathLike[str], root: str | os.PathLike[str] = ROOT) -> Manifest:
    """Read and check a sweep manifest.

    Args:
        path: the YAML file.
        root: folder the config paths are relative to (the repository root).

    Raises:
        ManifestError: on a missing key, unknown model, missing config file, a name
            template without its axis, or a gate / baseline naming no phase-1 run.
    """
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{path}: expected a YAML mapping")
    for key in ("seeds", "models", "phase1", "gate", "phase2"):
        if key not in raw:
            raise ManifestError(f"{path}: missing '{key}'")
    models: dict[str, dict[str, Any]] = {}
    for name, model in raw["models"].items():
        configs = list(model.get("configs") or [])
        for config in configs:
            if not (Path(root) / config).is_file():
                raise ManifestError(f"{path}: model {name!r}: config {config} does not exist")
        models[name] = {"configs": configs, "args": dict(model.get("args") or {})}
    common = dict(raw.get("common_args") or {})
    known: dict[str, Spec] = {}
    phase1 = _dedupe(
        [s for i, r in enumerate(raw["phase1"]) for s in _expand(r, f"phase1[{i}]", models)],
        models,
        common,
        known,
    )
    gate = raw["gate"] or {}
    names = {s.name for s in phase1} | {a for s in phase1 for a in s.aliases}
    teacher = gate.get("teacher")
    if teacher not in names:
        raise ManifestError(
            f"{path}: gate.teacher {teacher!r} is not a phase-1 run ({sorted(names)})"
        )
    teacher = _canonical(phase1, teacher)
    students = [_canonical(phase1, s) for s in gate.get("students") or [s.name for s in phase1]]
    students = [s for s in dict.fromkeys(students) if s != teacher]
    for s in students:
        if s not in names:
            raise ManifestError(f"{path}: gate.students: {s!r} is not a phase-1 run")
    tuning = _dedupe(
        [
            s
            for i, r in enumerate(gate.get("tuning") or [])
            for s in _expand(r, f"gate.tuning[{i}]", models)
        ],
        models,
        common,
        dict(known),
    )
    tuning = [s for s in tuning if s.name not in names]
    phase2 = _dedupe(
        [s for i, r in enumerate(raw["phase2"]) for s in _expand(r, f"phase2[{i}]", models)],
        models,
        common,
        {},
    )
    for spec in phase2:
        if spec.baseline is not None and spec.baseline not in names:
            raise ManifestError(
                f"{path}: phase2 {spec.name}: baseline {spec.baseline!r} is not a phase-1 run"
            )
    phase2 = [
        dataclasses.replace(s, baseline=s.baseline and _canonical(phase1, s.baseline))
        for s in phase2
    ]
    boot = raw.get("bootstrap") or {}
    return Manifest(
        name=str(raw.get("name") or path.stem),
        seeds=[int(s) for s in raw["seeds"]],
        models=models,
        common_args=common,
        phase1=phase1,
        phase2=phase2,
        teacher=teacher,
        students=students,
        margin=float(gate.get("margin", 0.0)),
        tuning=tuning,
        bootstrap_resamples=int(boot.get("resamples", 1000)),
        bootstrap_seed=int(boot.get("seed", 0)),
        path=path,
    )


def _canonical(specs: Sequence[Spec], name: str) -> str:
    for spec in specs:
        if name == spec.name or name in spec.aliases:
            return spec.name
    return name


# -- runs -------------------------------------------------------------------------------------


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _config_texts(configs: Sequence[str], root: Path) -> list[tuple[str, str]]:
    """Text of each config and of the YAML files it names (``data: data/x.yaml``), recursively."""
    seen: dict[str, str] = {}

    def visit(path: Path) -> None:
        key = str(path)
        if key in seen or not path.is_file():
            return
        text = path.read_text()
        seen[key] = text
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError:
            return
        stack = [tree]
        while stack:
            node = stack.pop()
            if isinstance(node, Mapping):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, str) and node.endswith((".yaml", ".yml")):
                visit(path.parent / node)

    for config in configs:
        visit(root / config)
    return sorted(seen.items())


@dataclasses.dataclass
class Run:
    """One training run: a spec at one seed."""

    phase: str
    spec: Spec
    seed: int
    configs: tuple[str, ...]
    args: tuple[tuple[str, Any], ...]
    status: str = "planned"
    note: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def run_dir(self, out: Path) -> Path:
        """Where the run's TensorBoard version folder and artifacts are."""
        return out / "runs" / self.name / f"seed{self.seed}"

    def argv(self, out: Path) -> list[str]:
        """``main.py`` arguments: configs, settings, then the sweep's own placement."""
        argv = ["fit"]
        for config in self.configs:
            argv += ["--config", config]
        for key, value in self.args:
            argv += [f"--{key}", _cli_value(value)]
        argv += [
            "--seed_everything", str(self.seed),
            "--trainer.logger.init_args.save_dir", str(out / "runs"),
            "--trainer.logger.init_args.name", self.name,
            "--trainer.logger.init_args.version", f"seed{self.seed}",
            "--artifacts.leaderboard", str(out / "leaderboard.csv"),
        ]  # fmt: skip
        return argv

    def config_hash(self, root: Path) -> str:
        """Hash of what decides the result: settings, seed and the configs' text."""
        payload = {
            "configs": _config_texts(self.configs, root),
            "args": [[k, v] for k, v in self.args],
            "seed": self.seed,
        }
        return hashlib.sha256(
            json.dumps(payload, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]


@dataclasses.dataclass
class RunResult:
    """What a finished run left behind, read from its artifacts."""

    phase: str
    name: str
    seed: int
    status: str
    run_dir: str
    val_f1: float | None = None
    test_f1: float | None = None
    test_acc: float | None = None
    test_bal_acc: float | None = None
    best_ckpt: str | None = None
    model: str | None = None
    params: int | None = None
    latency_ms: float | None = None
    gap_closed: float | None = None
    compression_ratio: float | None = None
    seconds: float | None = None
    note: str = ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_result(run: Run, out: Path) -> RunResult:
    """Read a run's ``metrics.json`` and ``sweep_run.json`` (status ``missing`` when absent)."""
    run_dir = run.run_dir(out)
    record = _read_json(run_dir / RUN_RECORD) or {}
    metrics = _read_json(run_dir / "metrics.json") or {}
    test = metrics.get("test") or {}
    complexity = metrics.get("complexity") or {}
    extras = metrics.get("extras") or {}
    status = record.get("status", "missing")
    if status == "ok" and test.get("test/f1_macro") is None:
        status = "failed"
    return RunResult(
        phase=run.phase,
        name=run.name,
        seed=run.seed,
        status=status,
        run_dir=str(run_dir),
        val_f1=metrics.get("best_val_f1_macro"),
        test_f1=test.get("test/f1_macro"),
        test_acc=test.get("test/acc"),
        test_bal_acc=test.get("test/bal_acc"),
        best_ckpt=metrics.get("best_model_path"),
        model=metrics.get("model"),
        params=complexity.get("params"),
        latency_ms=complexity.get("latency_median_ms"),
        gap_closed=extras.get("gap_closed"),
        compression_ratio=extras.get("compression_ratio"),
        seconds=record.get("seconds"),
        note=record.get("note", ""),
    )


def fit_and_test(argv: Sequence[str]) -> int:
    """``main.py fit <argv>`` then ``test`` on the best checkpoint, in this process.

    The sweep runs this in a subprocess per run, so fit and test share one trainer,
    one run folder and one leaderboard row.

    Args:
        argv: ``main.py`` arguments starting with ``fit``.
    """
    from main import main as cli_main
    from util.errors import debug_requested, report_error

    if list(argv) == sys.argv[1:]:  # Lightning's warning would print both copies into run.log
        del sys.argv[1:]
    try:
        cli = cli_main(list(argv))
        trainer = cli.trainer
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None else ""
        if not best:
            print(
                "util.sweep: no best checkpoint was written; testing the final weights", flush=True
            )
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best" if best else None)
    except Exception as err:  # one masked line in run.log (the traceback with EARSLEEP_DEBUG=1)
        report_error(err, debug_requested())
        return 1
    return 0


_FIT_AND_TEST = (
    "import sys; from util.sweep import fit_and_test; sys.exit(fit_and_test(sys.argv[1:]))"
)


def subprocess_runner(threads: int | None = None) -> Runner:
    """The default runner: :func:`fit_and_test` in a fresh Python, output to the run's log.

    Args:
        threads: ``OMP_NUM_THREADS`` for each run (``None`` leaves the environment as is).
    """

    def run(run: Run, argv: list[str], run_dir: Path, log_path: Path) -> int:
        env = dict(os.environ)
        if threads is not None and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log_path, "w") as log:
            log.write("$ python main.py " + mask_text(" ".join(argv)) + "\n")
            log.flush()
            return subprocess.run(
                [sys.executable, "-c", _FIT_AND_TEST, *argv],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            ).returncode

    return run


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


# -- statistics -------------------------------------------------------------------------------


def macro_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Macro-F1 of ``(..., K, K)`` confusion counts (rows true, columns predicted).

    Like torchmetrics: a class with no true and no predicted sample is left out of
    the average.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    denom = confusion.sum(axis=-1) + confusion.sum(axis=-2)  # 2tp + fp + fn
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.where(present, denom, 1), 0.0)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def bootstrap_macro_f1(
    runs: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean macro-F1 over seeds and its bootstrap interval over test clips.

    Each replicate redraws the test clips with replacement and recomputes every
    seed's macro-F1 on the same draw (paired, when all seeds share the test set),
    then averages over seeds. Drawing clips is drawing multinomial counts over the
    distinct ``(target, pred_1, …, pred_S)`` rows, so it is exact and fast.

    Args:
        runs: per seed ``(targets, predictions)`` integer arrays.
        num_classes: ``K``.
        resamples: bootstrap replicates.
        seed: random seed of the replicates.
        level: interval coverage.

    Returns:
        ``(point, low, high)``.
    """
    rng = np.random.default_rng(seed)
    k = num_classes
    targets = [np.asarray(t, dtype=np.int64) for t, _ in runs]
    preds = [np.asarray(p, dtype=np.int64) for _, p in runs]
    paired = all(t.shape == targets[0].shape and np.array_equal(t, targets[0]) for t in targets)
    groups = (
        [(targets[0], preds)] if paired else [(t, [p]) for t, p in zip(targets, preds, strict=True)]
    )
    point, reps = [], []
    for target, group in groups:
        rows = np.stack([target, *group], axis=1)
        uniq, counts = np.unique(rows, axis=0, return_counts=True)
        n = int(counts.sum())
        draws = rng.multinomial(n, counts / n, size=resamples)  # (B, U)
        for s in range(len(group)):
            cells = np.zeros((len(uniq), k * k))
            cells[np.arange(len(uniq)), uniq[:, 0] * k + uniq[:, 1 + s]] = 1
            point.append(macro_f1_from_confusion((counts @ cells).reshape(k, k)))
            reps.append(macro_f1_from_confusion((draws @ cells).reshape(-1, k, k)))
    mean_reps = np.mean(reps, axis=0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(mean_reps, [tail, 100 - tail])
    return float(np.mean(point)), float(low), float(high)


def _read_predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray, int] | None:
    path = run_dir / "test_predictions.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = [(int(r[1]), int(r[2])) for r in reader]
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    k = sum(1 for h in header if h.startswith("prob_"))
    data = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return data[:, 0], data[:, 1], k


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return float(np.mean(vals)), std


# -- the gate ---------------------------------------------------------------------------------


@dataclasses.dataclass
class GateDecision:
    """Whether the teacher beats the best student by the margin on validation."""

    teacher: str | None
    teacher_val_f1: float | None
    best_student: str | None
    best_student_val_f1: float | None
    margin: float
    passed: bool
    tuned: bool = False
    candidates: dict[str, float | None] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        gap = (
            None
            if self.teacher_val_f1 is None or self.best_student_val_f1 is None
            else self.teacher_val_f1 - self.best_student_val_f1
        )
        verdict = "passed" if self.passed else "NOT met"
        return (
            f"gate {verdict}: teacher {self.teacher} val macro-F1 {f(self.teacher_val_f1)} vs best "
            f"student {self.best_student} {f(self.best_student_val_f1)} (difference {f(gap)}, "
            f"margin {self.margin:g})"
        )


def _mean_val(results: Iterable[RunResult], name: str) -> float | None:
    return _mean_std([r.val_f1 for r in results if r.name == name and r.status == "ok"])[0]


def evaluate_gate(
    results: Sequence[RunResult], teacher: str, students: Sequence[str], margin: float
) -> GateDecision:
    """Compare the teacher's mean validation macro-F1 with the best student's.

    Args:
        results: finished runs (only ``ok`` ones count).
        teacher: the teacher's run name.
        students: the students' run names.
        margin: how much higher the teacher must score.
    """
    scores = {s: _mean_val(results, s) for s in students}
    scored = {s: v for s, v in scores.items() if v is not None}
    best = max(scored, key=scored.get) if scored else None
    t = _mean_val(results, teacher)
    b = scored.get(best) if best else None
    passed = t is not None and (b is None or t - b >= margin)
    return GateDecision(teacher, t, best, b, margin, passed)


# -- the sweep --------------------------------------------------------------------------------


class Sweep:
    """Plan, run, resume and summarise a manifest.

    Args:
        manifest: the parsed manifest.
        out: output folder (``runs/``, ``leaderboard.csv``, summaries).
        resume: skip runs already finished with the same configuration hash.
        jobs: runs trained at once (the first run of each phase runs alone, so a
            shared spectrogram cache is built once).
        runner: how to execute one run (default: a subprocess of :func:`fit_and_test`).
        root: the repository root (configs are relative to it).
        echo: where progress lines go.
    """

    def __init__(
        self,
        manifest: Manifest,
        out: str | os.PathLike[str],
        resume: bool = False,
        jobs: int = 1,
        runner: Runner | None = None,
        root: str | os.PathLike[str] = ROOT,
        echo: Callable[[str], None] = tqdm.write,
    ) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.manifest = manifest
        self.out = Path(out).resolve()
        self.resume = resume
        self.jobs = jobs
        cpus = os.cpu_count() or 1
        self.runner = runner or subprocess_runner(max(1, cpus // jobs) if jobs > 1 else None)
        self.root = Path(root)
        self.echo = echo
        self.results: list[RunResult] = []
        self.gate: GateDecision | None = None

    # -- planning
    def runs_for(
        self, phase: str, specs: Iterable[Spec], extra: Callable[[Spec, int], list] | None = None
    ) -> list[Run]:
        """Every spec at every seed, with its full ordered settings."""
        m = self.manifest
        runs = []
        for spec in specs:
            model = m.models[spec.model]
            for seed in m.seeds:
                args = [*model["args"].items(), *m.common_args.items(), *spec.args]
                runs.append(Run(phase, spec, seed, tuple(model["configs"]), tuple(args)))
                if extra is not None:
                    runs[-1].args += tuple(extra(spec, seed))
        return runs

    def plan_text(self) -> str:
        """The dry-run plan: every run of every phase and the counts."""
        m = self.manifest
        seeds = len(m.seeds)
        lines = [f"sweep {m.name}: seeds {m.seeds}, output {self.out}"]

        def section(title: str, specs: Sequence[Spec], note: str = "") -> None:
            lines.append(
                f"{title}: {len(specs)} runs per seed x {seeds} seeds = {len(specs) * seeds} runs{note}"
            )
            for spec in specs:
                model = m.models[spec.model]
                settings = " ".join(f"{k}={_cli_value(v)}" for k, v in spec.args)
                alias = f" (also {', '.join(spec.aliases)})" if spec.aliases else ""
                base = f" baseline={spec.baseline}" if spec.baseline else ""
                lines.append(
                    f"  {spec.name}{alias}: {' '.join(model['configs'])} {settings}{base}".rstrip()
                )

        section("phase 1", m.phase1)
        lines.append(
            f"gate: teacher {m.teacher} must beat the best of {len(m.students)} students by "
            f">= {m.margin:g} mean validation macro-F1"
        )
        section("teacher tuning", m.tuning, " (only if the gate is not met)")
        section("phase 2", m.phase2, " (teacher: the gate's choice)")
        always = (len(m.phase1) + len(m.phase2)) * seeds
        lines.append(
            f"total: {always} runs ({len(m.phase1) + len(m.phase2)} per seed), "
            f"+{len(m.tuning) * seeds} if the teacher needs tuning"
        )
        return "\n".join(lines)

    # -- running
    def _check_out(self) -> None:
        runs = self.out / "runs"
        if runs.exists() and any(runs.iterdir()) and not self.resume:
            raise SystemExit(
                f"{self.out} already holds sweep runs; pass --resume to continue that sweep "
                "(finished runs are kept) or choose another --out"
            )

    def _done(self, run: Run, digest: str) -> bool:
        record = _read_json(run.run_dir(self.out) / RUN_RECORD) or {}
        if record.get("hash") != digest or record.get("status") != "ok":
            return False
        return read_result(run, self.out).status == "ok"

    def _execute_one(self, run: Run) -> RunResult:
        run_dir = run.run_dir(self.out)
        digest = run.config_hash(self.root)
        if self.resume and self._done(run, digest):
            result = read_result(run, self.out)
            result.note = "resumed"
            return result
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a stale or failed attempt: start clean
        run_dir.mkdir(parents=True)
        argv = run.argv(self.out)
        log_path = run_dir / "run.log"
        started = time.monotonic()
        try:
            code = self.runner(run, argv, run_dir, log_path)
            note = "" if code == 0 else f"exit code {code}: {_last_line(log_path)}"
        except Exception as err:  # a runner failure is one failed run, not a failed sweep
            code, note = -1, f"{type(err).__name__}: {err}"
        record = {
            "phase": run.phase,
            "name": run.name,
            "seed": run.seed,
            "hash": digest,
            "status": "ok" if code == 0 else "failed",
            "returncode": code,
            "seconds": round(time.monotonic() - started, 1),
            "note": note,
            "command": "python main.py " + " ".join(argv),
            "log": str(log_path),
        }
        (run_dir / RUN_RECORD).write_text(json.dumps(mask_tree(record), indent=2) + "\n")
        result = read_result(run, self.out)
        if code == 0 and result.status != "ok":
            result.note = "finished without test metrics (metrics.json has no test/f1_macro)"
        return result

    def execute(self, runs: Sequence[Run], title: str) -> list[RunResult]:
        """Run (or resume, or skip) ``runs``; one line per run, a bar over the phase."""
        results: dict[int, RunResult] = {}
        todo = []
        for i, run in enumerate(runs):
            if run.status == "skipped":
                results[i] = RunResult(
                    run.phase,
                    run.name,
                    run.seed,
                    "skipped",
                    str(run.run_dir(self.out)),
                    note=run.note,
                )
                self.echo(f"[{title}] {run.name} seed {run.seed}: skipped ({run.note})")
            else:
                todo.append(i)
        bar = tqdm(total=len(runs), desc=title, unit="run", initial=len(results), leave=False)

        def one(i: int) -> None:
            result = self._execute_one(runs[i])
            results[i] = result
            bar.update()
            self.echo(f"[{title} {len(results)}/{len(runs)}] {_line(result)}")

        try:
            if todo and self.jobs > 1:
                one(todo[0])  # builds the shared cache alone
                with ThreadPoolExecutor(self.jobs) as pool:
                    list(pool.map(one, todo[1:]))
            else:
                for i in todo:
                    one(i)
        finally:
            bar.close()
        ordered = [results[i] for i in range(len(runs))]
        self.results.extend(ordered)
        return ordered

    def run(self) -> list[dict[str, Any]]:
        """Phase 1, the gate (and tuning), phase 2, then the summary; returns its rows."""
        m = self.manifest
        self._check_out()
        self.out.mkdir(parents=True, exist_ok=True)
        self.echo(self.plan_text())
        phase1 = self.execute(self.runs_for("phase1", m.phase1), PHASE_TITLES["phase1"])
        self.gate = evaluate_gate(phase1, m.teacher, m.students, m.margin)
        self.echo(self.gate.describe())
        teacher = m.teacher if self.gate.passed else None
        pool = list(phase1)
        if not self.gate.passed:
            if m.tuning:
                self.echo(
                    f"tuning the teacher: {len(m.tuning)} configurations x {len(m.seeds)} seeds"
                )
                pool += self.execute(self.runs_for("tuning", m.tuning), PHASE_TITLES["tuning"])
            candidates = {c: _mean_val(pool, c) for c in [m.teacher, *(s.name for s in m.tuning)]}
            scored = {c: v for c, v in candidates.items() if v is not None}
            teacher = max(scored, key=scored.get) if scored else None
            decision = evaluate_gate(pool, teacher or m.teacher, m.students, m.margin)
            decision.tuned, decision.candidates = True, candidates
            self.gate = decision
            self.echo(f"teacher after tuning: {teacher}; {decision.describe()}")
            if teacher is not None and not decision.passed:
                self.echo(
                    "warning: no teacher meets the margin; distilling from the best one anyway"
                )
        (self.out / "gate.json").write_text(
            json.dumps(dataclasses.asdict(self.gate), indent=2) + "\n"
        )
        self.execute(self._phase2_runs(pool, teacher), PHASE_TITLES["phase2"])
        return self.summarize()

    def _phase2_runs(self, pool: Sequence[RunResult], teacher: str | None) -> list[Run]:
        by = {(r.name, r.seed): r for r in pool}

        def extra(spec: Spec, seed: int) -> list[tuple[str, Any]]:
            args: list[tuple[str, Any]] = []
            t = by.get((teacher, seed))
            if t is not None and t.status == "ok" and t.best_ckpt:
                args.append(("model.init_args.teacher_checkpoint", t.best_ckpt))
                if t.val_f1 is not None:
                    args.append(("model.init_args.teacher_f1", t.val_f1))
            b = by.get((spec.baseline, seed))
            if b is not None and b.status == "ok" and b.val_f1 is not None:
                args.append(("model.init_args.baseline_f1", b.val_f1))
            return args

        runs = self.runs_for("phase2", self.manifest.phase2, extra)
        for run in runs:
            if not any(k == "model.init_args.teacher_checkpoint" for k, _ in run.args):
                run.status, run.note = "skipped", f"no trained teacher for seed {run.seed}"
        return runs

    # -- summary
    def summarize(self) -> list[dict[str, Any]]:
        """Aggregate seeds per configuration; write runs.csv, summary.csv and summary.md."""
        m = self.manifest
        _write_csv(self.out / "runs.csv", [dataclasses.asdict(r) for r in self.results])
        rows = []
        order = list(dict.fromkeys((r.phase, r.name) for r in self.results))
        for phase, name in order:
            group = [r for r in self.results if (r.phase, r.name) == (phase, name)]
            ok = [r for r in group if r.status == "ok"]
            preds = [p for r in ok if (p := _read_predictions(Path(r.run_dir))) is not None]
            ci = (None, None, None)
            if preds:
                k = (
                    max(p[2] for p in preds)
                    or int(max(max(p[0].max(), p[1].max()) for p in preds)) + 1
                )
                ci = bootstrap_macro_f1(
                    [(t, p) for t, p, _ in preds], k, m.bootstrap_resamples, m.bootstrap_seed
                )
            row: dict[str, Any] = {"phase": phase, "config": name}
            row["model"] = next((r.model for r in ok if r.model), None)
            row["seeds_ok"] = f"{len(ok)}/{len(group)}"
            for key, attr in (
                ("val_f1", "val_f1"),
                ("test_f1", "test_f1"),
                ("test_acc", "test_acc"),
                ("test_bal_acc", "test_bal_acc"),
                ("gap_closed", "gap_closed"),
            ):
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([getattr(r, attr) for r in ok])
            row["test_f1_ci_low"], row["test_f1_ci_high"] = ci[1], ci[2]
            row["params"] = next((r.params for r in ok if r.params), None)
            row["latency_ms"] = _mean_std([r.latency_ms for r in ok])[0]
            row["compression_ratio"] = _mean_std([r.compression_ratio for r in ok])[0]
            row["chosen"] = ""
            rows.append(row)
        self._mark_best(rows)
        columns = list(rows[0]) if rows else ["phase", "config"]
        _write_csv(self.out / "summary.csv", rows, columns)
        text = _markdown(rows, self.gate)
        (self.out / "summary.md").write_text(mask_text(text))
        self.echo("\n" + text)
        return rows

    def _mark_best(self, rows: list[dict[str, Any]]) -> None:
        """Mark, on validation macro-F1 only, the best student, teacher and distilled config."""
        m = self.manifest

        def best(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
            scored = [r for r in candidates if r["val_f1_mean"] is not None]
            return max(scored, key=lambda r: r["val_f1_mean"]) if scored else None

        students = [r for r in rows if r["phase"] == "phase1" and r["config"] in m.students]
        marks = [
            (best(students), "best baseline student"),
            (best([r for r in rows if r["phase"] == "phase2"]), "best distilled"),
            (best(students + [r for r in rows if r["phase"] == "phase2"]), "best overall"),
        ]
        if self.gate is not None and self.gate.teacher:
            teacher_rows = [
                r for r in rows if r["config"] == self.gate.teacher and r["phase"] != "phase2"
            ]
            marks.append((teacher_rows[0] if teacher_rows else None, "teacher"))
        for row, label in marks:
            if row is not None:
                row["chosen"] = ", ".join(filter(None, [row["chosen"], label]))


def _line(r: RunResult) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    took = f" in {r.seconds:.0f} s" if r.seconds is not None else ""
    if r.status == "ok":
        resumed = " (resumed)" if r.note == "resumed" else ""
        return f"{r.name} seed {r.seed}: ok{took}{resumed}, val F1 {f(r.val_f1)}, test F1 {f(r.test_f1)}"
    return f"{r.name} seed {r.seed}: {r.status.upper()}{took}: {r.note} (log: {r.run_dir}/run.log)"


def _write_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    columns = list(columns or (rows[0].keys() if rows else []))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(
            {k: "" if v is None else mask_tree(v) for k, v in row.items()} for row in rows
        )
    os.replace(tmp, path)


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _markdown(rows: Sequence[Mapping[str, Any]], gate: GateDecision | None) -> str:
    head = (
        "| phase | config | model | seeds | val macro-F1 | test macro-F1 | test 95% CI | "
        "test acc | test bal. acc | params | gap closed | chosen (on val) |"
    )
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        ci = (
            f"[{r['test_f1_ci_low']:.4f}, {r['test_f1_ci_high']:.4f}]"
            if r["test_f1_ci_low"] is not None
            else "n/a"
        )
        cells = [
            PHASE_TITLES.get(r["phase"], r["phase"]),
            r["config"],
            r["model"] or "",
            r["seeds_ok"],
            _pm(r["val_f1_mean"], r["val_f1_std"]),
            _pm(r["test_f1_mean"], r["test_f1_std"]),
            ci,
            _pm(r["test_acc_mean"], r["test_acc_std"]),
            _pm(r["test_bal_acc_mean"], r["test_bal_acc_std"]),
            "" if r["params"] is None else f"{int(r['params']):,}",
            ""
            if r["gap_closed_mean"] is None
            else _pm(r["gap_closed_mean"], r["gap_closed_std"], 2),
            r["chosen"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if gate is not None:
        text += f"\n{gate.describe()}" + (" (after teacher tuning)" if gate.tuned else "") + "\n"
    return text


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m util.sweep``: see the module docstring.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m util.sweep",
        description="Baselines, a teacher gate, then a KD grid, over seeds; see util/sweep.py.",
    )
    parser.add_argument(
        "--manifest", required=True, help="sweep manifest YAML (config/sweep/*.yaml)"
    )
    parser.add_argument("--out", help="output folder (default log/sweeps/<manifest name>)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and run counts, run nothing"
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip runs already finished with the same config"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
    except (ManifestError, OSError, yaml.YAMLError) as err:
        parser.error(str(err))
    out = Path(args.out) if args.out else ROOT / "log" / "sweeps" / manifest.name
    sweep = Sweep(
        manifest,
        out,
        resume=args.resume,
        jobs=args.jobs,
        echo=print if args.dry_run else tqdm.write,
    )
    if args.dry_run:
        print(sweep.plan_text())
        return 0
    try:
        rows = sweep.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume (finished runs in {out} are kept)")
        return 130
    failed = sum(1 for r in sweep.results if r.status == "failed")
    print(f"\nwrote {out}/summary.md, summary.csv, runs.csv; {failed} failed run(s)")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

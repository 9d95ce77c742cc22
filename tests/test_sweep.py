"""The sweep runner: plans, the teacher gate, collapsed runs, provenance and resume, failures,
statistics, and one real sweep."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import yaml
from torchmetrics.functional.classification import multiclass_f1_score

from main import main
from tests.helpers import tiny_args
from util.callbacks.provenance import data_fingerprint_hash
from util.cpu import THREADS_ENV
from util.sweep import (
    ROOT,
    ManifestError,
    Run,
    Sweep,
    SweepError,
    bootstrap_macro_f1,
    data_fingerprint_now,
    load_manifest,
)
from util.sweep import main as sweep_main
from util.sweep.plot import plot_summary, summary_figure
from util.sweep.run import (
    as_fresh_process,
    changed_settings,
    flat_settings,
    resolve_config,
    settings_digest,
)
from util.sweep.stats import bootstrap_replicates
from util.sweep.tune import RaySettings, RayTuneExecutor, Trial, TrialOutcome, thread_env

CLASSES = ["quiet", "breathe", "snore"]


# -- plans ----------------------------------------------------------------------------------


def test_reference_manifest_plans_12_baselines_and_27_distillations_per_seed(capsys) -> None:
    m = load_manifest(ROOT / "config/sweep/reference.yaml")
    names = [s.name for s in m.phase1]
    assert len(names) == 12
    grid = {f"tinycnn_cbam_r{r}_k{k}" for r in (4, 8, 16) for k in (3, 7, 11)}
    assert grid - set(names) == {"tinycnn_cbam_r8_k3"}  # the default run is that grid point
    (cbam,) = [s for s in m.phase1 if s.name == "tinycnn_cbam"]
    assert cbam.aliases == ("tinycnn_cbam_r8_k3",)
    assert {"tinycnn", "crnn", "bcresnet"} <= set(names)
    assert m.teacher == "crnn" and "crnn" not in m.students and len(m.students) == 11
    assert len(m.phase2) == 27
    assert {s.baseline for s in m.phase2} == {"tinycnn", "tinycnn_cbam", "bcresnet"}
    assert len(m.tuning) > 0
    assert m.margin == 0.03 and m.on_fail == "stop"  # the published protocol; the gate gates

    assert (
        sweep_main(["--manifest", str(ROOT / "config/sweep/reference.yaml"), "--dry_run", "true"])
        == 0
    )
    text = capsys.readouterr().out
    seeds = len(m.seeds)
    assert f"phase 1: 12 runs per seed x {seeds} seeds = {12 * seeds} runs" in text
    assert f"phase 2: 27 runs per seed x {seeds} seeds = {27 * seeds} runs" in text
    assert f"total: {39 * seeds} runs (39 per seed)" in text


def test_demo_manifest_runs_three_seeds_of_the_whole_flow() -> None:
    m = load_manifest(ROOT / "config/sweep/demo.yaml")
    assert len(m.seeds) >= 3  # the project's own minimum for a mean with a CI
    assert m.phase1 and m.tuning and m.phase2 and m.teacher == "crnn"
    assert sum(s.model == "tinycnn_cbam" for s in m.phase1) >= 2  # a CBAM grid subset
    kd = [dict(s.args) for s in m.phase2 if s.baseline == "tinycnn"]
    alphas = {a["model.init_args.alpha"] for a in kd}
    temperatures = {a["model.init_args.temperature"] for a in kd}
    assert len(alphas) >= 2 and len(temperatures) >= 2  # an alpha x T heatmap
    assert m.margin == 0.03 and m.on_fail == "distil"  # the demo shows phase 2, and says why
    for model in m.models.values():
        assert "config/sweep/demo_data.yaml" in model["configs"]


def test_manifest_errors_say_where(tmp_path: Path) -> None:
    def manifest(**changes: Any) -> Path:
        raw = _manifest_dict(tmp_path)
        raw.update(changes)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    with pytest.raises(ManifestError, match="model 'nope' is not under 'models:'"):
        load_manifest(manifest(phase1=[{"name": "x", "model": "nope"}]))
    with pytest.raises(ManifestError, match="gate.teacher 'ghost'"):
        load_manifest(manifest(gate={"teacher": "ghost"}))
    gate = _manifest_dict(tmp_path)["gate"]
    with pytest.raises(ManifestError, match=r"gate.on_fail must be one of \['stop', 'distil'\]"):
        load_manifest(manifest(gate={**gate, "on_fail": "always"}))
    with pytest.raises(ManifestError, match=r"gate: unknown keys \['onfail'\]"):
        load_manifest(manifest(gate={**gate, "onfail": "distil"}))
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(manifest(models={"m": {"configs": ["config/none.yaml"]}}))
    with pytest.raises(ManifestError, match="name template"):
        load_manifest(
            manifest(
                phase1=[
                    {"name": "x{missing}", "model": "student"},
                    {"name": "teacher", "model": "teacher"},
                ]
            )
        )


def test_cli_help_lists_every_option_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        sweep_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--manifest",
        "--out",
        "--dry_run {true,false}",
        "--resume",
        "--distil_anyway {true,false}",
        "--ray_address",
        "--cpus_per_trial",
        "--gpus_per_trial",
        "--max_concurrent_trials",
        "--retries",
        "--debug",
    ):
        assert option in text
    assert "default: False" in text and "default: 0.0" in text


def test_cli_errors_are_one_line_and_debug_adds_the_traceback(tmp_path: Path, capsys) -> None:
    def error(*argv: str, code: int) -> str:
        assert sweep_main(list(argv)) == code
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    reference = str(ROOT / "config/sweep/reference.yaml")
    assert "--dry-run" in error("--manifest", reference, "--dry-run", code=2)
    assert "cpus_per_trial" in error("--manifest", reference, "--cpus_per_trial", "0", code=2)
    assert "missing.yaml" in error("--manifest", str(tmp_path / "missing.yaml"), code=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_manifest_dict(tmp_path), "phase2": [{"name": "x"}]}))
    assert "phase2[0]: a run spec needs 'name' and 'model'" in error("--manifest", str(bad), code=2)
    assert sweep_main(["--manifest", str(bad), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_manifest_dict(tmp_path)))
    (tmp_path / "out" / "runs" / "old").mkdir(parents=True)
    line = error("--manifest", str(good), "--out", str(tmp_path / "out"), code=1)
    assert "--resume true" in line


# -- a fake runner: results without training ---------------------------------------------------


class InlineExecutor:
    """Runs the trials here, one after the other (the gate and resume logic without Ray).

    ``experiments`` records ``(name, trial keys, restore)`` of every phase.
    """

    def __init__(self) -> None:
        self.experiments: list[tuple[str, list[str], bool]] = []

    def threads_per_run(self) -> None:
        return None

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def run(self, experiment: str, trials: list[Trial], done: Any, restore: bool) -> str:
        self.experiments.append((experiment, [t.key for t in trials], restore))
        for trial in trials:
            ok, note = trial.execute()
            done(TrialOutcome(trial.key, ok, note))
        return f"inline {experiment}"


def _manifest_dict(tmp_path: Path, seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    config = tmp_path / "student.yaml"
    if not config.exists():
        config.write_text("model: {class_path: models.classifier.Classifier}\n")
    teacher = tmp_path / "teacher.yaml"
    if not teacher.exists():
        teacher.write_text("model: {class_path: models.classifier.Classifier}\n")
    grid = {"alpha": {"key": "model.init_args.alpha", "values": [0.3, 0.9]}}
    return {
        "name": "fake",
        "seeds": list(seeds),
        "bootstrap": {"resamples": 200},
        "models": {
            "student": {"configs": [str(config)]},
            "teacher": {"configs": [str(teacher)]},
            "kd": {
                "configs": [str(config)],
                "args": {"model": "models.distillation.DistillationClassifier"},
            },
        },
        "phase1": [
            {"name": "student", "model": "student"},
            {"name": "teacher", "model": "teacher"},
            {
                "name": "student_w{width}",
                "model": "student",
                "grid": {
                    "width": {"key": "model.init_args.backbone.init_args.width", "values": [8, 16]}
                },
            },
        ],
        "gate": {
            "teacher": "teacher",
            "margin": 0.05,
            "tuning": [
                {
                    "name": "teacher_h{hidden}",
                    "model": "teacher",
                    "grid": {
                        "hidden": {
                            "key": "model.init_args.backbone.init_args.rnn_hidden",
                            "values": [96, 128],
                        }
                    },
                }
            ],
        },
        "phase2": [{"name": "kd_a{alpha}", "model": "kd", "baseline": "student", "grid": grid}],
    }


class FakeRunner:
    """Writes the artifacts a real run would, with scores from a table.

    ``scores[name] = (val_f1, test_f1)``; seed ``s`` adds ``0.001·s`` to both. Test
    predictions are made to have roughly that test macro-F1. Runs named in ``collapsed``
    (``name`` or ``(name, seed)``) record a collapsed test split, as ``metrics.json``'s
    ``collapse`` does; every run records ``data`` as its ``data_fingerprint.json`` and
    ``git`` as its ``git.json`` (what :class:`~util.callbacks.Provenance` writes).
    """

    def __init__(
        self,
        scores: dict[str, tuple[float, float]],
        fail: set[tuple[str, int]] = frozenset(),
        collapsed: set[Any] = frozenset(),
    ) -> None:
        self.scores = scores
        self.fail = set(fail)
        self.collapsed = set(collapsed)
        self.data: dict[str, Any] = {"train": {"cache_key": "k-train", "rows": 1200}}
        self.git: dict[str, Any] = {"commit": "a" * 40, "branch": "main", "dirty": False}
        self.calls: list[tuple[str, int, list[str]]] = []

    def data_probe(self, argv: list[str]) -> str | None:
        """What the data looks like now (the sweep's probe, without main.py)."""
        return data_fingerprint_hash(self.data)

    def code_probe(self) -> dict[str, Any]:
        return dict(self.git)

    def config_probe(self, argv: list[str]) -> dict[str, Any]:
        """What the run resolves to (the sweep's probe, without main.py): the values of its
        config files, then its settings."""
        config: dict[str, Any] = {"files": []}
        for flag, value in zip(argv[1::2], argv[2::2], strict=True):
            if flag == "--config":
                config["files"].append(yaml.safe_load(Path(value).read_text()))
            else:
                config[flag[2:]] = value
        return config

    def __call__(self, run: Run, argv: list[str], run_dir: Path, log_path: Path) -> int:
        self.calls.append((run.name, run.seed, argv))
        log_path.write_text("training...\n")
        if (run.name, run.seed) in self.fail:
            log_path.write_text("training...\nRuntimeError: boom\n")
            return 1
        val, test = (v + 0.001 * run.seed for v in self.scores.get(run.name, (0.5, 0.5)))
        ckpt = run_dir / "checkpoints" / "best.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_text("fake")
        rng = np.random.default_rng(run.seed)
        target = np.arange(300) % 3
        pred = np.where(rng.random(300) < test, target, (target + 1) % 3)
        with open(run_dir / "test_predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "clip_id", "target", "pred", *(f"prob_{c}" for c in CLASSES)])
            w.writerows(
                [i, f"test/c{i}.wav", t, p, 0.3, 0.3, 0.4]
                for i, (t, p) in enumerate(zip(target, pred, strict=True))
            )
        extras = {}
        if run.name.startswith("kd"):  # as DistillationClassifier.run_summary reports it
            args = _args(argv)
            base, teacher = (
                float(args[k]) if k in args else None
                for k in ("model.init_args.baseline_f1", "model.init_args.teacher_f1")
            )
            gap, reason = None, "no baseline_f1 given"
            if base is not None and teacher is not None and teacher > base:
                gap, reason = (val - base) / (teacher - base), None
            extras = {"gap_closed": gap, "gap_closed_reason": reason, "compression_ratio": 3.0}
        down = run.name in self.collapsed or (run.name, run.seed) in self.collapsed
        share = (
            {"quiet": 0.0, "breathe": 0.0, "snore": 1.0} if down else dict.fromkeys(CLASSES, 1 / 3)
        )
        collapse = {
            "collapsed": down,
            "never_predicted": ["quiet", "breathe"] if down else [],
            "pred_share": share,
            "majority_f1_macro": 0.2,
        }
        metrics = {
            "model": "TinyCNN",
            "best_val_f1_macro": val,
            "best_model_path": str(ckpt),
            "test": {"test/f1_macro": test, "test/acc": test, "test/bal_acc": test},
            "complexity": {"params": 1000, "latency_median_ms": 1.0},
            "collapse": {"val": {**collapse, "collapsed": False}, "test": collapse},
            "extras": extras,
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / "data_fingerprint.json").write_text(json.dumps(self.data))
        (run_dir / "git.json").write_text(json.dumps(self.git))
        return 0


def _write_two_run_manifest(tmp_path: Path, raw: dict[str, Any]) -> Path:
    """``raw`` cut to a student and a teacher run (no phase 2), written as ``manifest.yaml``."""
    raw.update(
        phase1=[{"name": "student", "model": "student"}, {"name": "teacher", "model": "teacher"}],
        gate={"teacher": "teacher", "margin": 0.05},
        phase2=[],
    )
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep(
    tmp_path: Path,
    runner: FakeRunner,
    resume: bool = False,
    distil_anyway: bool = False,
    echo: Any = None,
    executor: Any = None,
    **changes: Any,
) -> Sweep:
    raw = _manifest_dict(tmp_path)
    raw.update(changes)
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Sweep(
        load_manifest(path),
        tmp_path / "out",
        resume=resume,
        executor=executor or InlineExecutor(),
        runner=runner,
        echo=echo or (lambda s: None),
        distil_anyway=distil_anyway,
        data_probe=runner.data_probe,
        code_probe=runner.code_probe,
        config_probe=runner.config_probe,
    )


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _args(argv: list[str]) -> dict[str, str]:
    return {argv[i][2:]: argv[i + 1] for i in range(len(argv)) if argv[i].startswith("--")}


STUDENTS_WEAK = {"student": (0.70, 0.69), "student_w8": (0.72, 0.74), "student_w16": (0.71, 0.70)}


def test_gate_met_distils_from_the_teacher_without_tuning(tmp_path: Path) -> None:
    runner = FakeRunner({**STUDENTS_WEAK, "teacher": (0.85, 0.84)})
    sweep = _sweep(tmp_path, runner)
    sweep.run()
    names = [name for name, _, _ in runner.calls]
    assert not any(n.startswith("teacher_h") for n in names)
    assert sweep.gate.passed and sweep.gate.teacher == "teacher" and not sweep.gate.tuned
    assert sweep.gate.best_student == "student_w8"
    kd = [(seed, _args(argv)) for name, seed, argv in runner.calls if name.startswith("kd")]
    assert len(kd) == 4
    for seed, args in kd:
        assert args["model.init_args.teacher_checkpoint"] == str(
            tmp_path / "out" / "runs" / "teacher" / f"seed{seed}" / "checkpoints" / "best.ckpt"
        )
        assert float(args["model.init_args.baseline_f1"]) == pytest.approx(0.70 + 0.001 * seed)
        assert float(args["model.init_args.teacher_f1"]) == pytest.approx(0.85 + 0.001 * seed)
        assert args["seed_everything"] == str(seed)
        assert args["trainer.logger.init_args.version"] == f"seed{seed}"
    gate = json.loads((tmp_path / "out" / "gate.json").read_text())
    assert gate["passed"] is True


def test_gate_not_met_tunes_the_teacher_and_uses_the_best_tuned_one(tmp_path: Path) -> None:
    scores = {
        **STUDENTS_WEAK,
        "teacher": (0.74, 0.80),
        "teacher_h96": (0.76, 0.90),
        "teacher_h128": (0.80, 0.79),
    }
    runner = FakeRunner(scores)
    sweep = _sweep(tmp_path, runner)
    sweep.run()
    names = [name for name, _, _ in runner.calls]
    # tuning runs train after phase 1 and before any distillation
    assert names.index("teacher_h96") > names.index("student_w16")
    assert max(names.index(n) for n in ("teacher_h96", "teacher_h128")) < names.index("kd_a0.3")
    assert sweep.gate.tuned and sweep.gate.teacher == "teacher_h128"  # best on validation
    assert sweep.gate.passed  # 0.80 - 0.72 >= 0.05
    for name, seed, argv in runner.calls:
        if name.startswith("kd"):
            assert (
                f"/runs/teacher_h128/seed{seed}/"
                in _args(argv)["model.init_args.teacher_checkpoint"]
            )
    rows = {r["config"]: r for r in _csv_rows(tmp_path / "out" / "summary.csv")}
    assert "teacher" in rows["teacher_h128"]["chosen"]


#: The teacher stays below the margin (0.05 above the best student, 0.721) after tuning.
TEACHERS_WEAK = {"teacher": (0.73, 0.8), "teacher_h96": (0.74, 0.8), "teacher_h128": (0.70, 0.8)}


def test_gate_still_not_met_after_tuning_stops_before_phase_2_and_says_why(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    runner = FakeRunner({**STUDENTS_WEAK, **TEACHERS_WEAK})
    sweep = _sweep(tmp_path, runner, echo=lines.append)
    rows = sweep.run()
    assert sweep.gate.tuned and not sweep.gate.passed and sweep.gate.teacher == "teacher_h96"
    names = {name for name, _, _ in runner.calls}
    assert "teacher_h96" in names and not any(n.startswith("kd") for n in names)
    assert sweep.gate.phase2 == "does not run"
    assert "--distil_anyway true" in sweep.gate.phase2_reason
    assert any(
        line.startswith("phase 2 does not run: no teacher meets the margin") for line in lines
    )
    # the phase-2 runs are listed as skipped, with the reason; the summary has no rows for them
    runs = {(r["name"], r["seed"]): r for r in _csv_rows(tmp_path / "out" / "runs.csv")}
    assert runs[("kd_a0.3", "0")]["status"] == "skipped"
    assert "the gate is not met" in runs[("kd_a0.3", "0")]["note"]
    assert not [r for r in rows if r["phase"] == "phase2"]
    chosen = {r["config"]: r["chosen"] for r in rows}
    assert chosen["teacher_h96"] == "best teacher (gate not met)"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "phase 2 does not run: no teacher meets the margin of 0.05 after teacher tuning" in md
    assert json.loads((tmp_path / "out" / "gate.json").read_text())["phase2"] == "does not run"


@pytest.mark.parametrize("asked_by", ["manifest", "command line"])
def test_gate_not_met_distils_only_when_asked_explicitly(tmp_path: Path, asked_by: str) -> None:
    runner = FakeRunner({**STUDENTS_WEAK, **TEACHERS_WEAK})
    if asked_by == "manifest":
        gate = {**_manifest_dict(tmp_path)["gate"], "on_fail": "distil"}
        sweep = _sweep(tmp_path, runner, gate=gate)
        source = "the manifest's gate.on_fail: distil"
    else:
        sweep = _sweep(tmp_path, runner, distil_anyway=True)
        source = "--distil_anyway true"
    rows = sweep.run()
    assert not sweep.gate.passed and sweep.gate.phase2 == "runs"
    kd = [(seed, _args(argv)) for name, seed, argv in runner.calls if name.startswith("kd")]
    assert len(kd) == 4
    for seed, args in kd:
        assert f"/runs/teacher_h96/seed{seed}/" in args["model.init_args.teacher_checkpoint"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert (
        "phase 2 runs: no teacher meets the margin after teacher tuning; distilling from the "
        f"best one, teacher_h96, anyway because {source} says so"
    ) in md
    assert any("best distilled" in r["chosen"] for r in rows)


def test_cli_distil_anyway_reaches_the_sweep(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(_manifest_dict(tmp_path)))
    args = ["--manifest", str(path), "--dry_run", "true"]
    assert sweep_main(args) == 0
    assert "phase 2 does not run (gate.on_fail: stop" in capsys.readouterr().out
    assert sweep_main([*args, "--distil_anyway", "true"]) == 0
    assert "phase 2 runs anyway (--distil_anyway true)" in capsys.readouterr().out


def test_gap_closed_is_absent_with_its_reason_when_the_teacher_is_below_the_baseline(
    tmp_path: Path,
) -> None:
    # the case: baseline 0.396, teacher 0.332, student 0.316 (gap "1.25" before)
    scores = {
        "student": (0.396, 0.4),
        "student_w8": (0.30, 0.3),
        "student_w16": (0.30, 0.3),
        "teacher": (0.332, 0.3),
        "teacher_h96": (0.30, 0.3),
        "teacher_h128": (0.30, 0.3),
        "kd_a0.3": (0.316, 0.3),
        "kd_a0.9": (0.316, 0.3),
    }
    sweep = _sweep(tmp_path, FakeRunner(scores), distil_anyway=True)
    rows = {r["config"]: r for r in sweep.run()}
    # the teacher of each seed is 0.064 below its baseline: no gap to close
    assert rows["kd_a0.3"]["gap_closed"] is None
    assert rows["kd_a0.3"]["gap_closed_reason"] == "teacher 0.333 is not above the baseline 0.397"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "gap closed not reported for kd_a0.3, kd_a0.9: teacher 0.333 is not above" in md
    # above the baseline, it is the share of the teacher's lead the student recovered
    scores.update({"teacher": (0.50, 0.5), "kd_a0.3": (0.448, 0.4)})
    (tmp_path / "again").mkdir()
    sweep = _sweep(tmp_path / "again", FakeRunner(scores), distil_anyway=True)
    rows = {r["config"]: r for r in sweep.run()}
    assert rows["kd_a0.3"]["gap_closed"] == pytest.approx((0.4485 - 0.3965) / (0.5005 - 0.3965))
    assert rows["kd_a0.3"]["gap_closed_reason"] is None


# -- collapsed runs ---------------------------------------------------------------------------


def test_collapsed_runs_are_flagged_counted_and_never_chosen(tmp_path: Path) -> None:
    # student_w8 has the best validation score but collapsed on one seed; the teacher
    # collapsed: tuning runs and the best tuned teacher that did not collapse is chosen
    scores = {
        **STUDENTS_WEAK,
        "teacher": (0.95, 0.9),
        "teacher_h96": (0.90, 0.9),
        "teacher_h128": (0.85, 0.8),
    }
    runner = FakeRunner(scores, collapsed={("student_w8", 1), "teacher", "teacher_h96"})
    sweep = _sweep(tmp_path, runner)
    rows = {r["config"]: r for r in sweep.run()}
    assert sweep.gate.teacher == "teacher_h128" and sweep.gate.passed
    assert sweep.gate.candidates["teacher"] is None and sweep.gate.candidates["teacher_h96"] is None
    assert sweep.gate.excluded["teacher"] == "collapsed in 2 of 2 seeds"
    # the best student is student_w16 (0.71): student_w8 (0.72) collapsed on seed 1
    assert sweep.gate.best_student == "student_w16"
    assert sweep.gate.excluded["student_w8"] == "collapsed in 1 of 2 seeds"
    assert "best baseline student" in rows["student_w16"]["chosen"]
    assert rows["student_w8"]["chosen"] == "" and rows["teacher"]["chosen"] == ""
    assert rows["teacher_h128"]["chosen"] == "teacher"
    assert (rows["student_w8"]["collapsed_runs"], rows["teacher"]["collapsed_runs"]) == (1, 2)
    assert rows["student"]["collapsed_runs"] == 0
    runs = {(r["name"], r["seed"]): r for r in _csv_rows(tmp_path / "out" / "runs.csv")}
    assert runs[("student_w8", "1")]["collapsed"] == "True"
    assert runs[("student_w8", "1")]["never_predicted"] == "quiet,breathe"
    assert runs[("student_w8", "0")]["collapsed"] == "False"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| phase 1 | student_w8 | TinyCNN | 2/2 | **1/2** |" in md
    assert "collapsed runs: 5 of 16 finished" in md and "student_w8 seed 1" in md


def test_a_collapsed_baseline_is_never_a_baseline(tmp_path: Path) -> None:
    scores = {**STUDENTS_WEAK, "teacher": (0.9, 0.9)}
    runner = FakeRunner(scores, collapsed={("student", 0)})
    sweep = _sweep(tmp_path, runner)
    rows = {r["config"]: r for r in sweep.run()}
    kd = {seed: _args(argv) for name, seed, argv in runner.calls if name == "kd_a0.3"}
    assert "model.init_args.baseline_f1" not in kd[0]  # seed 0's baseline collapsed
    assert float(kd[1]["model.init_args.baseline_f1"]) == pytest.approx(0.701)
    runs = {(r["name"], r["seed"]): r for r in _csv_rows(tmp_path / "out" / "runs.csv")}
    assert runs[("kd_a0.3", "0")]["gap_closed_reason"] == "baseline student seed 0 collapsed"
    assert rows["kd_a0.3"]["gap_closed"] is None
    assert rows["kd_a0.3"]["gap_closed_reason"] == "the baseline student collapsed in 1 of 2 seeds"


def test_resume_refuses_runs_whose_data_fingerprint_or_code_version_changed(
    tmp_path: Path,
) -> None:
    scores = {**STUDENTS_WEAK, "teacher": (0.9, 0.9)}
    first = FakeRunner(scores)
    _sweep(tmp_path, first).run()
    recorded = {r["data_fingerprint"] for r in _csv_rows(tmp_path / "out" / "runs.csv")}
    assert recorded == {data_fingerprint_hash(first.data)}

    # same config and seeds, other data (a rebuilt cache, a changed archive): nothing reused
    lines: list[str] = []
    changed = FakeRunner(scores)
    changed.data = {"train": {"cache_key": "k-train-v2", "rows": 1200}}
    _sweep(tmp_path, changed, resume=True, echo=lines.append).run()
    assert len(changed.calls) == 12
    old, new = data_fingerprint_hash(first.data), data_fingerprint_hash(changed.data)
    rerun = [line for line in lines if "re-running" in line]
    assert len(rerun) == 12  # one line per run, saying what differed
    assert f"[phase 1] re-running student seed 0: data fingerprint {old} -> {new}" in rerun
    rows = _csv_rows(tmp_path / "out" / "runs.csv")
    assert {r["data_fingerprint"] for r in rows} == {new}

    # another commit, or the same one with local changes: nothing reused either
    code = FakeRunner(scores)
    code.data, code.git = changed.data, {**changed.git, "dirty": True}
    lines.clear()
    _sweep(tmp_path, code, resume=True, echo=lines.append).run()
    assert len(code.calls) == 12
    assert f"code version {'a' * 12} -> {'a' * 12}+dirty" in lines[1]
    summary = {r["config"]: r for r in _csv_rows(tmp_path / "out" / "summary.csv")}
    assert summary["student"]["code_version"] == "a" * 12 + "+dirty"
    assert summary["student"]["data_fingerprint"] == new

    # all four match: everything is reused, nothing re-run
    same = FakeRunner(scores)
    same.data, same.git = code.data, code.git
    lines.clear()
    _sweep(tmp_path, same, resume=True, echo=lines.append).run()
    assert same.calls == [] and not [line for line in lines if "re-running" in line]


def test_resume_skips_finished_runs_and_retrains_changed_ones(tmp_path: Path) -> None:
    scores = {**STUDENTS_WEAK, "teacher": (0.9, 0.9)}
    first = FakeRunner(scores)
    _sweep(tmp_path, first).run()
    assert len(first.calls) == 2 * (4 + 2)  # 4 phase-1 + 2 phase-2 configs, 2 seeds

    with pytest.raises(SweepError, match="--resume true"):
        _sweep(tmp_path, FakeRunner(scores)).run()

    again = FakeRunner(scores)
    rows = _sweep(tmp_path, again, resume=True).run()
    assert again.calls == []
    assert len(rows) == 6

    # a comment or another layout is no change
    (tmp_path / "teacher.yaml").write_text(
        "# v2\nmodel:\n    class_path: models.classifier.Classifier  # the plain task\n"
    )
    cosmetic = FakeRunner(scores)
    _sweep(tmp_path, cosmetic, resume=True).run()
    assert cosmetic.calls == []

    # a changed teacher config retrains the teacher, and the KD runs whose teacher changed
    (tmp_path / "teacher.yaml").write_text(
        "model: {class_path: models.classifier.Classifier}\ntrainer: {max_epochs: 7}\n"
    )
    changed = FakeRunner({**scores, "teacher": (0.91, 0.9)})
    _sweep(tmp_path, changed, resume=True).run()
    assert {name for name, _, _ in changed.calls} == {"teacher", "kd_a0.3", "kd_a0.9"}


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    runner = FakeRunner(
        {**STUDENTS_WEAK, "teacher": (0.9, 0.9)}, fail={("teacher", 1), ("student_w8", 0)}
    )
    sweep = _sweep(tmp_path, runner)
    rows = sweep.run()
    status = {(r.name, r.seed): r for r in sweep.results}
    assert status[("teacher", 1)].status == "failed"
    assert "RuntimeError: boom" in status[("teacher", 1)].note
    assert status[("student_w8", 1)].status == "ok"
    # seed 1 has no teacher: its distillation runs are skipped, seed 0's ran
    assert status[("kd_a0.3", 1)].status == "skipped" and status[("kd_a0.3", 0)].status == "ok"
    summary = {r["config"]: r for r in rows}
    assert summary["teacher"]["seeds_ok"] == "1/2"
    record = json.loads((tmp_path / "out/runs/teacher/seed1/sweep_run.json").read_text())
    assert record["status"] == "failed" and record["returncode"] == 1
    # resume retrains exactly the failed and skipped runs
    retry = FakeRunner({**STUDENTS_WEAK, "teacher": (0.9, 0.9)})
    _sweep(tmp_path, retry, resume=True).run()
    assert sorted((n, s) for n, s, _ in retry.calls) == [
        ("kd_a0.3", 1), ("kd_a0.9", 1), ("student_w8", 0), ("teacher", 1)
    ]  # fmt: skip


def test_summary_aggregates_seeds_and_chooses_on_validation_only(tmp_path: Path) -> None:
    # student_w8 is best on validation, student on test: the choice must follow validation
    scores = {
        "student": (0.70, 0.95),
        "student_w8": (0.75, 0.60),
        "student_w16": (0.71, 0.70),
        "teacher": (0.9, 0.9),
    }
    sweep = _sweep(tmp_path, FakeRunner(scores))
    rows = {r["config"]: r for r in sweep.run()}
    assert "best baseline student" in rows["student_w8"]["chosen"]
    assert "best" not in rows["student"]["chosen"]
    w8 = rows["student_w8"]
    assert w8["val_f1_mean"] == pytest.approx(0.7505)
    assert w8["val_f1_std"] == pytest.approx(np.std([0.75, 0.751], ddof=1))
    assert w8["test_f1_ci_low"] <= w8["test_f1_ci_high"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| phase 1 | student_w8 |" in md and "0.7505 ± 0.0007" in md
    runs = list(_csv_rows(tmp_path / "out" / "runs.csv"))
    assert len(runs) == 2 * 6


KD_GRID = {
    "alpha": {"key": "model.init_args.alpha", "values": [0.3, 0.9]},
    "temperature": {"key": "model.init_args.temperature", "values": [2.0, 4.0]},
}


def _assert_png(path: Path) -> np.ndarray:
    """``path`` is a readable, non-blank PNG; returns its pixels."""
    assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.shape[2] in (3, 4) and float(pixels[..., :3].std()) > 0  # something drawn
    return pixels


def test_summary_picture_shows_f1_vs_params_and_the_kd_grid(tmp_path: Path) -> None:
    scores = {**STUDENTS_WEAK, "teacher": (0.85, 0.84), "kd_a0.9_T4": (0.80, 0.79)}
    kd = [{"name": "kd_a{alpha}_T{temperature}", "model": "kd", "baseline": "student"}]
    kd[0]["grid"] = KD_GRID
    sweep = _sweep(tmp_path, FakeRunner(scores, collapsed={"kd_a0.3_T2"}), phase2=kd)
    rows = {r["config"]: r for r in sweep.run()}
    assert (rows["kd_a0.9_T4"]["kd_alpha"], rows["kd_a0.9_T4"]["kd_temperature"]) == (0.9, 4.0)
    assert rows["kd_a0.9_T4"]["kd_student"] == "student"
    assert rows["student"]["kd_alpha"] is None
    out = tmp_path / "out"
    _assert_png(out / "summary.png")
    assert "![summary](summary.png)" in (out / "summary.md").read_text()
    assert "kd_alpha" in _csv_rows(out / "summary.csv")[0]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # the heat map holds each (alpha, T) cell's mean validation macro-F1, alpha down, T across
    fig = summary_figure(list(rows.values()))
    grid = np.ma.filled(fig.axes[1].images[0].get_array(), np.nan)
    assert grid.shape == (2, 2)
    assert grid[1, 1] == pytest.approx(rows["kd_a0.9_T4"]["val_f1_mean"])
    assert grid[0, 0] == pytest.approx(rows["kd_a0.3_T2"]["val_f1_mean"])
    # the collapsed configuration is its own legend entry on the scatter
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "collapsed (≥ 1 seed)" in legend and "KD" in legend and "baseline" in legend


def test_summary_picture_is_written_without_kd_rows(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, FakeRunner({**STUDENTS_WEAK, **TEACHERS_WEAK}))
    rows = sweep.run()
    assert not [r for r in rows if r["phase"] == "phase2"]
    _assert_png(tmp_path / "out" / "summary.png")
    assert "![summary](summary.png)" in (tmp_path / "out" / "summary.md").read_text()
    # rows read back from summary.csv (strings, empty cells) draw too; the KD panel is a note
    png = plot_summary(_csv_rows(tmp_path / "out" / "summary.csv"), tmp_path / "again.png")
    _assert_png(png)
    fig = summary_figure([])
    assert not fig.axes[1].images and "no distilled" in fig.axes[1].texts[0].get_text()


def test_the_data_probe_agrees_with_a_finished_run_and_sees_other_data(tmp_path: Path) -> None:
    """What resume compares: a real run's recorded fingerprint and the probe's, now."""
    argv = ["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "1")]
    fit = main(argv)
    recorded = json.loads((Path(fit.trainer.log_dir) / "data_fingerprint.json").read_text())
    assert data_fingerprint_now(argv) == data_fingerprint_hash(recorded)
    # the same configuration once its caches are gone (rebuilt, or a changed archive's
    # new cache key) is other data
    (tmp_path / "cache").rename(tmp_path / "cache_old")
    assert data_fingerprint_now(argv) not in (None, data_fingerprint_hash(recorded))


def _nested_experiment(tmp_path: Path, batch_size: int = 32, seed: int = 0) -> Path:
    """An experiment YAML naming a data YAML that names a source YAML (relative paths)."""
    (tmp_path / "exp.yaml").write_text(
        "model:\n  class_path: models.classifier.Classifier\n"
        "  init_args: {backbone: models.backbones.TinyCNN}\n"
        "data: data.yaml\n"
    )
    (tmp_path / "data.yaml").write_text(
        f"source: source.yaml\nclasses: [quiet, breathe, snore]\nbatch_size: {batch_size}\n"
    )
    (tmp_path / "source.yaml").write_text(
        f"class_path: data.sources.Synthetic\ninit_args: {{seed: {seed}}}\n"
    )
    return tmp_path / "exp.yaml"


def test_the_resolved_config_sees_into_included_files_and_not_their_layout(
    tmp_path: Path,
) -> None:
    """What resume compares: main.py's own resolution, not the YAML text."""
    argv = ["fit", "--config", str(_nested_experiment(tmp_path)), "--seed_everything", "0"]
    first = flat_settings(resolve_config(argv))
    assert first["data.batch_size"] == 32 and first["trainer.max_epochs"] == 50  # defaults.yaml
    assert first["data.source.init_args.seed"] == 0  # two files down
    digest = settings_digest(first)
    # where the run's logs go is placement, not configuration
    placed = argv + ["--trainer.logger.init_args.save_dir", str(tmp_path / "elsewhere")]
    assert settings_digest(flat_settings(resolve_config(placed))) == digest

    # comments, flow or block style, indentation, key order: the same configuration
    (tmp_path / "data.yaml").write_text(
        "# the demo's data\nbatch_size:    32  # clips per step\nclasses:\n"
        "    - quiet\n    - breathe\n    - snore\nsource: source.yaml\n"
    )
    assert settings_digest(flat_settings(resolve_config(argv))) == digest

    # a value inside the included file, or inside the file that one includes
    _nested_experiment(tmp_path, batch_size=16)
    now = flat_settings(resolve_config(argv))
    assert settings_digest(now) != digest
    assert changed_settings(first, now) == "data.batch_size 32 -> 16"
    _nested_experiment(tmp_path, seed=1)
    now = flat_settings(resolve_config(argv))
    assert changed_settings(first, now) == "data.source.init_args.seed 0 -> 1"

    with pytest.raises(RuntimeError, match="--data.batch_size"):
        resolve_config([*argv, "--data.batch_size", "many"])


def test_resume_reruns_a_run_whose_included_yaml_changed_and_not_a_reformatted_one(
    tmp_path: Path,
) -> None:
    """The real resolution in a sweep: the record keeps the settings; resume names what moved."""
    experiment = _nested_experiment(tmp_path)
    raw = _manifest_dict(tmp_path, seeds=(0,))
    raw["models"] = {
        "student": {"configs": [str(experiment)]},
        "teacher": {"configs": [str(experiment)], "args": {"trainer.max_epochs": 3}},
    }
    path = _write_two_run_manifest(tmp_path, raw)

    def sweep(runner: FakeRunner, lines: list[str], resume: bool = True) -> Sweep:
        return Sweep(
            load_manifest(path),
            tmp_path / "out",
            resume=resume,
            executor=InlineExecutor(),
            runner=runner,
            echo=lines.append,
            data_probe=runner.data_probe,
            code_probe=runner.code_probe,
        )  # config_probe: the default, main.py's parser

    scores = {"student": (0.6, 0.6), "teacher": (0.8, 0.8)}
    sweep(first := FakeRunner(scores), [], resume=False).run()
    assert len(first.calls) == 2
    record = json.loads((tmp_path / "out/runs/teacher/seed0/sweep_run.json").read_text())
    assert record["settings"]["trainer.max_epochs"] == 3 and len(record["hash"]) == 16

    experiment.write_text("# reformatted\n" + experiment.read_text().replace("  ", "    "))
    lines: list[str] = []
    sweep(same := FakeRunner(scores), lines).run()
    assert same.calls == [] and not [line for line in lines if "re-running" in line]

    _nested_experiment(tmp_path, batch_size=16)
    lines.clear()
    sweep(changed := FakeRunner(scores), lines).run()
    assert [name for name, _, _ in changed.calls] == ["student", "teacher"]
    assert (
        "[phase 1] re-running student seed 0: its configuration changed: "
        "data.batch_size 32 -> 16" in lines
    )


def test_a_run_in_the_worker_gets_a_fresh_process_state_and_leaves_none_behind(
    tmp_path: Path,
) -> None:
    """What worker_runner wraps around each run: env, cwd, argv, threads, output."""
    before = (dict(os.environ), os.getcwd(), list(sys.argv), torch.get_num_threads())
    seen: dict[str, Any] = {}
    log_path = tmp_path / "run.log"
    for attempt in range(2):  # the second run sees what a fresh process would, not the first's
        with open(log_path, "w", buffering=1) as log, as_fresh_process(log, thread_env(1)):
            seen[f"env{attempt}"] = (os.environ.get(THREADS_ENV), os.environ.get("PL_GLOBAL_SEED"))
            seen[f"cwd{attempt}"] = os.getcwd()
            os.environ["PL_GLOBAL_SEED"] = "7"  # what seed_everything leaves
            torch.set_num_threads(1)
            print("to stdout")
            os.write(2, b"to the stderr descriptor\n")  # C code, a handler made at import
            sys.argv[1:] = ["--changed"]
        text = log_path.read_text()
        assert "to stdout" in text and "to the stderr descriptor" in text
    assert (
        seen["env0"]
        == seen["env1"]
        == (os.environ.get(THREADS_ENV, "1"), before[0].get("PL_GLOBAL_SEED"))
    )
    assert seen["cwd0"] == seen["cwd1"] == str(ROOT)
    assert (dict(os.environ), os.getcwd(), list(sys.argv), torch.get_num_threads()) == before


# -- statistics ---------------------------------------------------------------------------------


def test_bootstrap_replicates_match_the_exact_bootstrap_by_torchmetrics() -> None:
    # 4 clips, 2 seeds sharing them: all 4**4 redraws, each scored by torchmetrics, are the
    # exact bootstrap distribution; class 2 never occurs, and some redraws lose class 1 too
    target = np.array([0, 0, 1, 1])
    runs = [(target, np.array([0, 1, 1, 1])), (target, np.array([0, 0, 0, 1]))]

    def f1(t: np.ndarray, p: np.ndarray) -> float:
        return multiclass_f1_score(torch.tensor(p), torch.tensor(t), 3, average="macro").item()

    exact = np.array(
        [
            np.mean([f1(t[list(draw)], p[list(draw)]) for t, p in runs])
            for draw in itertools.product(range(4), repeat=4)
        ]
    )
    replicates = bootstrap_replicates(runs, 3, resamples=20_000, seed=0)
    assert set(np.round(replicates, 5)) <= set(np.round(exact, 5))
    assert replicates.mean() == pytest.approx(exact.mean(), abs=4 * exact.std() / np.sqrt(20_000))
    assert replicates.std() == pytest.approx(exact.std(), rel=0.05)
    point, low, high = bootstrap_macro_f1(runs, 3, resamples=20_000)
    assert point == pytest.approx(np.mean([f1(t, p) for t, p in runs]), abs=1e-6)
    assert (low, high) == pytest.approx(tuple(np.percentile(exact, [2.5, 97.5])), abs=0.05)


def test_bootstrap_interval_brackets_the_point_and_shrinks_with_more_clips() -> None:
    rng = np.random.default_rng(1)

    def seeds(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        target = rng.integers(0, 3, n)
        return [(target, np.where(rng.random(n) < 0.8, target, (target + 1) % 3)) for _ in range(2)]

    small, large = seeds(200), seeds(5000)
    point, low, high = bootstrap_macro_f1(small, 3, resamples=500)
    expected = np.mean(
        [
            multiclass_f1_score(torch.tensor(p), torch.tensor(t), 3, average="macro").item()
            for t, p in small
        ]
    )
    assert point == pytest.approx(expected, abs=1e-6)
    assert low < point < high
    _, low_l, high_l = bootstrap_macro_f1(large, 3, resamples=500)
    assert high_l - low_l < (high - low) / 2
    perfect = [(t, t) for t, _ in small]
    assert bootstrap_macro_f1(perfect, 3, resamples=100) == (1.0, 1.0, 1.0)


# -- one real sweep, end to end -----------------------------------------------------------------


@pytest.mark.slow
def test_tiny_real_sweep_end_to_end(tmp_path: Path, capsys) -> None:
    """Real runs in reused Ray workers on the demo's corpus: baselines, tuning, KD, summary."""
    data = tmp_path / "tiny_data.yaml"
    data.write_text(
        yaml.safe_dump(
            {  # the demo sweep's data and steps (fewer and a run collapses), its own cache
                "data": {"cache_dir": str(tmp_path / "cache")},
                "latency": {"runs": 2, "warmup": 0},
            }
        )
    )
    configs = ["config/demo.yaml", "config/sweep/demo_data.yaml", str(data)]
    raw = {
        "name": "tiny",
        "seeds": [0],
        "bootstrap": {"resamples": 100},
        "models": {
            "tinycnn": {"configs": configs},
            "crnn": {
                "configs": configs,
                "args": {"model.init_args.backbone": "models.backbones.CRNN"},
            },
            "kd": {
                "configs": configs,
                "args": {"model": "models.distillation.DistillationClassifier"},
            },
        },
        "phase1": [{"name": "tinycnn", "model": "tinycnn"}, {"name": "crnn", "model": "crnn"}],
        # an unreachable margin: the flow must go through teacher tuning
        "gate": {
            "teacher": "crnn",
            "margin": 2.0,
            "tuning": [
                {
                    "name": "crnn_h16",
                    "model": "crnn",
                    "args": {"model.init_args.backbone.init_args.rnn_hidden": 16},
                }
            ],
        },
        "phase2": [
            {
                "name": "kd",
                "model": "kd",
                "baseline": "tinycnn",
                "args": {"model.init_args.alpha": 0.5},
            }
        ],
    }
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    args = ["--manifest", str(manifest), "--out", str(out)]
    # the margin is not met: phase 2 runs only because the command line asks
    code = sweep_main([*args, "--distil_anyway", "true"])
    runs = list(_csv_rows(out / "runs.csv"))
    assert [(r["name"], r["status"]) for r in runs] == [
        ("tinycnn", "ok"), ("crnn", "ok"), ("crnn_h16", "ok"), ("kd", "ok")
    ], [r["note"] for r in runs]  # fmt: skip
    assert code == 0
    gate = json.loads((out / "gate.json").read_text())
    assert gate["tuned"] is True and not gate["passed"] and gate["phase2"] == "runs"
    assert "--distil_anyway true" in gate["phase2_reason"]
    assert "phase 2 runs: " in (out / "summary.md").read_text()
    kd_dir = out / "runs" / "kd" / "seed0"
    metrics = json.loads((kd_dir / "metrics.json").read_text())
    assert metrics["test"]["test/f1_macro"] is not None
    extras = metrics["extras"]
    assert extras["alpha"] == 0.5 and extras["compression_ratio"] > 1
    # baseline and teacher scores were passed: a gap, or the reason there is none
    assert (extras["gap_closed"] is None) != (extras["gap_closed_reason"] is None)
    for run in runs:  # collapse and provenance, as the run's own files say
        run_dir = Path(run["run_dir"])
        collapse = json.loads((run_dir / "metrics.json").read_text())["collapse"]
        flagged = collapse["test"]["collapsed"] or collapse["val"]["collapsed"]
        assert run["collapsed"] == str(flagged)
        fingerprint = json.loads((run_dir / "data_fingerprint.json").read_text())
        assert set(fingerprint) == {"train", "validation", "test"}
        assert run["data_fingerprint"] == data_fingerprint_hash(fingerprint)
        assert run["git_commit"] == str(json.loads((run_dir / "git.json").read_text())["commit"])
    board = list(_csv_rows(out / "leaderboard.csv"))
    assert len(board) == 4 and board[-1]["alpha"] == "0.5" and board[-1]["test_f1_macro"]
    assert [b["data_fingerprint"] for b in board] == [r["data_fingerprint"] for r in runs]
    assert [b["git_commit"] for b in board] == [r["git_commit"] for r in runs]
    # the stored predictions reproduce the logged test macro-F1
    with open(kd_dir / "test_predictions.csv", newline="") as f:
        stored = [(int(r["target"]), int(r["pred"])) for r in csv.DictReader(f)]
    target, pred = (np.array(column) for column in zip(*stored, strict=True))
    point, low, high = bootstrap_macro_f1([(target, pred)], 3, resamples=100)
    assert point == pytest.approx(metrics["test"]["test/f1_macro"], abs=1e-5)
    summary = {r["config"]: r for r in _csv_rows(out / "summary.csv")}
    assert set(summary) == {"tinycnn", "crnn", "crnn_h16", "kd"}
    assert (
        float(summary["kd"]["test_f1_ci_low"]) <= point <= float(summary["kd"]["test_f1_ci_high"])
    )

    # resume: the data probe and the code version agree with every run's record
    assert sweep_main([*args, "--resume", "true", "--distil_anyway", "true"]) == 0
    printed = capsys.readouterr().out
    assert "re-running" not in printed and printed.count("(resumed)") == 4

    # the same configuration over other data (here: the caches are gone) is never reused
    (tmp_path / "cache").rename(tmp_path / "cache_old")
    calls: list[str] = []

    def refuse(run: Run, argv: list[str], run_dir: Path, log_path: Path) -> int:
        calls.append(run.name)
        return 1

    lines: list[str] = []
    before = runs[0]["data_fingerprint"]
    Sweep(
        load_manifest(manifest),
        out,
        resume=True,
        executor=InlineExecutor(),  # `calls` lives in this process
        runner=refuse,
        echo=lines.append,
    ).run()
    assert calls == ["tinycnn", "crnn", "crnn_h16"]  # phase 2 has no teacher left
    rerun = [line for line in lines if "re-running" in line]
    assert len(rerun) == 3 and all(f"data fingerprint {before} -> " in line for line in rerun)


# -- on a local Ray runtime ---------------------------------------------------------------------


class FailOnce(FakeRunner):
    """A FakeRunner whose first attempt of each run crashes (a marker file remembers it)."""

    def __init__(self, scores: dict[str, tuple[float, float]], marks: Path) -> None:
        super().__init__(scores)
        self.marks = marks

    def __call__(self, run: Run, argv: list[str], run_dir: Path, log_path: Path) -> int:
        mark = self.marks / f"{run.name}-{run.seed}"
        if not mark.exists():
            mark.write_text("crashed once")
            log_path.write_text("RuntimeError: a node went away\n")
            return 1
        return super().__call__(run, argv, run_dir, log_path)


def test_a_two_trial_sweep_runs_on_a_local_ray_runtime_retries_and_restores(
    tmp_path: Path,
) -> None:
    """Real Ray Tune: one trial per run, a failed run retried, the experiment restored."""
    raw = _manifest_dict(tmp_path, seeds=(0,))
    path = _write_two_run_manifest(tmp_path, raw)
    (marks := tmp_path / "marks").mkdir()
    runner = FailOnce({"student": (0.6, 0.6), "teacher": (0.8, 0.8)}, marks)
    out = tmp_path / "out"
    settings = RaySettings(cpus_per_trial=1, retries=1)

    def sweep(resume: bool, lines: list[str]) -> Sweep:
        return Sweep(
            load_manifest(path),
            out,
            resume=resume,
            ray=settings,
            runner=runner,
            echo=lines.append,
            data_probe=runner.data_probe,
            code_probe=runner.code_probe,
            config_probe=runner.config_probe,
        )

    lines: list[str] = []
    first = sweep(False, lines)
    assert isinstance(first.executor, RayTuneExecutor)
    assert first.executor.threads_per_run() == 1
    first.run()
    runs = _csv_rows(out / "runs.csv")
    assert [(r["name"], r["status"]) for r in runs] == [("student", "ok"), ("teacher", "ok")]
    assert sorted(p.name for p in marks.iterdir()) == [
        "student-0",
        "teacher-0",
    ]  # each crashed once
    assert sum("1/2]" in line or "2/2]" in line for line in lines) == 2  # a line per finished run
    experiments = [p for p in (out / "ray").iterdir() if p.is_dir()]
    assert len(experiments) == 1 and experiments[0].name.startswith("phase1-")
    assert json.loads((out / "gate.json").read_text())["passed"] is True

    again: list[str] = []
    sweep(True, again).run()
    assert sum("(resumed)" in line for line in again) == 2
    assert any(line.endswith(f"restored Tune experiment {experiments[0]}") for line in again)
    assert [r["status"] for r in _csv_rows(out / "runs.csv")] == ["ok", "ok"]


def test_a_gate_with_every_student_collapsed_is_not_met() -> None:
    from util.sweep.run import RunResult
    from util.sweep.stats import evaluate_gate

    def run(name: str, val: float, collapsed: bool) -> RunResult:
        return RunResult("phase1", name, 0, "ok", "", val_f1=val, collapsed=collapsed)

    teacher = run("crnn", 0.6, False)
    students = [run("tinycnn", 0.3, True), run("tinycnn_cbam", 0.35, True)]
    gate = evaluate_gate([teacher, *students], "crnn", ["tinycnn", "tinycnn_cbam"], 0.03)
    assert not gate.passed and gate.best_student is None
    assert "collapsed in 1 of 1 seeds" in gate.describe()  # the summary says why
    usable = [teacher, run("tinycnn", 0.5, False)]
    assert evaluate_gate(usable, "crnn", ["tinycnn"], 0.03).passed  # 0.6 beats 0.5 by 0.1
    assert evaluate_gate([teacher], "crnn", [], 0.03).passed  # nothing to beat

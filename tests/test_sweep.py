"""The sweep runner: plans, the teacher gate, resume, failures, statistics, and one real sweep."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torchmetrics.functional.classification import multiclass_f1_score

from util.sweep import (
    ROOT,
    ManifestError,
    Run,
    Sweep,
    SweepError,
    bootstrap_macro_f1,
    load_manifest,
)
from util.sweep import main as sweep_main
from util.sweep.stats import bootstrap_replicates

CLASSES = ["quiet", "breathe", "snore"]


# -- plans ----------------------------------------------------------------------------------


def test_reference_manifest_plans_11_baselines_and_18_distillations_per_seed(capsys) -> None:
    m = load_manifest(ROOT / "config/sweep/reference.yaml")
    names = [s.name for s in m.phase1]
    assert len(names) == 11
    grid = {f"tinycnn_cbam_r{r}_k{k}" for r in (4, 8, 16) for k in (3, 7, 11)}
    assert grid - set(names) == {"tinycnn_cbam_r8_k3"}  # the default run is that grid point
    (cbam,) = [s for s in m.phase1 if s.name == "tinycnn_cbam"]
    assert cbam.aliases == ("tinycnn_cbam_r8_k3",)
    assert {"tinycnn", "crnn"} <= set(names)
    assert m.teacher == "crnn" and "crnn" not in m.students and len(m.students) == 10
    assert len(m.phase2) == 18
    assert {s.baseline for s in m.phase2} == {"tinycnn", "tinycnn_cbam"}
    assert len(m.tuning) > 0

    assert (
        sweep_main(["--manifest", str(ROOT / "config/sweep/reference.yaml"), "--dry_run", "true"])
        == 0
    )
    text = capsys.readouterr().out
    seeds = len(m.seeds)
    assert f"phase 1: 11 runs per seed x {seeds} seeds = {11 * seeds} runs" in text
    assert f"phase 2: 18 runs per seed x {seeds} seeds = {18 * seeds} runs" in text
    assert f"total: {29 * seeds} runs (29 per seed)" in text


def test_demo_manifest_runs_two_seeds_of_the_whole_flow() -> None:
    m = load_manifest(ROOT / "config/sweep/demo.yaml")
    assert len(m.seeds) == 2
    assert m.phase1 and m.tuning and m.phase2 and m.teacher == "crnn"
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
        "--jobs",
        "--debug",
    ):
        assert option in text
    assert "default: False" in text and "default: 1" in text


def test_cli_errors_are_one_line_and_debug_adds_the_traceback(tmp_path: Path, capsys) -> None:
    def error(*argv: str, code: int) -> str:
        assert sweep_main(list(argv)) == code
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    reference = str(ROOT / "config/sweep/reference.yaml")
    assert "--dry-run" in error("--manifest", reference, "--dry-run", code=2)
    assert "jobs" in error("--manifest", reference, "--jobs", "0", code=2)
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
    predictions are made to have roughly that test macro-F1.
    """

    def __init__(
        self, scores: dict[str, tuple[float, float]], fail: set[tuple[str, int]] = frozenset()
    ) -> None:
        self.scores = scores
        self.fail = set(fail)
        self.calls: list[tuple[str, int, list[str]]] = []

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
            w.writerow(["index", "target", "pred", *(f"prob_{c}" for c in CLASSES)])
            w.writerows(
                [i, t, p, 0.3, 0.3, 0.4] for i, (t, p) in enumerate(zip(target, pred, strict=True))
            )
        extras = {}
        if run.name.startswith("kd"):
            extras = {"gap_closed": 0.5, "compression_ratio": 3.0}
        metrics = {
            "model": "TinyCNN",
            "best_val_f1_macro": val,
            "best_model_path": str(ckpt),
            "test": {"test/f1_macro": test, "test/acc": test, "test/bal_acc": test},
            "complexity": {"params": 1000, "latency_median_ms": 1.0},
            "extras": extras,
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return 0


def _sweep(tmp_path: Path, runner: FakeRunner, resume: bool = False, **changes: Any) -> Sweep:
    raw = _manifest_dict(tmp_path)
    raw.update(changes)
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Sweep(
        load_manifest(path), tmp_path / "out", resume=resume, runner=runner, echo=lambda s: None
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


def test_gate_still_not_met_after_tuning_distils_from_the_best_and_says_so(tmp_path: Path) -> None:
    scores = {
        **STUDENTS_WEAK,
        "teacher": (0.73, 0.8),
        "teacher_h96": (0.74, 0.8),
        "teacher_h128": (0.70, 0.8),
    }
    lines: list[str] = []
    sweep = _sweep(tmp_path, FakeRunner(scores))
    sweep.echo = lines.append
    sweep.run()
    assert sweep.gate.tuned and not sweep.gate.passed and sweep.gate.teacher == "teacher_h96"
    assert any("no teacher meets the margin" in line for line in lines)


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

    # a changed teacher config retrains the teacher, and the KD runs whose teacher changed
    (tmp_path / "teacher.yaml").write_text(
        "model: {class_path: models.classifier.Classifier}\n# v2\n"
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
def test_tiny_real_sweep_end_to_end(tmp_path: Path) -> None:
    """Real subprocess runs on a tiny synthetic corpus: baselines, tuning, KD, summary."""
    data = tmp_path / "tiny_data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": {
                        "class_path": "data.sources.Synthetic",
                        "init_args": {
                            "seed": 0,
                            "clips_per_split": {"train": 192, "validation": 96, "test": 96},
                        },
                    },
                    "cache_dir": str(tmp_path / "cache"),
                    "batch_size": 32,
                },
                "trainer": {"max_epochs": 1, "limit_train_batches": 3},
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
    code = sweep_main(["--manifest", str(manifest), "--out", str(out)])
    runs = list(_csv_rows(out / "runs.csv"))
    assert [(r["name"], r["status"]) for r in runs] == [
        ("tinycnn", "ok"), ("crnn", "ok"), ("crnn_h16", "ok"), ("kd", "ok")
    ], [r["note"] for r in runs]  # fmt: skip
    assert code == 0
    kd_dir = out / "runs" / "kd" / "seed0"
    metrics = json.loads((kd_dir / "metrics.json").read_text())
    assert metrics["test"]["test/f1_macro"] is not None
    assert metrics["extras"]["alpha"] == 0.5 and metrics["extras"]["compression_ratio"] > 1
    assert metrics["extras"]["gap_closed"] is not None  # baseline and teacher scores were passed
    board = list(_csv_rows(out / "leaderboard.csv"))
    assert len(board) == 4 and board[-1]["alpha"] == "0.5" and board[-1]["test_f1_macro"]
    # the stored predictions reproduce the logged test macro-F1
    point, low, high = bootstrap_macro_f1(
        [
            tuple(
                np.loadtxt(
                    kd_dir / "test_predictions.csv",
                    delimiter=",",
                    skiprows=1,
                    usecols=(1, 2),
                    dtype=int,
                ).T
            )
        ],
        3,
        resamples=100,
    )
    assert point == pytest.approx(metrics["test"]["test/f1_macro"], abs=1e-5)
    summary = {r["config"]: r for r in _csv_rows(out / "summary.csv")}
    assert set(summary) == {"tinycnn", "crnn", "crnn_h16", "kd"}
    assert json.loads((out / "gate.json").read_text())["tuned"] is True
    # resume: nothing to retrain
    assert sweep_main(["--manifest", str(manifest), "--out", str(out), "--resume", "true"]) == 0
    records = [json.loads(p.read_text()) for p in out.glob("runs/*/seed0/sweep_run.json")]
    assert len(records) == 4

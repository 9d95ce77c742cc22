"""The two-phase sweep: plan, run (or resume) and summarise a manifest.

Phase 1 trains the baselines; the gate decides the teacher (tuning it first when it
does not beat the best student by the margin); phase 2 distils each student of the grid
from that teacher, seed by seed. ``runs.csv``, ``gate.json``, ``summary.csv`` and
``summary.md`` land in the output folder beside ``runs/`` and ``leaderboard.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models.task import MONITOR
from util.redact import mask_text, mask_tree
from util.sweep.manifest import PHASE_TITLES, ROOT, Manifest, Spec, cli_value
from util.sweep.report import markdown, run_line, write_csv
from util.sweep.run import (
    RUN_RECORD,
    TEST_SCORE,
    Run,
    Runner,
    RunResult,
    last_line,
    read_json,
    read_predictions,
    read_result,
    subprocess_runner,
)
from util.sweep.stats import (
    GateDecision,
    best_of,
    bootstrap_macro_f1,
    evaluate_gate,
    mean_score,
    mean_std,
)

__all__ = ["Sweep", "SweepError"]

#: Per-run numbers aggregated over seeds in ``summary.csv`` (``<name>_mean``, ``<name>_std``).
_AGGREGATED = ("val_f1", "test_f1", "test_acc", "test_bal_acc", "gap_closed")


class SweepError(RuntimeError):
    """The sweep cannot start as asked; the message says what to do."""


class Sweep:
    """Plan, run, resume and summarise a manifest.

    Args:
        manifest: the parsed manifest.
        out: output folder (``runs/``, ``leaderboard.csv``, summaries).
        resume: skip runs already finished with the same configuration hash.
        jobs: runs trained at once (the first run of each phase runs alone, so a
            shared spectrogram cache is built once).
        runner: how to execute one run (default: a subprocess of
            :func:`~util.sweep.run.fit_and_test`).
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
                settings = " ".join(f"{k}={cli_value(v)}" for k, v in spec.args)
                alias = f" (also {', '.join(spec.aliases)})" if spec.aliases else ""
                base = f" baseline={spec.baseline}" if spec.baseline else ""
                lines.append(
                    f"  {spec.name}{alias}: {' '.join(model['configs'])} {settings}{base}".rstrip()
                )

        section(PHASE_TITLES["phase1"], m.phase1)
        lines.append(
            f"gate: teacher {m.teacher} must beat the best of {len(m.students)} students by "
            f">= {m.margin:g} mean {MONITOR}"
        )
        section(PHASE_TITLES["tuning"], m.tuning, " (only if the gate is not met)")
        section(PHASE_TITLES["phase2"], m.phase2, " (teacher: the gate's choice)")
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
            raise SweepError(
                f"{self.out} already holds sweep runs; pass --resume true to continue that "
                "sweep (finished runs are kept) or choose another --out"
            )

    def _done(self, run: Run, digest: str) -> bool:
        record = read_json(run.run_dir(self.out) / RUN_RECORD) or {}
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
            note = "" if code == 0 else f"exit code {code}: {last_line(log_path)}"
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
            result.note = f"finished without test metrics (metrics.json has no {TEST_SCORE})"
        return result

    def execute(self, runs: Sequence[Run], title: str) -> list[RunResult]:
        """Run (or resume, or skip) ``runs``; one line per run, a bar over the phase."""
        results: dict[int, RunResult] = {}
        todo = []
        for i, run in enumerate(runs):
            if run.status == "skipped":
                out = str(run.run_dir(self.out))
                results[i] = RunResult(run.phase, run.name, run.seed, "skipped", out, note=run.note)
                self.echo(f"[{title}] {run.name} seed {run.seed}: skipped ({run.note})")
            else:
                todo.append(i)
        bar = tqdm(total=len(runs), desc=title, unit="run", initial=len(results), leave=False)

        def one(i: int) -> None:
            result = self._execute_one(runs[i])
            results[i] = result
            bar.update()
            self.echo(f"[{title} {len(results)}/{len(runs)}] {run_line(result)}")

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
        """Phase 1, the gate (and tuning), phase 2, then the summary; returns its rows.

        Raises:
            SweepError: the output folder holds runs of a sweep and ``resume`` is off.
        """
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
            candidates = {c: mean_score(pool, c) for c in [m.teacher, *(s.name for s in m.tuning)]}
            teacher = best_of({c: v for c, v in candidates.items() if v is not None})
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
    def _row(self, phase: str, name: str) -> dict[str, Any]:
        """``summary.csv``'s row of one configuration: its seeds aggregated."""
        m = self.manifest
        group = [r for r in self.results if (r.phase, r.name) == (phase, name)]
        ok = [r for r in group if r.status == "ok"]
        preds = [p for r in ok if (p := read_predictions(Path(r.run_dir))) is not None]
        preds = [p for p in preds if len(p[0])]
        ci = (None, None, None)
        if preds:
            k = max(p[2] for p in preds) or int(max(max(p[0].max(), p[1].max()) for p in preds)) + 1
            ci = bootstrap_macro_f1(
                [(t, p) for t, p, _ in preds], k, m.bootstrap_resamples, m.bootstrap_seed
            )
        row: dict[str, Any] = {"phase": phase, "config": name}
        row["model"] = next((r.model for r in ok if r.model), None)
        row["seeds_ok"] = f"{len(ok)}/{len(group)}"
        for key in _AGGREGATED:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([getattr(r, key) for r in ok])
        row["test_f1_ci_low"], row["test_f1_ci_high"] = ci[1], ci[2]
        row["params"] = next((r.params for r in ok if r.params), None)
        row["latency_ms"] = mean_std([r.latency_ms for r in ok])[0]
        row["compression_ratio"] = mean_std([r.compression_ratio for r in ok])[0]
        row["chosen"] = ""
        return row

    def summarize(self) -> list[dict[str, Any]]:
        """Aggregate seeds per configuration; write runs.csv, summary.csv and summary.md."""
        write_csv(self.out / "runs.csv", [dataclasses.asdict(r) for r in self.results])
        order = dict.fromkeys((r.phase, r.name) for r in self.results)
        rows = [self._row(phase, name) for phase, name in order]
        self._mark_best(rows)
        columns = list(rows[0]) if rows else ["phase", "config"]
        write_csv(self.out / "summary.csv", rows, columns)
        text = markdown(rows, self.gate)
        (self.out / "summary.md").write_text(mask_text(text))
        self.echo("\n" + text)
        return rows

    def _mark_best(self, rows: list[dict[str, Any]]) -> None:
        """Mark, on the validation score only, the best student, teacher and distilled config."""
        m = self.manifest

        def best(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
            scored = {i: r["val_f1_mean"] for i, r in enumerate(candidates)}
            i = best_of({i: v for i, v in scored.items() if v is not None})
            return None if i is None else candidates[i]

        students = [r for r in rows if r["phase"] == "phase1" and r["config"] in m.students]
        distilled = [r for r in rows if r["phase"] == "phase2"]
        marks = [
            (best(students), "best baseline student"),
            (best(distilled), "best distilled"),
            (best(students + distilled), "best overall"),
        ]
        if self.gate is not None and self.gate.teacher:
            teacher_rows = [
                r for r in rows if r["config"] == self.gate.teacher and r["phase"] != "phase2"
            ]
            marks.append((teacher_rows[0] if teacher_rows else None, "teacher"))
        for row, label in marks:
            if row is not None:
                row["chosen"] = ", ".join(filter(None, [row["chosen"], label]))

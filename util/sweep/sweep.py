"""The two-phase sweep: plan, run (or resume) and summarise a manifest.

Phase 1 trains the baselines; the gate decides the teacher (tuning it first when it
does not beat the best student by the margin); phase 2 distils each student of the grid
from that teacher, seed by seed, unless the gate is still not met after tuning and
neither the manifest (``gate.on_fail: distil``) nor the caller (``distil_anyway``) asks
to distil anyway. A collapsed run is never chosen: not as a best, the teacher or a
baseline. ``runs.csv``, ``gate.json``, ``summary.csv`` and ``summary.md`` land in the
output folder beside ``runs/`` and ``leaderboard.csv``.

Why about 500 lines: planning, resume (what changed, run by run), the gate with its tuning
and the phase-2 decision are one flow over one set of results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models.task import MONITOR
from util.callbacks.provenance import code_version, git_info
from util.redact import mask_text, mask_tree
from util.sweep.manifest import PHASE_TITLES, ROOT, Manifest, Spec, cli_value
from util.sweep.plot import plot_summary
from util.sweep.report import markdown, run_line, summary_rows, write_csv
from util.sweep.run import (
    RUN_RECORD,
    TEST_SCORE,
    Run,
    Runner,
    RunResult,
    changed_settings,
    data_fingerprint_now,
    flat_settings,
    last_line,
    read_json,
    read_result,
    resolve_config,
    runner_for,
    settings_digest,
)
from util.sweep.stats import GateDecision, best_of, eligible_score, evaluate_gate
from util.sweep.tune import Executor, RaySettings, RayTuneExecutor, Trial, TrialOutcome

__all__ = ["Sweep", "SweepError"]

#: Run settings that decide the data a run reads (the data probe's cache key).
_DATA_KEYS = ("data", "data.")


def _reused() -> tuple[bool, str]:
    """The trial of a run that a resume reuses: nothing to train."""
    return True, "resumed"


class SweepError(RuntimeError):
    """The sweep cannot start as asked; the message says what to do."""


class Sweep:
    """Plan, run, resume and summarise a manifest.

    Args:
        manifest: the parsed manifest.
        out: output folder (``runs/``, ``leaderboard.csv``, summaries).
        resume: reuse runs already finished with the same configuration, seed, data
            fingerprint and code version; say what differed for every other one.
        ray: how runs are spread (:class:`~util.sweep.tune.RaySettings`: a local Ray
            runtime by default, or a cluster's address; resources per run; retries).
        executor: where runs execute (default: :class:`~util.sweep.tune.RayTuneExecutor`
            with ``ray``; tests pass an in-process one).
        runner: how to execute one run (default: :func:`~util.sweep.run.runner_for`
            ``run_in``, its threads pinned to the CPUs the executor reserves per run).
        run_in: ``worker`` (each run inside the executor's worker process, reused from
            run to run) or ``subprocess`` (a fresh Python per run); see
            :func:`~util.sweep.run.worker_runner`.
        root: the repository root (configs are relative to it).
        echo: where progress lines go.
        distil_anyway: run phase 2 even when no teacher meets the gate's margin after
            tuning (as the manifest's ``gate.on_fail: distil`` does).
        data_probe: ``main.py`` arguments → the data fingerprint hash a run would record
            now (default :func:`~util.sweep.run.data_fingerprint_now`); read on resume.
        code_probe: the code version now, as :func:`~util.callbacks.provenance.git_info`
            gives it (the default); read on resume.
        config_probe: ``main.py`` arguments → the configuration they resolve to (default
            :func:`~util.sweep.run.resolve_config`); read for every run before it runs
            (its hash goes into ``sweep_run.json``) and on resume.
    """

    def __init__(
        self,
        manifest: Manifest,
        out: str | os.PathLike[str],
        resume: bool = False,
        ray: RaySettings | None = None,
        executor: Executor | None = None,
        runner: Runner | None = None,
        run_in: str = "worker",
        root: str | os.PathLike[str] = ROOT,
        echo: Callable[[str], None] = tqdm.write,
        distil_anyway: bool = False,
        data_probe: Callable[[list[str]], str | None] | None = None,
        code_probe: Callable[[], Mapping[str, Any]] | None = None,
        config_probe: Callable[[list[str]], Mapping[str, Any]] | None = None,
    ) -> None:
        self.manifest = manifest
        self.out = Path(out).resolve()
        self.resume = resume
        self.executor = executor or RayTuneExecutor(ray or RaySettings(), self.out / "ray")
        self.runner = runner or runner_for(run_in, self.executor.threads_per_run())
        self.root = Path(root)
        self.echo = echo
        self.distil_anyway = distil_anyway
        self.data_probe = data_probe or self._data_fingerprint_resolved
        self.code_probe = code_probe or git_info
        self.config_probe = config_probe or resolve_config
        self.results: list[RunResult] = []
        self.gate: GateDecision | None = None
        self._code_now: tuple[Any, Any] | None = None
        self._data_now: dict[str, str | None] = {}
        self._configs: dict[tuple[str, ...], Mapping[str, Any]] = {}
        self._unresolved: dict[tuple[str, ...], str] = {}
        self._gap_notes: dict[tuple[str, int], str] = {}

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
            f">= {m.margin:g} mean {MONITOR}; if no teacher does after tuning, phase 2 "
            + ("runs anyway" if self._distils_anyway() else "does not run")
            + f" ({self._on_fail_source()})"
        )
        section(PHASE_TITLES["tuning"], m.tuning, " (only if the gate is not met)")
        section(PHASE_TITLES["phase2"], m.phase2, " (teacher: the gate's choice)")
        always = (len(m.phase1) + len(m.phase2)) * seeds
        lines.append(
            f"total: {always} runs ({len(m.phase1) + len(m.phase2)} per seed), "
            f"+{len(m.tuning) * seeds} if the teacher needs tuning"
        )
        return "\n".join(lines)

    def _distils_anyway(self) -> bool:
        return self.distil_anyway or self.manifest.on_fail == "distil"

    def _on_fail_source(self) -> str:
        if self.distil_anyway:
            return "--distil_anyway true"
        if self.manifest.on_fail == "distil":
            return "the manifest's gate.on_fail: distil"
        return f"gate.on_fail: {self.manifest.on_fail}; --distil_anyway true overrides"

    # -- resume: does a finished run still hold?
    def _code_version_now(self) -> tuple[Any, Any]:
        if self._code_now is None:
            git = self.code_probe()
            self._code_now = (git.get("commit"), git.get("dirty"))
        return self._code_now

    def resolve(self, run: Run) -> None:
        """Set the run's resolved settings and their digest (``None`` if it does not resolve)."""
        argv = tuple(run.argv(self.out))
        try:
            config = self.config_probe(list(argv))
        except Exception as err:  # the run itself fails with the same error, in its log
            self._unresolved[argv] = f"{type(err).__name__}: {err}"
            run.settings = run.digest = None
            return
        self._configs[argv] = config
        run.settings = flat_settings(config)
        run.digest = settings_digest(run.settings)

    def _data_fingerprint_resolved(self, argv: list[str]) -> str | None:
        return data_fingerprint_now(argv, self._configs.get(tuple(argv)))

    def _data_fingerprint_now(self, run: Run) -> str | None:
        """The data fingerprint hash the run would record now, probed once per data config."""
        argv = run.argv(self.out)
        config = self._configs.get(tuple(argv))
        if config is not None and "data" in config:
            key = json.dumps(config["data"], sort_keys=True, default=str)
        else:
            data_args = [
                (k, v) for k, v in run.args if k == _DATA_KEYS[0] or k.startswith(_DATA_KEYS[1])
            ]
            key = json.dumps([run.configs, data_args], sort_keys=True, default=str)
        if key not in self._data_now:
            self._data_now[key] = self.data_probe(argv)
        return self._data_now[key]

    def _differences(self, run: Run) -> list[str] | None:
        """What keeps the run's earlier result from being reused; ``[]``: it holds.

        ``None`` when the run has no earlier attempt. It holds when it finished with test
        metrics and its resolved configuration (:func:`~util.sweep.run.resolve_config`:
        defaults and included files applied, comments and layout ignored), seed, data
        fingerprint and code version all equal what this sweep would run now.
        """
        record = read_json(run.run_dir(self.out) / RUN_RECORD)
        if record is None:
            return None
        if record.get("status") != "ok":
            return [f"its last attempt {record.get('status', 'did not finish')}"]
        result = read_result(run, self.out)
        if result.status != "ok":
            return [f"it left no test metrics (metrics.json has no {TEST_SCORE})"]
        diffs = []
        if run.digest is None:
            why = self._unresolved.get(tuple(run.argv(self.out)), "unknown")
            diffs.append(f"its configuration cannot be resolved now ({why})")
        elif record.get("hash") != run.digest:
            then = record.get("settings")
            if isinstance(then, Mapping) and run.settings is not None:
                what = changed_settings(then, run.settings) or "its settings"
            else:
                what = "recorded without its settings"
            diffs.append(f"its configuration changed: {what}")
        if record.get("seed", run.seed) != run.seed:
            diffs.append(f"seed {record.get('seed')} -> {run.seed}")
        then, now = (result.git_commit, result.git_dirty), self._code_version_now()
        if then != now:
            old, new = (code_version({"commit": c, "dirty": d}) for c, d in (then, now))
            diffs.append(f"code version {old or 'unknown'} -> {new or 'unknown'}")
        try:
            data = self._data_fingerprint_now(run)
        except Exception as err:  # cannot tell: train again rather than trust
            diffs.append(
                f"the data fingerprint cannot be computed now ({type(err).__name__}: {err})"
            )
        else:
            if data != result.data_fingerprint:
                diffs.append(
                    f"data fingerprint {result.data_fingerprint or 'none'} -> {data or 'none'}"
                )
        return diffs

    # -- running
    def _check_out(self) -> None:
        runs = self.out / "runs"
        if runs.exists() and any(runs.iterdir()) and not self.resume:
            raise SweepError(
                f"{self.out} already holds sweep runs; pass --resume true to continue that "
                "sweep (finished runs are kept) or choose another --out"
            )

    def _execute_one(self, run: Run) -> RunResult:
        run_dir = run.run_dir(self.out)
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
        if code == 0 and not (run_dir / "metrics.json").is_file():
            note = f"finished without test metrics (metrics.json has no {TEST_SCORE})"
        record = {
            "phase": run.phase,
            "name": run.name,
            "seed": run.seed,
            "hash": run.digest,
            "status": "ok" if code == 0 else "failed",
            "returncode": code,
            "seconds": round(time.monotonic() - started, 1),
            "note": note,
            "command": "python main.py " + " ".join(argv),
            "log": str(log_path),
            "settings": run.settings,
        }
        (run_dir / RUN_RECORD).write_text(json.dumps(mask_tree(record), indent=2) + "\n")
        result = read_result(run, self.out)
        if code == 0 and result.status != "ok":
            result.note = f"finished without test metrics (metrics.json has no {TEST_SCORE})"
        return result

    def _trial(self, run: Run) -> tuple[bool, str]:
        """Execute one run where the executor placed it; ``(succeeded, note)``."""
        result = self._execute_one(run)
        return result.status == "ok", result.note

    def execute(self, runs: Sequence[Run], title: str) -> list[RunResult]:
        """Run (or reuse, or skip) ``runs`` as one executor experiment; a line per run.

        Every run's configuration is resolved first (its digest goes into its record);
        on resume, every run is checked before any trains. The
        phase's earlier Tune experiment is restored when no run it finished has changed
        since (a changed one must train again, which a restored experiment would not do).
        """
        results: dict[int, RunResult] = {}
        todo: list[int] = []
        changed_finished = False
        for i, run in enumerate(runs):
            if run.status == "skipped":
                out = str(run.run_dir(self.out))
                results[i] = RunResult(run.phase, run.name, run.seed, "skipped", out, note=run.note)
                self.echo(f"[{title}] {run.name} seed {run.seed}: skipped ({run.note})")
                continue
            self.resolve(run)
            diffs = self._differences(run) if self.resume else None
            if diffs == []:
                results[i] = read_result(run, self.out)
                results[i].note = "resumed"
                self.echo(f"[{title}] {run_line(results[i])}")
                continue
            if diffs:
                self.echo(f"[{title}] re-running {run.name} seed {run.seed}: {'; '.join(diffs)}")
                record = read_json(run.run_dir(self.out) / RUN_RECORD) or {}
                changed_finished |= record.get("status") == "ok"
            todo.append(i)
        bar = tqdm(total=len(runs), desc=title, unit="run", initial=len(results), leave=False)
        reused = set(results)
        keys = {
            f"{run.name}/seed{run.seed}": i for i, run in enumerate(runs) if run.status != "skipped"
        }

        def done(outcome: TrialOutcome) -> None:
            i = keys[outcome.key]
            if i in reused:  # read and printed above
                return
            result = read_result(runs[i], self.out)
            if result.status == "missing":  # the trial ended before writing its record
                result.status, result.note = "failed", outcome.note or "the trial did not run"
            results[i] = result
            bar.update()
            self.echo(f"[{title} {len(results)}/{len(runs)}] {run_line(result)}")

        trials = [
            Trial(k, _reused if i in reused else functools.partial(self._trial, runs[i]))
            for k, i in keys.items()
        ]
        try:
            how = self.executor.run(
                self._experiment_name(runs[0].phase if runs else title, list(keys)),
                trials,
                done,
                restore=self.resume and not changed_finished,
            )
        finally:
            bar.close()
        if how:
            self.echo(f"[{title}] {how}")
        for i in todo:  # a trial the executor lost is one failed run
            if i not in results:
                done(TrialOutcome(f"{runs[i].name}/seed{runs[i].seed}", False, "no outcome"))
        ordered = [results[i] for i in range(len(runs))]
        self.results.extend(ordered)
        return ordered

    @staticmethod
    def _experiment_name(phase: str, keys: Sequence[str]) -> str:
        """``<phase>-<hash of its runs>``: a resumed sweep finds the same experiment."""
        return f"{phase}-{hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()[:8]}"

    def run(self) -> list[dict[str, Any]]:
        """Phase 1, the gate (and tuning), phase 2 if it may, then the summary; returns its rows.

        Raises:
            SweepError: the output folder holds runs of a sweep and ``resume`` is off.
        """
        self._check_out()
        self.out.mkdir(parents=True, exist_ok=True)
        self.echo(self.plan_text())
        with self.executor.session():
            return self._run_phases()

    def _run_phases(self) -> list[dict[str, Any]]:
        m = self.manifest
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
            scored = {c: eligible_score(pool, c) for c in [m.teacher, *(s.name for s in m.tuning)]}
            candidates = {c: v for c, (v, _) in scored.items()}
            teacher = best_of({c: v for c, v in candidates.items() if v is not None})
            decision = evaluate_gate(pool, teacher or m.teacher, m.students, m.margin)
            decision.tuned, decision.candidates = bool(m.tuning), candidates
            decision.excluded = {
                c: why for c, (_, why) in scored.items() if why
            } | decision.excluded
            self.gate = decision
            self.echo(f"teacher after tuning: {teacher}; {decision.describe()}")
        distil, self.gate.phase2_reason = self._phase2_decision(teacher)
        self.gate.phase2 = "runs" if distil else "does not run"
        self.echo(self.gate.phase2_line())
        (self.out / "gate.json").write_text(
            json.dumps(dataclasses.asdict(self.gate), indent=2) + "\n"
        )
        runs = self._phase2_runs(pool, teacher)
        if not distil:
            for run in runs:
                run.status, run.note = "skipped", "phase 2 does not run: the gate is not met"
        for result in self.execute(runs, PHASE_TITLES["phase2"]):
            if result.gap_closed is None and (result.name, result.seed) in self._gap_notes:
                result.gap_closed_reason = self._gap_notes[(result.name, result.seed)]
        return self.summarize()

    def _phase2_decision(self, teacher: str | None) -> tuple[bool, str]:
        """Whether phase 2 runs, and why (the gate's verdict, or who asked to distil anyway)."""
        gate = self.gate
        if gate.passed:
            return True, f"the teacher {teacher} meets the margin of {gate.margin:g}"
        if teacher is None:
            return False, "no teacher: every candidate failed, collapsed or has no score"
        after = " after teacher tuning" if gate.tuned else ""
        if self._distils_anyway():
            return True, (
                f"no teacher meets the margin{after}; distilling from the best one, {teacher}, "
                f"anyway because {self._on_fail_source()} says so"
            )
        return False, (
            f"no teacher meets the margin of {gate.margin:g}{after}; to distil from the best "
            f"one ({teacher}) anyway, set gate.on_fail: distil in the manifest or pass "
            "--distil_anyway true"
        )

    def _phase2_runs(self, pool: Sequence[RunResult], teacher: str | None) -> list[Run]:
        by = {(r.name, r.seed): r for r in pool}

        def extra(spec: Spec, seed: int) -> list[tuple[str, Any]]:
            args: list[tuple[str, Any]] = []
            t = by.get((teacher, seed))
            if t is not None and t.eligible and t.best_ckpt:
                args.append(("model.init_args.teacher_checkpoint", t.best_ckpt))
                if t.val_f1 is not None:
                    args.append(("model.init_args.teacher_f1", t.val_f1))
            b = by.get((spec.baseline, seed))
            if b is not None and b.eligible and b.val_f1 is not None:
                args.append(("model.init_args.baseline_f1", b.val_f1))
            elif b is not None and b.collapsed:  # never a baseline: its gap would be meaningless
                self._gap_notes[(spec.name, seed)] = f"baseline {b.name} seed {seed} collapsed"
            return args

        runs = self.runs_for("phase2", self.manifest.phase2, extra)
        for run in runs:
            if not any(k == "model.init_args.teacher_checkpoint" for k, _ in run.args):
                run.status, run.note = "skipped", f"no trained teacher for seed {run.seed}"
        return runs

    # -- summary
    def summarize(self) -> list[dict[str, Any]]:
        """Aggregate seeds per configuration; write runs.csv, summary.csv and summary.md.

        A configuration none of whose runs was attempted (phase 2 when the gate stopped
        it) has no summary row; its runs are in ``runs.csv`` as ``skipped``.
        """
        write_csv(self.out / "runs.csv", [dataclasses.asdict(r) for r in self.results])
        rows = summary_rows(self.results, self.manifest, self.gate)
        columns = list(rows[0]) if rows else ["phase", "config"]
        write_csv(self.out / "summary.csv", rows, columns)
        text = markdown(rows, self.gate, self.results)
        (self.out / "summary.md").write_text(mask_text(text))
        plot_summary(rows, self.out / "summary.png", self.out / "tensorboard", self.manifest.name)
        self.echo("\n" + text)
        return rows

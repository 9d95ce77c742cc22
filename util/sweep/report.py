"""What a sweep writes for people: progress lines, CSV tables and the summary.

:func:`summary_rows` aggregates the seeds of each configuration (``summary.csv``),
:func:`markdown` renders them with the gate's decision (``summary.md``). Every value
passes :func:`util.redact.mask_tree` (or ``mask_text``) on its way out: a run's note
may quote a command line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from models.task import MONITOR
from util.callbacks.provenance import code_version
from util.redact import mask_tree
from util.sweep.manifest import PHASE_TITLES, Manifest
from util.sweep.run import RunResult, read_predictions
from util.sweep.stats import GateDecision, best_of, bootstrap_macro_f1, mean_std

__all__ = ["PICTURE", "markdown", "run_line", "summary_rows", "write_csv"]

#: Per-run numbers aggregated over seeds in ``summary.csv`` (``<name>_mean``, ``<name>_std``).
AGGREGATED = ("val_f1", "test_f1", "test_acc", "test_bal_acc")
#: The summary picture's file name, beside ``summary.md`` (:func:`util.sweep.plot.plot_summary`).
PICTURE = "summary.png"
#: ``summary.md``'s columns.
_HEAD = (
    "| phase | config | model | seeds | collapsed | val macro-F1 | test macro-F1 | "
    "test 95% CI | test acc | test bal. acc | params | gap closed | data / code | "
    "chosen (on val) |"
)


def _score(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def run_line(r: RunResult) -> str:
    """One progress line for a finished (or failed, or skipped) run."""
    took = f" in {r.seconds:.0f} s" if r.seconds is not None else ""
    if r.status == "ok":
        resumed = " (resumed)" if r.note == "resumed" else ""
        collapsed = ", COLLAPSED" if r.collapsed else ""
        return (
            f"{r.name} seed {r.seed}: ok{took}{resumed}, "
            f"val F1 {_score(r.val_f1)}, test F1 {_score(r.test_f1)}{collapsed}"
        )
    return f"{r.name} seed {r.seed}: {r.status.upper()}{took}: {r.note} (log: {r.run_dir}/run.log)"


def write_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Write ``rows`` (masked; ``None`` as empty) atomically: a temporary file, then a rename."""
    columns = list(columns or (rows[0].keys() if rows else []))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(
            {k: "" if v is None else mask_tree(v) for k, v in row.items()} for row in rows
        )
    os.replace(tmp, path)


# -- summary.csv ---------------------------------------------------------------------------------


def _distinct(values: Iterable[str | None]) -> str | None:
    """The distinct non-empty values, in order of appearance, joined by spaces (``None``: none)."""
    seen = [v for v in dict.fromkeys(values) if v]
    return " ".join(seen) if seen else None


def _ok_by_seed(
    results: Sequence[RunResult], name: str, phases: Sequence[str]
) -> dict[int, RunResult]:
    return {r.seed: r for r in results if r.name == name and r.phase in phases and r.status == "ok"}


def gap_closed(
    results: Sequence[RunResult], name: str, baseline: str | None, teacher: str | None
) -> tuple[float | None, str | None]:
    """``(student − baseline) / (teacher − baseline)`` of mean validation scores, or why not.

    The means are over the seeds where the distilled ``name``, its ``baseline`` and the
    ``teacher`` all finished. The ratio is given only when the teacher is above the
    baseline (below it there is no gap to close, and the ratio would read as success for
    a student worse than its baseline) and no baseline seed collapsed.

    Returns:
        ``(ratio, None)``, or ``(None, reason)``.
    """
    if baseline is None:
        return None, "no baseline run in the manifest"
    if teacher is None:
        return None, "no teacher"
    student = _ok_by_seed(results, name, ["phase2"])
    base = _ok_by_seed(results, baseline, ["phase1"])
    teach = _ok_by_seed(results, teacher, ["phase1", "tuning"])
    if not student:
        return None, "no finished run"
    collapsed = sum(1 for r in base.values() if r.collapsed)
    if collapsed:
        return None, f"the baseline {baseline} collapsed in {collapsed} of {len(base)} seeds"
    seeds = [
        k
        for k in student
        if k in base
        and k in teach
        and None not in (student[k].val_f1, base[k].val_f1, teach[k].val_f1)
    ]
    if not seeds:
        return None, f"no seed where {name}, {baseline} and {teacher} all have a {MONITOR}"
    s, b, t = (sum(runs[k].val_f1 for k in seeds) / len(seeds) for runs in (student, base, teach))
    if t <= b:
        return None, f"teacher {t:.3f} is not above the baseline {b:.3f}"
    return (s - b) / (t - b), None


def _setting(args: Sequence[tuple[str, Any]], field: str) -> float | None:
    """The value a run's dotted ``args`` give ``…init_args.<field>`` (last one wins), or ``None``.

    ``None`` means the KD config file's own value (not set by the manifest).
    """
    value = None
    for key, v in args:
        if key.rsplit(".", 1)[-1] == field:
            value = v
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _row(
    results: Sequence[RunResult],
    manifest: Manifest,
    gate: GateDecision | None,
    phase: str,
    name: str,
) -> dict[str, Any]:
    """``summary.csv``'s row of one configuration: its seeds aggregated."""
    group = [r for r in results if (r.phase, r.name) == (phase, name)]
    ok = [r for r in group if r.status == "ok"]
    preds = [p for r in ok if (p := read_predictions(Path(r.run_dir))) is not None]
    preds = [p for p in preds if len(p[0])]
    ci = (None, None, None)
    if preds:
        k = max(p[2] for p in preds) or int(max(max(p[0].max(), p[1].max()) for p in preds)) + 1
        ci = bootstrap_macro_f1(
            [(t, p) for t, p, _ in preds], k, manifest.bootstrap_resamples, manifest.bootstrap_seed
        )
    row: dict[str, Any] = {"phase": phase, "config": name}
    row["model"] = next((r.model for r in ok if r.model), None)
    row["seeds_ok"] = f"{len(ok)}/{len(group)}"
    row["collapsed_runs"] = sum(1 for r in ok if r.collapsed)
    for key in AGGREGATED:
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std([getattr(r, key) for r in ok])
    row["test_f1_ci_low"], row["test_f1_ci_high"] = ci[1], ci[2]
    row["params"] = next((r.params for r in ok if r.params), None)
    row["latency_ms"] = mean_std([r.latency_ms for r in ok])[0]
    row["compression_ratio"] = mean_std([r.compression_ratio for r in ok])[0]
    row["gap_closed"], row["gap_closed_reason"] = None, None
    row["kd_student"], row["kd_alpha"], row["kd_temperature"] = None, None, None
    if phase == "phase2":
        spec = next((s for s in manifest.phase2 if s.name == name), None)
        if spec is not None:
            row["kd_student"] = spec.baseline or spec.model
            row["kd_alpha"] = _setting(spec.args, "alpha")
            row["kd_temperature"] = _setting(spec.args, "temperature")
        teacher = gate.teacher if gate is not None else None
        row["gap_closed"], row["gap_closed_reason"] = gap_closed(
            results, name, spec.baseline if spec is not None else None, teacher
        )
    row["data_fingerprint"] = _distinct(r.data_fingerprint for r in ok)
    row["code_version"] = _distinct(
        code_version({"commit": r.git_commit, "dirty": r.git_dirty}) for r in ok
    )
    row["chosen"] = ""
    return row


def _mark_best(rows: list[dict[str, Any]], manifest: Manifest, gate: GateDecision | None) -> None:
    """Mark, on the validation score only, the best student, teacher and distilled config.

    A configuration with a collapsed seed is never marked.
    """

    def best(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        scored = {i: r["val_f1_mean"] for i, r in enumerate(candidates) if not r["collapsed_runs"]}
        i = best_of({i: v for i, v in scored.items() if v is not None})
        return None if i is None else candidates[i]

    students = [r for r in rows if r["phase"] == "phase1" and r["config"] in manifest.students]
    distilled = [r for r in rows if r["phase"] == "phase2"]
    marks = [
        (best(students), "best baseline student"),
        (best(distilled), "best distilled"),
        (best(students + distilled), "best overall"),
    ]
    if gate is not None and gate.teacher and gate.teacher_val_f1 is not None:
        teacher_rows = [r for r in rows if r["config"] == gate.teacher and r["phase"] != "phase2"]
        label = "teacher" if gate.phase2 == "runs" else "best teacher (gate not met)"
        marks.append((teacher_rows[0] if teacher_rows else None, label))
    for row, label in marks:
        if row is not None:
            row["chosen"] = ", ".join(filter(None, [row["chosen"], label]))


def summary_rows(
    results: Sequence[RunResult], manifest: Manifest, gate: GateDecision | None
) -> list[dict[str, Any]]:
    """``summary.csv``: one row per configuration that was attempted, best ones marked.

    Per configuration: mean ± std over its finished seeds, the bootstrap interval of the
    test macro-F1, how many finished seeds collapsed (``collapsed_runs``; such a
    configuration is never marked as chosen), the gap closed (phase 2, :func:`gap_closed`),
    the distilled student's baseline and the KD ``alpha``/``temperature`` the manifest set
    (phase 2; empty where the KD config's own value applies)
    and the distinct data fingerprints and code versions of its seeds. A configuration
    none of whose runs was attempted (phase 2 when the gate stopped it) has no row.
    """
    attempted = dict.fromkeys((r.phase, r.name) for r in results if r.status != "skipped")
    rows = [_row(results, manifest, gate, phase, name) for phase, name in attempted]
    _mark_best(rows, manifest, gate)
    return rows


# -- summary.md ----------------------------------------------------------------------------------


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _provenance_cell(r: Mapping[str, Any]) -> str:
    return f"{r['data_fingerprint'] or '?'} / {r['code_version'] or '?'}"


def markdown(
    rows: Sequence[Mapping[str, Any]],
    gate: GateDecision | None,
    results: Sequence[RunResult] = (),
    picture: str | None = PICTURE,
) -> str:
    """``summary.md``: one table row per configuration, the picture, then collapse, gap and
    gate notes.

    Args:
        picture: file name, beside ``summary.md``, of :func:`util.sweep.plot.plot_summary`'s
            PNG to reference (``None``: no picture line).
    """
    lines = [_HEAD, "|" + "|".join(["---"] * _HEAD.count(" |")) + "|"]
    no_gap: dict[str, list[str]] = {}
    for r in rows:
        ci = (
            f"[{r['test_f1_ci_low']:.4f}, {r['test_f1_ci_high']:.4f}]"
            if r["test_f1_ci_low"] is not None
            else "n/a"
        )
        ok = int(str(r["seeds_ok"]).split("/")[0])
        collapsed = f"**{r['collapsed_runs']}/{ok}**" if r["collapsed_runs"] else f"0/{ok}"
        gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        if r["phase"] == "phase2" and r["gap_closed"] is None and r["gap_closed_reason"]:
            gap = "n/a"
            no_gap.setdefault(r["gap_closed_reason"], []).append(r["config"])
        cells = [
            PHASE_TITLES.get(r["phase"], r["phase"]),
            r["config"],
            r["model"] or "",
            r["seeds_ok"],
            collapsed,
            _pm(r["val_f1_mean"], r["val_f1_std"]),
            _pm(r["test_f1_mean"], r["test_f1_std"]),
            ci,
            _pm(r["test_acc_mean"], r["test_acc_std"]),
            _pm(r["test_bal_acc_mean"], r["test_bal_acc_std"]),
            "" if r["params"] is None else f"{int(r['params']):,}",
            gap,
            _provenance_cell(r),
            r["chosen"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if picture:
        text += f"\n![summary]({picture})\n"
    finished = [r for r in results if r.status == "ok"]
    if finished:
        down = [f"{r.name} seed {r.seed}" for r in finished if r.collapsed]
        text += (
            f"\ncollapsed runs: {len(down)} of {len(finished)} finished "
            "(at most one class predicted, or macro-F1 no better than always answering the "
            "majority class, on test or validation); a configuration with one is never "
            "chosen as a best, the teacher or a baseline"
            + (f": {', '.join(down)}" if down else "")
            + "\n"
        )
    for reason, configs in no_gap.items():
        text += f"\ngap closed not reported for {', '.join(configs)}: {reason}\n"
    if gate is not None:
        text += f"\n{gate.describe()}" + (" (after teacher tuning)" if gate.tuned else "") + "\n"
        if gate.phase2:
            text += f"\n{gate.phase2_line()}\n"
    return text

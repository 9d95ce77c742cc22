"""What a sweep writes for people: progress lines, CSV tables and the markdown summary.

Every value passes :func:`util.redact.mask_tree` (or ``mask_text``) on its way out: a
run's note may quote a command line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from util.redact import mask_tree
from util.sweep.manifest import PHASE_TITLES
from util.sweep.run import RunResult
from util.sweep.stats import GateDecision

__all__ = ["markdown", "run_line", "write_csv"]

#: ``summary.md``'s columns.
_HEAD = (
    "| phase | config | model | seeds | val macro-F1 | test macro-F1 | test 95% CI | "
    "test acc | test bal. acc | params | gap closed | chosen (on val) |"
)


def _score(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def run_line(r: RunResult) -> str:
    """One progress line for a finished (or failed, or skipped) run."""
    took = f" in {r.seconds:.0f} s" if r.seconds is not None else ""
    if r.status == "ok":
        resumed = " (resumed)" if r.note == "resumed" else ""
        return (
            f"{r.name} seed {r.seed}: ok{took}{resumed}, "
            f"val F1 {_score(r.val_f1)}, test F1 {_score(r.test_f1)}"
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


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def markdown(rows: Sequence[Mapping[str, Any]], gate: GateDecision | None) -> str:
    """``summary.md``: one table row per configuration, then the gate's decision."""
    lines = [_HEAD, "|" + "|".join(["---"] * 12) + "|"]
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

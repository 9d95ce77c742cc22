"""The sweep's statistics: mean ± std over seeds, a bootstrap interval, and the teacher gate.

Scores are compared the way :data:`models.task.MODE` says (higher is better for
``"max"``), on :data:`models.task.MONITOR`, the validation score; test numbers are
reported, never used to choose. A configuration with a collapsed seed (see
:attr:`~util.sweep.run.RunResult.eligible`) is never chosen: not as the best student,
the teacher or a baseline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from models.task import MODE, MONITOR
from util.sweep.run import RunResult

__all__ = [
    "GateDecision",
    "best_of",
    "bootstrap_macro_f1",
    "bootstrap_replicates",
    "eligible_score",
    "evaluate_gate",
    "macro_f1",
    "mean_score",
    "mean_std",
]

Key = TypeVar("Key")
#: Clips × replicates scored in one torchmetrics call (bounds its one-hot memory).
_CHUNK = 2_000_000


def macro_f1(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """torchmetrics' macro-F1 of each row of ``(..., n)`` integer class arrays.

    A class with no true and no predicted clip in a row is left out of that row's average.
    """
    # torch loads in seconds; `--help` and `--dry_run true` need none of it
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    targets, preds = np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    shape, n = targets.shape[:-1], targets.shape[-1]
    f1 = multiclass_f1_score(
        torch.from_numpy(preds.reshape(-1, n)),
        torch.from_numpy(targets.reshape(-1, n)),
        num_classes,
        average="macro",
        multidim_average="samplewise",
        validate_args=False,
    )
    return f1.double().numpy().reshape(shape)


def _groups(
    runs: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """``[(targets, [preds of each seed])]``: one group when every seed has the same test set."""
    targets = [np.asarray(t, dtype=np.int64) for t, _ in runs]
    preds = [np.asarray(p, dtype=np.int64) for _, p in runs]
    if any(len(t) == 0 for t in targets):
        raise ValueError("a run has no test predictions; leave it out of the bootstrap")
    if all(t.shape == targets[0].shape and np.array_equal(t, targets[0]) for t in targets):
        return [(targets[0], preds)]
    return [(t, [p]) for t, p in zip(targets, preds, strict=True)]


def bootstrap_replicates(
    runs: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Mean macro-F1 over seeds, once per bootstrap redraw of the test clips.

    Each replicate draws as many clips as the test set holds, with replacement, and
    scores every seed on the same draw (paired, when all seeds share the test set: the
    same targets in the same order; otherwise each seed's clips are drawn on their own).

    Args:
        runs: per seed ``(targets, predictions)`` integer arrays.
        num_classes: ``K``.
        resamples: bootstrap replicates.
        seed: random seed of the replicates.

    Returns:
        ``(resamples,)`` float array.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for targets, group in _groups(runs):
        n = len(targets)
        step = max(1, _CHUNK // n)
        for start in range(0, resamples, step):
            draw = rng.integers(0, n, size=(min(step, resamples - start), n))
            for preds in group:
                total[start : start + len(draw)] += macro_f1(
                    targets[draw], preds[draw], num_classes
                )
    return total / len(runs)


def bootstrap_macro_f1(
    runs: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean macro-F1 over seeds and its bootstrap interval over test clips.

    See :func:`bootstrap_replicates` for the draws; the interval is their percentiles.

    Args:
        runs: per seed ``(targets, predictions)`` integer arrays.
        num_classes: ``K``.
        resamples: bootstrap replicates.
        seed: random seed of the replicates.
        level: interval coverage.

    Returns:
        ``(point, low, high)``.
    """
    point = np.mean([macro_f1(t, p, num_classes) for t, p in runs])
    replicates = bootstrap_replicates(runs, num_classes, resamples, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(point), float(low), float(high)


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values (``None``: no value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return float(np.mean(vals)), std


def best_of(scores: Mapping[Key, float]) -> Key | None:
    """The key of the best score (by :data:`models.task.MODE`); ``None`` when empty."""
    if not scores:
        return None
    pick = max if MODE == "max" else min
    return pick(scores, key=scores.__getitem__)


def mean_score(results: Iterable[RunResult], name: str) -> float | None:
    """Mean validation score over the ``ok`` seeds of the run ``name``."""
    return mean_std([r.val_f1 for r in results if r.name == name and r.status == "ok"])[0]


def eligible_score(results: Iterable[RunResult], name: str) -> tuple[float | None, str]:
    """``(mean validation score, "")`` of ``name`` when it may be chosen, else ``(None, why)``.

    It may be chosen when it has a finished seed and none of its finished seeds collapsed.
    """
    done = [r for r in results if r.name == name and r.status == "ok"]
    if not done:
        return None, "no finished run"
    collapsed = sum(1 for r in done if r.collapsed)
    if collapsed:
        return None, f"collapsed in {collapsed} of {len(done)} seeds"
    score = mean_std([r.val_f1 for r in done])[0]
    return (score, "") if score is not None else (None, f"no {MONITOR} recorded")


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
    #: Runs left out of the comparison (collapsed, none finished), and why.
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Whether phase 2 ran (``ran``, ``not run``; empty until decided) and why.
    phase2: str = ""
    phase2_reason: str = ""

    def describe(self) -> str:
        """One line: the verdict, both scores, their difference and the margin."""

        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        gap = (
            None
            if self.teacher_val_f1 is None or self.best_student_val_f1 is None
            else self.teacher_val_f1 - self.best_student_val_f1
        )
        verdict = "passed" if self.passed else "NOT met"
        left_out = "; ".join(f"{name}: {why}" for name, why in self.excluded.items())
        return (
            f"gate {verdict}: teacher {self.teacher} {MONITOR} {f(self.teacher_val_f1)} vs best "
            f"student {self.best_student} {f(self.best_student_val_f1)} (difference {f(gap)}, "
            f"margin {self.margin:g})" + (f"; left out: {left_out}" if left_out else "")
        )

    def phase2_line(self) -> str:
        """One line: whether phase 2 ran, and why (empty before the sweep decided)."""
        if not self.phase2:
            return ""
        return f"phase 2 {self.phase2}: {self.phase2_reason}"


def evaluate_gate(
    results: Sequence[RunResult], teacher: str, students: Sequence[str], margin: float
) -> GateDecision:
    """Compare the teacher's mean validation score with the best student's.

    Only :func:`eligible_score` counts: a collapsed teacher fails the gate, a collapsed
    student is not the best student, and when every student collapsed or failed the gate
    is not met (the teacher beat nothing; the summary lists them as left out).

    Args:
        results: finished runs (only ``ok`` ones count).
        teacher: the teacher's run name.
        students: the students' run names.
        margin: by how much the teacher must be better.
    """
    excluded: dict[str, str] = {}

    def score(name: str) -> float | None:
        value, why = eligible_score(results, name)
        if why:
            excluded[name] = why
        return value

    scored = {s: v for s in students if (v := score(s)) is not None}
    best = best_of(scored)
    t = score(teacher)
    b = scored.get(best) if best else None
    gain = None if t is None or b is None else (t - b if MODE == "max" else b - t)
    # With students to beat but none usable (every one collapsed or failed), the teacher
    # has shown nothing: the gate is not met. Without students there is nothing to beat.
    passed = t is not None and (gain >= margin if gain is not None else not students)
    return GateDecision(teacher, t, best, b, margin, passed, excluded=excluded)

"""What a task measures on each split: torchmetrics per split, and collapse detection."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def collapse_report(confusion: torch.Tensor, f1_macro: float) -> dict[str, Any]:
    """Whether a model has collapsed onto (nearly) one class, from its confusion matrix.

    A model is **collapsed** on a split when it predicts at most one class there, or when
    its macro-F1 is at or below that of the majority-class baseline for the split's own
    counts: always predicting the most frequent class ``m`` scores
    ``F1_m = 2·n_m / (N + n_m)`` and 0 for every other class with samples, so the baseline
    is ``F1_m / K_present`` (classes with no samples are left out of macro averages, as
    torchmetrics does). With fewer than two classes present nothing is flagged.

    Args:
        confusion: ``(K, K)`` counts, rows true class, columns predicted class.
        f1_macro: the model's macro-F1 on the same split.

    Returns:
        ``pred_share`` (share of predictions per class index), ``never_predicted`` (class
        indices), ``majority_f1_macro`` (the baseline) and ``collapsed`` (bool).
    """
    counts = confusion.detach().cpu().to(torch.float64)
    total = float(counts.sum())
    support, predicted = counts.sum(dim=1), counts.sum(dim=0)
    share = (predicted / total).tolist() if total else [0.0] * len(predicted)
    present = int((support > 0).sum())
    majority = float(support.max()) if total else 0.0
    baseline = 2 * majority / (total + majority) / present if present else 0.0
    distinct = int((predicted > 0).sum())
    collapsed = present >= 2 and (distinct <= 1 or f1_macro <= baseline + 1e-9)
    return {
        "pred_share": share,
        "never_predicted": [k for k, n in enumerate(predicted.tolist()) if n == 0],
        "majority_f1_macro": baseline,
        "collapsed": bool(collapsed),
    }


def split_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, macro-F1, balanced accuracy, per-class P/R/F1 and the confusion matrix."""
    k = {"num_classes": num_classes}
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(average="micro", **k),
            "f1_macro": MulticlassF1Score(average="macro", **k),
            "bal_acc": MulticlassAccuracy(average="macro", **k),  # mean per-class recall
            "precision": MulticlassPrecision(average=None, **k),
            "recall": MulticlassRecall(average=None, **k),
            "f1": MulticlassF1Score(average=None, **k),
            "confusion": MulticlassConfusionMatrix(**k),
        }
    )

"""The plain sleep-sound classifier: :class:`models.task.Task` with the class-weighted loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.task import Step, Task

__all__ = ["Classifier"]


class Classifier(Task):
    """A backbone trained with the class-weighted cross-entropy (the plain recipe).

    Every argument is :class:`models.task.Task`'s; ``python main.py fit --model.help
    Classifier`` lists them.
    """

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy (unweighted with ``use_class_weights: false``)."""
        weight = self.class_weight if self.hparams.use_class_weights else None
        return F.cross_entropy(logits, target, weight=weight)

    def compute_loss(self, step: Step) -> torch.Tensor:
        """The cross-entropy, over both mixup targets when the batch was mixed."""
        return step.mixed(self.cross_entropy)

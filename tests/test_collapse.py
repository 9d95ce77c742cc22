"""A model that predicts one class is flagged in metrics.json, the leaderboard and TensorBoard."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from main import main
from models.backbones import Backbone
from tests.helpers import tiny_args


class Snorer(Backbone):
    """Calls every clip ``snore`` (the third class), whatever it hears."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 5.0]))

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.bias.expand(x.shape[0], -1) + 0 * x.mean(), []


def test_a_run_that_predicts_one_class_is_flagged_everywhere(tmp_path: Path) -> None:
    args = tiny_args(tmp_path, "--model.init_args.backbone", "tests.test_collapse.Snorer")
    fit = main(["fit", *args, "--trainer.max_epochs", "1", "--model.init_args.freq_mask", "0"])
    tested = main(["test", *args, "--ckpt_path", fit.trainer.checkpoint_callback.best_model_path])
    metrics = json.loads((Path(tested.trainer.log_dir) / "metrics.json").read_text())
    test = metrics["collapse"]["test"]
    assert test["collapsed"] is True
    assert test["never_predicted"] == ["quiet", "breathe"]
    assert test["pred_share"] == {"quiet": 0.0, "breathe": 0.0, "snore": 1.0}
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["collapsed"] for r in rows] == ["True", "True"]  # the fit row (val), the test row
    events = EventAccumulator(tested.trainer.log_dir)
    events.Reload()
    assert events.Scalars("test/collapsed")[-1].value == 1.0
    assert events.Scalars("test/pred_share/snore")[-1].value == 1.0

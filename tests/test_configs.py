"""Every experiment YAML under config/ instantiates and trains a step on the synthetic source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from main import main
from tests.helpers import ROOT

#: The experiment configs (``config/data/`` holds data sections, ``config/sweep/`` manifests).
EXPERIMENTS = sorted(p.name for p in (ROOT / "config").glob("*.yaml") if p.name != "defaults.yaml")
#: A few hundred clips of the synthetic corpus in place of the hub's DreamCatcher.
SYNTHETIC = json.dumps(
    {
        "class_path": "data.sources.Synthetic",
        "init_args": {"clips_per_split": {"train": 24, "validation": 12, "test": 12}},
    }
)


def _args(name: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "config" / name),
        "--data.source", SYNTHETIC,
        "--data.cache_dir", str(tmp_path / "cache"),
        "--data.progress", "false",
        "--data.num_workers", "0",
        "--data.batch_size", "8",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "log"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--leaderboard.path", str(tmp_path / "leaderboard.csv"),
        "--latency.runs", "1",
        *extra,
    ]  # fmt: skip


def test_every_experiment_config_is_covered() -> None:
    assert {"demo.yaml", "tinycnn.yaml", "crnn.yaml", "kd_tinycnn.yaml"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_print_config_shows_every_default_that_will_run(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "config" / name), "--print_config"])
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    assert model["optimizer"]["class_path"] == "models.task.Adam"
    assert config["data"]["source"]["class_path"].startswith("data.sources.")
    assert config["data"]["features"]["class_path"] == "data.features.LogMelFrontEnd"
    assert config["checkpoint"]["monitor"] == "val/f1_macro"
    assert config["predict_engine"]["runtime"] == "auto"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CRNN teacher trained one step on the synthetic source with the reference features."""
    root = tmp_path_factory.mktemp("teacher")
    cli = main(
        ["fit", *_args("crnn.yaml", root),
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
         "--trainer.limit_val_batches", "1"]
    )  # fmt: skip
    return Path(cli.trainer.checkpoint_callback.best_model_path)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_trains_on_the_synthetic_source(
    name: str, tmp_path: Path, teacher: Path
) -> None:
    extra = ["--model.init_args.teacher_checkpoint", str(teacher)] if name.startswith("kd_") else []
    cli = main(["fit", *_args(name, tmp_path, "--trainer.fast_dev_run", "true", *extra)])
    assert cli.trainer.state.finished
    assert cli.model.feature_config == cli.datamodule.feature_config

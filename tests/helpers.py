"""Helpers shared by the tests that run ``main.py`` in-process on the demo config."""

from __future__ import annotations

from pathlib import Path

from models.classifier import Classifier, build_like_cli, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: The demo's corpus cut down to seconds of work.
TINY_SPLITS = '{"train": 96, "validation": 48, "test": 48}'


def tiny_args(
    tmp_path: Path, *extra: str, splits: str = TINY_SPLITS, latency_runs: int = 2
) -> list[str]:
    """``config/demo.yaml`` on a tiny corpus, every output under ``tmp_path``."""
    return [
        "--config", str(ROOT / "config" / "demo.yaml"),
        "--data.source.init_args.clips_per_split", splits,
        "--data.cache_dir", str(tmp_path / "cache"),
        "--data.progress", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "log"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--artifacts.leaderboard", str(tmp_path / "leaderboard.csv"),
        "--latency.runs", str(latency_runs),
        *extra,
    ]  # fmt: skip


def untrained_checkpoint(path: Path) -> Path:
    """An untrained native TinyCNN written as a CLI-style ``.ckpt`` (three default classes)."""
    model = build_like_cli(
        Classifier,
        "models.backbones.TinyCNN",
        num_classes=3,
        in_channels=2,
        class_names=["quiet", "breathe", "snore"],
        input_shape=(2, 64, 101),
    )
    return save_checkpoint(model, path)

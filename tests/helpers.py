"""Helpers shared by the tests (and the benchmarks): tiny CLI runs, CLI-style checkpoints."""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

from models.classifier import Classifier
from models.task import Task

ROOT = Path(__file__).resolve().parents[1]
#: The demo config cut down to seconds of work (tiny corpus, no bars, two latency runs).
TINY = ROOT / "tests" / "conf" / "tiny.yaml"


def tiny_args(
    tmp_path: Path, *extra: str, splits: str | None = None, latency_runs: int | None = None
) -> list[str]:
    """``config/demo.yaml`` + ``tests/conf/tiny.yaml``, every output under ``tmp_path``.

    ``splits`` (a JSON ``{split: clips}``) and ``latency_runs`` override the tiny config's.
    """
    args = [
        "--config", str(ROOT / "config" / "demo.yaml"),
        "--config", str(TINY),
        "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "log"),
        "--leaderboard.path", str(tmp_path / "leaderboard.csv"),
    ]  # fmt: skip
    if splits is not None:
        args += ["--data.source.init_args.clips_per_split", splits]
    if latency_runs is not None:
        args += ["--latency.runs", str(latency_runs)]
    return [*args, *extra]


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


def load_windows_whole(path: Path, front_end, hop_s: float = 0.5):
    """Features of every window of a *short* file decoded and resampled whole.

    The reference the streaming path (:class:`data.recordings.RecordingWindows`) is
    tested against: decode with :func:`data.audio.decode`, resample the whole signal
    with :func:`data.audio.resample`, cut the windows, run the front end (an
    ``nn.Module`` with ``sample_rate`` and ``clip_samples``) once.

    Returns:
        ``(x (N, C, F, T), start_s (N,))``, torch tensors.
    """
    import torch

    from data.audio import decode, resample
    from data.recordings import window_count

    wave, sr = decode(path)
    wave = resample(wave, sr, int(front_end.sample_rate))
    clip = int(front_end.clip_samples)
    hop = max(1, int(round(hop_s * front_end.sample_rate)))
    n = window_count(wave.shape[1], clip, hop)
    waves = torch.stack([torch.from_numpy(wave[:, k * hop : k * hop + clip]) for k in range(n)])
    with torch.inference_mode():
        x = front_end(waves) if n else torch.zeros(0)
    return x, torch.arange(n, dtype=torch.float64) * (hop / front_end.sample_rate)


def build_like_cli(
    cls: type[Task],
    backbone: str,
    backbone_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Task:
    """Build ``cls`` outside the CLI with the hyperparameters LightningCLI would record.

    Its checkpoints then hold ``_class_path``, ``_instantiator`` and the backbone as a
    ``class_path``/``init_args`` dict, exactly like a ``python main.py fit`` checkpoint,
    so ``load_from_checkpoint``, ``test --ckpt_path`` and export treat them alike.
    Used by tests and benchmarks. It records the hyper-parameters through Lightning's
    private ``_given_hyperparameters_context``, the hook LightningCLI itself uses; that is
    why it lives here and not in the models.

    Args:
        cls: ``Classifier`` or a subclass.
        backbone: the backbone's class path, e.g. ``models.backbones.TinyCNN``.
        backbone_args: its init args (without ``in_channels``/``num_classes``).
        kwargs: the module's own init args.
    """
    backbone_args = dict(backbone_args or {})
    module, name = backbone.rsplit(".", 1)
    factory = functools.partial(getattr(importlib.import_module(module), name), **backbone_args)
    defaults = {
        # a class default (the optimizer's) as the class_path spec the CLI records: a class
        # itself would be pickled by reference, which weights-only loading refuses
        n: {"class_path": f"{d.__module__}.{d.__qualname__}"} if isinstance(d, type) else d
        for klass in (Task, cls)
        for n, p in inspect.signature(klass.__init__).parameters.items()
        if (d := p.default) is not inspect.Parameter.empty
    }
    hparams = {
        "_class_path": f"{cls.__module__}.{cls.__qualname__}",
        **defaults,
        "backbone": {"class_path": backbone, "init_args": backbone_args},
        **kwargs,
    }
    with _given_hyperparameters_context(hparams, "lightning.pytorch.cli.instantiate_module"):
        return cls(backbone=factory, **kwargs)


def save_checkpoint(module: LightningModule, path: str | Path) -> Path:
    """Write ``module`` (e.g. from :func:`build_like_cli`, untrained) as a ``.ckpt`` file.

    The file is what ``Trainer.save_checkpoint`` writes during fit (weights,
    hyperparameters, Lightning's version), so ``--ckpt_path`` accepts it. Used by
    tests and benchmarks that need a checkpoint without training one.
    """
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        max_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path

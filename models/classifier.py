"""The plain sleep-sound classifier: a backbone, a loss, augmentation and metrics."""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchaudio.transforms as AT
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from models.backbones import Backbone, TinyCNN

STAGES = ("train", "val", "test")
PREDICT_ENGINES = ("auto", "torch", "onnxruntime")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint was made for another backbone or class count than the configured model."""


class Adam(torch.optim.Adam):
    """Adam with the reference recipe's defaults: lr 1e-3, weight decay 1e-5.

    The classifier's default optimizer, so that ``--model.init_args.optimizer.init_args.lr
    0.003`` (and ``--print_config``) see a real class with real defaults, not ``None``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
        )


#: The metric that picks the best checkpoint and stops training (mode ``max``).
MONITOR = "val/f1_macro"
#: Checkpoint key holding ``{"monitor", "value"}``: the validation score of its weights.
VALIDATION_SCORE_KEY = "earsleep_validation_score"


def checkpoint_validation_score(checkpoint: dict[str, Any]) -> float | None:
    """The validation macro-F1 of the weights in a checkpoint, if it recorded one.

    Read from :data:`VALIDATION_SCORE_KEY` (written by :meth:`Classifier.on_save_checkpoint`)
    or, in files written before it, from the ``val/f1_macro`` ``ModelCheckpoint``'s state.
    """
    recorded = checkpoint.get(VALIDATION_SCORE_KEY)
    if isinstance(recorded, dict) and recorded.get("monitor") == MONITOR:
        return float(recorded["value"])
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict):
            continue
        if state.get("monitor") != MONITOR:
            continue
        for name in ("current_score", "best_model_score"):
            value = state.get(name)
            if value is not None and math.isfinite(float(value)):
                return float(value)
    return None


class NonFiniteLossError(FloatingPointError):
    """A step's loss is NaN or infinite: training stops instead of saving a NaN model."""


def _split_metrics(num_classes: int) -> MetricCollection:
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


class Classifier(LightningModule):
    """Classify log-mel clips with a backbone; the plain (no teacher) training recipe.

    ``num_classes``, ``in_channels``, ``class_names`` and ``input_shape`` come from
    the data module (the CLI links them), so YAML only names the backbone and the
    recipe.

    Args:
        backbone: the network, as ``class_path``/``init_args`` without ``in_channels``
            and ``num_classes`` (e.g. ``models.backbones.TinyCNN``).
        num_classes: number of classes (linked from ``data.num_classes``).
        in_channels: input channels of the log-mel maps (linked from the data).
        class_names: class names in label order (linked from the data).
        input_shape: ``(C, F, T)`` of one input (linked from the data); used for
            profiling and export.
        features: the front end's configuration (linked from ``data.feature_config``:
            :meth:`data.features.LogMelFrontEnd.config`). Saved with the checkpoint, so
            ``test``, ``validate``, ``predict`` and export can tell whether the data they
            are given comes from the same front end (:mod:`models.compatibility`).
        class_weights: cross-entropy class weights; ``None`` takes the data module's
            inverse-frequency weights from the train counts.
        use_class_weights: weigh the loss by class at all.
        normalize: standardise each mel band with the train split's mean and std
            (stored in the checkpoint, so prediction matches training). Turn off for the
            ``reference`` preset, whose dB input is used as published.
        freq_mask: SpecAugment frequency-mask width (bins, train only; 0 disables).
        time_mask: SpecAugment time-mask width (frames, train only; 0 disables).
        num_masks: how many masks of each kind per clip.
        mixup_alpha: Beta(α, α) mixup of train batches (0 disables).
        optimizer: optimizer ``class_path``/``init_args`` (without ``params``); the
            default, :class:`Adam`, is the reference recipe (lr 1e-3, weight decay 1e-5):
            ``--model.init_args.optimizer.init_args.lr 0.003`` changes its learning rate.
        lr_scheduler: optional scheduler ``class_path``/``init_args`` (without the
            optimizer); ``ReduceLROnPlateau`` watches ``val/f1_macro``.
        predict_engine: what runs the model in ``predict``. ``onnxruntime`` exports it
            to ONNX once when prediction starts, checks the logits against PyTorch
            (within 1e-4) and runs ONNX Runtime on the CPU, about twice as fast as eager
            PyTorch for the tiny CNNs (:class:`util.export.OnnxRuntimeRunner`);
            ``torch`` runs PyTorch; ``auto`` takes ONNX Runtime on a CPU and PyTorch on
            a GPU, or when the export or its check fails (with a warning). Training,
            validation and testing always run PyTorch.
    """

    def __init__(
        self,
        backbone: Callable[[int, int], Backbone] = TinyCNN,
        num_classes: int = 3,
        in_channels: int = 2,
        class_names: Sequence[str] | None = None,
        input_shape: Sequence[int] = (2, 64, 101),
        features: dict[str, Any] | None = None,
        class_weights: Sequence[float] | None = None,
        use_class_weights: bool = True,
        normalize: bool = True,
        freq_mask: int = 8,
        time_mask: int = 10,
        num_masks: int = 1,
        mixup_alpha: float = 0.0,
        optimizer: OptimizerCallable = Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        predict_engine: Literal["auto", "torch", "onnxruntime"] = "auto",
    ) -> None:
        super().__init__()
        if predict_engine not in PREDICT_ENGINES:
            raise ValueError(
                f"predict_engine must be one of {PREDICT_ENGINES}, got {predict_engine!r}"
            )
        self.save_hyperparameters()
        self.backbone = backbone(in_channels, num_classes)
        if not isinstance(self.backbone, Backbone):
            raise TypeError(
                f"backbone must build a models.backbones.Backbone, got {type(self.backbone)}"
            )
        self.num_classes = num_classes
        self.class_names = list(class_names or [f"class{i}" for i in range(num_classes)])
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.input_shape = tuple(input_shape)
        #: The front end's configuration the model is trained on (``None``: not recorded).
        self.feature_config: dict[str, Any] | None = dict(features) if features else None
        self.example_input_array = torch.zeros(1, *self.input_shape)
        self.normalize = normalize
        channels, bands = self.input_shape[0], self.input_shape[1]
        self.register_buffer("band_mean", torch.zeros(channels, bands, 1))
        self.register_buffer("band_std", torch.ones(channels, bands, 1))
        weights = torch.ones(num_classes) if class_weights is None else torch.tensor(class_weights)
        self.register_buffer("class_weight", weights.float())
        self._weights_given = class_weights is not None
        masks = [AT.FrequencyMasking(freq_mask, iid_masks=True)] * (num_masks if freq_mask else 0)
        masks += [AT.TimeMasking(time_mask, iid_masks=True)] * (num_masks if time_mask else 0)
        self.augment = nn.Sequential(*masks)
        self.mixup_alpha = mixup_alpha
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        # keyed "<stage>_metrics": a bare "train" key would shadow nn.Module.train
        self.metrics = nn.ModuleDict({f"{s}_metrics": _split_metrics(num_classes) for s in STAGES})
        #: Confusion matrix (rows true, cols predicted) of the last val/test epoch.
        self.confusion: dict[str, torch.Tensor] = {}
        #: Test-set ``index``, ``target`` and ``probs`` after a test epoch.
        self.test_predictions: dict[str, torch.Tensor] = {}
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.predict_engine = predict_engine
        #: The ONNX Runtime runner while predicting with it, else ``None``.
        self.onnx_runner: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- data-derived state -------------------------------------------------
    def setup(self, stage: str) -> None:
        """Take class weights and band statistics from the data module before fitting."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if stage != "fit" or dm is None:
            return
        if not self._weights_given and self.hparams.use_class_weights:
            weights = getattr(dm, "class_weights", None)
            if weights is not None:
                self.class_weight.copy_(torch.as_tensor(weights, dtype=torch.float32))
        stats = getattr(dm, "feature_stats", None)
        if self.normalize and stats is not None:
            mean, std = stats
            self.band_mean.copy_(torch.as_tensor(mean).reshape_as(self.band_mean))
            self.band_std.copy_(torch.as_tensor(std).reshape_as(self.band_std).clamp_min(1e-5))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the validation score of exactly these weights (``VALIDATION_SCORE_KEY``).

        A ``ModelCheckpoint``'s own state keeps the score of the last file *it* wrote, so
        a ``last.ckpt`` written by another callback would carry an older epoch's score.
        """
        value = self.trainer.callback_metrics.get(MONITOR) if self._trainer is not None else None
        if value is not None and bool(torch.isfinite(torch.as_tensor(value))):
            checkpoint[VALIDATION_SCORE_KEY] = {"monitor": MONITOR, "value": float(value)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint made for another backbone or class count, naming both."""
        hp = checkpoint.get("hyper_parameters", {})
        theirs = _backbone_name(hp.get("backbone"))
        ours = type(self.backbone).__name__
        their_classes = hp.get("num_classes")
        if (theirs and theirs != ours) or (their_classes and their_classes != self.num_classes):
            raise CheckpointMismatchError(
                f"checkpoint holds {theirs or '?'} with {their_classes} classes, but the configured "
                f"model is {ours} with {self.num_classes} classes; pass the checkpoint's own config "
                "(its run folder has config.yaml) or a matching --model"
            )

    def configure_optimizers(self) -> object:
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=1e-5)
        else:
            optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        monitor = (
            {"monitor": "val/f1_macro"}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            else {}
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **monitor}}

    # -- forward ------------------------------------------------------------
    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Per-band standardisation with the train statistics (identity when off)."""
        return (x - self.band_mean) / self.band_std if self.normalize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` for raw front-end features ``(B, C, F, T)``."""
        return self.backbone(self.standardize(x))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy."""
        weight = self.class_weight if self.hparams.use_class_weights else None
        return F.cross_entropy(logits, target, weight=weight)

    def train_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise then augment a train batch (masking never touches val/test)."""
        return self.augment(self.standardize(x))

    def compute_loss(
        self, x: torch.Tensor, y: torch.Tensor, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits)``; subclasses change the loss, not the step."""
        if stage == "train":
            x = self.train_inputs(x)
            if self.mixup_alpha > 0:
                lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
                perm = torch.randperm(x.shape[0], device=x.device)
                logits = self.backbone(lam * x + (1 - lam) * x[perm])
                loss = lam * self.loss(logits, y) + (1 - lam) * self.loss(logits, y[perm])
                return loss, logits
        else:
            x = self.standardize(x)
        logits = self.backbone(x)
        return self.loss(logits, y), logits

    # -- the one shared step ------------------------------------------------
    def shared_step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss, logits = self.compute_loss(x, y, stage)
        # One scalar sync per step (detect_anomaly checks every op and is far slower). The
        # error ends fit before any checkpoint, metrics or leaderboard row of a NaN model.
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(
                f"{stage} loss is {float(loss.detach())} at epoch {self.current_epoch}, "
                f"global step {self.global_step}: training stopped. The input holds NaN/inf "
                "(check the cache with data.cache.open_cache(path, check_rows=True)) or the "
                "model diverged (lower the learning rate)"
            )
        self.metrics[f"{stage}_metrics"].update(logits.detach(), y)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=x.shape[0],
            sync_dist=stage != "train",
        )
        if stage == "test":
            self._test_batches.append((y.detach(), logits.detach().softmax(dim=1)))
        return loss

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "test")

    def predict_step(self, batch: object, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities ``(B, K)``; ``batch`` is ``(x, y)``, ``x`` or a dict with ``"x"``."""
        if isinstance(batch, dict):
            x = batch["x"]
        else:
            x = batch[0] if isinstance(batch, list | tuple) else batch
        logits = self(x) if self.onnx_runner is None else self.onnx_runner(x)
        return logits.softmax(dim=1)

    def on_predict_start(self) -> None:
        """Build the ONNX Runtime runner when ``predict_engine`` asks for it."""
        self.onnx_runner = None
        engine = self.predict_engine
        if engine == "torch" or (engine == "auto" and self.device.type != "cpu"):
            return
        if self.device.type != "cpu":
            raise ValueError(
                f"predict_engine 'onnxruntime' runs on the CPU but the model is on "
                f"{self.device}; use predict_engine 'torch' (or 'auto')"
            )
        try:
            from util.export import ExportError, OnnxRuntimeRunner
        except ImportError as err:
            if engine == "onnxruntime":
                raise
            rank_zero_warn(f"predict_engine auto: no ONNX Runtime ({err}); predicting with torch")
            return
        try:
            self.onnx_runner = OnnxRuntimeRunner(
                self, self.input_shape, threads=torch.get_num_threads()
            )
        except ExportError as err:
            if engine == "onnxruntime":
                raise
            first = str(err).strip().splitlines()[0]
            rank_zero_warn(
                f"predict_engine auto: ONNX Runtime cannot run {type(self.backbone).__name__} "
                f"({first}); predicting with torch"
            )

    def on_predict_end(self) -> None:
        self.onnx_runner = None

    # -- epoch ends: compute, log, keep the confusion ---------------------------
    def _log_epoch(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self.metrics[f"{stage}_metrics"].reset()
            return
        values = self.metrics[f"{stage}_metrics"].compute()
        self.metrics[f"{stage}_metrics"].reset()
        confusion = values.pop("confusion").long().cpu()
        scalars = {f"{stage}/{k}": values[k] for k in ("acc", "f1_macro", "bal_acc")}
        for kind in ("precision", "recall", "f1"):
            for name, v in zip(self.class_names, values[kind], strict=True):
                scalars[f"{stage}/{kind}/{name}"] = v
        # values are already synced by torchmetrics; reducing identical values again is harmless
        f1 = scalars.pop(f"{stage}/f1_macro")
        self.log(f"{stage}/f1_macro", f1, prog_bar=True, sync_dist=True)
        self.log_dict(scalars, sync_dist=True)
        missing = [n for n, row in zip(self.class_names, confusion, strict=True) if row.sum() == 0]
        if missing and stage != "train":
            rank_zero_warn(
                f"{stage}: no samples of class {', '.join(missing)}; its recall and F1 are "
                "undefined and left out of the macro averages"
            )
        self.confusion[stage] = confusion

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._test_batches = []

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        if not self._test_batches:
            return
        target = torch.cat([t for t, _ in self._test_batches])
        probs = torch.cat([p for _, p in self._test_batches])
        self._test_batches = []
        if self.trainer.world_size > 1:  # DistributedSampler gives equal-sized shards
            target = self.all_gather(target).reshape(-1)
            probs = self.all_gather(probs).reshape(-1, self.num_classes)
        self.test_predictions = {
            "index": torch.arange(target.numel()),
            "target": target.cpu(),
            "probs": probs.float().cpu(),
        }


def _backbone_name(spec: object) -> str | None:
    """The class name of a backbone hyperparameter (dict from the CLI, or a class)."""
    if isinstance(spec, dict) and "class_path" in spec:
        return str(spec["class_path"]).rsplit(".", 1)[-1]
    if isinstance(spec, type):
        return spec.__name__
    return None


def build_like_cli(
    cls: type[Classifier],
    backbone: str,
    backbone_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Classifier:
    """Build ``cls`` outside the CLI with the hyperparameters LightningCLI would record.

    Its checkpoints then hold ``_class_path``, ``_instantiator`` and the backbone as a
    ``class_path``/``init_args`` dict, exactly like a ``python main.py fit`` checkpoint,
    so ``load_from_checkpoint``, ``test --ckpt_path`` and export treat them alike.
    Used by tests and benchmarks.

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
        for klass in (Classifier, cls)
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

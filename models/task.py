"""The task contract every earsleep LightningModule follows: :class:`Task`.

A task owns what every recipe shares (its hyper-parameters, the backbone, the input path,
metrics per split, the one shared step, checkpoint bookkeeping and the monitored score)
and leaves one part to its subclasses: :meth:`Task.compute_loss`. The plain classifier
(:class:`models.classifier.Classifier`) fills it with the class-weighted cross-entropy;
distillation (:class:`models.distillation.DistillationClassifier`) adds the teacher's terms
to it and never touches the input path.

``MONITOR``/``MODE`` name the score that selects checkpoints, stops early and ranks sweep
runs: spelled once here, read by the CLI's defaults, the checkpoint callbacks, early
stopping and :mod:`util.sweep`.

What callbacks read or set on a module is declared, not found by ``getattr``: the
reporting callbacks (confusion matrices, latency, run artifacts) take any module that
follows :class:`Reports` (a :class:`Task` does); the predict engine sets a task's
``predict_runner``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torchaudio.transforms as AT
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from models.backbones import Backbone, TinyCNN
from models.compatibility import check_compatible
from models.metrics import collapse_report, split_metrics
from models.pruning import conform_to_state_dict

#: The validation score that decides (checkpointing, early stopping, sweeps).
MONITOR = "val/f1_macro"
#: Whether :data:`MONITOR` is better when higher (``"max"``) or lower.
MODE = "max"
#: Checkpoint key holding ``{"monitor", "value"}``: the validation score of its weights.
VALIDATION_SCORE_KEY = "earsleep_validation_score"
STAGES = ("train", "val", "test")


class NonFiniteLossError(FloatingPointError):
    """A step's loss is NaN or infinite: training stops instead of saving a NaN model."""


class Adam(torch.optim.Adam):
    """Adam with the reference recipe's defaults: lr 1e-3, weight decay 1e-5.

    The tasks' default optimizer, so that ``--model.init_args.optimizer.init_args.lr
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


def checkpoint_validation_score(checkpoint: dict[str, Any]) -> float | None:
    """The validation macro-F1 of the weights in a checkpoint, if it recorded one.

    Read from :data:`VALIDATION_SCORE_KEY` (written by :meth:`Task.on_save_checkpoint`)
    or, in files written before it, from the monitoring ``ModelCheckpoint``'s state.
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


@runtime_checkable
class Reports(Protocol):
    """What the reporting callbacks read from (and, for ``complexity``, write to) a module."""

    #: Class names in label order.
    class_names: list[str]
    #: Confusion matrix (rows true, cols predicted) of the last epoch, by stage.
    confusion: dict[str, torch.Tensor]
    #: Test-set ``index``, ``target`` and ``probs`` after a test epoch (empty before).
    test_predictions: dict[str, torch.Tensor]
    #: Params, MACs, bytes and latency, written by :class:`util.callbacks.LatencyProfiler`.
    complexity: dict[str, Any] | None
    #: :func:`models.metrics.collapse_report` of the last epoch, by stage (``val``, ``test``).
    collapse: dict[str, dict[str, Any]]

    def run_summary(self) -> dict[str, Any]:
        """Columns the module adds to the run's leaderboard row."""
        ...


@dataclass
class Step:
    """One batch on its way through :meth:`Task.shared_step`, handed to the loss.

    Attributes:
        stage: ``train``, ``val`` or ``test``.
        inputs: what the backbone saw: standardised and, in training, augmented and mixed.
        target: class indices ``(B,)``.
        logits: the backbone's output ``(B, K)``.
        maps: the backbone's feature maps when :meth:`Task.wants_maps` asked for them.
        lam: the mixup weight of ``target`` (1: no mixup).
        perm: the batch permutation mixed in with weight ``1 - lam`` (``None``: no mixup).
    """

    stage: str
    inputs: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    maps: list[torch.Tensor]
    lam: float = 1.0
    perm: torch.Tensor | None = None

    def mixed(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``loss(logits, target)``, blended over the mixup targets when the batch was mixed."""
        value = loss(self.logits, self.target)
        if self.perm is None:
            return value
        return self.lam * value + (1 - self.lam) * loss(self.logits, self.target[self.perm])


class Task(LightningModule):
    """Classify log-mel clips with a backbone: everything a recipe shares but its loss.

    ``num_classes``, ``in_channels``, ``class_names``, ``input_shape`` and ``features``
    come from the data module (the CLI links them), so YAML only names the backbone and
    the recipe.

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
            optimizer); ``ReduceLROnPlateau`` watches :data:`MONITOR`.
    """

    #: The score that selects checkpoints and stops training, and whether higher is better.
    monitor: ClassVar[str] = MONITOR
    mode: ClassVar[str] = MODE

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # a subclass's own arguments too (Lightning walks the frames)
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
        self.metrics = nn.ModuleDict({f"{s}_metrics": split_metrics(num_classes) for s in STAGES})
        #: Confusion matrix (rows true, cols predicted) of the last val/test epoch.
        self.confusion: dict[str, torch.Tensor] = {}
        #: Test-set ``index``, ``target`` and ``probs`` after a test epoch.
        self.test_predictions: dict[str, torch.Tensor] = {}
        #: :func:`models.metrics.collapse_report` of the last val/test epoch, by stage.
        self.collapse: dict[str, dict[str, Any]] = {}
        #: Params, MACs, bytes and latency, set by :class:`util.callbacks.LatencyProfiler`.
        self.complexity: dict[str, Any] | None = None
        #: What computes logits in ``predict`` instead of :meth:`forward`: set for the
        #: duration of a predict run by :class:`util.callbacks.PredictEngine`.
        self.predict_runner: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- hooks the CLI and the callbacks call ---------------------------------
    def check_ready(self) -> None:
        """Fail before any data is prepared if the task cannot train (the CLI calls it)."""

    def run_summary(self) -> dict[str, Any]:
        """Columns this task adds to the run's leaderboard row (none for the plain task)."""
        return {}

    # -- the part recipes fill in --------------------------------------------
    def compute_loss(self, step: Step) -> torch.Tensor:
        """The loss of one step (see :class:`Step`); every task defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define compute_loss")

    def wants_maps(self, stage: str) -> bool:
        """Whether :meth:`compute_loss` needs the backbone's feature maps in ``stage``."""
        return False

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made for another backbone or other classes, naming both.

        A channel-pruned checkpoint's hyper-parameters describe the unpruned backbone:
        the layers whose shapes differ are rebuilt at the checkpoint's sizes here, before
        Lightning loads the weights (:func:`models.pruning.conform_to_state_dict`).
        """
        check_compatible(
            checkpoint.get("hyper_parameters", {}),
            class_names=self.class_names,
            backbone=type(self.backbone),
            what="the checkpoint",
            fix="pass the checkpoint's own config (its run folder has config.yaml) or a "
            "matching --model",
        )
        conform_to_state_dict(self, checkpoint.get("state_dict") or {})

    def configure_optimizers(self) -> object:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        monitor = {"monitor": MONITOR} if plateau else {}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **monitor}}

    # -- the input path -----------------------------------------------------
    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Per-band standardisation with the train statistics (identity when off)."""
        return (x - self.band_mean) / self.band_std if self.normalize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` for raw front-end features ``(B, C, F, T)``."""
        return self.backbone(self.standardize(x))

    def train_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise then augment a train batch (masking never touches val/test)."""
        return self.augment(self.standardize(x))

    def step(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> Step:
        """Run the input path and the backbone on one batch of raw features."""
        lam, perm = 1.0, None
        if stage == "train":
            x = self.train_inputs(x)
            if self.mixup_alpha > 0:
                lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
                perm = torch.randperm(x.shape[0], device=x.device)
                x = lam * x + (1 - lam) * x[perm]
        else:
            x = self.standardize(x)
        if self.wants_maps(stage):
            logits, maps = self.backbone.forward_with_maps(x)
        else:
            logits, maps = self.backbone(x), []
        return Step(stage, x, y, logits, maps, lam, perm)

    # -- the one shared step ------------------------------------------------
    def shared_step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        step = self.step(x, y, stage)
        loss = self.compute_loss(step)
        # One scalar sync per step (detect_anomaly checks every op and is far slower). The
        # error ends fit before any checkpoint, metrics or leaderboard row of a NaN model.
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(
                f"{stage} loss is {float(loss.detach())} at epoch {self.current_epoch}, "
                f"global step {self.global_step}: training stopped. The input holds NaN/inf "
                "(check the cache with data.cache.open_cache(path, check_rows=True)) or the "
                "model diverged (lower the learning rate)"
            )
        logits = step.logits.detach()
        self.metrics[f"{stage}_metrics"].update(logits, y)
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
            self._test_batches.append((y.detach(), logits.softmax(dim=1)))
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
        run = self.predict_runner or self
        return run(x).softmax(dim=1)

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
        if stage != "train":
            report = collapse_report(confusion, float(f1))
            self.collapse[stage] = report
            shares = {
                f"{stage}/pred_share/{name}": share
                for name, share in zip(self.class_names, report["pred_share"], strict=True)
            }
            self.log_dict(
                {
                    f"{stage}/collapsed": float(report["collapsed"]),
                    f"{stage}/majority_f1_macro": report["majority_f1_macro"],
                    **shares,
                },
                sync_dist=True,
            )
            if report["collapsed"]:
                never = [self.class_names[k] for k in report["never_predicted"]]
                rank_zero_warn(
                    f"{stage}: the model has collapsed (macro-F1 {float(f1):.3f} against "
                    f"{report['majority_f1_macro']:.3f} for always predicting the majority "
                    f"class; never predicted: {', '.join(never) or 'none'})"
                )

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

"""Structured channel pruning during fine-tuning: :class:`ChannelPruning`.

Masks (``torch.nn.utils.prune``, Lightning's ``ModelPruning``) zero weights but keep every
tensor and every multiply. This callback removes whole channels with the dependency
graph of `torch-pruning <https://github.com/VainF/Torch-Pruning>`_: a convolution's
output channels go together with the batch norm, the attention MLP and the next layer's
input channels that depend on them, so the pruned network is smaller in parameters,
MACs, ONNX file size and latency, and is an ordinary ``nn.Module``.

Two schedules, each starting from a trained model (``init_checkpoint``):

- ``single``: prune to ``sparsity`` before the first epoch, then fine-tune for the run.
- ``progressive``: ``steps`` prune → fine-tune rounds; round ``k`` (1-based) removes
  ``sparsity · k / steps`` of the original channels and starts at epoch
  ``(k - 1) · epochs_per_step``; the epochs after the last round fine-tune the final size.

With ``sparsity: 0`` nothing is pruned: the run is the same fine-tuning without pruning
(the "no pruning" scenario). The pruned checkpoint tests, predicts and exports like any
other: :meth:`models.task.Task.on_load_checkpoint` rebuilds the smaller layers
(:func:`models.pruning.conform_to_state_dict`), and the checkpoint records how it was
pruned under :data:`models.pruning.PRUNING_KEY`.
"""

from __future__ import annotations

import fnmatch
import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from models.compatibility import IncompatibleError, check_compatible
from models.distillation import DistillationClassifier
from models.pruning import PRUNING_KEY, layer_widths, load_conformed
from models.task import Task
from util.callbacks.latency import LatencyProfiler
from util.checkpoint import CheckpointError, read_checkpoint
from util.complexity import count_macs, count_params

__all__ = ["IMPORTANCES", "PASS_THROUGH", "ChannelPruning", "PruningError", "prune_channels"]

#: Importance criteria (how channels are ranked; the lowest go first).
IMPORTANCES = ("l1", "l2", "lamp", "fpgm", "bn_scale", "random")
#: Modules that keep the channel count of their input and whose insides are not pruned:
#: CBAM's spatial attention reduces over channels (mean, max) and broadcasts its gate back,
#: which a dependency tracer would otherwise read as an element-wise op on channels.
PASS_THROUGH = ("models.backbones.cbam.SpatialAttention",)
#: Norms over channels × frequency sub-bands (BC-ResNet's sub-spectral norm folds the bands
#: into the channel axis, which a tracer would read as more channels).
SUB_BAND_NORMS = ("models.backbones.bcresnet.SubSpectralNorm",)


#: The default scenario name of each schedule (``kd_`` in front when distilling).
SCENARIO_OF = {"none": "finetune", "single": "single", "progressive": "progressive"}


class PruningError(ValueError):
    """A pruning option or its starting checkpoint does not fit the run (one-line message)."""


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise PruningError(f"pass_through class {path!r} cannot be imported") from err
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise PruningError(f"pass_through {path!r} is not an nn.Module class")
    return found


def _importance(name: str) -> Any:
    import torch_pruning as tp

    criteria = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }
    return criteria[name]()


def _pass_through_pruner() -> Any:
    import torch_pruning as tp

    class PassThrough(tp.pruner.BasePruningFunc):
        """Channels flow through unchanged; nothing inside is pruned."""

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            return layer

        prune_in_channels = prune_out_channels  # in and out channels are the same ones

        def get_out_channels(self, layer: nn.Module) -> None:
            return None

        def get_in_channels(self, layer: nn.Module) -> None:
            return None

    return PassThrough()


def _sub_band_norm_pruner() -> Any:
    import torch_pruning as tp

    class SubBandNorm(tp.pruner.BasePruningFunc):
        """A batch norm over channels × sub-bands (``norm``, ``sub_bands``): drop every band of a channel."""

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            bands = int(layer.sub_bands)
            rows = [int(c) * bands + b for c in idxs for b in range(bands)]
            tp.prune_batchnorm_out_channels(layer.norm, rows)
            return layer

        prune_in_channels = prune_out_channels  # channels in and out are the same ones

        def get_out_channels(self, layer: nn.Module) -> int:
            return int(layer.norm.num_features) // int(layer.sub_bands)

        get_in_channels = get_out_channels

    return SubBandNorm()


def prune_channels(
    backbone: nn.Module,
    input_shape: Sequence[int],
    ratio: float,
    importance: str = "l2",
    layers: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    global_pruning: bool = False,
    round_to: int | None = None,
    pass_through: Sequence[str] = PASS_THROUGH,
    keep: Mapping[str, int] | None = None,
    sub_band_norms: Sequence[str] = SUB_BAND_NORMS,
) -> dict[str, int]:
    """Remove ``ratio`` of the channels of ``backbone``'s prunable layers, in place.

    The dependency graph is traced on one zero input of ``input_shape``; every layer
    whose output width equals the backbone's ``num_classes`` (the classifier) is kept.

    Args:
        backbone: the network (a :class:`models.backbones.Backbone`).
        input_shape: ``(C, F, T)`` of one input, without the batch axis.
        ratio: fraction of the current channels to remove from each pruned layer, in ``[0, 1)``.
        importance: one of :data:`IMPORTANCES`.
        layers: ``fnmatch`` patterns of the layer names (``blocks.*.conv``) whose output
            channels may be pruned; ``None``: every convolution and linear layer.
        ignore: patterns of layer names never pruned (applied after ``layers``).
        global_pruning: rank channels across layers (widths then differ per layer)
            instead of removing the same fraction from every layer.
        round_to: keep channel counts multiples of this (``None``: any count).
        pass_through: class paths of modules treated as channel-preserving (see
            :data:`PASS_THROUGH`).
        keep: target output widths by layer name; they replace ``ratio`` for the layers
            named (the progressive schedule's exact widths of the original network).
        sub_band_norms: class paths of norms over channels folded with frequency sub-bands
            (an ``nn.BatchNorm2d`` ``norm`` of ``C · sub_bands`` features; see
            :data:`SUB_BAND_NORMS`): a pruned channel takes all its bands with it.

    Returns:
        The output width of each convolution and linear layer afterwards.

    Raises:
        PruningError: a bad ratio or importance, or a network that no longer runs.
    """
    import torch_pruning as tp

    if not 0.0 <= ratio < 1.0:
        raise PruningError(f"pruning ratio must be in [0, 1), got {ratio}")
    if importance not in IMPORTANCES:
        raise PruningError(
            f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}"
        )
    if importance == "bn_scale" and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()
    ):
        raise PruningError("importance bn_scale needs batch norm layers; the backbone has none")
    num_classes = getattr(backbone, "num_classes", None)
    ignored, ratios = [], {}
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            continue
        width = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else None
        width = module.out_features if isinstance(module, nn.Linear) else width
        chosen = layers is None or any(fnmatch.fnmatchcase(name, p) for p in layers)
        skipped = any(fnmatch.fnmatchcase(name, p) for p in ignore)
        if width == num_classes or not chosen or skipped:
            ignored.append(module)
        elif keep is not None and name in keep and width:
            # torch-pruning keeps int(width * (1 - r)) channels: aim half a channel above
            ratios[module] = max(0.0, 1.0 - (int(keep[name]) + 0.5) / width)
    if ratio > 0 or any(r > 0 for r in ratios.values()):
        param = next(backbone.parameters())
        example = torch.zeros(1, *(int(d) for d in input_shape), device=param.device)
        customized = {_import(path): _pass_through_pruner() for path in pass_through}
        customized.update({_import(path): _sub_band_norm_pruner() for path in sub_band_norms})
        was_training = backbone.training
        backbone.eval()  # traced and checked in eval mode: batch norm at batch 1
        try:
            tp.pruner.MetaPruner(
                backbone,
                example,
                importance=_importance(importance),
                pruning_ratio=ratio,
                pruning_ratio_dict=ratios or None,
                global_pruning=global_pruning,
                ignored_layers=ignored,
                round_to=round_to,
                customized_pruners=customized,
            ).step()
            with torch.no_grad():
                out = backbone(example)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise PruningError(
                f"the pruned {type(backbone).__name__} no longer runs ({first}); add the module "
                "that mixes channels to pass_through or its layers to ignore"
            ) from err
        finally:
            backbone.train(was_training)
        if num_classes is not None and tuple(out.shape) != (1, num_classes):
            raise PruningError(f"the pruned backbone returns {tuple(out.shape)} logits")
    return layer_widths(backbone)


class ChannelPruning(Callback):
    """Prune whole channels (torch-pruning) from a trained model while fine-tuning it.

    Put it under ``trainer.callbacks`` (``config/prune/*.yaml``). It acts in ``fit`` only:
    at setup it loads ``init_checkpoint`` into the model (rebuilding already-pruned layers)
    and, with ``single``, prunes to ``sparsity``; with ``progressive`` it prunes one more
    round at the start of every ``epochs_per_step``-th epoch, rebuilds the optimizer
    (and scheduler) over the new parameters, and restarts the ``val/f1_macro`` bookkeeping
    of checkpointing and early stopping, so the best checkpoint is always one of the
    final size. Every saved checkpoint gets the record under
    :data:`models.pruning.PRUNING_KEY`.

    Args:
        sparsity: fraction of each pruned layer's output channels removed, in ``[0, 1)``
            (0: fine-tune without pruning). Override it with
            ``--trainer.callbacks.init_args.sparsity 0.25``.
        schedule: ``single`` (prune once, then fine-tune) or ``progressive`` (``steps``
            rounds of prune → fine-tune).
        steps: pruning rounds of the progressive schedule (>= 2); ignored by ``single``.
        epochs_per_step: fine-tuning epochs between progressive rounds.
        importance: how channels are ranked, lowest removed first: ``l1``/``l2`` (filter
            weight norm), ``lamp``, ``fpgm`` (geometric median), ``bn_scale`` (batch-norm
            scale; needs batch norm), ``random``.
        layers: ``fnmatch`` patterns of backbone layer names whose output channels may be
            pruned (e.g. ``["blocks.*.conv"]``); ``None``: every convolution and linear
            layer except the classifier.
        ignore: patterns of backbone layer names never pruned.
        global_pruning: rank channels across layers instead of pruning each layer by the
            same fraction (widths then differ per layer).
        round_to: keep channel counts multiples of this (e.g. 4 or 8 for SIMD); ``None``: any.
        pass_through: class paths of modules that keep their input's channels and are not
            pruned inside (CBAM's spatial attention by default).
        init_checkpoint: the trained model to start from (a ``.ckpt`` of the same backbone,
            classes and features, e.g. ``python main.py fit --config config/demo.yaml``'s
            best checkpoint); ``None`` starts from the model as built (for tests only:
            pruning an untrained network ranks random weights).
        scenario: a name for reports; ``None``: ``[kd_]{finetune|single|progressive}``
            (``finetune``: ``sparsity: 0``), the names of ``config/prune/*.yaml``.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        schedule: Literal["single", "progressive"] = "single",
        steps: int = 3,
        epochs_per_step: int = 1,
        importance: Literal["l1", "l2", "lamp", "fpgm", "bn_scale", "random"] = "l2",
        layers: list[str] | None = None,
        ignore: list[str] | None = None,
        global_pruning: bool = False,
        round_to: int | None = None,
        pass_through: list[str] | None = None,
        init_checkpoint: str | None = None,
        scenario: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise PruningError(f"sparsity must be in [0, 1), got {sparsity}")
        if schedule not in ("single", "progressive"):
            raise PruningError(f"schedule must be single or progressive, got {schedule!r}")
        if schedule == "progressive" and steps < 2:
            raise PruningError(f"the progressive schedule needs steps >= 2, got {steps}")
        if epochs_per_step < 1:
            raise PruningError(f"epochs_per_step must be >= 1, got {epochs_per_step}")
        if importance not in IMPORTANCES:
            raise PruningError(
                f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}"
            )
        if round_to is not None and round_to < 1:
            raise PruningError(f"round_to must be >= 1 or null, got {round_to}")
        self.sparsity = float(sparsity)
        self.schedule = schedule
        self.steps = int(steps) if schedule == "progressive" and sparsity > 0 else 1
        self.epochs_per_step = int(epochs_per_step)
        self.importance = importance
        self.layers = None if layers is None else list(layers)
        self.ignore = list(ignore or [])
        self.global_pruning = bool(global_pruning)
        self.round_to = round_to
        self.pass_through = list(PASS_THROUGH if pass_through is None else pass_through)
        for path in self.pass_through:
            _import(path)
        self.init_checkpoint = init_checkpoint
        self.scenario = scenario
        #: Pruning rounds done so far (restored on resume).
        self.steps_done = 0
        #: What the checkpoint records (see :func:`models.pruning.pruning_record`).
        self.record: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return f"ChannelPruning{{schedule={self.schedule}, sparsity={self.sparsity}}}"

    # -- the schedule ---------------------------------------------------------
    def target(self, step: int) -> float:
        """Fraction of the original channels removed after round ``step`` (1-based)."""
        return self.sparsity * min(step, self.steps) / self.steps

    def step_epoch(self, step: int) -> int:
        """The epoch at whose start round ``step`` (1-based) prunes (round 1: before fit)."""
        return (step - 1) * self.epochs_per_step

    # -- Lightning hooks ------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, Task):
            raise PruningError(f"ChannelPruning needs an earsleep Task, got {type(pl_module)}")
        last = self.step_epoch(self.steps)
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= last:
            raise PruningError(
                f"the progressive schedule's last round starts at epoch {last}: "
                f"--trainer.max_epochs {trainer.max_epochs} is too few (at least {last + 1})"
            )
        if trainer.ckpt_path:  # a resumed fit: the checkpoint holds the pruned weights
            return
        kd = isinstance(pl_module, DistillationClassifier)
        kind = self.schedule if self.sparsity > 0 else "none"
        shape = tuple(pl_module.input_shape)
        self.record = {
            "scenario": self.scenario or f"{'kd_' if kd else ''}{SCENARIO_OF[kind]}",
            "schedule": kind,
            "sparsity": self.sparsity,
            "steps": self.steps,
            "steps_done": 0,
            "epochs_per_step": self.epochs_per_step,
            "importance": self.importance,
            "global_pruning": self.global_pruning,
            "init_checkpoint": self.init_checkpoint,
            "init_val_f1_macro": None,
            "distillation": kd,
        }
        if self.init_checkpoint:
            self._load_initial(pl_module)
        self.record.update(
            channels_before=layer_widths(pl_module.backbone),
            params_before=count_params(pl_module.backbone),
            macs_before=count_macs(pl_module.backbone, shape),
        )
        self._prune(pl_module, 1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self.steps_done + 1
        if step > self.steps or trainer.current_epoch < self.step_epoch(step):
            return
        if trainer.world_size > 1:
            raise PruningError("progressive pruning runs on one device; use schedule single")
        self._prune(pl_module, step)
        trainer.strategy.setup_optimizers(trainer)  # the old one holds the removed tensors
        self._restart_selection(trainer)
        for callback in trainer.callbacks:
            if isinstance(callback, LatencyProfiler):  # complexity of the new size
                callback.on_fit_start(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.record:
            checkpoint[PRUNING_KEY] = dict(self.record)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "record": dict(self.record)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.record = dict(state_dict.get("record") or {})

    # -- the work -------------------------------------------------------------
    def _load_initial(self, pl_module: Task) -> None:
        path = str(self.init_checkpoint)
        try:
            checkpoint = read_checkpoint(path, what="init_checkpoint")
            check_compatible(
                checkpoint.get("hyper_parameters") or {},
                class_names=pl_module.class_names,
                input_shape=pl_module.input_shape,
                feature_config=pl_module.feature_config,
                backbone=type(pl_module.backbone),
                what=f"init_checkpoint {path}",
                fix="start from a checkpoint of the backbone and data this config names",
            )
        except (CheckpointError, IncompatibleError) as err:
            raise PruningError(str(err)) from err
        state = checkpoint.get("state_dict") or {}
        try:
            load_conformed(pl_module, state)
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PruningError(f"init_checkpoint {path} does not fit the model: {first}") from err
        recorded = checkpoint.get("earsleep_validation_score") or {}
        self.record["init_val_f1_macro"] = recorded.get("value")
        rank_zero_info(f"ChannelPruning: starting from {path}")

    def _prune(self, pl_module: Task, step: int) -> None:
        done = self.target(step - 1) if step > 1 else 0.0
        ratio = 1.0 - (1.0 - self.target(step)) / (1.0 - done)  # of the current channels
        shape = tuple(pl_module.input_shape)
        keep = None
        if step > 1:  # exact widths of the original network, not rounded round after round
            before = self.record.get("channels_before") or {}
            keep = {n: max(1, round(w * (1.0 - self.target(step)))) for n, w in before.items()}
        widths = prune_channels(
            pl_module.backbone,
            shape,
            ratio if self.sparsity > 0 else 0.0,
            importance=self.importance,
            layers=self.layers,
            ignore=self.ignore,
            global_pruning=self.global_pruning,
            round_to=self.round_to,
            pass_through=self.pass_through,
            keep=keep,
        )
        self.steps_done = step
        self.record.update(
            steps_done=step,
            channels_after=widths,
            params_after=count_params(pl_module.backbone),
            macs_after=count_macs(pl_module.backbone, shape),
        )
        if self.sparsity > 0:
            rank_zero_info(
                f"ChannelPruning: round {step}/{self.steps} removed {self.target(step):.0%} of "
                f"the channels: {self.record['params_before']:,} -> "
                f"{self.record['params_after']:,} params, {self.record['macs_before']:,} -> "
                f"{self.record['macs_after']:,} MACs"
            )

    @staticmethod
    def _restart_selection(trainer: pl.Trainer) -> None:
        """Forget scores of the larger model: best checkpoints and early stopping restart."""
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor:
                for path in list(callback.best_k_models):
                    if path != callback.last_model_path:
                        trainer.strategy.remove_checkpoint(path)
                worst = math.inf if callback.mode == "min" else -math.inf
                callback.best_k_models = {}
                callback.kth_best_model_path = ""
                callback.best_model_path = ""
                callback.best_model_score = None
                callback.kth_value = torch.tensor(worst)
            elif isinstance(callback, EarlyStopping):
                callback.wait_count = 0
                worst = math.inf if callback.monitor_op == torch.lt else -math.inf
                callback.best_score = torch.tensor(worst)

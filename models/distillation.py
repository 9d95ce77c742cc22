"""Knowledge distillation: a student classifier trained against a frozen teacher checkpoint.

The teacher is any :class:`~models.classifier.Classifier` checkpoint (normally a CRNN).
It is read only when training needs it (``setup("fit")`` or the first train loss), is
frozen and kept in eval mode, and is held outside the module tree, so it is never in
the student's ``state_dict`` or checkpoint. A student checkpoint therefore tests,
predicts and exports like a plain classifier, with or without the teacher file; a
few facts about the teacher (path, parameter count, validation macro-F1) travel in
the checkpoint as metadata for the leaderboard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.classifier import Classifier
from models.compatibility import IncompatibleError, check_compatible
from models.task import MONITOR, Step, checkpoint_validation_score

#: Checkpoint key of the teacher metadata the student carries instead of its weights.
META_KEY = "distillation"


class TeacherCheckpointError(ValueError):
    """The teacher checkpoint is missing, unreadable, not a classifier or does not fit the student."""


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's soft-target term ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    The ``T²`` keeps its gradient on the scale of the cross-entropy's as ``T`` grows.

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``(B, K)`` teacher logits (no gradient needed).
        temperature: softmax temperature ``T > 0``.
    """
    t = float(temperature)
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
    )
    return kl * t * t


def attention_map(feature_map: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a ``(B, C, H, W)`` map: channel sum of squares, flattened, unit L2 norm."""
    return F.normalize(feature_map.pow(2).sum(dim=1).flatten(1), dim=1)


def attention_transfer_loss(
    student_maps: Sequence[torch.Tensor],
    teacher_maps: Sequence[torch.Tensor],
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis): ``Σ_layers mean_b ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖₂``.

    Channel counts may differ (the attention sums them away); spatial sizes must match:
    a mismatch is an error naming the layer and both shapes, never a silent resize.

    Args:
        student_maps: the student's maps from ``forward_with_maps`` (``(B, C_i, H_i, W_i)`` each).
        teacher_maps: the teacher's, in the same order.
        layers: indices into both lists; ``None`` takes every layer (both lists must
            then be equally long).

    Raises:
        ValueError: on an index out of range, unequal list lengths or unequal spatial sizes.
    """
    if layers is None:
        if len(student_maps) != len(teacher_maps):
            raise ValueError(
                f"attention transfer: the student has {len(student_maps)} feature maps and the "
                f"teacher {len(teacher_maps)}; choose matching ones with at_layers"
            )
        layers = range(len(student_maps))
    total = None
    for i in layers:
        if not (
            -len(student_maps) <= i < len(student_maps)
            and -len(teacher_maps) <= i < len(teacher_maps)
        ):
            raise ValueError(
                f"attention transfer layer {i} is out of range: the student has "
                f"{len(student_maps)} feature maps, the teacher {len(teacher_maps)}"
            )
        s, t = student_maps[i], teacher_maps[i]
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(
                f"attention transfer layer {i}: student map {tuple(s.shape)} and teacher map "
                f"{tuple(t.shape)} differ in batch or spatial size (B, ·, H, W must match); "
                "pick layers of equal size with at_layers"
            )
        term = (attention_map(s) - attention_map(t.to(s.dtype))).norm(dim=1).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("attention transfer needs at least one layer; at_layers is empty")
    return total


def read_teacher_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a teacher checkpoint file and check it is a classifier checkpoint.

    Args:
        path: the ``.ckpt`` file.

    Returns:
        The checkpoint dictionary.

    Raises:
        TeacherCheckpointError: the file is missing, unreadable, or lacks a state dict
            or ``hyper_parameters`` naming a backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} does not exist: train the teacher first (e.g. "
            "python main.py fit --config config/crnn.yaml) and set "
            "model.init_args.teacher_checkpoint to its best .ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only errors all mean "not usable"
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} could not be read as a Lightning checkpoint: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hparams, dict)
        or not hparams.get("backbone")
        or "state_dict" not in checkpoint
    ):
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} is not a Classifier checkpoint (no state_dict or no "
            "hyper_parameters naming a backbone); pass a checkpoint written by python main.py fit"
        )
    return checkpoint


class DistillationClassifier(Classifier):
    """A :class:`~models.classifier.Classifier` trained against a frozen teacher.

    Training loss: ``α·T²·KL(p_T ‖ p_S) + (1−α)·CE_weighted + β·AT``, logged as
    ``train/kd_loss`` (the ``T²·KL`` term), ``train/ce_loss`` and, with ``beta > 0``,
    ``train/at_loss``. Validation and test use the plain cross-entropy, so their
    metrics compare directly with a classifier trained without a teacher.

    The teacher sees the student's own train batch (same SpecAugment masks, same
    mixup), mapped into the teacher's standardisation: the student's standardised,
    augmented input is de-standardised with the student's band statistics and
    re-standardised with the teacher's own (identical data gives identical inputs).

    The teacher is loaded at ``setup("fit")`` (or at the first train loss), never in
    ``__init__``: testing, predicting or exporting a student checkpoint never reads
    the teacher file, which may have been deleted since.

    All other arguments are those of :class:`~models.classifier.Classifier`.

    Args:
        teacher_checkpoint: path of the teacher's ``.ckpt`` (a Classifier checkpoint
            with the same classes and input shape, e.g. the best CRNN checkpoint).
        alpha: weight of the distillation term; ``1 − alpha`` weighs the cross-entropy.
        temperature: softmax temperature ``T`` of the distillation term.
        beta: weight of the attention-transfer term (0 disables it).
        at_layers: indices into the maps of the backbones' ``forward_with_maps`` used for attention
            transfer; ``None`` takes all (the maps must agree in spatial size).
        baseline_f1: validation macro-F1 of the same student trained without a teacher;
            when given, the leaderboard gets ``gap_closed``.
        teacher_f1: validation macro-F1 of the teacher; ``None`` reads it from the
            teacher checkpoint's ModelCheckpoint state.
        **kwargs: the remaining :class:`~models.classifier.Classifier` arguments.
    """

    def __init__(
        self,
        teacher_checkpoint: str,
        alpha: float = 0.6,
        temperature: float = 4.0,
        beta: float = 0.0,
        at_layers: list[int] | None = None,
        baseline_f1: float | None = None,
        teacher_f1: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if at_layers is not None and not at_layers:
            raise ValueError("at_layers must name at least one layer, or be None for all")
        self.teacher_checkpoint = str(teacher_checkpoint)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.at_layers = None if at_layers is None else [int(i) for i in at_layers]
        self.baseline_f1 = baseline_f1
        # A plain attribute, not a submodule: never saved, never moved or switched to
        # train mode by Lightning (see _apply and train below).
        self.__dict__["_teacher"] = None
        #: What the checkpoint keeps about the teacher (and this student's val score).
        self.teacher_info: dict[str, Any] = {
            "path": self.teacher_checkpoint,
            "params": None,
            "val_f1_macro": teacher_f1,
            "backbone": None,
        }
        self._checkpoint_val_f1: float | None = None

    # -- the teacher -----------------------------------------------------------
    def check_ready(self) -> None:
        """Check the teacher checkpoint before any data is prepared (the CLI calls this)."""
        self.check_teacher()

    def check_teacher(self, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check the teacher checkpoint fits this student without building the teacher.

        Cheap enough to call before any data is prepared.

        Args:
            checkpoint: the already loaded teacher checkpoint (read from
                ``teacher_checkpoint`` when ``None``).

        Returns:
            The teacher checkpoint dictionary.

        Raises:
            TeacherCheckpointError: missing or unreadable file, not a classifier
                checkpoint, or other classes / input shape than the student.
        """
        if checkpoint is None:
            checkpoint = read_teacher_checkpoint(self.teacher_checkpoint)
        try:  # the one rule: classes, input shape and the front end's options
            check_compatible(
                checkpoint["hyper_parameters"],
                class_names=self.class_names,
                input_shape=self.input_shape,
                feature_config=self.feature_config,
                what=f"teacher checkpoint {self.teacher_checkpoint}",
                fix="distil from a teacher trained on the student's classes and features",
            )
        except IncompatibleError as err:
            raise TeacherCheckpointError(str(err)) from err
        return checkpoint

    def load_teacher(self) -> Classifier:
        """Read, check, freeze and return the teacher (once; later calls return it).

        Raises:
            TeacherCheckpointError: see :meth:`check_teacher`.
        """
        if self._teacher is not None:
            return self._teacher
        checkpoint = self.check_teacher()
        try:
            teacher = Classifier.load_from_checkpoint(
                self.teacher_checkpoint, map_location="cpu", weights_only=True
            )
        except Exception as err:
            raise TeacherCheckpointError(
                f"teacher checkpoint {self.teacher_checkpoint} could not be restored as a "
                f"Classifier: {type(err).__name__}: {err}"
            ) from err
        if teacher.num_classes != self.num_classes:  # hparams may lack num_classes
            raise TeacherCheckpointError(
                f"teacher checkpoint {self.teacher_checkpoint} predicts {teacher.num_classes} "
                f"classes, the student {self.num_classes}"
            )
        teacher.requires_grad_(False)
        teacher.eval()
        param = next(self.parameters(), None)
        if param is not None:
            teacher.to(device=param.device, dtype=param.dtype)
        self.__dict__["_teacher"] = teacher
        score = self.teacher_info.get("val_f1_macro")
        self.teacher_info = {
            "path": self.teacher_checkpoint,
            "params": sum(p.numel() for p in teacher.backbone.parameters()),
            "val_f1_macro": score if score is not None else checkpoint_validation_score(checkpoint),
            "backbone": type(teacher.backbone).__name__,
        }
        return teacher

    @property
    def teacher(self) -> Classifier:
        """The frozen teacher, loaded on first use."""
        return self.load_teacher()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # .to(device/dtype), .cuda(), .half(): the teacher follows the student
        super()._apply(fn, recurse)
        if self.__dict__.get("_teacher") is not None:
            self._teacher._apply(fn)
        return self

    def train(self, mode: bool = True) -> DistillationClassifier:
        """Switch the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.__dict__.get("_teacher") is not None:
            self._teacher.eval()
        return self

    def setup(self, stage: str) -> None:
        """Take data statistics (see Classifier) and, when fitting, load and check the teacher."""
        super().setup(stage)
        if stage == "fit":
            self.load_teacher()

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # nothing should switch it, but BatchNorm/dropout must never train

    # -- loss ----------------------------------------------------------------
    def teacher_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Map the student's standardised input into the teacher's standardisation."""
        raw = x * self.band_std + self.band_mean if self.normalize else x
        return self.teacher.standardize(raw)

    def wants_maps(self, stage: str) -> bool:
        """The student's feature maps, for attention transfer in training."""
        return stage == "train" and self.beta > 0

    def compute_loss(self, step: Step) -> torch.Tensor:
        """Distillation loss in training; the plain class-weighted cross-entropy otherwise.

        The teacher sees exactly the student's inputs (``step.inputs``: standardised,
        augmented, mixed), mapped into its own standardisation.
        """
        ce = super().compute_loss(step)
        if step.stage != "train":
            return ce
        teacher, maps = self.teacher, self.wants_maps(step.stage)
        with torch.no_grad():
            x = self.teacher_inputs(step.inputs)
            teacher_logits, teacher_maps = (
                teacher.backbone.forward_with_maps(x) if maps else (teacher.backbone(x), [])
            )
        kd = logit_kd_loss(step.logits, teacher_logits, self.temperature)
        loss = self.alpha * kd + (1 - self.alpha) * ce
        terms = {"train/kd_loss": kd.detach(), "train/ce_loss": ce.detach()}
        if maps:
            at = attention_transfer_loss(step.maps, teacher_maps, self.at_layers)
            loss = loss + self.beta * at
            terms["train/at_loss"] = at.detach()
        if self._trainer is not None:
            self.log_dict(terms, on_step=False, on_epoch=True, batch_size=step.target.shape[0])
        return loss

    # -- what the checkpoint and the leaderboard keep ------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the teacher's metadata (never its weights) and this checkpoint's val macro-F1."""
        super().on_save_checkpoint(checkpoint)
        score = None
        if self._trainer is not None:
            value = self.trainer.callback_metrics.get(MONITOR)
            score = float(value) if value is not None else None
        checkpoint[META_KEY] = {"teacher": dict(self.teacher_info), "val_f1_macro": score}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the backbone (see Classifier) and restore the teacher's metadata."""
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint.get(META_KEY) or {}
        saved = dict(meta.get("teacher") or {})
        if saved:
            if self.teacher_info.get("val_f1_macro") is not None:  # an explicit teacher_f1 wins
                saved["val_f1_macro"] = self.teacher_info["val_f1_macro"]
            self.teacher_info = {**self.teacher_info, **saved, "path": self.teacher_checkpoint}
        self._checkpoint_val_f1 = meta.get("val_f1_macro")

    def _student_f1(self) -> float | None:
        """Best validation macro-F1 of this run, else that of the loaded checkpoint."""
        if self._trainer is not None:
            for cb in self.trainer.checkpoint_callbacks:
                if getattr(cb, "monitor", None) == MONITOR and cb.best_model_score is not None:
                    return float(cb.best_model_score)
        return self._checkpoint_val_f1

    def run_summary(self) -> dict[str, Any]:
        """KD columns of the leaderboard row (RunArtifacts calls this).

        ``compression_ratio`` is teacher parameters / student parameters;
        ``gap_closed`` is ``(student − baseline) / (teacher − baseline)`` on validation
        macro-F1, given only when ``baseline_f1`` was given, the scores are known and the
        teacher beats the baseline (a teacher below its student's baseline has no gap to
        close: the ratio would read as success for a worse student); otherwise it is
        ``None`` and ``gap_closed_reason`` says why.
        """
        student_params = sum(p.numel() for p in self.backbone.parameters())
        teacher_params = self.teacher_info.get("params")
        gap, reason = None, None
        student_f1, teacher_f1 = self._student_f1(), self.teacher_info.get("val_f1_macro")
        if self.baseline_f1 is None:
            reason = "no baseline_f1 given"
        elif student_f1 is None or teacher_f1 is None:
            reason = "the student's or the teacher's validation macro-F1 is unknown"
        elif teacher_f1 <= self.baseline_f1:
            reason = f"teacher {teacher_f1:.3f} is not above the baseline {self.baseline_f1:.3f}"
        else:
            gap = (student_f1 - self.baseline_f1) / (teacher_f1 - self.baseline_f1)
        return {
            "teacher": self.teacher_checkpoint,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "beta": self.beta,
            "compression_ratio": teacher_params / student_params if teacher_params else None,
            "gap_closed": gap,
            "gap_closed_reason": reason,
        }


__all__ = [
    "DistillationClassifier",
    "TeacherCheckpointError",
    "attention_map",
    "attention_transfer_loss",
    "logit_kd_loss",
    "read_teacher_checkpoint",
]

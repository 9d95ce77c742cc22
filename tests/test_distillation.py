"""DistillationClassifier: the loss, the frozen teacher, checkpoints without it, bad teachers."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from data.features import LogMelFrontEnd
from models.classifier import Classifier
from models.distillation import (
    META_KEY,
    DistillationClassifier,
    TeacherCheckpointError,
    attention_map,
    attention_transfer_loss,
    logit_kd_loss,
)
from tests.helpers import build_like_cli, save_checkpoint

SHAPE = (1, 16, 24)  # (C, F, T): small, so a fit takes a second
CLASSES = ["quiet", "breathe", "snore"]
CRNN_SMALL = {"rnn_hidden": 8, "rnn_layers": 1, "channels": [4, 8, 8], "dropout": 0.5}
TINY_SMALL = {"channels": [4, 8, 8]}


def loss_of(
    model, x: torch.Tensor, y: torch.Tensor, stage: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)`` of one batch through the task's own step, as training computes it."""
    step = model.step(x, y, stage)
    return model.compute_loss(step), step.logits


def cli_style(cls: type, backbone: str, backbone_args: dict[str, Any], **kwargs: Any) -> Any:
    """Build ``cls`` the way LightningCLI does, so its checkpoint hparams are the CLI's.

    The checkpoint then holds ``_class_path``, ``_instantiator`` and the backbone as a
    ``class_path``/``init_args`` dict, exactly like a ``python main.py fit`` checkpoint.
    """
    kwargs = {
        "num_classes": len(CLASSES),
        "in_channels": SHAPE[0],
        "class_names": CLASSES,
        "input_shape": SHAPE,
        **kwargs,
    }
    return build_like_cli(cls, backbone, backbone_args, **kwargs)


def student(teacher_checkpoint: str | Path, **kwargs: Any) -> DistillationClassifier:
    kwargs.setdefault("backbone_args", TINY_SMALL)
    backbone_args = kwargs.pop("backbone_args")
    return cli_style(
        DistillationClassifier,
        "models.backbones.TinyCNN",
        backbone_args,
        teacher_checkpoint=str(teacher_checkpoint),
        **kwargs,
    )


def loaders(n: int = 48, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(CLASSES)
    x = torch.randn(n, *SHAPE, generator=g) + y[:, None, None, None] * 0.5
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=16)


def trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def fit_classifier(model: pl.LightningModule, root: Path, epochs: int = 1) -> str:
    """Fit ``model`` on random data; return its best checkpoint (monitored like the CLI's)."""
    ckpt = ModelCheckpoint(dirpath=root, monitor="val/f1_macro", mode="max")
    fit = trainer(root, max_epochs=epochs, callbacks=[ckpt])
    fit.fit(model, *loaders())
    assert ckpt.best_model_path
    return ckpt.best_model_path


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("teacher")
    pl.seed_everything(0)
    teacher = cli_style(Classifier, "models.backbones.CRNN", CRNN_SMALL)
    with torch.no_grad():  # other band statistics than the student's, to be mapped
        teacher.band_mean.fill_(0.3)
        teacher.band_std.fill_(2.0)
    return fit_classifier(teacher, root)


# -- the loss, by hand -----------------------------------------------------------------


def test_logit_kd_loss_matches_hand_computed_kl() -> None:
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.5, 2.5]])
    temp = 4.0
    expected = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        zs = sum(math.exp(v / temp) for v in srow)
        zt = sum(math.exp(v / temp) for v in trow)
        ps = [math.exp(v / temp) / zs for v in srow]
        pt = [math.exp(v / temp) / zt for v in trow]
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    expected = expected / len(s) * temp**2
    assert logit_kd_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-5)
    assert logit_kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_train_loss_combines_kd_and_weighted_ce(teacher_ckpt: str) -> None:
    weights = [1.0, 2.0, 0.5]
    model = student(
        teacher_ckpt, alpha=0.6, temperature=3.0, class_weights=weights, freq_mask=0, time_mask=0
    )
    with torch.no_grad():
        model.band_mean.fill_(-0.2)
        model.band_std.fill_(0.7)
    x, y = torch.randn(6, *SHAPE), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, logits = loss_of(model, x, y, "train")
    teacher = model.teacher
    assert torch.allclose(logits, model.backbone(model.standardize(x)))
    t_logits = teacher(x)  # the teacher's own standardisation of the same raw input
    kd = logit_kd_loss(logits, t_logits, 3.0)
    ce = F.cross_entropy(logits, y, weight=torch.tensor(weights))
    assert loss.item() == pytest.approx((0.6 * kd + 0.4 * ce).item(), rel=1e-5)


def test_alpha_zero_is_exactly_the_weighted_cross_entropy(teacher_ckpt: str) -> None:
    weights = [0.5, 1.5, 3.0]
    model = student(teacher_ckpt, alpha=0.0, class_weights=weights, freq_mask=0, time_mask=0)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 3, (8,))
    loss, logits = loss_of(model, x, y, "train")
    ce = F.cross_entropy(model.backbone(model.standardize(x)), y, weight=torch.tensor(weights))
    assert torch.equal(loss, ce)


def test_val_and_test_loss_never_need_the_teacher(tmp_path: Path) -> None:
    model = student(tmp_path / "gone.ckpt")
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 3, (4,))
    for stage in ("val", "test"):
        loss, _ = loss_of(model, x, y, stage)
        assert torch.isfinite(loss)
    assert model.__dict__["_teacher"] is None
    with pytest.raises(TeacherCheckpointError, match="does not exist"):
        loss_of(model, x, y, "train")


def test_teacher_sees_the_students_augmented_input_in_its_own_standardisation(
    teacher_ckpt: str,
) -> None:
    model = student(teacher_ckpt)
    with torch.no_grad():
        model.band_mean.uniform_(-1, 1)
        model.band_std.uniform_(0.5, 2)
    x = torch.randn(3, *SHAPE)
    mapped = model.teacher_inputs(model.standardize(x))
    assert torch.allclose(mapped, model.teacher.standardize(x), atol=1e-5)
    # a masked (zero) region of the student's input is the student's band mean in raw units
    masked = model.teacher_inputs(torch.zeros(1, *SHAPE))
    assert torch.allclose(masked, model.teacher.standardize(model.band_mean.expand(1, *SHAPE)))


@pytest.mark.parametrize("mixup_alpha", [0.0, 0.4])
def test_teacher_gets_the_very_batch_the_student_trains_on(
    teacher_ckpt: str, mixup_alpha: float
) -> None:
    model = student(teacher_ckpt, freq_mask=6, time_mask=6, mixup_alpha=mixup_alpha)
    with torch.no_grad():
        model.band_mean.fill_(0.5)
        model.band_std.fill_(1.5)
    seen: dict[str, torch.Tensor] = {}
    model.backbone.register_forward_pre_hook(lambda m, a: seen.setdefault("student", a[0]))
    model.teacher.backbone.register_forward_pre_hook(lambda m, a: seen.setdefault("teacher", a[0]))
    x = torch.randn(8, *SHAPE) + 3.0
    loss_of(model, x, torch.randint(0, 3, (8,)), "train")
    s, t = seen["student"], seen["teacher"]
    raw = s * model.band_std + model.band_mean
    assert torch.allclose(t, model.teacher.standardize(raw), atol=1e-5)
    if mixup_alpha == 0:  # the masks were applied (zeroed bands/frames) before both saw it
        assert (s == 0).any() and not torch.allclose(s, model.standardize(x))


# -- attention transfer ------------------------------------------------------------------


def test_attention_transfer_is_zero_for_identical_maps() -> None:
    maps = [torch.randn(2, 4, 8, 12), torch.randn(2, 8, 4, 6)]
    assert attention_transfer_loss(maps, [m.clone() for m in maps]).item() == pytest.approx(
        0.0, abs=1e-6
    )
    # channel counts may differ: only the channel sum of squares is compared
    wide = [torch.cat([m, torch.zeros_like(m)], dim=1) for m in maps]
    assert attention_transfer_loss(maps, wide).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_transfer_matches_its_definition() -> None:
    s, t = torch.randn(3, 4, 5, 6), torch.randn(3, 7, 5, 6)
    qs, qt = s.pow(2).sum(1).flatten(1), t.pow(2).sum(1).flatten(1)
    expected = (qs / qs.norm(dim=1, keepdim=True) - qt / qt.norm(dim=1, keepdim=True)).norm(dim=1)
    assert attention_transfer_loss([s], [t]).item() == pytest.approx(
        expected.mean().item(), rel=1e-5
    )
    assert torch.allclose(attention_map(s).norm(dim=1), torch.ones(3))


def test_attention_transfer_refuses_mismatched_maps_naming_layer_and_shapes() -> None:
    s = [torch.randn(2, 4, 8, 12), torch.randn(2, 8, 4, 6)]
    t = [torch.randn(2, 4, 8, 12), torch.randn(2, 8, 4, 5)]
    with pytest.raises(
        ValueError, match=r"layer 1: student map \(2, 8, 4, 6\) and teacher map \(2, 8, 4, 5\)"
    ):
        attention_transfer_loss(s, t)
    assert attention_transfer_loss(s, t, layers=[0]).item() == pytest.approx(
        (attention_map(s[0]) - attention_map(t[0])).norm(dim=1).mean().item()
    )
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        attention_transfer_loss(s, t, layers=[5])
    with pytest.raises(ValueError, match="student has 2 feature maps and the teacher 1"):
        attention_transfer_loss(s, t[:1])


def test_attention_transfer_joins_the_train_loss(teacher_ckpt: str) -> None:
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 3, (4,))
    base = student(teacher_ckpt, freq_mask=0, time_mask=0, beta=0.0)
    with_at = student(teacher_ckpt, freq_mask=0, time_mask=0, beta=2.0, at_layers=[0, 2])
    with_at.load_state_dict(base.state_dict())
    plain, _ = loss_of(base, x, y, "train")
    total, _ = loss_of(with_at, x, y, "train")
    _, s_maps = with_at.backbone.forward_with_maps(with_at.standardize(x))
    _, t_maps = with_at.teacher.backbone.forward_with_maps(with_at.teacher.standardize(x))
    at = attention_transfer_loss(s_maps, t_maps, [0, 2])
    assert total.item() == pytest.approx(plain.item() + 2.0 * at.item(), rel=1e-5)


# -- the teacher through a real fit, and the checkpoint without it ---------------------------


class WatchTeacher(pl.Callback):
    """Record, at every train batch, whether the teacher is in eval mode and has no grads."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        teacher = pl_module.teacher
        eval_everywhere = not any(m.training for m in teacher.modules())
        no_grad = all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        self.seen.append((eval_everywhere, no_grad))


def test_fit_keeps_teacher_frozen_and_out_of_the_checkpoint(
    teacher_ckpt: str, tmp_path: Path
) -> None:
    teacher_before = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    model = student(teacher_ckpt, alpha=0.5, temperature=4.0, baseline_f1=0.2)
    watch = WatchTeacher()
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/f1_macro", mode="max")
    fit = trainer(tmp_path, max_epochs=2, callbacks=[ckpt, watch], log_every_n_steps=1)
    fit.fit(model, *loaders())
    assert len(watch.seen) == 6 and all(e and g for e, g in watch.seen)
    assert model.teacher.training is False and model.training is True
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"teacher weight {key} changed"
    assert {"train/kd_loss", "train/ce_loss"} <= set(fit.callback_metrics)
    assert "train/at_loss" not in fit.callback_metrics

    saved = torch.load(ckpt.best_model_path, weights_only=True)
    assert set(saved["state_dict"]) == set(model.state_dict())
    plain = cli_style(Classifier, "models.backbones.TinyCNN", TINY_SMALL)
    assert set(saved["state_dict"]) == set(plain.state_dict())  # the student, nothing more
    assert not any("teacher" in k for k in saved["state_dict"])
    assert saved[META_KEY]["teacher"]["params"] == sum(
        p.numel() for p in model.teacher.backbone.parameters()
    )

    extras = model.run_summary()
    assert extras["teacher"] == teacher_ckpt
    assert (extras["alpha"], extras["temperature"], extras["beta"]) == (0.5, 4.0, 0.0)
    assert extras["compression_ratio"] == pytest.approx(
        model.teacher_info["params"] / sum(p.numel() for p in model.backbone.parameters())
    )
    # the teacher's score is read from its checkpoint; gap_closed uses the best val score
    teacher_state = torch.load(teacher_ckpt, weights_only=True)["callbacks"]
    (teacher_cb,) = [v for k, v in teacher_state.items() if k.startswith("ModelCheckpoint")]
    teacher_f1 = model.teacher_info["val_f1_macro"]
    assert teacher_f1 == pytest.approx(float(teacher_cb["current_score"]))
    model.baseline_f1 = teacher_f1 - 0.25
    expected = (float(ckpt.best_model_score) - model.baseline_f1) / 0.25
    assert model.run_summary()["gap_closed"] == pytest.approx(expected)
    assert model.run_summary()["gap_closed_reason"] is None
    # a teacher no better than the baseline closes no gap: absent, with the reason
    model.baseline_f1 = teacher_f1 + 0.05
    below = model.run_summary()
    assert below["gap_closed"] is None
    assert below["gap_closed_reason"].startswith(f"teacher {teacher_f1:.3f} is not above")
    model.baseline_f1 = None
    assert model.run_summary()["gap_closed"] is None


def test_student_checkpoint_loads_tests_and_predicts_without_the_teacher_file(
    teacher_ckpt: str, tmp_path: Path
) -> None:
    teacher_copy = tmp_path / "teacher.ckpt"
    teacher_copy.write_bytes(Path(teacher_ckpt).read_bytes())
    model = student(teacher_copy, baseline_f1=0.1)
    best = fit_classifier(model, tmp_path / "student")
    teacher_params = model.teacher_info["params"]
    teacher_copy.unlink()

    _, test = loaders()
    x = next(iter(test))[0]
    model.eval()
    # The export path: Classifier.load_from_checkpoint gives a plain Classifier with the
    # student's weights and band statistics (the KD arguments are dropped).
    plain = Classifier.load_from_checkpoint(best, map_location="cpu").eval()
    assert type(plain) is Classifier
    assert torch.allclose(plain(x), model(x))

    loaded = DistillationClassifier.load_from_checkpoint(best, map_location="cpu")
    assert loaded.__dict__["_teacher"] is None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert loaded.run_summary()["compression_ratio"] == pytest.approx(
        teacher_params / sum(p.numel() for p in loaded.backbone.parameters())
    )

    run = trainer(tmp_path / "test")
    result = run.test(loaded, test)
    assert "test/f1_macro" in result[0]
    probs = torch.cat(run.predict(loaded, test))
    assert probs.shape == (48, 3) and torch.allclose(probs.sum(1), torch.ones(48))


def test_teacher_follows_the_student_device_and_dtype(teacher_ckpt: str) -> None:
    model = student(teacher_ckpt)
    model.load_teacher()
    model.double()
    assert next(model.teacher.parameters()).dtype == torch.float64
    model.train()
    assert model.teacher.training is False


# -- bad teachers: clear errors before any training step -------------------------------------


class CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


def _fit_fails(model: DistillationClassifier, root: Path, match: str) -> None:
    count = CountSteps()
    with pytest.raises(TeacherCheckpointError, match=match):
        trainer(root, callbacks=[count], enable_checkpointing=False).fit(model, *loaders())
    assert count.steps == 0


def test_missing_teacher_file_fails_before_training(tmp_path: Path) -> None:
    _fit_fails(student(tmp_path / "nope.ckpt"), tmp_path, r"nope\.ckpt does not exist")


def test_non_checkpoint_teacher_fails_before_training(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    _fit_fails(student(text), tmp_path, "could not be read as a Lightning checkpoint")
    other = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    _fit_fails(student(other), tmp_path, "is not a Classifier checkpoint")


def test_teacher_with_other_classes_fails_before_training(tmp_path: Path) -> None:
    four = cli_style(
        Classifier,
        "models.backbones.CRNN",
        CRNN_SMALL,
        num_classes=4,
        class_names=[*CLASSES, "cough"],
    )
    path = tmp_path / "four.ckpt"
    run = trainer(tmp_path, max_steps=0, enable_checkpointing=False)
    run.strategy.connect(four)
    run.save_checkpoint(path)
    _fit_fails(student(path), tmp_path, r"was trained for classes \[.*'cough'\], the data has")


def test_teacher_with_other_class_names_or_shape_is_refused(teacher_ckpt: str) -> None:
    renamed = student(teacher_ckpt, class_names=["quiet", "breathe", "cough"])
    with pytest.raises(TeacherCheckpointError, match="was trained for classes"):
        renamed.check_teacher()
    wider = cli_style(
        DistillationClassifier,
        "models.backbones.TinyCNN",
        TINY_SMALL,
        teacher_checkpoint=teacher_ckpt,
        in_channels=2,
        input_shape=(2, *SHAPE[1:]),
    )
    with pytest.raises(TeacherCheckpointError, match="takes features"):
        wider.load_teacher()


def test_teacher_trained_on_other_features_is_refused(tmp_path: Path) -> None:
    """Same classes and shape, another front end (eps): the teacher's logits would mislead."""
    features = LogMelFrontEnd().config()
    teacher = cli_style(
        Classifier,
        "models.backbones.TinyCNN",
        TINY_SMALL,
        in_channels=2,
        input_shape=(2, *SHAPE[1:]),
        features=features,
    )
    path = save_checkpoint(teacher, tmp_path / "teacher.ckpt")

    def pupil(student_features: dict) -> DistillationClassifier:
        return cli_style(
            DistillationClassifier,
            "models.backbones.TinyCNN",
            TINY_SMALL,
            teacher_checkpoint=str(path),
            in_channels=2,
            input_shape=(2, *SHAPE[1:]),
            features=student_features,
        )

    with pytest.raises(TeacherCheckpointError, match="eps: trained 1e-06, given 0.1"):
        pupil({**features, "eps": 0.1}).check_teacher()
    same = pupil(features)
    assert same.check_teacher()["hyper_parameters"]["features"] == features


def test_bad_hyperparameters_are_refused() -> None:
    for bad in ({"alpha": 1.5}, {"temperature": 0.0}, {"beta": -1.0}, {"at_layers": []}):
        with pytest.raises(ValueError):
            student("t.ckpt", **bad)


# -- through the command line ------------------------------------------------------------------


@pytest.mark.slow
def test_cli_student_tests_after_the_teacher_file_is_deleted(tmp_path: Path) -> None:
    """fit a CRNN teacher, fit a KD student, delete the teacher, then ``main.py test``."""
    from main import main

    data = tmp_path / "data.yaml"
    data.write_text(
        f"""
data:
  source:
    class_path: data.sources.Synthetic
    init_args: {{seed: 0, clips_per_split: {{train: 128, validation: 64, test: 64}}}}
  cache_dir: {tmp_path / "cache"}
  batch_size: 32
  progress: false
trainer:
  max_epochs: 1
  limit_train_batches: 2
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    init_args: {{save_dir: {tmp_path / "log"}}}
latency: {{runs: 1, warmup: 0}}
leaderboard: {{path: {tmp_path / "leaderboard.csv"}}}
"""
    )
    base = ["--config", "config/demo.yaml", "--config", str(data)]
    teacher_cli = main(
        ["fit", *base, "--model.init_args.backbone", "models.backbones.CRNN"]
        + ["--trainer.logger.init_args.name", "teacher"]
    )
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(Path(teacher_cli.trainer.checkpoint_callback.best_model_path).read_bytes())
    kd = tmp_path / "kd.yaml"
    kd.write_text(
        "model:\n  class_path: models.distillation.DistillationClassifier\n"
        f"  init_args: {{teacher_checkpoint: {teacher}, baseline_f1: 0.2}}\n"
    )
    student_cli = main(
        ["fit", *base, "--config", str(kd), "--trainer.logger.init_args.name", "student"]
    )
    best = student_cli.trainer.checkpoint_callback.best_model_path
    assert not any("teacher" in k for k in torch.load(best, weights_only=True)["state_dict"])
    teacher.unlink()

    tested = main(
        ["test", *base, "--config", str(kd), "--ckpt_path", best]
        + ["--trainer.logger.init_args.name", "student_test"]
    )
    assert isinstance(tested.model, DistillationClassifier)
    assert tested.model.__dict__["_teacher"] is None
    assert "test/f1_macro" in tested.trainer.callback_metrics
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    assert row["teacher"] == str(teacher) and row["alpha"] == "0.6" and row["test_f1_macro"]
    assert float(row["compression_ratio"]) > 1

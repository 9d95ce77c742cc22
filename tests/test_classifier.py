"""The classifier's metrics, loss and checkpoint guard, through real Lightning loops."""

import warnings

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from models.backbones import Backbone
from models.classifier import Classifier
from models.compatibility import IncompatibleError

CLASSES = ["quiet", "breathe", "snore"]


class Echo(Backbone):
    """Predicts the class written into the input's first cell (a scripted model)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    def forward_with_maps(self, x):
        pred = x[:, 0, 0, 0].round().long().clamp(0, self.num_classes - 1)
        return torch.nn.functional.one_hot(pred, self.num_classes).float() * 10 + self.bias, []


def scripted(targets, preds, shape=(1, 4, 5)):
    x = torch.zeros(len(targets), *shape)
    x[:, 0, 0, 0] = torch.tensor(preds, dtype=torch.float32)
    return DataLoader(TensorDataset(x, torch.tensor(targets)), batch_size=4)


def quiet_trainer(tmp_path, **kw):
    return Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


def make_model(**kw):
    defaults = dict(
        num_classes=3, in_channels=1, class_names=CLASSES, input_shape=(1, 4, 5), normalize=False
    )
    return Classifier(backbone=Echo, **(defaults | kw))


def test_metrics_match_a_hand_computed_confusion_matrix(tmp_path):
    targets = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    preds = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
    # confusion (rows true): [[2,1,1],[1,2,0],[0,1,2]]
    model = make_model()
    out = quiet_trainer(tmp_path).validate(model, scripted(targets, preds), verbose=False)[0]
    assert model.confusion["val"].tolist() == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    precision = [2 / 3, 2 / 4, 2 / 3]
    recall = [2 / 4, 2 / 3, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert out["val/acc"] == pytest.approx(6 / 10)
    assert out["val/f1_macro"] == pytest.approx(sum(f1) / 3)
    assert out["val/bal_acc"] == pytest.approx(sum(recall) / 3)
    for i, name in enumerate(CLASSES):
        assert out[f"val/precision/{name}"] == pytest.approx(precision[i])
        assert out[f"val/recall/{name}"] == pytest.approx(recall[i])
        assert out[f"val/f1/{name}"] == pytest.approx(f1[i])


def test_absent_class_keeps_metrics_defined_and_warns(tmp_path):
    targets, preds = [0, 0, 1, 1], [0, 1, 1, 1]
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = quiet_trainer(tmp_path).test(model, scripted(targets, preds), verbose=False)[0]
    assert any("no samples of class snore" in str(w.message) for w in caught)
    assert all(v == v for v in out.values())  # no NaN
    # the absent class is left out of the macro average: F1 quiet 2/3, breathe 0.8
    assert out["test/f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert model.test_predictions["probs"].shape == (4, 3)
    assert model.test_predictions["target"].tolist() == targets


def test_loss_uses_the_data_modules_class_weights_and_band_stats(tmp_path):
    class DM(LightningDataModule):
        class_weights = torch.tensor([0.5, 1.0, 2.0])
        feature_stats = (torch.full((1, 4), 3.0), torch.full((1, 4), 2.0))

        def train_dataloader(self):
            return scripted([0, 1, 2, 2], [0, 1, 2, 0])

    model = make_model(normalize=True, freq_mask=0, time_mask=0)
    quiet_trainer(tmp_path, max_steps=1).fit(model, datamodule=DM())
    assert model.class_weight.tolist() == [0.5, 1.0, 2.0]
    assert model.band_mean.flatten().tolist() == [3.0] * 4
    x = torch.full((1, 1, 4, 5), 7.0)
    assert torch.equal(model.standardize(x), torch.full_like(x, 2.0))
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1])
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(model.cross_entropy(logits, y), expected)


def test_augmentation_only_touches_training_inputs():
    model = make_model(freq_mask=2, time_mask=2, num_masks=2)
    x = torch.randn(8, 1, 4, 5) + 5
    assert torch.equal(model.standardize(x), x)  # normalize off
    masked = model.train_inputs(x)
    assert (masked == 0).any() and not (x == 0).any()
    model.eval()
    assert torch.equal(model(x), model.backbone(x))


def test_predict_step_returns_probabilities():
    model = make_model()
    x = torch.zeros(3, 1, 4, 5)
    for batch in (x, (x, torch.zeros(3)), {"x": x}):
        probs = model.predict_step(batch, 0)
        assert probs.shape == (3, 3)
        assert torch.allclose(probs.sum(dim=1), torch.ones(3))


def test_checkpoint_of_another_class_count_is_refused():
    model = make_model()
    ckpt = {
        "hyper_parameters": {
            "backbone": {"class_path": "models.backbones.TinyCNN"},
            "num_classes": 5,
        }
    }
    with pytest.raises(IncompatibleError, match="holds a TinyCNN, the config asks for a Echo"):
        model.on_load_checkpoint(ckpt)


def test_collapse_is_one_class_or_no_better_than_the_majority_class() -> None:
    from models.metrics import collapse_report

    # 10 quiet, 6 breathe, 4 snore; everything predicted "quiet"
    one_class = torch.tensor([[10, 0, 0], [6, 0, 0], [4, 0, 0]])
    report = collapse_report(one_class, f1_macro=(2 * 10 / 30) / 3)
    assert report["collapsed"] and report["never_predicted"] == [1, 2]
    assert report["pred_share"] == [1.0, 0.0, 0.0]
    # the baseline: F1 of the majority class (2·10/(20+10)) over the three present classes
    assert report["majority_f1_macro"] == pytest.approx(2 * 10 / 30 / 3)
    # three classes predicted, but no better than always saying "quiet": still collapsed
    poor = torch.tensor([[4, 3, 3], [3, 2, 1], [2, 1, 1]])
    assert collapse_report(poor, f1_macro=0.2)["collapsed"]
    good = torch.tensor([[9, 1, 0], [1, 5, 0], [0, 1, 3]])
    assert not collapse_report(good, f1_macro=0.8)["collapsed"]
    # a split with one class present cannot tell
    assert not collapse_report(torch.tensor([[5, 0], [0, 0]]), f1_macro=1.0)["collapsed"]

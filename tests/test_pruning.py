"""Structured channel pruning: real torch-pruning shrinks the network, and its checkpoint
fits, tests and exports like any other (util/callbacks/pruning.py, models/pruning.py)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from main import main
from models.backbones import CRNN, TinyCNN, TinyCNNCBAM
from models.classifier import Classifier
from models.pruning import (
    PRUNING_KEY,
    PrunedShapeError,
    conform_to_state_dict,
    layer_widths,
    pruning_record,
)
from tests.helpers import ROOT, TINY, build_like_cli, save_checkpoint, untrained_checkpoint
from util.callbacks.pruning import ChannelPruning, PruningError, prune_channels
from util.checkpoint import read_checkpoint
from util.complexity import count_macs, count_params
from util.deploy import export as ex

NATIVE = (2, 64, 101)
SCENARIOS = ["finetune", "single", "progressive", "kd_finetune", "kd_single", "kd_progressive"]
CLASSES = ["quiet", "breathe", "snore"]


# -- the pruning itself ---------------------------------------------------------------------


@pytest.mark.parametrize("backbone", [TinyCNN, TinyCNNCBAM])
def test_half_the_channels_takes_at_most_half_the_params_and_macs(backbone: type) -> None:
    model = backbone(2, 3)
    params, macs = count_params(model), count_macs(model, NATIVE)
    widths = prune_channels(model, NATIVE, 0.5)
    assert [widths[f"blocks.{i}.conv"] for i in range(3)] == [8, 16, 32]
    assert widths["head"] == 3  # the classifier keeps its classes
    # inner convolutions lose half their inputs and half their outputs: about a quarter
    assert count_params(model) <= 0.3 * params
    assert count_macs(model, NATIVE) <= 0.3 * macs
    assert model(torch.randn(2, *NATIVE)).shape == (2, 3)


def test_cbam_attention_follows_the_pruned_block_and_its_spatial_gate_is_untouched() -> None:
    model = TinyCNNCBAM(2, 3)
    prune_channels(model, NATIVE, 0.5)
    assert model.cbam.channel.mlp[0].in_features == 16 == model.cbam.channel.mlp[2].out_features
    assert model.cbam.spatial.conv.weight.shape == (1, 2, 3, 3)  # mean and max maps, as before


def test_layers_and_ignore_choose_what_is_pruned() -> None:
    model = TinyCNN(2, 3)
    widths = prune_channels(model, NATIVE, 0.5, layers=["blocks.*.conv"], ignore=["blocks.2.*"])
    assert [widths[f"blocks.{i}.conv"] for i in range(3)] == [8, 16, 64]


def test_bad_options_are_refused_in_one_line() -> None:
    with pytest.raises(PruningError, match=r"sparsity must be in \[0, 1\)"):
        ChannelPruning(sparsity=1.0)
    with pytest.raises(PruningError, match="steps >= 2"):
        ChannelPruning(schedule="progressive", steps=1)
    with pytest.raises(PruningError, match="bn_scale needs batch norm"):
        prune_channels(TinyCNN(2, 3), NATIVE, 0.5, importance="bn_scale")
    with pytest.raises(PruningError, match="cannot be imported"):
        ChannelPruning(pass_through=["models.backbones.cbam.NoSuchThing"])


# -- loading a pruned state dict without torch-pruning ------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "kwargs"), [(TinyCNN, {}), (TinyCNN, {"batch_norm": True}), (TinyCNNCBAM, {})]
)
def test_a_fresh_unpruned_module_takes_the_pruned_weights_exactly(
    backbone: type, kwargs: dict
) -> None:
    pruned = backbone(2, 3, **kwargs)
    prune_channels(pruned, NATIVE, 0.5)
    fresh = backbone(2, 3, **kwargs)
    assert conform_to_state_dict(fresh, backbone(2, 3, **kwargs).state_dict()) == []
    rebuilt = conform_to_state_dict(fresh, pruned.state_dict())
    assert "blocks.1.conv" in rebuilt and "head" in rebuilt
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(2, *NATIVE)
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x))
    assert layer_widths(fresh) == layer_widths(pruned)


def test_depthwise_convolutions_keep_one_channel_per_group() -> None:
    """BC-ResNet-style depthwise layers: the group count follows the pruned width."""
    net = nn.Sequential(
        nn.Conv2d(2, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
    )
    pruned = nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
    )
    conform_to_state_dict(net, pruned.state_dict())
    net.load_state_dict(pruned.state_dict())
    assert net[1].groups == 4 and net[1].in_channels == 4 and net[2].num_features == 4
    assert net(torch.randn(1, 2, 8, 8)).shape == (1, 4, 8, 8)


def test_bcresnet_prunes_through_its_sub_spectral_norms_and_reloads_exactly() -> None:
    """BC-ResNet folds frequency sub-bands into channels: each pruned channel takes its bands."""
    bcresnet = getattr(importlib.import_module("models.backbones"), "BCResNet", None)
    if bcresnet is None:
        pytest.skip("models.backbones.BCResNet is not in this tree")
    model = bcresnet(2, 3)
    macs = count_macs(model, NATIVE)
    prune_channels(model, NATIVE, 0.5)
    assert count_macs(model, NATIVE) <= 0.5 * macs
    fresh = bcresnet(2, 3)
    conform_to_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, *NATIVE)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_a_shape_change_in_a_layer_that_cannot_be_rebuilt_is_named() -> None:
    model = CRNN(2, 3, rnn_hidden=8, rnn_layers=1, channels=[4, 8, 8])
    state = CRNN(2, 3, rnn_hidden=16, rnn_layers=1, channels=[4, 8, 8]).state_dict()
    with pytest.raises(PrunedShapeError, match=r"rnn\..*GRU cannot be rebuilt"):
        conform_to_state_dict(model, state)


# -- fitting, reloading and exporting through the CLI --------------------------------------------


def _args(tmp: Path, scenario: str, cache: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "config" / "prune" / f"{scenario}.yaml"),
        "--config", str(TINY),
        "--data.cache_dir", str(cache),
        "--trainer.logger.init_args.save_dir", str(tmp / "log"),
        "--leaderboard.path", str(tmp / "leaderboard.csv"),
        "--trainer.callbacks.init_args.init_checkpoint", str(tmp / "base.ckpt"),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """``config/prune/single.yaml`` on the tiny corpus: the best checkpoint of a 50 % prune."""
    tmp = tmp_path_factory.mktemp("single")
    untrained_checkpoint(tmp / "base.ckpt")
    cli = main(["fit", *_args(tmp, "single", cache, "--trainer.max_epochs", "1")])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def test_the_six_scenarios_are_configured() -> None:
    assert sorted(p.stem for p in (ROOT / "config" / "prune").glob("*.yaml")) == sorted(SCENARIOS)
    for name in SCENARIOS:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "config" / "prune" / f"{name}.yaml"), "--help"])


def test_single_shot_checkpoint_is_pruned_and_says_how(pruned_run: Path) -> None:
    checkpoint = read_checkpoint(pruned_run)
    record = pruning_record(checkpoint)
    assert record is not None and checkpoint[PRUNING_KEY] == record
    assert record["scenario"] == "single" and record["sparsity"] == 0.5
    assert record["channels_before"]["blocks.2.conv"] == 64
    assert record["channels_after"]["blocks.2.conv"] == 32
    assert record["macs_after"] <= 0.5 * record["macs_before"]
    assert checkpoint["state_dict"]["backbone.blocks.1.conv.weight"].shape == (16, 8, 3, 3)
    assert checkpoint["hyper_parameters"]["backbone"]["class_path"].endswith("TinyCNN")


def test_pruned_checkpoint_tests_and_exports_smaller(
    pruned_run: Path, tmp_path: Path, cache: Path
) -> None:
    model = ex.load_classifier(pruned_run)  # Lightning's load_from_checkpoint: a fresh module
    assert layer_widths(model.backbone)["blocks.0.conv"] == 8
    tested = main(["test", *_args(tmp_path, "single", cache), "--ckpt_path", str(pruned_run)])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/f1_macro"]) <= 1.0
    assert tested.model.complexity["params"] == count_params(model.backbone)
    config = pruned_run.parents[1] / "config.yaml"
    pruned = ex.export_checkpoint(
        pruned_run, out=tmp_path / "pruned", parity_clips=16, progress=False
    )
    whole = untrained_checkpoint(tmp_path / "whole.ckpt")
    unpruned = ex.export_checkpoint(
        whole, run_config=config, out=tmp_path / "whole", parity_clips=16, progress=False
    )
    assert pruned["files"]["fp32"]["bytes"] < 0.5 * unpruned["files"]["fp32"]["bytes"]
    assert pruned["parity"]["max_abs_diff"] <= 1e-4


def test_progressive_rounds_end_at_the_target_and_keep_only_final_size_checkpoints(
    tmp_path: Path, cache: Path
) -> None:
    untrained_checkpoint(tmp_path / "base.ckpt")
    cli = main(
        ["fit", *_args(tmp_path, "progressive", cache),
         "--trainer.max_epochs", "3", "--trainer.callbacks.init_args.steps", "2",
         "--trainer.callbacks.init_args.epochs_per_step", "1"]
    )  # fmt: skip
    model = cli.model
    assert layer_widths(model.backbone)["blocks.1.conv"] == 16
    # the optimizer trains the pruned tensors, not the removed ones
    trained = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters()}
    folder = Path(cli.trainer.checkpoint_callback.best_model_path).parent
    for path in folder.glob("*.ckpt"):
        record = pruning_record(read_checkpoint(path))
        assert record["steps_done"] == 2 and record["channels_after"]["blocks.1.conv"] == 16
    assert model.complexity["params"] == count_params(model.backbone)  # profiled again


def test_too_few_epochs_for_the_progressive_rounds_is_refused(tmp_path: Path, cache: Path) -> None:
    untrained_checkpoint(tmp_path / "base.ckpt")
    with pytest.raises(PruningError, match="max_epochs 2 is too few"):
        main(["fit", *_args(tmp_path, "progressive", cache, "--trainer.max_epochs", "2")])


def test_a_baseline_of_another_backbone_is_refused(tmp_path: Path, cache: Path) -> None:
    other = build_like_cli(
        Classifier, "models.backbones.TinyCNNCBAM", num_classes=3, in_channels=2,
        class_names=CLASSES, input_shape=NATIVE,
    )  # fmt: skip
    save_checkpoint(other, tmp_path / "base.ckpt")
    with pytest.raises(PruningError, match="init_checkpoint .*TinyCNNCBAM"):
        main(["fit", *_args(tmp_path, "single", cache, "--trainer.max_epochs", "1")])


def test_kd_fine_tuning_of_a_pruned_student_distils_from_a_tiny_teacher(
    tmp_path: Path, cache: Path
) -> None:
    teacher = build_like_cli(
        Classifier, "models.backbones.CRNN",
        {"rnn_hidden": 8, "rnn_layers": 1, "channels": [4, 8, 8]},
        num_classes=3, in_channels=2, class_names=CLASSES, input_shape=NATIVE,
    )  # fmt: skip
    save_checkpoint(teacher, tmp_path / "teacher.ckpt")
    untrained_checkpoint(tmp_path / "base.ckpt")
    cli = main(
        ["fit", *_args(tmp_path, "kd_single", cache, "--trainer.max_epochs", "1",
                       "--model.init_args.teacher_checkpoint", str(tmp_path / "teacher.ckpt"),
                       "--trainer.callbacks.init_args.sparsity", "0.25")]
    )  # fmt: skip
    assert "train/kd_loss" in cli.trainer.callback_metrics
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    record = pruning_record(read_checkpoint(best))
    assert record["scenario"] == "kd_single" and record["distillation"] is True
    assert record["channels_after"]["blocks.2.conv"] == 48
    # a pruned checkpoint can itself be a teacher: the hook rebuilds it on load
    restored = Classifier.load_from_checkpoint(best, map_location="cpu", weights_only=True)
    assert layer_widths(restored.backbone)["blocks.2.conv"] == 48
    assert json.loads((best.parents[1] / "metrics.json").read_text())["complexity"]["params"] == (
        count_params(restored.backbone)
    )

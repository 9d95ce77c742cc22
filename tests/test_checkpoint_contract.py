"""The checkpoint knows its front end: other features are refused, test needs no train cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from main import main
from models.compatibility import IncompatibleError, check_compatible
from tests.test_cli import tiny_args
from util.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, object]:
    tmp_path = tmp_path_factory.mktemp("contract")
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "1")])
    return tmp_path, cli.trainer.checkpoint_callback.best_model_path, cli


def test_the_checkpoint_records_the_front_end_it_was_trained_on(fitted) -> None:
    _, ckpt, cli = fitted
    saved = read_checkpoint(ckpt)["hyper_parameters"]["features"]
    assert saved == cli.datamodule.features.config()
    assert saved["preset"] == "native" and saved["n_mels"] == 64


@pytest.mark.parametrize(
    ("option", "value", "name"),
    [
        ("--data.features.init_args.eps", "0.1", "eps"),
        ("--data.features.init_args.mel_scale", "slaney", "mel_scale"),
    ],
)
@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_a_checkpoint_refuses_a_front_end_with_other_options(
    fitted, subcommand: str, option: str, value: str, name: str, capsys
) -> None:
    """Same 2×64×101 shape, other features: refused in one line before any cache is built."""
    tmp_path, ckpt, _ = fitted
    caches_before = sorted((tmp_path / "cache").rglob("*.h5"))
    with pytest.raises(SystemExit) as stop:
        main([subcommand, *tiny_args(tmp_path), "--ckpt_path", ckpt, option, value])
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert f"{name}: trained" in err[0] and "given" in err[0] and ckpt in err[0]
    assert sorted((tmp_path / "cache").rglob("*.h5")) == caches_before  # nothing built


def test_test_with_a_checkpoint_reads_only_the_test_split(fitted) -> None:
    """The band statistics are in the checkpoint: no train cache is read, none is rebuilt."""
    tmp_path, ckpt, cli = fitted
    train = cli.datamodule.cache_file("train")
    validation = cli.datamodule.cache_file("validation")
    assert train.is_file()
    train.unlink()
    validation.unlink()
    tested = main(["test", *tiny_args(tmp_path), "--ckpt_path", ckpt])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/f1_macro"]) <= 1.0
    assert not train.exists() and not validation.exists()
    # the statistics the model normalised with are the checkpoint's, not defaults
    state = read_checkpoint(ckpt)["state_dict"]
    assert (tested.model.band_mean == state["band_mean"]).all()
    assert not (state["band_std"] == 1).all()


def test_compatibility_names_what_differs() -> None:
    hparams = {
        "backbone": {"class_path": "models.backbones.TinyCNN"},
        "class_names": ["quiet", "breathe", "snore"],
        "input_shape": [2, 64, 101],
        "features": {"preset": "native", "eps": 1e-6},
    }
    check_compatible(hparams, class_names=["quiet", "breathe", "snore"], input_shape=(2, 64, 57))
    with pytest.raises(IncompatibleError, match=r"classes \['quiet', 'breathe', 'snore'\]"):
        check_compatible(hparams, class_names=["quiet", "snore"])
    with pytest.raises(IncompatibleError, match=r"\(1, 64, 501\)"):
        check_compatible(hparams, input_shape=(1, 64, 501))
    with pytest.raises(IncompatibleError, match="eps: trained 1e-06, given 0.1"):
        check_compatible(hparams, feature_config={"preset": "native", "eps": 0.1})
    with pytest.raises(IncompatibleError, match="holds a TinyCNN, the config asks for a CRNN"):
        check_compatible(hparams, backbone={"class_path": "models.backbones.CRNN"})
    # a checkpoint from before the front end was recorded: features are not judged
    check_compatible({**hparams, "features": None}, feature_config={"eps": 0.1})


def test_a_checkpoint_from_before_the_engine_callback_gets_its_fix_in_one_line(
    fitted, tmp_path: Path, capsys
) -> None:
    import shlex
    import subprocess
    import sys

    import torch

    root, ckpt, _ = fitted
    old = torch.load(ckpt, weights_only=True)
    old["hyper_parameters"]["predict_engine"] = "auto"
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    with pytest.raises(SystemExit):
        main(["test", *tiny_args(root), "--ckpt_path", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--predict_engine.runtime" in err[0]
    fix = shlex.split(err[0].split("drop it from the file once: ", 1)[1])
    subprocess.run([sys.executable, *fix[1:]], check=True)  # the printed command, as given
    tested = main(["test", *tiny_args(root), "--ckpt_path", str(path)])
    assert tested.trainer.state.finished

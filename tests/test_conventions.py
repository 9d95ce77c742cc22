"""Lightning conventions: last.ckpt is the last epoch, learning rates logged, a real optimizer default."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from main import main
from tests.test_cli import ROOT, tiny_args
from util.checkpoint import read_checkpoint


def test_last_ckpt_is_the_last_epoch_and_resuming_from_it_continues(tmp_path: Path) -> None:
    """Lightning 2.6's save_last would leave last.ckpt at the best epoch; ours is the last one."""
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "3")])
    folder = Path(cli.trainer.checkpoint_callback.best_model_path).parent
    last = folder / "last.ckpt"
    saved = read_checkpoint(last)
    assert saved["epoch"] == 2  # epochs 0, 1, 2: the third
    assert saved["global_step"] == cli.trainer.global_step
    # its recorded validation score is that epoch's, not the best one's
    assert saved["earsleep_validation_score"]["value"] == pytest.approx(
        float(cli.trainer.callback_metrics["val/f1_macro"])
    )
    assert len(list(folder.glob("best-*.ckpt"))) == 1 and len(list(folder.glob("last*.ckpt"))) == 1
    resumed = main(
        ["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "4"), "--ckpt_path", str(last)]
    )
    assert resumed.trainer.current_epoch == 4  # one more epoch, not four
    assert resumed.trainer.global_step == saved["global_step"] * 4 // 3


def test_learning_rates_are_logged_and_the_optimizer_default_takes_a_new_lr(
    tmp_path: Path,
) -> None:
    """``--model.init_args.optimizer.init_args.lr`` works without naming the optimizer."""
    cli = main(
        ["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "1"),
         "--model.init_args.optimizer.init_args.lr", "0.003"]
    )  # fmt: skip
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "Adam"
    assert optimizer.param_groups[0]["lr"] == 0.003
    assert optimizer.param_groups[0]["weight_decay"] == 1e-5  # the recipe's, kept
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    rates = [t for t in events.Tags()["scalars"] if t.startswith("lr-")]
    assert rates == ["lr-Adam"]
    assert events.Scalars("lr-Adam")[0].value == pytest.approx(0.003)
    # the HParams tab: the run's hyper-parameters beside its best validation macro-F1
    assert events.PluginTagToContent("hparams")  # the summary TensorBoard's tab reads
    best = events.Scalars("hp/val_f1_macro")[-1].value
    assert best == pytest.approx(float(cli.trainer.checkpoint_callback.best_model_score))


def test_print_config_shows_the_optimizer_that_will_run(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "config" / "demo.yaml"), "--print_config"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: models.task.Adam" in out and "weight_decay: 1.0e-05" in out


def test_test_and_predict_with_a_checkpoint_log_into_its_run_folder(tmp_path: Path) -> None:
    """No new, otherwise empty ``version_<n>`` per test or predict: a subfolder of the run."""
    fit = main(["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "1")])
    run = Path(fit.trainer.log_dir)
    best = fit.trainer.checkpoint_callback.best_model_path
    for _ in range(2):
        tested = main(["test", *tiny_args(tmp_path), "--ckpt_path", best])
    assert Path(tested.trainer.log_dir) == run / "test" / "version_1"
    assert (run / "test" / "version_0" / "test_metrics.csv").is_file()
    predicted = main(["predict", *tiny_args(tmp_path), "--ckpt_path", best])
    assert Path(predicted.trainer.log_dir) == run / "predict" / "version_0"
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # log/demo holds the one run


def test_early_stopping_says_that_it_ended_the_run(tmp_path: Path, capsys) -> None:
    """A frozen model (lr 0) never improves: patience 1 stops it after its second epoch."""
    cli = main(
        ["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "5"),
         "--early_stopping.patience", "1", "--model.init_args.optimizer.init_args.lr", "0"]
    )  # fmt: skip
    assert cli.trainer.current_epoch < 5
    err = capsys.readouterr().err
    assert (
        f"early stopping ended the run after epoch {cli.trainer.early_stopping_callback.stopped_epoch}"
        in err
    )

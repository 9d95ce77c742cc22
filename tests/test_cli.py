"""main.py end to end, in-process: fit, then test and predict from the checkpoint."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from main import main
from tests.helpers import tiny_args as shared_tiny_args

ROOT = Path(__file__).resolve().parents[1]
TINY_SPLITS = '{"train": 160, "validation": 64, "test": 64}'


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return shared_tiny_args(tmp_path, *extra, splits=TINY_SPLITS, latency_runs=10)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_epochs", "2")])
    return tmp_path, cli


def test_fit_writes_checkpoints_config_and_artifacts(fitted):
    tmp_path, cli = fitted
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.name.startswith("best-")
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((run_dir / "epoch_metrics.csv").read_text().splitlines()))
    assert len(rows) == 2 and "val/f1_macro" in rows[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["complexity"]["params"] == sum(
        p.numel() for p in cli.model.backbone.parameters()
    )


def test_test_and_predict_from_the_checkpoint(fitted):
    tmp_path, cli = fitted
    best = cli.trainer.checkpoint_callback.best_model_path
    tested = main(["test", *tiny_args(tmp_path), "--ckpt_path", best])
    metrics = tested.trainer.callback_metrics
    assert 0.0 <= float(metrics["test/f1_macro"]) <= 1.0
    assert {"test/acc", "test/bal_acc", "test/f1/snore"} <= set(metrics)
    run_dir = Path(tested.trainer.log_dir)
    header = next(csv.reader((run_dir / "class_metrics.csv").read_text().splitlines()))
    assert header[:4] == ["class", "precision", "recall", "f1"]
    # a misclassified clip can be found by name: every row names its clip
    rows = list(csv.DictReader((run_dir / "test_predictions.csv").read_text().splitlines()))
    ids = [r["clip_id"] for r in rows]
    assert len(set(ids)) == len(ids) == len(tested.model.test_predictions["target"])
    assert tested.datamodule.dataset("test").clip_ids == ids
    board = list(csv.DictReader((tmp_path / "leaderboard.csv").read_text().splitlines()))
    assert board[-1]["model"] == "TinyCNN" and board[-1]["test_f1_macro"]
    # A test-only run takes the tested checkpoint's validation score from the file.
    val = float(cli.trainer.checkpoint_callback.best_model_score)
    assert float(board[-1]["best_val_f1_macro"]) == pytest.approx(val)
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run_metrics["best_val_f1_macro"] == pytest.approx(val)
    assert run_metrics["best_model_path"] == best

    predicted = main(["predict", *tiny_args(tmp_path), "--ckpt_path", best])
    probs = torch.cat(predicted.trainer.predict_loop.predictions)
    n_test = len(tested.model.test_predictions["target"])  # the test split minus non_wearer
    assert 0 < n_test < 64
    assert probs.shape == (n_test, 3)
    assert probs.sum(dim=1).allclose(torch.ones(n_test))
    # predict runs the same model on the same rows as test
    assert torch.allclose(probs, tested.model.test_predictions["probs"], atol=1e-5)


def test_the_predict_engine_is_a_callback_not_a_model_option(fitted):
    """Choosing the engine never touches the checkpoint's hyper-parameters, and both agree."""
    tmp_path, cli = fitted
    best = cli.trainer.checkpoint_callback.best_model_path
    stored = torch.load(best, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert "predict_engine" not in stored
    probs = {}
    for runtime in ("torch", "onnxruntime"):
        predicted = main(
            ["predict", *tiny_args(tmp_path), "--ckpt_path", best]
            + ["--predict_engine.runtime", runtime]
        )
        assert predicted.model.predict_runner is None  # handed back after the run
        probs[runtime] = torch.cat(predicted.trainer.predict_loop.predictions)
    assert torch.allclose(probs["torch"], probs["onnxruntime"], atol=1e-4)


def test_checkpoint_of_another_backbone_is_refused(fitted, capsys):
    tmp_path, cli = fitted
    best = cli.trainer.checkpoint_callback.best_model_path
    with pytest.raises(SystemExit):
        main(["test", *tiny_args(tmp_path), "--model.init_args.backbone", "models.backbones.CRNN",
              "--ckpt_path", best])  # fmt: skip
    err = capsys.readouterr().err
    assert "TinyCNN" in err and "CRNN" in err


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "models.classifier.Classifier"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("freq_mask", "mixup_alpha", "normalize", "optimizer"):
        assert f"--model.{option}" in out
    assert "SpecAugment" in out


def test_a_subcommand_builds_its_own_parser_and_help_lists_every_one(fitted, capsys):
    tmp_path, cli = fitted
    assert set(cli._subcommand_parsers) == {"fit"}  # the other three are never built
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict"):
        assert f"    {subcommand} " in out
    # the subcommand's own help and its errors are those of the full parser
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--help"])
    assert exit_info.value.code == 0 and "--ckpt_path" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *tiny_args(tmp_path), "--trainer.no_such_option", "1"])
    assert exit_info.value.code != 0
    assert "no_such_option" in capsys.readouterr().err


def test_unknown_class_path_is_a_clear_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                *tiny_args(tmp_path),
                "--model.init_args.backbone",
                "models.backbones.NoSuchNet",
            ]
        )
    assert exit_info.value.code != 0
    assert "NoSuchNet" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_fit_on_two_cpu_processes_writes_artifacts_once(tmp_path):
    args = tiny_args(
        tmp_path, "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
        "--trainer.strategy", "ddp", "--trainer.devices", "2",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "main.py", "fit", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "log").glob("demo/version_*"))
    assert len(runs) == 1, runs
    assert (runs[0] / "metrics.json").is_file()
    board = list(csv.DictReader((tmp_path / "leaderboard.csv").read_text().splitlines()))
    assert len(board) == 1


EXIT_QUICKLY = """
import atexit, concurrent.futures, pathlib, sys, threading, time
from util.cli import exit_quickly
out = pathlib.Path(sys.argv[1])
atexit.register(lambda: (out / "handler").write_text("ran"))
def late():  # a non-daemon thread still writing when the command ends
    time.sleep(0.5)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
pool = concurrent.futures.ThreadPoolExecutor(2)  # left open: must not hang the exit
pool.submit(time.sleep, 0.1)
print("buffered, no newline", end="")
exit_quickly(3)
"""


@pytest.mark.parametrize("full", ["0", "1"])
def test_a_quick_exit_still_joins_threads_runs_handlers_and_flushes(tmp_path, full):
    done = subprocess.run(
        [sys.executable, "-c", EXIT_QUICKLY, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EARSLEEP_FULL_EXIT": full},
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "buffered, no newline"  # a pipe: block-buffered until flushed
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "handler").read_text() == "ran"


def test_fit_through_the_real_entry_point_leaves_complete_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = subprocess.run(
        [sys.executable, "main.py", "fit", *tiny_args(tmp_path, "--trainer.max_epochs", "1")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "log").glob("demo/version_*")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert "val/f1_macro" in events.Tags()["scalars"]  # the writer flushed before the exit
    assert json.loads((run / "metrics.json").read_text())["complexity"]["params"] > 0
    assert len(list(csv.DictReader((tmp_path / "leaderboard.csv").open()))) == 1

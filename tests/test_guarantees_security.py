"""What earsleep guarantees about hostile files and secrets (README: "What earsleep guarantees").

- No code path unpickles arbitrary objects from a user's checkpoint: a ``.ckpt`` whose
  hyperparameters hold an object whose ``__reduce__`` runs a command is refused, in one
  line naming the file, by export, ``test``, ``predict`` and ``load_classifier``; the
  marker file its command would create never appears.
- No secret reaches a file the project writes: a token given as a config value is
  refused before anything is written; ``HF_TOKEN``, a password in a URL and a token in
  a sweep manifest appear in none of the files of a run or a sweep.
"""

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

import main as cli_main
from data.sources import DreamCatcher
from data.sources.hub import HubAudioDataset
from models.classifier import Classifier
from tests.helpers import tiny_args, untrained_checkpoint
from util import deploy
from util.checkpoint import CheckpointError, force_weights_only, read_checkpoint
from util.deploy.__main__ import main as export_main
from util.redact import mask_text, mask_tree
from util.sweep import Sweep, load_manifest, subprocess_runner

ROOT = Path(__file__).resolve().parents[1]
MARKER = "hf_EarsleepMarker0123456789secret"
URL_SECRET = "urlPassw0rdMarker"


class RunsCommand:
    """Unpickling this runs a shell command: the payload of a hostile checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture()
def weights_only_restored(monkeypatch):
    """main() forces weights-only loading process-wide; undo it after the test."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)


@pytest.fixture()
def hostile(tmp_path, weights_only_restored):
    """A real TinyCNN checkpoint with a command-running object in its hyperparameters."""
    good = untrained_checkpoint(tmp_path / "good.ckpt")
    marker = tmp_path / "PWNED"
    checkpoint = torch.load(good, weights_only=True, map_location="cpu")
    checkpoint["hyper_parameters"]["note"] = RunsCommand(f"touch {marker}")
    path = tmp_path / "run" / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip pickle format takes another code path
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": {}, "note": RunsCommand(f"touch {marker}")}, f)
    return {"path": path, "legacy": legacy, "marker": marker, "good": good}


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_export_refuses_a_hostile_checkpoint_without_running_it(hostile, capsys):
    code = export_main(["--ckpt_path", str(hostile["path"]), "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 1
    assert not hostile["marker"].exists()
    lines = [line for line in err.splitlines() if str(hostile["path"]) in line]
    assert len(lines) == 1 and "weights-only" in lines[0] and "posix.system" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["path", "legacy"])
def test_load_classifier_and_read_checkpoint_refuse_hostile_pickles(hostile, kind):
    with pytest.raises(deploy.ExportError, match="weights-only"):
        deploy.load_classifier(hostile[kind])
    with pytest.raises(CheckpointError, match="refuses this file"):
        read_checkpoint(hostile[kind])
    assert not hostile["marker"].exists()
    assert isinstance(deploy.load_classifier(hostile["good"]), Classifier)


@pytest.mark.parametrize("subcommand", ["test", "predict", "validate"])
def test_cli_refuses_a_hostile_checkpoint_in_one_line(hostile, tmp_path, capsys, subcommand):
    code = cli_main.cli([subcommand, *tiny_args(tmp_path), "--ckpt_path", str(hostile["path"])])
    err = capsys.readouterr().err
    assert code == 2
    assert not hostile["marker"].exists()
    (line,) = _error_lines(err)
    assert str(hostile["path"]) in line and "weights-only" in line
    assert "usage:" not in err and "Traceback" not in err


def test_weights_only_false_is_refused(hostile, tmp_path, capsys):
    code = cli_main.cli(
        ["test", *tiny_args(tmp_path), "--ckpt_path", str(hostile["good"])]
        + ["--weights_only", "false"]
    )
    assert code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "--weights_only false is refused" in line


def test_every_torch_load_is_weights_only_once_forced(hostile):
    """Lightning's own loads (remote paths, ``weights_only=False``) cannot unpickle either."""
    force_weights_only()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(hostile["path"], weights_only=False)
    with pytest.raises(pickle.UnpicklingError):
        Classifier.load_from_checkpoint(hostile["path"], weights_only=False)
    assert not hostile["marker"].exists()


def test_remote_checkpoint_paths_are_refused(tmp_path, capsys, weights_only_restored):
    code = cli_main.cli(["test", *tiny_args(tmp_path), "--ckpt_path", "https://x.invalid/a.ckpt"])
    assert code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "local files only" in line


# -- secrets ------------------------------------------------------------------------


def _files_holding(root: Path, *needles: str) -> list[str]:
    """Every file under ``root`` whose bytes contain one of ``needles``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


@pytest.mark.parametrize(
    "source",
    [
        {"class_path": "data.sources.DreamCatcher", "init_args": {"token": MARKER}},
        {
            "class_path": "data.sources.HubAudioDataset",
            "init_args": {"path": "x/y", "token": MARKER},
        },
    ],
    ids=["dreamcatcher", "hub"],
)
def test_a_token_in_the_config_is_refused_and_written_nowhere(
    tmp_path, capsys, source, weights_only_restored
):
    out = tmp_path / "out"
    code = cli_main.cli(["fit", *tiny_args(out), "--data.source", yaml.safe_dump(source)])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = _error_lines(err)
    assert "HF_TOKEN" in line and "hf auth login" in line
    assert MARKER not in err
    assert _files_holding(tmp_path, MARKER) == []


def test_sources_refuse_a_token_argument(tmp_path):
    with pytest.raises(ValueError, match="HF_TOKEN"):
        DreamCatcher(root=str(tmp_path), token=MARKER)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        HubAudioDataset(str(tmp_path), token=MARKER)


def test_no_secret_reaches_any_file_of_a_run(tmp_path, monkeypatch, weights_only_restored):
    """HF_TOKEN, a password in a URL (env and config): in no file of fit + test + predict."""
    monkeypatch.setenv("HF_TOKEN", MARKER)
    monkeypatch.setenv("HF_ENDPOINT", f"https://user:{URL_SECRET}@hub.invalid")
    # predict_audio is unused by fit and test but recorded in config.yaml
    args = tiny_args(
        tmp_path, "--data.predict_audio", f"https://user:{URL_SECRET}@data.invalid/night.wav"
    )
    fit = cli_main.main(["fit", *args, "--trainer.max_epochs", "1"])
    best = fit.trainer.checkpoint_callback.best_model_path
    cli_main.main(["test", *args, "--ckpt_path", best])
    config = yaml.safe_load((Path(fit.trainer.log_dir) / "config.yaml").read_text())
    assert config["data"]["predict_audio"] == "https://user:***@data.invalid/night.wav"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any("tfevents" in p.name for p in written)
    assert _files_holding(tmp_path, MARKER, URL_SECRET) == []


@pytest.mark.parametrize(
    "args",
    [
        {
            "data.source": {
                "class_path": "data.sources.DreamCatcher",
                "init_args": {"token": MARKER},
            }
        },
        {"data.source.init_args.token": MARKER},  # the demo's source has no token at all
    ],
    ids=["refused_by_the_source", "unknown_option"],
)
def test_a_token_in_a_sweep_manifest_reaches_no_sweep_output(tmp_path, args):
    manifest = {
        "name": "secret",
        "seeds": [0],
        "models": {"m": {"configs": ["config/demo.yaml"], "args": args}},
        "phase1": [{"name": "m", "model": "m"}, {"name": "t", "model": "m"}],
        "gate": {"teacher": "t"},
        "phase2": [],
    }
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "out"
    runner = subprocess_runner(threads=1)  # real runs: each refuses the token in one line
    Sweep(load_manifest(path), out, runner=runner, echo=lambda s: None).run()
    logs = list(out.rglob("run.log"))
    assert logs and all(_error_lines(p.read_text()) for p in logs)
    assert list(out.rglob("*.json")) and _files_holding(out, MARKER) == []


def test_masking_rules():
    assert mask_text(f"see https://me:{URL_SECRET}@host/x") == "see https://me:***@host/x"
    assert mask_text(f"--data.source.init_args.token {MARKER[:12]}x") == (
        "--data.source.init_args.token ***"
    )
    assert MARKER not in mask_text(f"Namespace(token='{MARKER}')")
    tree = mask_tree({"a": [{"password": "pw12345678"}], "b": "token=None", "n": 3})
    assert tree == {"a": [{"password": "***"}], "b": "token=None", "n": 3}

"""What earsleep guarantees about runs (README: "What earsleep guarantees").

- Runs started together never share a run folder: each claims its ``version_<n>``
  with an exclusive ``mkdir``; 8 parallel fits give 8 folders and 8 leaderboard rows,
  each pointing at its own folder.
- An output location that cannot be written is one error before the data and the
  training, naming the option.
- The common mistakes end in one line naming the file or option and what to do, with
  a non-zero exit; ``--debug`` or ``EARSLEEP_DEBUG=1`` adds the traceback.
"""

import csv
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants

import main as cli_main
from tests.helpers import tiny_args, untrained_checkpoint
from util import errors
from util.callbacks.leaderboard import append_leaderboard_row
from util.deploy.__main__ import main as export_main
from util.outputs import OutputError, allocate_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def weights_only_restored(monkeypatch):
    """main() forces weights-only loading process-wide; undo it after each test."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# -- 9: a run folder per run ------------------------------------------------------------


def _allocate_many(root: str, n: int, queue) -> None:
    queue.put([allocate_version(root) for _ in range(n)])


# Forking a process that has started torch threads is safe here: the children only mkdir.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_concurrent_allocations_never_share_a_folder(tmp_path):
    root = tmp_path / "log" / "demo"
    (root / "version_3").mkdir(parents=True)  # numbering continues after existing runs
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    queue = ctx.Queue()
    workers, per_worker = 8, 25
    procs = [ctx.Process(target=_allocate_many, args=(str(root), per_worker, queue)) for _ in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    got = [n for _ in procs for n in queue.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(got) == list(range(4, 4 + workers * per_worker))
    assert len(list(root.iterdir())) == 1 + workers * per_worker


def _fit(args: list[str]) -> None:
    torch.set_num_threads(1)  # eight processes on a few cores
    cli_main.main(args)


def test_parallel_fits_get_a_folder_and_a_row_each(tmp_path):
    """8 fits started together, same save_dir and leaderboard, different seeds."""
    seeds = list(range(8))
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]
    short += ["--trainer.limit_val_batches", "1"]
    common = tiny_args(tmp_path, *short)
    # Build the shared cache once, in a run of its own (other folder, other leaderboard).
    cli_main.main(
        ["fit", *tiny_args(tmp_path / "warm", *short), "--data.cache_dir", str(tmp_path / "cache")]
    )
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["main"])  # torch and Lightning imported once, not 8 times
    procs = [
        ctx.Process(target=_fit, args=(["fit", *common, "--seed_everything", str(s)],))
        for s in seeds
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * len(seeds)

    folders = sorted((tmp_path / "log" / "demo").iterdir())
    assert len(folders) == len(seeds)
    seed_of = {}
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["run_dir"] == str(folder)
        seed_of[str(folder)] = metrics["seed"]
        assert len(list((folder / "checkpoints").glob("best-*.ckpt"))) == 1
        assert f"seed_everything: {metrics['seed']}" in (folder / "config.yaml").read_text()
    assert sorted(seed_of.values()) == seeds
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(seeds)
    assert sorted(r["run_dir"] for r in rows) == sorted(seed_of)
    assert all(int(r["seed"]) == seed_of[r["run_dir"]] for r in rows)


def _append_many(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_leaderboard_row(path, {"run_dir": f"w{worker}/r{i}", "time": "t", "model": "M"})


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_leaderboard_loses_no_row_under_eight_writers(tmp_path):
    path = str(tmp_path / "leaderboard.csv")
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 150)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run_dir"] for r in rows) == sorted(
        f"w{w}/r{i}" for w in range(8) for i in range(150)
    )


# -- 11: outputs checked before the first step -------------------------------------------


@pytest.mark.parametrize(
    "option", ["--trainer.logger.init_args.save_dir", "--leaderboard.path", "--checkpoint.dirpath"]
)  # fmt: skip
def test_an_impossible_output_location_fails_before_data_and_training(tmp_path, capsys, option):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = blocker / ("leaderboard.csv" if option == "--leaderboard.path" else "out")
    args = ["fit", *tiny_args(tmp_path), option, str(bad), "--trainer.max_epochs", "1"]
    with pytest.raises(OutputError, match=option.replace(".", r"\.")):
        cli_main.main(args)
    assert not (tmp_path / "cache").exists()  # not even the data was touched
    assert not list(tmp_path.rglob("*.ckpt"))
    assert cli_main.cli(args) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert option in line and str(bad.parent) in line and "not writable" in line


def test_a_read_only_folder_fails_before_training(tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the probe meet what a user would
        import util.outputs

        real = util.outputs.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).is_relative_to(read_only):
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(util.outputs.tempfile, "mkstemp", mkstemp)
    else:
        read_only.chmod(0o555)
    try:
        code = cli_main.cli(
            ["fit", *tiny_args(tmp_path), "--trainer.logger.init_args.save_dir", str(read_only)]
        )
    finally:
        read_only.chmod(0o755)
    assert code == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "--trainer.logger.init_args.save_dir" in line and "Permission denied" in line
    assert not (tmp_path / "cache").exists()


# -- 12: one line for the common mistakes ----------------------------------------------------


@pytest.fixture()
def checkpoints(tmp_path):
    good = untrained_checkpoint(tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch 3: looked good\n" * 20)
    return {"missing": tmp_path / "nope.ckpt", "truncated": truncated, "text": text}


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "no such file"),
        ("truncated", "truncated or not a .ckpt"),
        ("text", "truncated or not a .ckpt"),
    ],
)
def test_a_bad_checkpoint_is_one_line(tmp_path, capsys, checkpoints, kind, expected):
    path = checkpoints[kind]
    code = cli_main.cli(["test", *tiny_args(tmp_path), "--ckpt_path", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = _error_lines(err)
    assert str(path) in line and expected in line and "--ckpt_path" in line
    assert "Traceback" not in err and "usage:" not in err
    # the export CLI says the same, in one line
    assert export_main(["--ckpt_path", str(path), "--progress", "false"]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if str(path) in line] == [
        f"export failed: {line.removeprefix('error: ').split(' (options:')[0]}"
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data.batch_size", "-4"], "--data.batch_size must be a positive"),
        (["--no_such_option", "1"], "unrecognized arguments: --no_such_option"),
        (["--trainer.max_epochs", "many"], "--trainer.max_epochs"),
    ],
    ids=["negative_batch", "unknown_option", "bad_type"],
)
def test_a_bad_option_is_one_line(tmp_path, capsys, extra, expected):
    code = cli_main.cli(["fit", *tiny_args(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == _error_lines(err)  # nothing but the one line
    (line,) = _error_lines(err)
    assert expected in line and "fit --help" in line  # prog is sys.argv[0]


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return ["--data.source", "data.sources.DreamCatcher", "--data.source.init_args.download_dir"]


def test_an_offline_hub_download_is_one_line(tmp_path, capsys, offline):
    code = cli_main.cli(["fit", *tiny_args(tmp_path), *offline, str(tmp_path / "hub")])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = _error_lines(err)
    assert "HF_HUB_OFFLINE" in line and "--data.source.init_args.root" in line
    assert "Traceback" not in err


@pytest.mark.parametrize("switch", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, offline, switch):
    args = ["fit", *tiny_args(tmp_path), *offline, str(tmp_path / "hub")]
    if switch == "flag":
        args.append("--debug")
    else:
        monkeypatch.setenv(errors.DEBUG_ENV, "1")
    assert cli_main.cli(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "LocalEntryNotFoundError" in err
    assert len(_error_lines(err)) == 1


def test_the_real_entry_point_exits_non_zero_with_one_line(tmp_path, checkpoints):
    done = subprocess.run(
        [sys.executable, "main.py", "test", *tiny_args(tmp_path)]
        + ["--ckpt_path", str(checkpoints["text"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "LightningCLI's args" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: --ckpt_path"), done.stderr

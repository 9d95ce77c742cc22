"""Re-deriving a night's events, summary and timeline from its saved window probabilities.

``main.py predict`` runs a tiny untrained checkpoint over a 2-minute synthetic night once
(module fixture, options A); ``python -m util.night.rederive`` then re-derives from its
``probabilities.parquet`` and is compared with full ``predict`` runs.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, untrained_checkpoint
from util.night import read_events_csv
from util.night.generate import write_night
from util.night.probabilities import PROBABILITIES_FILE, ProbabilitiesError, read_probabilities
from util.night.rederive import main

# Lightning says these for every IterableDataset that feeds a prediction writer (see test_night).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined:UserWarning"),
    pytest.mark.filterwarnings("ignore:Couldn't infer the batch indices:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
]
#: Options A, the first predict's.
OPTIONS_A = ["--postprocessing.min_duration_s", "{snore: 5.0, default: 3.0}"]
OUTPUTS = ("events.csv", "summary.json", "timeline.png", PROBABILITIES_FILE)


def _predict(tmp: Path, audio: Path, ckpt: Path, out: Path, options: list[str]) -> None:
    from main import main as cli_main

    cli_main(
        [
            "predict",
            "--config", str(ROOT / "config" / "demo.yaml"),
            "--ckpt_path", str(ckpt),
            "--data.predict_audio", str(audio),
            "--data.cache_dir", str(tmp / "cache"),
            "--night.output_dir", str(out),
            "--trainer.logger.init_args.save_dir", str(tmp / "log"),
            "--trainer.enable_progress_bar", "false",
            *[a.replace("--postprocessing.", "--night.postprocessing.") for a in options],
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> dict[str, Path]:
    """A night and a broken file predicted with options A; the checkpoint and audio too."""
    tmp = tmp_path_factory.mktemp("rederive")
    audio = tmp / "audio"
    write_night(audio / "night.wav", hours=2 / 60, seed=2, scale=0.05)
    (audio / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    ckpt = untrained_checkpoint(tmp / "tiny.ckpt")
    out = tmp / "a"
    _predict(tmp, audio, ckpt, out, OPTIONS_A)
    return {"tmp": tmp, "audio": audio, "ckpt": ckpt, "out": out}


def _options_b(probabilities: Path) -> list[str]:
    """Options B: thresholds inside the untrained model's snore range, so that events appear."""
    snore = read_probabilities(probabilities).probs[:, 2]
    on, off = np.quantile(snore, 0.75), np.quantile(snore, 0.4)
    return [
        "--postprocessing.median_windows", "5",
        "--postprocessing.on_threshold", f"{on:.4f}",
        "--postprocessing.off_threshold", f"{off:.4f}",
        "--postprocessing.min_duration_s", "1.0",
        "--postprocessing.merge_gap_s", "{snore: 2.0, default: 1.0}",
    ]  # fmt: skip


def _copy(run_a: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_a["out"], tmp_path / "a"))


def test_rederived_outputs_equal_a_full_predict_with_the_same_options(run_a, tmp_path, capsys):
    options_b = _options_b(run_a["out"] / "night" / PROBABILITIES_FILE)
    full_b = tmp_path / "b"
    _predict(run_a["tmp"], run_a["audio"], run_a["ckpt"], full_b, options_b)
    capsys.readouterr()
    rederived = tmp_path / "r"
    rc = main(
        [str(run_a["out"]), *options_b, "--start_from", "defaults", "--output_dir", str(rederived)]
    )
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("night: night.wav: 2.0 min, snore ")
    assert printed[0].split(" -> ")[0].endswith("thresholds: options")
    assert printed[-1].startswith("re-derived 1 recording(s) in ")
    for name in OUTPUTS:  # byte for byte, the probabilities file's metadata included
        assert (rederived / "night" / name).read_bytes() == (
            full_b / "night" / name
        ).read_bytes(), name
    # The options mattered: B's events are not A's, and B found some.
    events_b = read_events_csv(full_b / "night" / "events.csv")
    assert events_b and events_b != read_events_csv(run_a["out"] / "night" / "events.csv")
    summary = json.loads((rederived / "night" / "summary.json").read_text())
    assert summary["postprocessing"]["median_windows"] == 5
    assert summary["postprocessing"]["per_class"]["snore"]["merge_gap_s"] == 2.0
    with open(rederived / "recordings.csv") as f:
        (row,) = list(csv.DictReader(f))
    with open(full_b / "recordings.csv") as f:
        full_rows = {Path(r["recording"]).name: r for r in csv.DictReader(f)}
    assert {k: v for k, v in row.items() if k != "output"} == {
        k: v for k, v in full_rows["night.wav"].items() if k != "output"
    }


def test_options_not_given_keep_the_files_own(run_a, tmp_path):
    a = _copy(run_a, tmp_path)
    before = {name: (a / "night" / name).read_bytes() for name in OUTPUTS}
    # No options: the same post-processing, so the same files (its source kept too).
    assert main([str(a)]) == 0
    assert {name: (a / "night" / name).read_bytes() for name in OUTPUTS} == before
    # One option: the rest stay A's (min_duration_s), not PostProcessing's defaults.
    assert (
        main([str(a / "night" / PROBABILITIES_FILE), "--postprocessing.median_windows", "5"]) == 0
    )
    summary = json.loads((a / "night" / "summary.json").read_text())
    assert summary["postprocessing"]["median_windows"] == 5
    assert summary["postprocessing"]["per_class"]["snore"]["min_duration_s"] == 5.0
    assert summary["postprocessing"]["source"] == "options"
    assert read_probabilities(a / "night" / PROBABILITIES_FILE).postprocessing.median_windows == 5
    # Back to the defaults: the summary says so.
    assert main([str(a), "--start_from", "defaults"]) == 0
    summary = json.loads((a / "night" / "summary.json").read_text())
    assert summary["postprocessing"]["source"] == "defaults"
    assert summary["postprocessing"]["per_class"]["snore"]["min_duration_s"] == 3.0


def test_in_place_updates_the_recordings_index_and_keeps_the_failed_rows(run_a, tmp_path):
    a = _copy(run_a, tmp_path)
    assert main([str(a), "--postprocessing.on_threshold", "0.0", "--postprocessing.off_threshold", "0.0"]) == 0  # fmt: skip
    with open(a / "recordings.csv") as f:
        rows = {Path(r["recording"]).name: r for r in csv.DictReader(f)}
    assert rows["broken.wav"]["status"] == "error"  # kept: it has no probabilities
    summary = json.loads((a / "night" / "summary.json").read_text())
    assert summary["event_counts"]["snore"] >= 1  # p > 0 everywhere: snore holds the night
    assert rows["night.wav"]["snore_episodes"] == str(summary["snore"]["episodes"])
    assert rows["night.wav"]["snore_episodes_per_hour"] == ""  # 2 minutes: no rate


def test_bad_input_is_one_line_and_the_other_recordings_still_run(run_a, tmp_path, capsys):
    a = _copy(run_a, tmp_path)
    # Nothing there, and a wrong option value: the command line's fault (2).
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no probabilities.parquet at or under" in err
    assert main([str(a), "--postprocessing.median_windows", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "median_windows must be a positive odd number" in err
    assert main([str(a), "--postprocessing.on_threshold", "high"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # A damaged file, a foreign Parquet file, one with rows removed: each one line (1);
    # the intact recording is still re-derived.
    (a / "damaged").mkdir()
    data = (a / "night" / PROBABILITIES_FILE).read_bytes()
    (a / "damaged" / PROBABILITIES_FILE).write_bytes(data[: len(data) // 2])
    (a / "foreign").mkdir()
    pq.write_table(pa.table({"x": [1.0]}), a / "foreign" / PROBABILITIES_FILE)
    (a / "cut").mkdir()
    table = pq.read_table(a / "night" / PROBABILITIES_FILE)
    pq.write_table(table.slice(10), a / "cut" / PROBABILITIES_FILE)
    assert main([str(a)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "damaged" in lines[1] and "cannot read it as Parquet" in lines[1]
    assert "foreign" in lines[2] and "no earsleep metadata" in lines[2]
    assert "cut" in lines[0] and "rows removed or reordered" in lines[0]
    assert "re-derived 1 recording(s)" in captured.out and "3 failed" in captured.out
    with pytest.raises(ProbabilitiesError, match="not the 239 windows"):
        read_probabilities(a / "cut" / PROBABILITIES_FILE)
    # A threshold for a class the model lacks is named.
    assert main([str(a / "night"), "--postprocessing.on_threshold", "{snroe: 0.5, default: 0.6}"]) == 1  # fmt: skip
    assert "['snroe'] are not classes of the model" in capsys.readouterr().err


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--postprocessing.on_threshold",
        "--postprocessing.min_duration_s",
        "--start_from",
        "--output_dir",
        "--plot_points",
    ):
        assert option in text
    assert "default: 0.6" in text and "default: file" in text


def test_it_runs_as_a_module_without_the_model(run_a, tmp_path):
    """``python -m util.night.rederive`` imports neither torch nor Lightning, and warns of nothing."""
    a = _copy(run_a, tmp_path)
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['rederive', {str(a)!r}]\n"
        "try:\n"
        "    runpy.run_module('util.night.rederive', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('loaded', sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded []" in done.stdout and "night: night.wav" in done.stdout

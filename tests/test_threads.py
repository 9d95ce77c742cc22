"""The intra-op thread default: free cores, a busy machine, overrides, and ``--threads``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from main import main
from tests.helpers import tiny_args
from util.cpu import THREADS_ENV, available_cores, choose_threads, other_load


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)


def test_auto_takes_the_free_cores_and_one_thread_on_a_busy_machine() -> None:
    assert choose_threads("auto", cores=2, load=0.1).threads == 2  # idle: both cores
    assert choose_threads("auto", cores=2, load=1.0).threads == 1  # one core held elsewhere
    assert choose_threads("auto", cores=2, load=5.0).threads == 1  # never below one
    assert choose_threads("auto", cores=16, load=0.0, processes=4).threads == 4  # shared
    assert choose_threads(None, cores=8, load=0.0).threads == 8
    reason = choose_threads("auto", cores=2, load=1.0).reason
    assert "2 core(s)" in reason and "load 1.0" in reason


def test_a_number_or_the_environment_wins_and_bad_values_are_refused(monkeypatch) -> None:
    assert choose_threads(3, cores=2, load=0.0).threads == 3
    assert choose_threads("2", cores=8, load=7.0).threads == 2
    monkeypatch.setenv(THREADS_ENV, "1")
    choice = choose_threads("auto", cores=8, load=0.0)
    assert choice.threads == 1 and THREADS_ENV in choice.reason
    assert choose_threads(4).threads == 4  # an explicit number beats the environment
    for bad in ("0", "many", -1, 1.5):
        with pytest.raises(ValueError, match="'auto' or an integer >= 1"):
            choose_threads(bad)
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(ValueError, match=THREADS_ENV):
        choose_threads("auto")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_available_cores_follow_the_process_affinity() -> None:
    code = "import os; os.sched_setaffinity(0, {0}); from util.cpu import available_cores; print(available_cores())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs /proc/loadavg (Linux)")
def test_a_job_started_a_moment_ago_counts_as_load() -> None:
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)  # running, but far too recent for the one-minute average
        assert other_load() >= 2
        assert choose_threads("auto", cores=2).threads == 1
    finally:
        for proc in spin:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat (Linux)")
def test_work_that_has_ended_does_not_count_as_load(monkeypatch) -> None:
    # The one-minute average still shows a job for minutes after it ended (a benchmark's
    # previous run); the load that decides the threads is what runs now.
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))
    assert other_load() < 1000.0


def test_main_applies_threads_before_training(tmp_path, capsys) -> None:
    before = torch.get_num_threads()
    try:
        cli = main(["fit", *tiny_args(tmp_path), "--threads", "1", "--trainer.fast_dev_run", "1"])
        assert torch.get_num_threads() == 1 and cli.threads.threads == 1
        with pytest.raises(SystemExit) as done:
            main(["fit", *tiny_args(tmp_path), "--threads", "none"])
        assert done.value.code != 0
        assert "--threads must be 'auto' or an integer >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)

"""Where a sweep's runs execute: Ray Tune trials, on this machine or on a Ray cluster.

The sweep keeps what is its own (the manifest's phases, the teacher gate, seeds,
validation-only selection, statistics and the summary) and hands the running of each
phase's runs to Ray Tune (:class:`RayTuneExecutor`): one Tune experiment per phase,
one trial per run, each trial the run's ``main.py fit`` + ``test`` writing its usual run
folder: inside the trial's Ray worker by default (:func:`~util.sweep.run.worker_runner`;
Tune reuses the workers of a phase, ``reuse_actors``, so each pays its imports once), or
in a subprocess per run (:func:`~util.sweep.run.subprocess_runner`). Tune places
trials by their resources (CPUs, GPUs, fractional GPUs so that several tiny models share
one), retries failed ones (``retries``) and restores an interrupted phase's experiment on
``--resume true``.

Without an address, a local Ray runtime is started for the sweep (nothing to install
or start beforehand) and stopped at its end; with ``address`` (``auto`` or
``ray://host:10001``) the trials go to that cluster, whose nodes must see the same
checkout and output folder at the same paths (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from util.cpu import THREADS_ENV, available_cores

__all__ = ["Executor", "RaySettings", "RayTuneExecutor", "Trial", "TrialOutcome", "thread_env"]

#: The metric a trial reports when it ends; what it did is read from its run folder.
_DONE = "earsleep_done"


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run handed to an executor: its key and what executes it.

    ``execute`` returns whether the run succeeded and, if not, why; it must be picklable
    (it travels to a Ray worker).
    """

    key: str
    execute: Callable[[], tuple[bool, str]]


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended, as the executor saw it (the run folder holds the rest)."""

    key: str
    ok: bool
    note: str = ""


class Executor(Protocol):
    """Runs the trials of one sweep phase and reports each as it ends."""

    def threads_per_run(self) -> int | None:
        """The intra-op threads each run should use (``None``: the run chooses)."""

    def session(self) -> contextlib.AbstractContextManager[None]:
        """A context that keeps the executor's runtime up across the phases of a sweep."""

    def run(
        self,
        experiment: str,
        trials: Sequence[Trial],
        done: Callable[[TrialOutcome], None],
        restore: bool,
    ) -> str:
        """Run ``trials`` (restoring ``experiment`` if asked and possible); one line on how."""


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """How the sweep uses Ray (``python -m util.sweep --help`` documents each).

    Args:
        address: a Ray cluster (``auto``, ``ray://host:10001``); ``None`` starts a local
            runtime for the sweep.
        cpus_per_trial: CPUs reserved per run (``None``: every core of the local runtime,
            so runs go one at a time with all cores, or 1 on a cluster).
        gpus_per_trial: GPUs per run; fractions (``0.25``) let several runs share a GPU.
        max_concurrent_trials: most runs at once (0: as many as the resources allow).
        retries: times a failed run is tried again before it counts as failed.
        storage: folder of the Tune experiments (one per phase; default
            ``<out>/ray``).
    """

    address: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0
    retries: int = 0
    storage: str | None = None

    def __post_init__(self) -> None:
        if self.cpus_per_trial is not None and self.cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial must be >= 0, got {self.gpus_per_trial}")
        if self.max_concurrent_trials < 0 or self.retries < 0:
            raise ValueError("max_concurrent_trials and retries must be >= 0")

    def cpus(self) -> float:
        """CPUs one trial reserves."""
        if self.cpus_per_trial is not None:
            return float(self.cpus_per_trial)
        return 1.0 if self.address else float(available_cores())


class RayTuneExecutor:
    """Runs each phase as a Ray Tune experiment under ``settings.storage`` (see the module).

    Args:
        settings: the Ray settings.
        storage: default folder of the experiments when ``settings.storage`` is unset.
    """

    def __init__(self, settings: RaySettings, storage: str | os.PathLike[str]) -> None:
        self.settings = settings
        self.storage = Path(settings.storage or storage).resolve()

    def threads_per_run(self) -> int | None:
        """One intra-op thread per reserved CPU (``None`` when runs get every core)."""
        s = self.settings
        if s.cpus_per_trial is None and not s.address:
            return None
        return max(1, math.floor(s.cpus()))

    def session(self) -> contextlib.AbstractContextManager[None]:
        """The Ray runtime for the whole sweep (started once, stopped at the end)."""
        return _ray_session(self.settings.address)

    def run(
        self,
        experiment: str,
        trials: Sequence[Trial],
        done: Callable[[TrialOutcome], None],
        restore: bool,
    ) -> str:
        """Run ``trials`` as the Tune experiment ``experiment``; ``done`` per finished trial.

        Returns:
            One line: where the experiment is and whether it was restored.
        """
        if not trials:
            return ""
        from ray import tune

        by_key = {t.key: t for t in trials}
        s = self.settings
        path = self.storage / experiment
        with _ray_session(s.address), _quiet_tune(), _Outcomes(done) as outcomes:
            trainable = tune.with_resources(
                _trainable(by_key, s.retries > 0, outcomes.queue),
                {"cpu": s.cpus(), "gpu": s.gpus_per_trial},
            )
            if restore and tune.Tuner.can_restore(str(path)):
                how = f"restored Tune experiment {path}"
                tuner = tune.Tuner.restore(
                    str(path),
                    trainable,
                    resume_unfinished=True,
                    resume_errored=False,
                    restart_errored=True,
                )
            else:
                how = f"Tune experiment {path}"
                if path.exists():
                    shutil.rmtree(path)  # an earlier attempt of other runs: start clean
                tuner = tune.Tuner(
                    trainable,
                    param_space={"run": tune.grid_search(list(by_key))},
                    tune_config=tune.TuneConfig(
                        max_concurrent_trials=s.max_concurrent_trials or None,
                        # a worker that finished a run takes the next one: its imports stay
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=experiment,
                        storage_path=str(self.storage),
                        failure_config=tune.FailureConfig(max_failures=s.retries),
                        verbose=0,
                    ),
                )
            results = tuner.fit()
        for result in results:  # failed after its retries, or restored as finished
            key = (result.config or {}).get("run")
            if key in by_key and key not in outcomes.seen:
                ok = result.error is None and bool((result.metrics or {}).get(_DONE))
                done(TrialOutcome(key, ok, "" if ok else _error_line(result.error)))
                outcomes.seen.add(key)
        return how


def _trainable(
    trials: Mapping[str, Trial], raise_on_failure: bool, queue: Any
) -> Callable[[dict], None]:
    """The Tune function trainable: execute the trial of ``config["run"]``, report the end.

    A finished trial puts its outcome on ``queue`` (the driver prints it at once); a
    failed run raises instead when retries are configured, so that Tune tries it again.
    """

    def trainable(config: dict) -> None:
        from ray import tune

        key = config["run"]
        ok, note = trials[key].execute()
        if not ok and raise_on_failure:
            raise RuntimeError(note or "the run failed")
        queue.put((key, bool(ok), note))
        tune.report({_DONE: bool(ok), "note": note})

    return trainable


class _Outcomes:
    """A Ray queue the trials put their outcome on, read by a driver thread into ``done``."""

    def __init__(self, done: Callable[[TrialOutcome], None]) -> None:
        self.done = done
        self.seen: set[str] = set()
        self._stop = threading.Event()

    def __enter__(self) -> _Outcomes:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})  # takes no trial's CPU
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                key, ok, note = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            if key not in self.seen:
                self.seen.add(key)
                self.done(TrialOutcome(key, ok, note))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.queue.shutdown()


def _error_line(error: Any) -> str:
    lines = [ln for ln in str(error or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """A Ray runtime for the block: the cluster at ``address``, else a local one.

    A runtime the caller already started (``ray.init`` before the sweep) is used as is
    and left running; one started here is shut down afterwards.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=available_cores(), include_dashboard=False, **options)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's legacy console output, which ``verbose=0`` silences (the sweep prints its own)."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment that pins a run's intra-op threads (empty: the run chooses)."""
    if threads is None:
        return {}
    return {THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads)}

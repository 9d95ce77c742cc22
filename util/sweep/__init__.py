"""Two-phase sweeps: baselines, a teacher gate, then a distillation grid, over seeds.

Usage (from the repository root)::

    python -m util.sweep --manifest config/sweep/reference.yaml --dry_run true
    python -m util.sweep --manifest config/sweep/demo.yaml [--out log/sweeps/demo] [--resume true]
    python -m util.sweep --manifest config/sweep/reference.yaml --distil_anyway true
    python -m util.sweep --manifest config/sweep/reference.yaml --ray_address auto --gpus_per_trial 0.25

Flow:

1. **phase 1** trains every baseline of the manifest for every seed.
2. **gate**: the teacher (a phase-1 run, normally the CRNN) must beat the best
   student by at least ``margin`` in mean *validation* score
   (:data:`models.task.MONITOR`, macro-F1; 0.03 in the reference protocol). If it does
   not, the ``tuning`` runs train first and the candidate with the best mean validation
   score (the original teacher included) becomes the teacher. If that one still misses
   the margin, phase 2 does **not** run, unless the manifest (``gate.on_fail: distil``)
   or the command line (``--distil_anyway true``) says to distil anyway; ``gate.json``
   and the summary say which it was and why.
3. **phase 2** distils each student of the grid from that teacher, seed by seed
   (the student of seed ``s`` learns from the teacher of seed ``s``), and passes the
   student's own phase-1 validation score as ``baseline_f1``. The summary's gap closed,
   ``(student − baseline) / (teacher − baseline)`` of mean validation scores, is given
   only when the teacher is above the baseline; otherwise it is empty and the reason is
   beside it.

A **collapsed** run (``metrics.json``'s ``collapse``: at most one class predicted, or a
macro-F1 no better than always answering the majority class, on test or validation) is
flagged in ``runs.csv``, counted per configuration in the summary, and never chosen:
not as a best, the teacher, the best student of the gate, or a baseline.

Each run is ``main.py fit`` then ``test`` on the best checkpoint in one process, as one
Ray Tune trial (:mod:`util.sweep.tune`: a local Ray runtime by default, a cluster with
``--ray_address``; CPUs and fractional GPUs per run; retries; the phase's Tune
experiment restored on resume); by default inside the trial's Ray worker, which Tune
reuses for the phase's next run (``--run_in subprocess``: a fresh Python per run). A
crash is recorded as failed and the sweep goes on. The sweep writes ``runs.csv`` (one
row per run), ``gate.json``, ``summary.csv`` and ``summary.md``: per configuration the
mean ± std over seeds and a bootstrap 95% interval of the test macro-F1 from the stored
``test_predictions.csv``. The best configuration is chosen on the validation score only;
test numbers are reported, never used to choose. Every row of ``runs.csv``, the summary
and the leaderboard names its data (the hash of the run's ``data_fingerprint.json``)
and its code (git commit and dirty flag, from ``git.json``). ``--resume true`` reuses a
finished run only when its resolved configuration (as ``main.py``'s own parser resolves
the command line: defaults, every config file and the files they include; comments and
layout do not count), seed, data fingerprint (the data module's fingerprint now, probed
without building anything) and code version all match, and prints one line for every
run it trains again saying what differed (the first changed settings by name).

One job a module:

- :mod:`util.sweep.manifest`: the YAML manifest (its format is documented there), grid
  expansion and the collapse of equal runs;
- :mod:`util.sweep.run`: one run's command line, resolved configuration, execution and
  results;
- :mod:`util.sweep.tune`: where runs execute (Ray Tune experiments, one per phase);
- :mod:`util.sweep.stats`: mean ± std, the bootstrap interval, the teacher gate;
- :mod:`util.sweep.report`: progress lines, CSV tables, ``summary.md``;
- :mod:`util.sweep.sweep`: :class:`Sweep`, which plans, runs, resumes and summarises;
- :mod:`util.sweep.cli`: the command line (``python -m util.sweep --help``).
"""

from util.sweep.cli import main
from util.sweep.manifest import ROOT, Manifest, ManifestError, Spec, load_manifest
from util.sweep.run import (
    Run,
    RunResult,
    data_fingerprint_now,
    fit_and_test,
    read_result,
    resolve_config,
    subprocess_runner,
    worker_runner,
)
from util.sweep.stats import GateDecision, bootstrap_macro_f1, eligible_score, evaluate_gate
from util.sweep.sweep import Sweep, SweepError

__all__ = [
    "ROOT",
    "GateDecision",
    "Manifest",
    "ManifestError",
    "Run",
    "RunResult",
    "Spec",
    "Sweep",
    "SweepError",
    "bootstrap_macro_f1",
    "data_fingerprint_now",
    "eligible_score",
    "evaluate_gate",
    "fit_and_test",
    "load_manifest",
    "main",
    "read_result",
    "resolve_config",
    "subprocess_runner",
    "worker_runner",
]

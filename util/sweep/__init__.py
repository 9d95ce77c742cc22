"""Two-phase sweeps: baselines, a teacher gate, then a distillation grid, over seeds.

Usage (from the repository root)::

    python -m util.sweep --manifest config/sweep/reference.yaml --dry_run true
    python -m util.sweep --manifest config/sweep/demo.yaml [--out log/sweeps/demo] [--resume true]

Flow:

1. **phase 1** trains every baseline of the manifest for every seed.
2. **gate**: the teacher (a phase-1 run, normally the CRNN) must beat the best
   student by at least ``margin`` in mean *validation* score
   (:data:`models.task.MONITOR`, macro-F1). If it does not, the ``tuning`` runs train
   first and the candidate with the best mean validation score (the original teacher
   included) becomes the teacher.
3. **phase 2** distils each student of the grid from that teacher, seed by seed
   (the student of seed ``s`` learns from the teacher of seed ``s``), and passes the
   student's own phase-1 validation score as ``baseline_f1`` so the leaderboard
   gets ``gap_closed``.

Each run is ``main.py fit`` then ``test`` on the best checkpoint, in its own subprocess;
a crash is recorded as failed and the sweep goes on. The sweep writes ``runs.csv`` (one
row per run), ``gate.json``, ``summary.csv`` and ``summary.md``: per configuration the
mean ± std over seeds and a bootstrap 95% interval of the test macro-F1 from the stored
``test_predictions.csv``. The best configuration is chosen on the validation score only;
test numbers are reported, never used to choose. ``--resume true`` skips every run whose
``metrics.json`` holds test metrics and whose recorded configuration hash (command line
and the text of its YAML files) matches; other runs are trained again from scratch.

One job a module:

- :mod:`util.sweep.manifest`: the YAML manifest (its format is documented there), grid
  expansion and the collapse of equal runs;
- :mod:`util.sweep.run`: one run's command line, its subprocess and its results;
- :mod:`util.sweep.stats`: mean ± std, the bootstrap interval, the teacher gate;
- :mod:`util.sweep.report`: progress lines, CSV tables, ``summary.md``;
- :mod:`util.sweep.sweep`: :class:`Sweep`, which plans, runs, resumes and summarises;
- :mod:`util.sweep.cli`: the command line (``python -m util.sweep --help``).
"""

from util.sweep.cli import main
from util.sweep.manifest import ROOT, Manifest, ManifestError, Spec, load_manifest
from util.sweep.run import Run, RunResult, fit_and_test, read_result, subprocess_runner
from util.sweep.stats import GateDecision, bootstrap_macro_f1, evaluate_gate
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
    "evaluate_gate",
    "fit_and_test",
    "load_manifest",
    "main",
    "read_result",
    "subprocess_runner",
]

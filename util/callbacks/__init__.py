"""Lightning callbacks: confusion matrices, latency profiling, run artifacts, provenance, the
leaderboard, threshold calibration, night reports, learning rates, the HParams summary and the
predict engine."""

from util.callbacks.artifacts import RunArtifacts
from util.callbacks.calibration import Calibration
from util.callbacks.confusion import ConfusionMatrixLogger
from util.callbacks.engine import PredictEngine
from util.callbacks.hparams import HParamsSummary
from util.callbacks.latency import LatencyProfiler
from util.callbacks.leaderboard import Leaderboard
from util.callbacks.learning_rate import LearningRates
from util.callbacks.night import NightWriter
from util.callbacks.provenance import Provenance

__all__ = [
    "Calibration",
    "ConfusionMatrixLogger",
    "HParamsSummary",
    "LatencyProfiler",
    "Leaderboard",
    "LearningRates",
    "NightWriter",
    "PredictEngine",
    "Provenance",
    "RunArtifacts",
]

"""Lightning callbacks: confusion matrices, latency profiling, run artifacts, night reports,
learning rates, the HParams summary and the predict engine."""

from util.callbacks.artifacts import RunArtifacts
from util.callbacks.confusion import ConfusionMatrixLogger
from util.callbacks.engine import PredictEngine
from util.callbacks.hparams import HParamsSummary
from util.callbacks.latency import LatencyProfiler
from util.callbacks.learning_rate import LearningRates
from util.callbacks.night import NightWriter

__all__ = [
    "ConfusionMatrixLogger",
    "HParamsSummary",
    "LatencyProfiler",
    "LearningRates",
    "NightWriter",
    "PredictEngine",
    "RunArtifacts",
]

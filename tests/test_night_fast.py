"""The night's fast path: TinyCNN layers as ONNX graphs, shared work over overlapping windows.

What a user relies on: ``main.py predict`` gives the per-window probabilities whatever
path computes them (:class:`util.night.shared_windows.SharedWindowRunner` against the
task's own forward on each window, 1e-5 on probabilities), and backbones the fast path
cannot run are named and left to the general path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.features import LogMelFrontEnd
from models.classifier import Classifier
from tests.helpers import build_like_cli
from util.night.shared_windows import SharedWindowRunner, plan_cost, plan_layers
from util.night.tinycnn_graphs import supports_tinycnn

SR = 16000


def _model(seed: int = 0, **backbone_args) -> Classifier:
    torch.manual_seed(seed)
    model = build_like_cli(
        Classifier,
        "models.backbones.TinyCNN",
        backbone_args or None,
        num_classes=3,
        class_names=["quiet", "breathe", "snore"],
    ).eval()
    with torch.no_grad():  # band statistics as a trained checkpoint has them
        model.band_mean.normal_(-6.0, 1.0)
        model.band_std.uniform_(0.5, 2.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


def _windows(hop_s: float, count: int, seed: int = 1) -> tuple[torch.Tensor, int]:
    """Front-end features of ``count`` consecutive 1-s windows of a noisy signal."""
    front_end = LogMelFrontEnd()
    hop = int(round(hop_s * SR))
    rng = np.random.default_rng(seed)
    samples = (count - 1) * hop + front_end.clip_samples
    t = np.arange(samples) / SR
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.7 * t))
    signal = (tone + 0.05 * rng.standard_normal((2, samples))).astype(np.float32)
    with torch.inference_mode():
        x = front_end.windows(torch.from_numpy(signal), hop, count)
    return x, hop // front_end.hop_length


def _probabilities(run, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return run(x).softmax(dim=1).double().numpy()


@pytest.mark.parametrize(
    ("hop_s", "depth", "modes"),
    [
        (0.5, None, ["windows"]),  # the default hop: sharing would save too little
        (0.5, 2, ["stream", "phases"]),  # 50 frames: the second pool splits odd/even windows
        (0.48, None, ["stream", "stream", "stream"]),  # 48 frames: every pool stride divides it
        (0.25, 1, ["phases"]),
        (0.1, None, ["stream", "phases"]),  # dense windows
    ],
)
def test_shared_windows_give_the_per_window_probabilities(hop_s, depth, modes):
    model = _model()
    x, hop_frames = _windows(hop_s, count=37)
    runner = SharedWindowRunner(model, hop_frames, depth=depth)
    assert [s.mode for s in runner.plan(x.shape[-1], 2, 2)] == modes
    expected = _probabilities(model, x)
    got = _probabilities(runner, x)
    assert np.abs(got - expected).max() < 1e-5
    # the batch's last windows alone, and a single window, agree too
    assert np.abs(_probabilities(runner, x[-5:]) - expected[-5:]).max() < 1e-5
    assert np.abs(_probabilities(runner, x[3:4]) - expected[3:4]).max() < 1e-5
    if modes != ["windows"]:
        assert runner.counts["shared"] >= 2


def test_workers_run_the_pieces_side_by_side_with_the_same_logits():
    import threading

    model = _model()
    x, hop_frames = _windows(0.5, count=37)  # 37: pieces of 8 and a last one of 5
    alone = SharedWindowRunner(model, hop_frames)
    together = SharedWindowRunner(model, hop_frames, workers=3)
    with torch.inference_mode():
        want = alone(x)
        got = together(x)
    assert torch.equal(got, want)  # each piece runs the same single-threaded graph
    assert any(t.name.startswith("earsleep-model") for t in threading.enumerate())
    together.close()
    together.close()  # twice is harmless
    assert not any(t.name.startswith("earsleep-model") for t in threading.enumerate())
    with torch.inference_mode():
        assert torch.equal(together(x), want)  # closed: the pieces run in turn
    with pytest.raises(ValueError, match="workers"):
        SharedWindowRunner(model, hop_frames, workers=0)


def test_batch_norm_is_folded_exactly():
    model = _model(batch_norm=True)
    x, hop_frames = _windows(0.1, count=20)
    runner = SharedWindowRunner(model, hop_frames, depth=3)
    assert np.abs(_probabilities(runner, x) - _probabilities(model, x)).max() < 1e-5


def test_windows_that_are_not_one_stream_run_per_window():
    """Unrelated clips (a cached split) in a night-sized batch: no stream is assumed."""
    model = _model()
    x, hop_frames = _windows(0.1, count=12)
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    runner = SharedWindowRunner(model, hop_frames, depth=3)
    got = _probabilities(runner, shuffled)
    assert np.abs(got - _probabilities(model, shuffled)).max() < 1e-5
    assert runner.counts == {"shared": 0, "per_window": 1}
    plain = SharedWindowRunner(model, None)  # not a night at all
    assert np.abs(_probabilities(plain, x) - _probabilities(model, x)).max() < 1e-5


def test_backbones_that_see_a_whole_window_keep_the_general_path():
    torch.manual_seed(0)
    for backbone in ("models.backbones.TinyCNNCBAM", "models.backbones.CRNN"):
        model = build_like_cli(Classifier, backbone, num_classes=3, class_names=list("abc"))
        reason = supports_tinycnn(model)
        assert reason is not None and type(model.backbone).__name__ in reason
        with pytest.raises(ValueError, match="plain TinyCNN"):
            SharedWindowRunner(model, 50)
    assert supports_tinycnn(_model()) is None


def test_a_layer_is_shared_only_where_its_slabs_fit_and_it_pays():
    weights = SharedWindowRunner(_model(), 50).weights
    assert len(weights) == 3 and abs(sum(weights) - 1.0) < 1e-9
    assert weights[0] < weights[1]  # 2 channels in: the first layer is the cheapest
    # 0.5 s: two layers shared would save only a few percent (the second pool's phases)
    assert [s.mode for s in plan_layers(101, 50, 2, 2, weights)] == ["windows"]
    assert 1.0 - plan_cost(plan_layers(101, 50, 2, 2, weights, depth=2), weights) < 0.05
    # 0.4 s: every layer, and the plan is the cheapest of sharing 1, 2 or 3 layers
    best = plan_layers(101, 40, 2, 2, weights)
    assert [s.mode for s in best] == ["stream"] * 3
    costs = [plan_cost(plan_layers(101, 40, 2, 2, weights, depth=d), weights) for d in (1, 2, 3)]
    assert plan_cost(best, weights) == min(costs) < 0.9
    # sharing only the first layer costs more than none: its numpy work eats the saving
    assert costs[0] > 1.0
    # the shared convs run on one thread, the per-window pieces on every worker: with two
    # workers the 0.48-s plan that wins on one thread loses in wall time
    assert [s.mode for s in plan_layers(101, 48, 2, 2, weights)] == ["stream"] * 3
    assert [s.mode for s in plan_layers(101, 48, 2, 2, weights, workers=2)] == ["windows"]
    runner = SharedWindowRunner(_model(), 48, workers=2)
    assert [s.mode for s in runner.plan(101, 2, 2)] == ["windows"]
    runner.close()
    # windows that barely overlap, or edges as wide as the window, never share
    assert plan_layers(101, 101, 2, 2, weights, depth=3)[0].mode == "windows"
    assert plan_layers(101, 10, 50, 50, weights, depth=3)[0].mode == "windows"
    steps = plan_layers(101, 48, 2, 2, weights, depth=3)
    assert [(s.width, s.hop, s.left, s.right) for s in steps] == [
        (101, 48, 2, 2),
        (50, 24, 2, 1),
        (25, 12, 2, 1),
    ]


def test_the_predict_engine_runs_a_tinycnn_night_on_shared_windows(tmp_path):
    """``main.py predict`` over a recording: the engine hands the task the fast runner,
    told the recording's hop in frames; a cached split (no stream) gets no hop."""
    import types

    import soundfile as sf
    from torch.utils.data import DataLoader, TensorDataset

    from data.recordings import recordings_loader
    from util.callbacks.engine import PredictEngine, window_hop_frames

    sf.write(tmp_path / "n.wav", np.zeros((3 * SR, 2), np.float32), SR)
    night = recordings_loader(tmp_path / "n.wav", LogMelFrontEnd(), hop_s=0.1)
    assert window_hop_frames(types.SimpleNamespace(predict_dataloaders=night)) == 10
    clips = DataLoader(TensorDataset(torch.zeros(4, 2, 64, 101)))
    assert window_hop_frames(types.SimpleNamespace(predict_dataloaders=[clips])) is None
    model = _model()
    PredictEngine("auto").on_predict_start(types.SimpleNamespace(predict_dataloaders=night), model)
    assert isinstance(model.predict_runner, SharedWindowRunner) and model.predict_runner.hop == 10

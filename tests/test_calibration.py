"""Post-processing calibrated on validation: the searches, the record in the checkpoint, predict's use.

The end-to-end scenario is the issue-15 one: a model whose snore probability sits near 0.5
finds no snoring with the default ``on_threshold`` 0.6, and does once ``fit`` has calibrated
its thresholds on validation. The model is :class:`HalfSureSnore`, a fixed detector on
hand-made sounds (a low buzz is snore, mid-band hiss is breathing, faint noise is quiet),
so that the test depends on calibration alone, not on how well a tiny run trains.

Calibration on labelled recordings is tested on window probabilities made by hand from
known events (:func:`_labelled_night`), where the defaults find nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from data.features import PRESETS
from models.backbones import Backbone
from models.classifier import Classifier
from tests.helpers import build_like_cli, tiny_args, untrained_checkpoint
from util.callbacks import Calibration
from util.checkpoint import read_checkpoint
from util.night import (
    CHECKPOINT_KEY,
    CalibratedThresholds,
    CalibrationError,
    Event,
    PostProcessing,
    best_threshold,
    calibrate_thresholds,
    evaluate_events,
    load_calibration,
    read_events_csv,
    store_calibration,
    write_events_csv,
)
from util.night.calibrate import main
from util.night.probabilities import WindowProbabilities, write_probabilities
from util.night.recalibrate import calibrate_on_recordings
from util.night.rederive import derive
from util.night.thresholds import (
    CALIBRATED_FIELDS,
    FORMAT_VERSION,
    GRID,
    checkpoint_facts,
    off_threshold_for,
    weights_sha256,
)

CLASSES = ["quiet", "breathe", "snore"]
SR = 16000

# Lightning says these for every IterableDataset that feeds a prediction writer (see test_night).
LIGHTNING_NOISE = [
    "ignore:Your `IterableDataset` has `__len__` defined:UserWarning",
    "ignore:Couldn't infer the batch indices:UserWarning",
    "ignore:.*does not have many workers:UserWarning",
]


# -- the search -----------------------------------------------------------------------


def test_the_search_picks_the_known_best_threshold():
    # snore clips at 0.45-0.6, the others at most 0.44: only t = 0.45 separates them all
    p = np.array([0.45, 0.5, 0.6, 0.44, 0.2, 0.1], np.float32)
    positive = np.array([1, 1, 1, 0, 0, 0], bool)
    t, scores = best_threshold(p, positive)
    assert t == 0.45 and scores == {"f1": 1.0, "precision": 1.0, "recall": 1.0}
    assert off_threshold_for(t) == 0.35 and off_threshold_for(0.08) == 0.04


def test_the_search_is_the_best_of_the_grid_and_the_middle_of_a_tie():
    rng = np.random.default_rng(0)
    positive = rng.random(400) < 0.3
    p = np.clip(rng.normal(0.3 + 0.25 * positive, 0.15), 0, 1).astype(np.float32)

    def f1(t: float) -> float:
        predicted = p >= np.float32(t)
        tp = int((predicted & positive).sum())
        return 2 * tp / (int(predicted.sum()) + int(positive.sum()))

    t, scores = best_threshold(p, positive)
    assert scores["f1"] == pytest.approx(max(f1(g) for g in GRID))
    assert scores["f1"] == pytest.approx(f1(t))
    # separable: every t in (0.2, 0.4] is perfect; the middle one of 0.21..0.40 is chosen
    t, scores = best_threshold(np.array([0.1, 0.2, 0.4, 0.9]), np.array([0, 0, 1, 1], bool))
    assert scores["f1"] == 1.0 and t == 0.3


def test_thresholds_per_event_class_and_none_for_the_background():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],
            [0.16, 0.4, 0.44],  # a breathing clip that looks almost like snore
            [0.45, 0.1, 0.45],
            [0.5, 0.0, 0.5],
            [0.3, 0.2, 0.5],
        ]
    )
    calibration = calibrate_thresholds(probs, labels, CLASSES)
    pp = calibration.postprocessing
    assert set(pp.on_threshold) == {"breathe", "snore", "default"}  # no quiet: background
    assert pp.on_threshold["snore"] == 0.45 and pp.off_threshold["snore"] == 0.35
    assert pp.on_threshold["default"] == PostProcessing().on_threshold
    snore = calibration.provenance["per_class"]["snore"]
    assert snore["f1"] == 1.0 and snore["clips"] == 3 and snore["f1_before"] == 0.0
    assert calibration.provenance["clips"] == 7
    assert (
        calibration.source()
        == "calibrated on validation (7 clips, snore F1 1.00 at on 0.45/off 0.35)"
    )
    # a class without validation clips keeps its thresholds, and the record says why
    without = calibrate_thresholds(probs[labels != 1], labels[labels != 1], CLASSES)
    assert without.postprocessing.for_class("breathe", CLASSES).on_threshold == 0.6
    assert "no validation clips of breathe" in without.provenance["not_calibrated"]["breathe"]
    with pytest.raises(CalibrationError, match="no clips"):
        calibrate_thresholds(np.zeros((0, 3)), np.zeros(0), CLASSES)


def test_an_explicit_option_wins_and_the_rest_is_calibrated():
    calibration = CalibratedThresholds(
        PostProcessing(on_threshold={"snore": 0.45, "default": 0.6}, off_threshold=0.35)
    )
    merged, used, user = calibration.apply(PostProcessing(min_duration_s=5.0))
    assert (used, user) == (["on_threshold", "off_threshold"], ["min_duration_s"])
    assert merged.on_threshold == {"snore": 0.45, "default": 0.6} and merged.min_duration_s == 5.0
    merged, used, user = calibration.apply(PostProcessing(on_threshold=0.5))
    assert (merged.on_threshold, merged.off_threshold) == (0.5, 0.35)
    assert (used, user) == (["off_threshold"], ["on_threshold"])


# -- the record in the checkpoint ---------------------------------------------------


def test_the_record_is_stored_atomically_and_read_back_weights_only(tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "model.ckpt")
    before = read_checkpoint(ckpt)
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.0, 0.5], [0.4, 0.1, 0.5]])
    store_calibration(ckpt, calibrate_thresholds(probs, labels, CLASSES))
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # no temporary left
    after = torch.load(ckpt, weights_only=True)  # plain values: weights-only loading reads it
    record = after[CHECKPOINT_KEY]
    assert json.loads(json.dumps(record)) == record
    assert record["provenance"]["checkpoint"] == checkpoint_facts(before, ckpt)
    assert after["state_dict"].keys() == before["state_dict"].keys()
    calibration = load_calibration(after)
    assert calibration.postprocessing.on_threshold["snore"] == 0.3  # middle of (0.1, 0.5]
    # grafted into a checkpoint of other weights, or damaged: refused in one line
    other = read_checkpoint(untrained_checkpoint(tmp_path / "other.ckpt"))
    other["state_dict"] = {k: v + 1 for k, v in other["state_dict"].items()}
    with pytest.raises(CalibrationError, match="other weights.*use_calibration false"):
        load_calibration({**other, CHECKPOINT_KEY: record}, what="--ckpt_path x")
    with pytest.raises(CalibrationError, match="damaged"):
        load_calibration({**after, CHECKPOINT_KEY: {**record, "postprocessing": {"on": 1}}})
    assert load_calibration(before) is None


# -- the callback in a plain Lightning run ------------------------------------------


class _RandomClips(LightningDataModule):
    """Random features, 16 clips of each class per split."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, 2, 64, 101, generator=g)
        self.y = torch.arange(3).repeat_interleave(16)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def _plain_fit(tmp_path: Path, callback: Calibration, **trainer_args) -> tuple[Path, Path, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = build_like_cli(
        Classifier, "models.backbones.TinyCNN", num_classes=3, class_names=CLASSES
    )
    # "best" is the first epoch, "last" the second: two sets of weights to calibrate
    best = ModelCheckpoint(tmp_path, "best", monitor="epoch", mode="min")
    last = ModelCheckpoint(tmp_path, "last", monitor=None, enable_version_counter=False)
    trainer = Trainer(
        accelerator="cpu", logger=False, max_epochs=2, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback, best, last], **trainer_args,
    )  # fmt: skip
    trainer.fit(model, datamodule=_RandomClips())
    return tmp_path / "best.ckpt", tmp_path / "last.ckpt", model


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
def test_the_callback_calibrates_every_kept_file_and_leaves_the_model_as_it_was(tmp_path):
    callback = Calibration()
    best, last, model = _plain_fit(tmp_path / "on", callback, limit_val_batches=2)
    assert set(callback.stored) == {str(best), str(last)}
    for path in (best, last):
        checkpoint = read_checkpoint(path)
        calibration = load_calibration(checkpoint)
        assert calibration.provenance["clips"] == 32  # the 2 batches validation read
        assert calibration.provenance["checkpoint"]["weights_sha256"] == weights_sha256(
            checkpoint["state_dict"]
        )
    weights = {p: read_checkpoint(p)["state_dict"] for p in (best, last)}
    assert weights_sha256(weights[best]) != weights_sha256(weights[last])
    assert weights_sha256(model.state_dict()) == weights_sha256(weights[last])  # as fit left it
    best, last, _ = _plain_fit(tmp_path / "off", Calibration(enabled=False))
    assert all(CHECKPOINT_KEY not in read_checkpoint(p) for p in (best, last))


# -- the scenario, end to end -----------------------------------------------


def _mel_centres() -> np.ndarray:
    """Centre frequencies (Hz) of the native front end's HTK mel bands."""
    cfg = PRESETS["native"]

    def mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    points = np.linspace(mel(cfg["f_min"]), mel(cfg["f_max"]), cfg["n_mels"] + 2)[1:-1]
    return 700.0 * (10.0 ** (points / 2595.0) - 1.0)


class HalfSureSnore(Backbone):
    """Hears snoring (a low buzz) and breathing (mid-band hiss), but is only half sure of snore.

    A fixed detector on raw log-mels (``normalize: false``): the share of the power below
    300 Hz makes the snore logit, the share in 800-3000 Hz the breathing logit. In eval
    (validation, predict) half of the snore probability goes to the other classes, so a
    snore clip gets p(snore) ≈ 0.5: the top class, under the default on_threshold 0.6.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        centres = torch.as_tensor(_mel_centres(), dtype=torch.float32)
        self.register_buffer("low", (centres < 300.0).float())
        self.register_buffer("mid", ((centres > 800.0) & (centres < 3000.0)).float())
        self.unused = nn.Parameter(torch.zeros(()))  # something for the optimizer

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        power = x.exp().mean(dim=(1, 3))  # (B, F)
        total = power.sum(dim=1)
        low, mid = (power @ self.low) / total, (power @ self.mid) / total
        logits = torch.stack([torch.zeros_like(low), 20 * (mid - 0.5), 20 * (low - 0.5)], dim=1)
        logits = logits + 0.0 * self.unused
        if self.training:
            return logits, []
        p = logits.softmax(dim=1)
        half = 0.5 * p[:, 2]
        p = torch.stack([p[:, 0] + half / 2, p[:, 1] + half / 2, half], dim=1)
        return p.log(), []


def _sound(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """``(2, samples)`` of ``kind``: faint noise, plus mid-band hiss or a low buzz."""
    n = int(round(seconds * SR))
    wave = 0.001 * rng.standard_normal((2, n))
    if kind == "breathe":
        spectrum = np.fft.rfft(rng.standard_normal((2, n)), axis=1)
        f = np.fft.rfftfreq(n, 1 / SR)
        spectrum[:, (f < 900) | (f > 2800)] = 0
        hiss = np.fft.irfft(spectrum, n, axis=1)
        wave += 0.05 * hiss / hiss.std()
    elif kind == "snore":
        t = np.arange(n) / SR
        f0 = rng.uniform(70, 100)
        buzz = sum(np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 6)) / h for h in (1, 2, 3))
        wave += 0.05 * buzz
    return wave.astype(np.float32)


#: The night: (class, seconds); snore from 20 to 32 s and from 60 to 72 s.
NIGHT = [("quiet", 20), ("snore", 12), ("quiet", 16), ("breathe", 12), ("snore", 12), ("quiet", 12)]


def _write_data(root: Path) -> tuple[Path, Path]:
    """A labelled folder of 1-s clips per split and class, and an 84-s night to predict."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("validation", 8), ("test", 4)):
        for label in CLASSES:
            folder = root / "clips" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                sf.write(str(folder / f"{i}.wav"), _sound(label, 1.0, rng).T, SR)
    night = root / "audio" / "night.wav"
    night.parent.mkdir()
    sf.write(str(night), np.concatenate([_sound(k, s, rng) for k, s in NIGHT], axis=1).T, SR)
    return root / "clips", night


def _args(tmp: Path, clips: Path) -> list[str]:
    return tiny_args(
        tmp,
        "--data.source", json.dumps({"class_path": "data.sources.AudioFolder", "init_args": {"root": str(clips)}}),
        "--model.init_args.backbone", "tests.test_calibration.HalfSureSnore",
        "--model.init_args.normalize", "false",
        "--model.init_args.freq_mask", "0",
        "--model.init_args.time_mask", "0",
        "--latency.runs", "1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """One epoch of ``main.py fit`` of :class:`HalfSureSnore`; the Calibration callback on."""
    from main import main as cli_main

    tmp = tmp_path_factory.mktemp("calibration")
    clips, night = _write_data(tmp)
    args = _args(tmp, clips)
    fit = cli_main(["fit", *args, "--trainer.max_epochs", "1"])
    checkpoints = {cb.best_model_path for cb in fit.trainer.checkpoint_callbacks}
    return {
        "tmp": tmp,
        "night": night,
        "clips": clips,
        "best": Path(fit.trainer.checkpoint_callback.best_model_path),
        "files": sorted(Path(p) for p in checkpoints),
        "config": Path(fit.trainer.log_dir) / "config.yaml",
        "args": args,  # type: ignore[dict-item]
    }


def _predict(fitted: dict, name: str, *options: str) -> dict:
    from main import main as cli_main

    out = fitted["tmp"] / name
    cli_main(
        [
            "predict", *fitted["args"],
            "--ckpt_path", str(fitted["best"]),
            "--data.predict_audio", str(fitted["night"].parent),
            "--night.output_dir", str(out),
            *options,
        ]
    )  # fmt: skip
    return json.loads((out / "night" / "summary.json").read_text())


def test_fit_stores_the_calibration_in_the_best_and_the_last_checkpoint(fitted):
    assert {p.name for p in fitted["files"]} >= {fitted["best"].name, "last.ckpt"}
    for path in fitted["files"]:
        record = torch.load(path, weights_only=True)[CHECKPOINT_KEY]
        provenance = record["provenance"]
        assert provenance["split"] == "validation" and provenance["clips"] == 24
        assert provenance["checkpoint"]["file"] == path.name
        snore = provenance["per_class"]["snore"]
        assert snore["f1"] == 1.0 and snore["f1_before"] == 0.0  # 0.6 found none of them
        assert record["postprocessing"]["on_threshold"]["snore"] < 0.5


@pytest.mark.filterwarnings(*LIGHTNING_NOISE)
def test_calibration_turns_no_snore_episodes_into_the_true_ones(fitted, caplog):
    before = _predict(fitted, "defaults", "--night.use_calibration", "false")
    assert before["snore"]["episodes"] == 0
    assert before["top_class_minutes"]["snore"] > 0.3  # the top class for 24 s, yet no episode
    assert before["postprocessing"]["source"] == "defaults"

    after = _predict(fitted, "calibrated")
    source = after["postprocessing"]["source"]
    assert source.startswith("calibrated on validation (24 clips, snore F1 1.00 at on 0.")
    assert f"thresholds: {source} -> " in caplog.text  # the console line
    found = [e for e in read_events_csv(fitted["tmp"] / "calibrated/night/events.csv")]
    snore = [(e.start_s, e.end_s) for e in found if e.label == "snore"]
    assert len(snore) == after["snore"]["episodes"] == 2
    for (start, end), (true_start, true_end) in zip(snore, [(20, 32), (60, 72)], strict=True):
        assert abs(start - true_start) <= 1.0 and abs(end - true_end) <= 1.0

    # re-deriving keeps where the thresholds came from
    from util.night.rederive import main as rederive

    assert rederive([str(fitted["tmp"] / "calibrated"), "--plot", "false"]) == 0
    again = json.loads((fitted["tmp"] / "calibrated/night/summary.json").read_text())
    assert again["postprocessing"]["source"] == source
    assert again["snore"] == after["snore"]


@pytest.mark.filterwarnings(*LIGHTNING_NOISE)
def test_an_explicit_threshold_wins_over_the_calibrated_one(fitted):
    summary = _predict(fitted, "explicit", "--night.postprocessing.on_threshold", "0.55")
    assert summary["snore"]["episodes"] == 0
    assert summary["postprocessing"]["per_class"]["snore"]["on_threshold"] == 0.55
    assert summary["postprocessing"]["source"].endswith("; options: on_threshold")


def test_the_command_calibrates_an_existing_checkpoint(fitted, tmp_path, capsys):
    ckpt = tmp_path / "copy.ckpt"
    shutil.copy(fitted["best"], ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    expected = checkpoint.pop(CHECKPOINT_KEY)
    torch.save(checkpoint, ckpt)
    assert main(["--ckpt_path", str(ckpt), "--config", str(fitted["config"])]) == 0
    out = capsys.readouterr().out
    assert f"{ckpt}: calibrated on validation (24 clips, snore F1 1.00" in out
    stored = torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]
    assert stored["postprocessing"] == expected["postprocessing"]
    assert stored["provenance"]["checkpoint"]["file"] == "copy.ckpt"


def test_the_command_says_in_one_line_what_is_wrong(tmp_path, capsys):
    assert main(["--ckpt_path", str(tmp_path / "missing.ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]
    ckpt = untrained_checkpoint(tmp_path / "alone" / "model.ckpt")
    assert main(["--ckpt_path", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --config" in err[0]
    assert main(["--ckpt_path", str(ckpt), "--batch_size", "0"]) == 2
    capsys.readouterr()
    # an option of the recordings calibration without --recordings is refused, not ignored
    assert main(["--ckpt_path", str(ckpt), "--start_from", "defaults"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--start_from only apply with --recordings" in err[0]
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--ckpt_path", "--config", "--batch_size", "--progress"):
        assert option in help_text
    assert "default: True" in help_text


# -- calibration on labelled recordings -----------------------------------------------

HOP_S, WINDOW_S = 0.5, 1.0


def _labelled_night(seed: int, minutes: float = 10.0) -> tuple[WindowProbabilities, list[Event]]:
    """A recording's window probabilities made from its true events, and those events.

    Breathing and snore bouts of 30-90 s alternate with 30-60 s of quiet; inside a bout its
    class has p ≈ 0.5 (the top class, under the default on_threshold 0.6) with a 1-s dip to
    0.2 at every breath (every 4 s), 0.15 outside; a 1-s false alarm at p 0.5 sits midway
    between bouts. Onsets lie on window edges, so that a perfect detector meets the 0.2-s
    collar.
    """
    rng = np.random.default_rng(seed)
    duration = minutes * 60.0
    n = int((duration - WINDOW_S) / HOP_S) + 1
    centres = np.arange(n) * HOP_S + WINDOW_S / 2
    truth: list[Event] = []
    t = 20.25
    while True:
        label = CLASSES[1 + len(truth) % 2]
        length = float(rng.integers(30, 90))
        if t + length > duration - 20:
            break
        truth.append(Event(t, t + length, label))
        t += length + float(rng.integers(30, 60))
    probs = np.tile(np.array([0.7, 0.15, 0.15]), (n, 1))
    for e in truth:
        k = CLASSES.index(e.label)
        inside = (centres >= e.start_s) & (centres < e.end_s)
        dip = ((centres - e.start_s) % 4.0) >= 3.0
        probs[inside, k] = np.where(dip[inside], 0.2, 0.5)
        probs[inside, 0] = np.where(dip[inside], 0.5, 0.25)
        probs[inside, 3 - k] = 1.0 - probs[inside, 0] - probs[inside, k]
    for a, b in zip(truth[:-1], truth[1:], strict=True):
        middle = (a.end_s + b.start_s) / 2
        spike = (centres >= middle) & (centres < middle + 1.0)
        probs[spike] = 0.0
        probs[spike, CLASSES.index(b.label)], probs[spike, 0] = 0.5, 0.5
    probs = np.clip(probs + rng.uniform(-0.03, 0.03, probs.shape), 0, 1)
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    night = WindowProbabilities(
        probs, list(CLASSES), HOP_S, WINDOW_S, duration, f"audio/night{seed}.wav"
    )
    return night, truth


def _pooled_f1(
    nights: list[WindowProbabilities], truths: list[list[Event]], pp: PostProcessing, label: str
) -> tuple[float, list[list[Event]]]:
    """Event F1 of ``label`` (sed_eval counts pooled) of ``pp``'s events, and the events."""
    tp = n = 0
    found = []
    for night, truth in zip(nights, truths, strict=True):
        events, _, _ = derive(night, pp, "test")
        found.append(events)
        scores = evaluate_events(truth, events, labels=[label])["per_class"][label]
        tp, n = tp + scores["tp"], n + scores["n_ref"] + scores["n_est"]
    return 2 * tp / n, found


@pytest.fixture(scope="module")
def labelled() -> dict[str, Any]:
    nights, truths = zip(*(_labelled_night(seed) for seed in range(3)), strict=True)
    nights, truths = list(nights), list(truths)
    calibration = calibrate_on_recordings(nights, truths, CLASSES)
    return {"nights": nights, "truths": truths, "calibration": calibration}


def test_calibration_on_recordings_recovers_the_true_events(labelled, tmp_path):
    nights, truths = labelled["nights"], labelled["truths"]
    for label in ("snore", "breathe"):
        f1, found = _pooled_f1(nights, truths, PostProcessing(), label)
        assert f1 == 0.0 and not any(e.label == label for events in found for e in events)
    calibration = labelled["calibration"]
    provenance = calibration.provenance
    assert provenance["method"] == "recordings" and provenance["hours"] == 0.5
    assert provenance["scoring"]["collar_s"] == HOP_S  # DCASE's 0.2 s is finer than the windows
    assert provenance["recordings"] == [f"audio/night{seed}.wav" for seed in range(3)]
    for label in ("snore", "breathe"):
        scores = provenance["per_class"][label]
        assert scores["f1_before"] == 0.0 and scores["f1"] > 0.8
        assert scores["min_duration_s"] > 1.0  # the 1-s false alarms are dropped
        assert scores["events"] == sum(e.label == label for t in truths for e in t)
    assert calibration.calibrated == CALIBRATED_FIELDS
    assert calibration.source().startswith(
        "calibrated on 3 validation recordings (0.5 h, snore event F1 "
    )
    # stored with the checkpoint, read back, applied as predict applies it: the same events
    ckpt = untrained_checkpoint(tmp_path / "model.ckpt")
    store_calibration(ckpt, calibration)
    stored = load_calibration(torch.load(ckpt, weights_only=True))
    assert stored.values() == calibration.values() and stored.calibrated == CALIBRATED_FIELDS
    pp, used, user = stored.apply(PostProcessing())
    assert (used, user) == (list(CALIBRATED_FIELDS), [])
    for label in ("snore", "breathe"):
        f1, found = _pooled_f1(nights, truths, pp, label)
        assert f1 == pytest.approx(provenance["per_class"][label]["f1"], abs=1e-4)
        assert (
            sum(e.label == label for events in found for e in events)
            == (provenance["per_class"][label]["detected"])
        )


def test_records_of_layout_1_still_load_and_damaged_ones_do_not():
    v1 = {
        "format": "earsleep.postprocessing",
        "version": 1,
        "postprocessing": {"on_threshold": {"snore": 0.45, "default": 0.6}, "off_threshold": 0.35},
        "provenance": {"split": "validation", "clips": 7},
    }
    calibration = CalibratedThresholds.from_record(v1)
    assert calibration.calibrated == ("on_threshold", "off_threshold")
    merged, used, _ = calibration.apply(PostProcessing())
    assert used == ["on_threshold", "off_threshold"] and merged.median_windows == 3
    assert merged.min_duration_s == PostProcessing().min_duration_s
    assert calibration.record()["version"] == FORMAT_VERSION == 2
    v2 = {**v1, "version": 2, "postprocessing": {"median_windows": 5, "merge_gap_s": {"snore": 2}}}
    assert CalibratedThresholds.from_record(v2).postprocessing.median_windows == 5
    for damaged in (
        {**v1, "postprocessing": {"min_duration_s": 1.0}},  # not a field of layout 1
        {**v2, "postprocessing": {"median_windows": 4}},
        {**v2, "postprocessing": {"median_windows": True}},
        {**v2, "postprocessing": {"min_duration_s": -1.0}},
        {**v2, "postprocessing": {"merge_gap_s": {"snore": math.inf}}},
        {**v2, "postprocessing": {"on_threshold": 1.5}},
    ):
        with pytest.raises(CalibrationError, match="damaged"):
            CalibratedThresholds.from_record(damaged)
    with pytest.raises(CalibrationError, match="newer than this earsleep"):
        CalibratedThresholds.from_record({**v2, "version": 3})


def test_an_explicit_min_duration_wins_over_the_calibrated_one(labelled, tmp_path):
    from types import SimpleNamespace

    from util.callbacks import NightWriter

    calibration = labelled["calibration"]
    ckpt = untrained_checkpoint(tmp_path / "model.ckpt")
    store_calibration(ckpt, calibration)
    trainer = SimpleNamespace(ckpt_path=str(ckpt))
    writer = NightWriter(postprocessing=PostProcessing(min_duration_s=5.0))
    pp, source = writer._choose(trainer, CLASSES)
    assert pp.min_duration_s == 5.0
    assert pp.median_windows == calibration.postprocessing.median_windows
    assert pp.on_threshold == calibration.postprocessing.on_threshold
    assert pp.merge_gap_s == calibration.postprocessing.merge_gap_s
    assert source == calibration.source() + "; options: min_duration_s"
    pp, source = NightWriter()._choose(trainer, CLASSES)
    assert pp.min_duration_s == calibration.postprocessing.min_duration_s
    assert source == calibration.source()  # what the night summary names


def _predicted(root: Path, seeds: range = range(3)) -> tuple[Path, list[Path]]:
    """``root/pred/night<i>/probabilities.parquet`` and their truths ``root/audio/night<i>.csv``."""
    audio, truth_files = root / "audio", []
    audio.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        night, truth = _labelled_night(seed)
        night.recording = str(audio / f"night{seed}.wav")
        (root / "pred" / f"night{seed}").mkdir(parents=True)
        write_probabilities(root / "pred" / f"night{seed}" / "probabilities.parquet", night)
        write_events_csv(truth, audio / f"night{seed}.csv")
        truth_files.append(audio / f"night{seed}.csv")
    return root / "pred", truth_files


def test_the_command_calibrates_on_predicted_recordings(tmp_path, capsys):
    pred, truth_files = _predicted(tmp_path)
    ckpt = untrained_checkpoint(tmp_path / "model.ckpt")
    assert main(["--ckpt_path", str(ckpt), "--recordings", str(pred)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{ckpt}: calibrated on 3 validation recordings (0.5 h, snore ")
    assert "event F1 before -> after: snore 0.00 -> 1.00, breathe 0.00 -> 1.00" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["snore", "breathe"]
    record = torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]
    assert record["version"] == 2 and set(record["postprocessing"]) == set(CALIBRATED_FIELDS)
    assert record["provenance"]["recordings"] == [
        str(tmp_path / "audio" / f"night{s}.wav") for s in range(3)
    ]
    # the truth named explicitly (paired by the audio's stem), one recording at a time
    files = [str(pred / f"night{s}" / "probabilities.parquet") for s in (0, 1)]
    truth = [str(f) for f in truth_files[:2]]
    assert main(["--ckpt_path", str(ckpt), "--recordings", *files, "--truth", *truth]) == 0
    assert "calibrated on 2 validation recordings" in capsys.readouterr().out


def test_the_command_on_recordings_says_in_one_line_what_is_wrong(tmp_path, capsys):
    pred, truth_files = _predicted(tmp_path)
    ckpt = untrained_checkpoint(tmp_path / "model.ckpt")
    base = ["--ckpt_path", str(ckpt), "--recordings", str(pred)]

    def error(argv: list[str], status: int = 1) -> str:
        assert main(argv) == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert "--truth needs --recordings" in error(["--ckpt_path", str(ckpt), "--truth", "a.csv"], 2)
    assert "runs no model" in error([*base, "--batch_size", "8"], 2)
    msg = error([*base, "--truth", *map(str, truth_files[:2])])
    assert "no truth for recording" in msg and "night2.csv" in msg
    msg = error([*base[:3], str(pred / "night0"), "--truth", *map(str, truth_files)])
    assert "label no recording" in msg and "night1.csv" in msg
    with open(truth_files[1], "a") as f:
        f.write("1.0,2.0,cough,\n3.0,4.0,cough,\n5.0,6.0,snoring,\n")
    msg = error(base)
    assert "3 events of labels that are not classes" in msg
    assert "'cough' x2, 'snoring' x1" in msg and "night1.csv" in msg and "--ignore_labels" in msg
    assert main([*base, "--ignore_labels", "cough", "snoring"]) == 0
    capsys.readouterr()
    record = torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]
    assert record["provenance"]["ignored_truth_labels"] == {"cough": 2, "snoring": 1}
    assert "classes of the model" in error([*base, "--ignore_labels", "snore"])
    truth_files[0].unlink()
    msg = error(base)
    assert "no truth for recording" in msg and "night0.csv" in msg
    other = tmp_path / "other"
    night, _ = _labelled_night(0)
    night.class_names = ["quiet", "breathing", "snore"]
    (other / "x").mkdir(parents=True)
    write_probabilities(other / "x" / "probabilities.parquet", night)
    msg = error(["--ckpt_path", str(ckpt), "--recordings", str(other)])
    assert "are not the checkpoint's ['quiet', 'breathe', 'snore']" in msg
    assert "no probabilities.parquet" in error(
        ["--ckpt_path", str(ckpt), "--recordings", str(tmp_path / "empty")]
    )

"""The confusion, latency, artifact, provenance and leaderboard callbacks in real Lightning runs
of a stand-in classifier."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import multiprocessing
import os
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from models.backbones import TinyCNN
from util.callbacks import (
    ConfusionMatrixLogger,
    LatencyProfiler,
    Leaderboard,
    Provenance,
    RunArtifacts,
)
from util.callbacks.leaderboard import LEADERBOARD_COLUMNS, append_leaderboard_row
from util.callbacks.provenance import data_fingerprint_hash, environment_info, git_info
from util.redact import mask_secrets

CLASSES = ["quiet", "breathe", "snore"]
SHAPE = (1, 8, 16)  # (C, F, T)


class StandIn(pl.LightningModule):
    """Fulfils the classifier contract the callbacks rely on, nothing more.

    Train metrics are logged in ``on_train_epoch_end`` on purpose: Lightning runs that
    hook after the callbacks' own, the hardest case for the per-epoch CSV.
    """

    def __init__(self, distilled: bool = False) -> None:
        super().__init__()
        self.class_names = list(CLASSES)
        self.backbone = TinyCNN(SHAPE[0], len(CLASSES), channels=(4, 8))
        self.example_input_array = torch.zeros(1, *SHAPE)
        self.confusion: dict[str, torch.Tensor] = {}
        self.test_predictions: dict[str, torch.Tensor] = {}
        self.complexity = None  # models.task.Reports: what the reporting callbacks read
        self.collapse: dict[str, dict] = {}
        self.distilled = distilled
        self._outputs: dict[str, list] = {"train": [], "val": [], "test": []}
        self._seen = 0

    def forward(self, x):
        return self.backbone(x)

    def _step(self, batch, stage):
        x, y, index = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self._outputs[stage].append((index, y, logits.softmax(dim=1).detach()))
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._step(batch, "val"))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._step(batch, "test"))

    def _epoch_end(self, stage):
        index, target, probs = (torch.cat(t) for t in zip(*self._outputs[stage], strict=True))
        self._outputs[stage].clear()
        pred, k = probs.argmax(dim=1), len(CLASSES)
        self.log(f"{stage}/acc", multiclass_accuracy(pred, target, k, average="micro"))
        self.log(f"{stage}/f1_macro", multiclass_f1_score(pred, target, k, average="macro"))
        self.log(f"{stage}/bal_acc", multiclass_accuracy(pred, target, k, average="macro"))
        per_class = {
            "precision": multiclass_precision(pred, target, k, average=None),
            "recall": multiclass_recall(pred, target, k, average=None),
            "f1": multiclass_f1_score(pred, target, k, average=None),
        }
        for name, values in per_class.items():
            for cls, value in zip(CLASSES, values, strict=True):
                self.log(f"{stage}/{name}/{cls}", value)
        if stage != "train":
            self.confusion[stage] = multiclass_confusion_matrix(pred, target, k)
        if stage == "test":
            self.test_predictions = {"index": index, "target": target, "probs": probs}

    def on_train_epoch_end(self):
        self._seen += sum(len(index) for index, _, _ in self._outputs["train"])
        self.log("train/seen", float(self._seen))  # differs every epoch, unlike the metrics
        self._epoch_end("train")

    def on_validation_epoch_end(self):
        self._epoch_end("val")

    def on_test_epoch_end(self):
        self._epoch_end("test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def run_summary(self):
        if not self.distilled:
            return {}
        return {"teacher": "crnn.ckpt", "alpha": 0.5, "temperature": 4.0, "compression_ratio": 3.1}


class RandomData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = 48
        self.data = TensorDataset(
            torch.randn(n, *SHAPE, generator=g),
            torch.randint(0, 3, (n,), generator=g),
            torch.arange(n),
        )

    def _loader(self):
        return DataLoader(self.data, batch_size=8)

    train_dataloader = val_dataloader = test_dataloader = _loader

    def fingerprint(self):
        return {"train": "abc123", "test": "def456"}


def make_trainer(root: Path, callbacks, **kwargs) -> pl.Trainer:
    options = {
        "max_epochs": 2,
        "limit_train_batches": 2,
        "limit_val_batches": 2,
        "limit_test_batches": 2,
        "num_sanity_val_steps": 1,
        "log_every_n_steps": 1,
        "devices": 1,
    }
    options.update(kwargs)
    return pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(root, name="runs"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **options,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One fit (2 epochs) + test with the reporting callbacks; the leaderboard read between the two.

    The leaderboard comes first on purpose: it must see the summary that RunArtifacts
    writes after it, in the same hook.
    """
    root = tmp_path_factory.mktemp("run")
    leaderboard = root / "leaderboard.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", "hf_do_not_leak")
        mp.delenv("PL_GLOBAL_SEED", raising=False)  # restored after the seed_everything below
        mp.delenv("PL_SEED_WORKERS", raising=False)
        pl.seed_everything(7)
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", monitor="val/f1_macro", mode="max")
        parser = LightningArgumentParser()
        parser.add_argument("--lr", type=float, default=0.1)
        callbacks = [
            SaveConfigCallback(parser, parser.parse_args([])),  # what LightningCLI adds
            checkpoint,
            ConfusionMatrixLogger(),
            LatencyProfiler(runs=3, warmup=1),
            Leaderboard(str(leaderboard)),
            RunArtifacts(),
            Provenance(),
        ]
        trainer = make_trainer(root, callbacks)
        model, data = StandIn(distilled=True), RandomData()
        trainer.fit(model, datamodule=data)
        after_fit = read_csv(leaderboard)
        trainer.test(model, datamodule=data)
    return {
        "dir": Path(trainer.log_dir),
        "leaderboard": leaderboard,
        "after_fit": after_fit,
        "model": model,
        "checkpoint": checkpoint,
    }


def test_artifact_files_exist(run):
    for name in [
        "epoch_metrics.csv",
        "metrics.json",
        "test_metrics.csv",
        "class_metrics.csv",
        "test_predictions.csv",
        "confusion_test.csv",
        "env.json",
        "git.json",
        "data_fingerprint.json",
    ]:
        assert (run["dir"] / name).is_file(), name
    assert json.loads((run["dir"] / "data_fingerprint.json").read_text()) == {
        "train": "abc123",
        "test": "def456",
    }


def test_epoch_metrics_has_one_complete_row_per_epoch(run):
    rows = read_csv(run["dir"] / "epoch_metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert [r["step"] for r in rows] == ["2", "4"]
    for row in rows:
        for key in ["train/loss_epoch", "train/acc", "train/f1_macro", "val/loss", "val/f1_macro"]:
            assert row[key] != "", key
        assert "val/recall/snore" in row and "train/precision/quiet" in row
    # Each row holds its own epoch's values, also those the module logs after the callbacks ran.
    assert [float(r["train/seen"]) for r in rows] == [16.0, 32.0]
    events = EventAccumulator(str(run["dir"]), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ["train/loss_epoch", "train/acc", "val/loss", "val/f1_macro"]:
        logged = [e.value for e in events.Scalars(tag)]
        assert [float(r[tag]) for r in rows] == pytest.approx(logged), tag


def test_metrics_json_reports_best_test_and_complexity(run):
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    assert metrics["best_val_f1_macro"] == pytest.approx(run["checkpoint"].best_model_score.item())
    assert metrics["best_model_path"] == run["checkpoint"].best_model_path
    assert metrics["best_epoch"] in (0, 1)
    assert metrics["seed"] == 7
    assert metrics["run_dir"] == str(run["dir"])
    assert metrics["wall_time_s"] > 0
    assert metrics["config"] == str(run["dir"] / "config.yaml")
    assert set(metrics["test"]) >= {"test/acc", "test/f1_macro", "test/bal_acc", "test/loss"}
    assert metrics["complexity"]["params"] == sum(
        p.numel() for p in run["model"].backbone.parameters()
    )
    assert metrics["complexity"]["latency_median_ms"] > 0  # from the profiler
    test_rows = {r["metric"]: float(r["value"]) for r in read_csv(run["dir"] / "test_metrics.csv")}
    assert test_rows["test/f1_macro"] == pytest.approx(metrics["test"]["test/f1_macro"])


def test_predictions_confusion_and_class_metrics_agree(run):
    predictions = read_csv(run["dir"] / "test_predictions.csv")
    assert list(predictions[0]) == ["index", "target", "pred", *(f"prob_{c}" for c in CLASSES)]
    assert [int(r["index"]) for r in predictions] == list(range(16))  # 2 batches of 8
    by_hand = torch.zeros(3, 3, dtype=torch.int64)
    for r in predictions:
        probs = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert int(r["pred"]) == max(range(3), key=probs.__getitem__)
        by_hand[int(r["target"]), int(r["pred"])] += 1
    with open(run["dir"] / "confusion_test.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true\\pred", *CLASSES]
    assert [row[0] for row in table[1:]] == CLASSES
    assert torch.tensor([[int(v) for v in row[1:]] for row in table[1:]]).equal(by_hand)
    classes = read_csv(run["dir"] / "class_metrics.csv")
    assert [r["class"] for r in classes] == CLASSES
    for k, r in enumerate(classes):
        hit, predicted, support = (
            by_hand[k, k].item(),
            by_hand[:, k].sum().item(),
            by_hand[k].sum().item(),
        )
        assert int(r["support"]) == support
        assert float(r["precision"]) == pytest.approx(hit / predicted if predicted else 0.0)
        assert float(r["recall"]) == pytest.approx(hit / support if support else 0.0)


def test_tensorboard_holds_scalars_and_confusion_figures(run):
    events = EventAccumulator(str(run["dir"]), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {
        "complexity/params",
        "complexity/macs",
        "complexity/bytes_fp32",
        "latency/cpu_b1_median_ms",
        "latency/cpu_b1_p90_ms",
        "val/f1_macro",
        "test/f1_macro",
    } <= scalars
    assert {"val/confusion", "test/confusion"} <= images
    assert len(events.Images("val/confusion")) == 2  # one per epoch, none from the sanity check
    params = events.Scalars("complexity/params")[0].value
    assert params == sum(p.numel() for p in run["model"].backbone.parameters())


def test_leaderboard_gets_one_row_filled_in_after_test(run):
    assert len(run["after_fit"]) == 1 and run["after_fit"][0]["test_f1_macro"] == ""
    with open(run["leaderboard"], newline="") as f:
        assert next(csv.reader(f)) == list(LEADERBOARD_COLUMNS)
    rows = read_csv(run["leaderboard"])
    assert len(rows) == 1
    row = rows[0]
    assert row["time"] == run["after_fit"][0]["time"]
    assert row["run_dir"] == str(run["dir"]) and row["model"] == "TinyCNN"
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    assert float(row["test_f1_macro"]) == pytest.approx(metrics["test"]["test/f1_macro"])
    assert float(row["best_val_f1_macro"]) == pytest.approx(metrics["best_val_f1_macro"])
    assert row["seed"] == "7" and row["teacher"] == "crnn.ckpt" and row["alpha"] == "0.5"
    assert row["beta"] == "" and row["gap_closed"] == ""
    assert row["config"] == str(run["dir"] / "config.yaml")
    assert float(row["latency_median_ms"]) > 0 and int(row["macs"]) > 0


def test_env_json_masks_tokens(run):
    text = (run["dir"] / "env.json").read_text()
    assert "hf_do_not_leak" not in text
    env = json.loads(text)
    assert env["env"]["HF_TOKEN"] == "***"
    assert env["packages"]["torch"] == importlib.metadata.version("torch")
    assert env["cpu_count"] >= 1 and env["device"]


def test_fit_without_validation_or_profiler(tmp_path):
    """Rows come from train epoch ends; complexity is computed without latency; test columns empty."""
    leaderboard = tmp_path / "board.csv"
    callbacks = [RunArtifacts(), Leaderboard(str(leaderboard))]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_val_batches=0)
    trainer.fit(StandIn(), datamodule=RandomData())
    log_dir = Path(trainer.log_dir)
    rows = read_csv(log_dir / "epoch_metrics.csv")
    assert len(rows) == 1 and rows[0]["train/acc"] != ""
    assert not any(k.startswith("val/") for k in rows[0])
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["best_val_f1_macro"] is None and metrics["test"] == {}
    assert metrics["complexity"]["macs"] > 0 and metrics["complexity"]["latency_median_ms"] is None
    (row,) = read_csv(leaderboard)
    assert row["test_f1_macro"] == "" and row["latency_median_ms"] == "" and row["macs"] != ""
    assert not (log_dir / "test_predictions.csv").exists()


def test_fast_dev_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    leaderboard = tmp_path / "board.csv"
    callbacks = [
        ConfusionMatrixLogger(),
        LatencyProfiler(),
        RunArtifacts(),
        Provenance(),
        Leaderboard(str(leaderboard)),
    ]
    trainer = make_trainer(tmp_path, callbacks, fast_dev_run=True)
    model = StandIn()
    trainer.fit(model, datamodule=RandomData())
    trainer.test(model, datamodule=RandomData())
    assert model.complexity["params"] > 0  # profiled, with a single timed pass
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written


def test_secrets_are_masked():
    env = {
        "HF_TOKEN": "hf_x",
        "AWS_SECRET_ACCESS_KEY": "s",
        "DB_PASSWORD": "p",
        "api_key": "k",
        "HF_HOME": "/cache",
        "HF_ENDPOINT": "https://user:pw@example.org/x",
    }
    masked = mask_secrets(env)
    assert masked["HF_TOKEN"] == masked["AWS_SECRET_ACCESS_KEY"] == masked["DB_PASSWORD"] == "***"
    assert masked["api_key"] == "***" and masked["HF_HOME"] == "/cache"
    assert masked["HF_ENDPOINT"] == "https://user:***@example.org/x"
    info = environment_info({"HF_TOKEN": "hf_x", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"})
    assert info["env"] == {"CUDA_VISIBLE_DEVICES": "0", "HF_TOKEN": "***"}


def test_git_info_outside_a_repository_is_graceful(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    info = git_info(tmp_path)
    assert info["commit"] is None and info["dirty"] is None and info["error"]
    here = git_info()  # this checkout, or graceful where the tests run from an export
    assert set(here) <= {"commit", "branch", "dirty", "error"}  # never a remote URL
    assert here["commit"] is None or re.fullmatch("[0-9a-f]{40}", here["commit"])


def _append_rows(path: str, worker: int, n: int) -> None:
    filler = "x" * 50_000  # rows far larger than one write() so unlocked writers would interleave
    for i in range(n):
        row = {"run_dir": f"w{worker}/r{i}", "time": "t", "model": "M", "config": filler}
        append_leaderboard_row(path, row)
        if i % 5 == 4:  # rewrite of the whole file while the others append
            append_leaderboard_row(
                path, {**row, "test_f1_macro": 1.0}, replace={"run_dir": row["run_dir"]}
            )


# Forking a process that has started torch threads is safe here: the children only write CSV.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_concurrent_leaderboard_appends_never_interleave(tmp_path):
    path = str(tmp_path / "sub" / "leaderboard.csv")
    workers, per_worker = 4, 20
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    procs = [ctx.Process(target=_append_rows, args=(path, w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == list(LEADERBOARD_COLUMNS)
    assert all(len(row) == len(LEADERBOARD_COLUMNS) for row in table)
    rows = read_csv(Path(path))
    assert sorted(r["run_dir"] for r in rows) == sorted(
        f"w{w}/r{i}" for w in range(workers) for i in range(per_worker)
    )
    replaced = {r["run_dir"] for r in rows if r["test_f1_macro"] == "1.0"}
    assert replaced == {f"w{w}/r{i}" for w in range(workers) for i in range(4, per_worker, 5)}
    assert all(len(r["config"]) == 50_000 for r in rows)
    assert not [p for p in os.listdir(tmp_path / "sub") if p.endswith(".tmp")]


def test_provenance_leaderboard_and_artifacts_each_write_their_own_files(tmp_path):
    """Provenance alone writes the three provenance files; the leaderboard row is metrics.json's.

    Between fit and test a ``validate`` adds no row; after test the one row holds every
    column as ``metrics.json`` has it (time: when the fit finished).
    """
    trainer = make_trainer(tmp_path / "a", [Provenance()], max_epochs=1)
    trainer.fit(StandIn(), datamodule=RandomData())
    log_dir = Path(trainer.log_dir)
    written = {
        p.name for p in log_dir.iterdir() if p.is_file() and not p.name.startswith("events.")
    }
    assert written == {"env.json", "git.json", "data_fingerprint.json", "hparams.yaml"}
    assert set(json.loads((log_dir / "env.json").read_text())) == set(environment_info())
    assert json.loads((log_dir / "git.json").read_text())["commit"] == git_info()["commit"]

    leaderboard = tmp_path / "board.csv"
    callbacks = [Leaderboard(str(leaderboard)), RunArtifacts()]
    trainer = make_trainer(tmp_path / "b", callbacks, max_epochs=1)
    model, data = StandIn(distilled=True), RandomData()
    trainer.fit(model, datamodule=data)
    (after_fit,) = read_csv(leaderboard)
    trainer.validate(model, datamodule=data)
    assert read_csv(leaderboard) == [after_fit]
    trainer.test(model, datamodule=data)
    log_dir = Path(trainer.log_dir)
    assert not (log_dir / "env.json").exists() and not (log_dir / "git.json").exists()
    m = json.loads((log_dir / "metrics.json").read_text())
    complexity, test, extras = m["complexity"], m["test"], m["extras"]
    expected = {
        "time": after_fit["time"],
        "run_dir": m["run_dir"],
        "model": m["model"],
        **{k: complexity.get(k) for k in ("params", "macs", "bytes_fp32", "latency_median_ms")},
        "best_val_f1_macro": m["best_val_f1_macro"],
        "test_f1_macro": test["test/f1_macro"],
        "test_acc": test["test/acc"],
        "test_bal_acc": test["test/bal_acc"],
        "collapsed": m["collapse"]["test"]["collapsed"] if m["collapse"] else None,
        "seed": m["seed"],
        **{k: extras.get(k) for k in ("teacher", "alpha", "temperature", "beta")},
        **{k: extras.get(k) for k in ("compression_ratio", "gap_closed", "gap_closed_reason")},
        # no Provenance callback in this run: its columns stay empty
        **{k: None for k in ("data_fingerprint", "git_commit", "git_dirty")},
        "config": m["config"],
    }
    assert list(expected) == list(LEADERBOARD_COLUMNS)
    assert read_csv(leaderboard) == [{k: "" if v is None else str(v) for k, v in expected.items()}]
    assert after_fit["test_f1_macro"] == "" and test["test/f1_macro"] is not None


def test_an_empty_leaderboard_path_writes_no_row_and_one_alone_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default path would land
    callbacks = [RunArtifacts(), Leaderboard("")]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_val_batches=0)
    trainer.fit(StandIn(), datamodule=RandomData())
    assert (Path(trainer.log_dir) / "metrics.json").is_file()
    assert not [p for p in tmp_path.rglob("*") if "board" in p.name]
    trainer = make_trainer(tmp_path, [Leaderboard(str(tmp_path / "board.csv"))], max_epochs=1)
    with pytest.raises(ValueError, match="Leaderboard needs a RunArtifacts callback"):
        trainer.fit(StandIn(), datamodule=RandomData())
    assert not (tmp_path / "board.csv").exists()


def test_leaderboard_rows_name_the_data_and_the_code_they_came_from(run):
    """The row carries the hash of the run's data_fingerprint.json and git.json's version."""
    (row,) = read_csv(run["leaderboard"])
    fingerprint = json.loads((run["dir"] / "data_fingerprint.json").read_text())
    assert row["data_fingerprint"] == data_fingerprint_hash(fingerprint)
    assert re.fullmatch("[0-9a-f]{12}", row["data_fingerprint"])
    git = json.loads((run["dir"] / "git.json").read_text())
    assert row["git_commit"] == ("" if git["commit"] is None else git["commit"])
    assert row["git_dirty"] == ("" if git["dirty"] is None else str(git["dirty"]))
    # the fit row carried them already: a row never lacks its provenance
    assert run["after_fit"][0]["data_fingerprint"] == row["data_fingerprint"]


def test_the_data_fingerprint_hash_follows_content_not_key_order():
    a = {"train": {"cache_key": "k1", "rows": 10}, "test": {"cache_key": "k2", "rows": 4}}
    b = {"test": {"rows": 4, "cache_key": "k2"}, "train": {"rows": 10, "cache_key": "k1"}}
    assert data_fingerprint_hash(a) == data_fingerprint_hash(b)
    assert data_fingerprint_hash(a) != data_fingerprint_hash({**a, "test": {"cache_key": "k3"}})
    assert data_fingerprint_hash(None) is None

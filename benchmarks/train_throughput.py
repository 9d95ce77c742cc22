"""Training throughput on CPU: each backbone, Lightning against a bare loop, and KD.

For TinyCNN, TinyCNN-CBAM (r8/k3) and CRNN at the ``reference`` (1×64×501) and
``native`` (2×64×101) inputs, this times training steps on random in-memory batches
(batch 64, a fixed number of steps after warm-up, median over repeats) three ways:

- **bare**: a plain PyTorch loop over the same :class:`~models.classifier.Classifier`
  doing the same per-step work as its ``training_step`` (standardise, SpecAugment,
  class-weighted loss, train-metric update, backward, Adam step);
- **lightning**: ``Trainer.fit`` on the same module, data and optimizer, with
  checkpointing, logging, progress bar and model summary off and no validation, so
  the difference is Lightning's loop itself: overhead % = (bare − lightning) / bare;
- **KD**: ``Trainer.fit`` of :class:`~models.distillation.DistillationClassifier`
  with a CRNN teacher (frozen, randomly initialised; speed does not depend on its
  weights), beside the plain Lightning number of the same student.

Bare and Lightning runs alternate within each repeat (and swap order every other
repeat) so that load drift on a shared machine hits both alike. Samples/s are measured between the start of the first
timed step and the end of the last.

    .venv/bin/python benchmarks/train_throughput.py
    .venv/bin/python benchmarks/train_throughput.py --steps 20 --repeats 5 --threads 4
    .venv/bin/python benchmarks/train_throughput.py --threads auto --load 2   # the default, loaded
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from benchmarks.busy import busy_processes  # noqa: E402
from models.classifier import Classifier  # noqa: E402
from models.distillation import DistillationClassifier  # noqa: E402
from tests.helpers import build_like_cli, save_checkpoint  # noqa: E402
from util.cpu import choose_threads  # noqa: E402

INPUTS = {"reference": (1, 64, 501), "native": (2, 64, 101)}
BACKBONES = {
    "TinyCNN": ("models.backbones.TinyCNN", {}),
    "TinyCNN-CBAM r8k3": ("models.backbones.TinyCNNCBAM", {"reduction": 8, "kernel_size": 3}),
    "CRNN": ("models.backbones.CRNN", {}),
}
KD_STUDENTS = ("TinyCNN", "TinyCNN-CBAM r8k3")
NUM_CLASSES = 3


class BatchPool(Dataset):
    """``length`` ready-made batches cycling over a small pool of random ones."""

    def __init__(self, shape: tuple[int, ...], batch: int, length: int, pool: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [
            (
                torch.randn(batch, *shape, generator=g),
                torch.randint(0, NUM_CLASSES, (batch,), generator=g),
            )
            for _ in range(pool)
        ]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i % len(self.batches)]


def build(cls: type, backbone: str, shape: tuple[int, ...], **kwargs: Any) -> Classifier:
    """Build ``cls`` as LightningCLI would, so its checkpoint loads like a CLI one."""
    path, args = BACKBONES[backbone]
    kwargs = {"num_classes": NUM_CLASSES, "in_channels": shape[0], "input_shape": shape, **kwargs}
    return build_like_cli(cls, path, args, **kwargs)


def teacher_checkpoint(shape: tuple[int, ...], folder: Path) -> str:
    """A CRNN Classifier checkpoint (random weights) for the KD runs."""
    path = folder / f"crnn_{'x'.join(map(str, shape))}.ckpt"
    if not path.exists():
        save_checkpoint(build(Classifier, "CRNN", shape), path)
    return str(path)


def bare_sps(model: Classifier, loader: DataLoader, warmup: int, batch: int) -> float:
    """Samples/s of a plain PyTorch loop doing the module's training-step work."""
    model.train()
    optimizer = model.configure_optimizers()  # the same Adam as under Lightning
    metrics = model.metrics["train_metrics"]
    start = None
    steps = 0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step = model.step(x, y, "train")
        loss = model.compute_loss(step)
        metrics.update(step.logits.detach(), y)
        loss.backward()
        optimizer.step()
        steps += i >= warmup
    metrics.reset()
    return steps * batch / (time.perf_counter() - start)


class StepTimer(pl.Callback):
    """Time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.end = time.perf_counter()
            self.steps += 1


def lightning_sps(model: Classifier, loader: DataLoader, warmup: int, batch: int) -> float:
    """Samples/s of ``Trainer.fit`` with everything but the training loop switched off."""
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, loader)
    return timer.steps * batch / (timer.end - timer.start)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in values) + "]"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table.

    Args:
        argv: command-line arguments (see ``--help``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (median)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--threads",
        default=None,
        help="torch intra-op threads: a number, or auto (earsleep's default, "
        "util.cpu.choose_threads, chosen once the --load processes run); unset: torch's own",
    )
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--no-kd", action="store_true", help="skip the distillation columns")
    parser.add_argument("--verbose", action="store_true", help="print every measurement")
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        help="busy processes (one spinning Python loop each) running during the measurement: "
        "a known competing load, e.g. one per core",
    )
    args = parser.parse_args(argv)
    with busy_processes(args.load):
        if args.threads:
            choice = choose_threads(args.threads)
            torch.set_num_threads(choice.threads)
            print(f"threads {args.threads}: {choice.reason}")
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Measure every cell the arguments ask for and print the table."""
    warnings.filterwarnings("ignore")  # Lightning's tips about workers and log intervals
    for name in ("lightning.pytorch", "lightning.fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)

    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
        f"{os.getloadavg()[0]:.1f}, {args.load} busy process(es); batch {args.batch}, {args.warmup} warm-up + {args.steps} timed "
        f"steps, median of {args.repeats}"
    )
    n = args.warmup + args.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for input_name in args.inputs:
            shape = INPUTS[input_name]
            loader = DataLoader(BatchPool(shape, args.batch, n), batch_size=None)
            for backbone in args.backbones:
                kd = not args.no_kd and backbone in KD_STUDENTS
                teacher = teacher_checkpoint(shape, Path(tmp)) if kd else None
                bare, light, distil = [], [], []
                for repeat in range(args.repeats):
                    # alternate which loop goes first, so that order effects cancel
                    for loop in (bare_sps, lightning_sps)[:: 1 if repeat % 2 == 0 else -1]:
                        torch.manual_seed(0)
                        model = build(Classifier, backbone, shape)
                        sps = loop(model, loader, args.warmup, args.batch)
                        (bare if loop is bare_sps else light).append(sps)
                    if kd:
                        torch.manual_seed(0)
                        student = build(
                            DistillationClassifier, backbone, shape, teacher_checkpoint=teacher
                        )
                        distil.append(lightning_sps(student, loader, args.warmup, args.batch))
                b, lt = statistics.median(bare), statistics.median(light)
                row = {
                    "backbone": backbone,
                    "input": f"{input_name} {'x'.join(map(str, shape))}",
                    "bare": b,
                    "lightning": lt,
                    "overhead": (b - lt) / b * 100,
                    "kd": statistics.median(distil) if distil else None,
                    "spread": (max(bare) - min(bare)) / b * 100,
                }
                rows.append(row)
                detail = ""
                if args.verbose:
                    detail = f": bare {_fmt(bare)}, Lightning {_fmt(light)}, KD {_fmt(distil)}"
                print(f"  measured {backbone} @ {row['input']}{detail}", flush=True)

    head = (
        f"{'backbone':<18} {'input':<20} {'bare sps':>9} {'Lightning sps':>13} {'overhead':>9} "
        f"{'KD sps':>8} {'KD/plain':>8} {'bare spread':>11}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        kd = f"{r['kd']:8.1f} {r['kd'] / r['lightning']:8.2f}" if r["kd"] else f"{'-':>8} {'-':>8}"
        print(
            f"{r['backbone']:<18} {r['input']:<20} {r['bare']:9.1f} {r['lightning']:13.1f} "
            f"{r['overhead']:8.1f}% {kd} {r['spread']:10.0f}%"
        )
    print(
        "\nsps = training samples per second. overhead = (bare - Lightning) / bare; target <= 10%. "
        "KD = Lightning fit of the student with a frozen CRNN teacher (teacher forward included); "
        "KD/plain = KD sps / Lightning sps of the same student. bare spread = (max - min) / median "
        "of the bare repeats: a rough noise level for this machine."
    )


if __name__ == "__main__":
    main()

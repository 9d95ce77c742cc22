"""The training CLI behind ``python main.py fit|validate|test|predict --config config/<x>.yaml``.

Everything a user changes lives in YAML (``class_path``/``init_args``); the
defaults every experiment shares are in ``config/defaults.yaml``, read first.
``python main.py fit --help`` and ``python main.py fit --model.help Classifier``
document every option. A failure prints one ``error:`` line and exits non-zero;
``--debug`` (or ``EARSLEEP_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from data.datamodule import SleepSoundDataModule
from models.classifier import Classifier
from models.compatibility import IncompatibleError, check_compatible
from models.task import MODE, MONITOR, Task
from util.callbacks import (
    Calibration,
    ConfusionMatrixLogger,
    HParamsSummary,
    LatencyProfiler,
    Leaderboard,
    LearningRates,
    NightWriter,
    PredictEngine,
    Provenance,
    RunArtifacts,
)
from util.checkpoint import SPECIAL_CKPT_PATHS, CheckpointError, force_weights_only, read_checkpoint
from util.cpu import choose_threads
from util.errors import condense, debug_requested, report_error
from util.memory import page_out_gpu_libraries
from util.outputs import prepare_outputs
from util.redact import mask_tree

DEFAULTS = Path(__file__).resolve().parents[1] / "config" / "defaults.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Attributes the data module knows from its config that the model must agree with.
LINKED = ("num_classes", "in_channels", "class_names", "input_shape")
#: The callbacks every run has, by their config key (``--<key>.<option>``, or a ``<key>:``
#: section in YAML; their defaults are in ``config/defaults.yaml``). They are registered
#: here rather than listed under ``trainer.callbacks`` because an experiment's own
#: ``trainer.callbacks`` list would replace that list, silently dropping them.
ALWAYS_ON = {
    "early_stopping": EarlyStopping,
    "checkpoint": ModelCheckpoint,
    "last_checkpoint": ModelCheckpoint,
    "confusion": ConfusionMatrixLogger,
    "latency": LatencyProfiler,
    "artifacts": RunArtifacts,
    "provenance": Provenance,
    "leaderboard": Leaderboard,
    "night": NightWriter,
    "calibration": Calibration,
    "lr_monitor": LearningRates,
    "hparams": HParamsSummary,
    "predict_engine": PredictEngine,
}


class EarSleepParser(LightningArgumentParser):
    """The CLI's parser: an error is its message and a pointer to ``--help``.

    argparse prints the whole usage first, which for a LightningCLI subcommand is
    over a hundred lines of options above the one line that says what is wrong.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {condense(message)} (options: {prog} --help)\n")
        self.exit(2)


class MaskedSaveConfig(SaveConfigCallback):
    """LightningCLI's config.yaml writer, with secrets masked (see :mod:`util.redact`).

    The sources refuse tokens as config values; this masks whatever else looks like a
    secret (a password in a URL, a secret-named key) before the file is written.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.config = mask_tree(self.config)
        super().setup(trainer, pl_module, stage)


class EarSleepCLI(LightningCLI):
    """LightningCLI with the project's callbacks always present and data→model links.

    Args:
        only: build the parser of this subcommand alone (``main.py predict ...`` needs
            no ``fit`` parser; each took 0.25 s to build on a 2-core EPYC); ``None``: all.
    """

    def __init__(self, *args: object, only: str | None = None, **kwargs: object) -> None:
        self._only = only
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's subcommands, or only the one the command line runs."""
        every = LightningCLI.subcommands()
        return {self._only: every[self._only]} if self._only in every else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, callback in ALWAYS_ON.items():
            parser.add_lightning_class_args(callback, key)
        # the monitored score is the task's (spelled once, in models.task)
        parser.set_defaults(
            {
                "early_stopping.monitor": MONITOR,
                "early_stopping.mode": MODE,
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": MODE,
                "checkpoint.filename": f"best-epoch{{epoch:02d}}-f1{{{MONITOR}:.4f}}",
            }
        )
        parser.add_argument(
            "--threads",
            type=int | str,
            default="auto",
            help="intra-op CPU threads of this process: auto (the cores free now: those this "
            "process may use less the CPU time other processes take now, from /proc/stat over "
            "0.1 s or the tasks runnable now, at least 1; the EARSLEEP_THREADS environment "
            "variable overrides it) or a number",
        )
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        # the front end travels with the model's hyper-parameters into every checkpoint
        parser.link_arguments(
            "data.feature_config", "model.init_args.features", apply_on="instantiate"
        )

    def before_fit(self) -> None:
        """Check the teacher and the outputs before the data module spends time on caches."""
        if isinstance(self.model, Task):
            self.model.check_ready()
        self._check_checkpoint_data()  # a resumed fit
        prepare_outputs(self.trainer, "fit", self.datamodule)

    def after_fit(self) -> None:
        """Say in one line when early stopping, not ``max_epochs``, ended the run."""
        stopper = self.trainer.early_stopping_callback
        if stopper is None or not stopper.stopped_epoch or not self.trainer.is_global_zero:
            return
        best = self.trainer.checkpoint_callback
        score = best.best_model_score if best is not None else None
        print(
            f"early stopping ended the run after epoch {stopper.stopped_epoch}: {MONITOR} did "
            f"not improve for {stopper.patience} epochs"
            + (f" (best {float(score):.4f})" if score is not None else ""),
            file=sys.stderr,
        )

    def before_validate(self) -> None:
        """Check a ``--ckpt_path`` against the data; claim the run folder; check the outputs."""
        self._check_checkpoint_data()
        prepare_outputs(self.trainer, "validate", self.datamodule)

    def before_test(self) -> None:
        """Check a ``--ckpt_path`` against the data; claim the run folder; check the outputs."""
        self._check_checkpoint_data()
        prepare_outputs(self.trainer, "test", self.datamodule)

    def before_predict(self) -> None:
        """Check a ``--ckpt_path`` against the data; claim the run folder; check the outputs."""
        self._check_checkpoint_data()
        prepare_outputs(self.trainer, "predict", self.datamodule)

    def predict(self, **kwargs: object) -> None:
        """``Trainer.predict``; over recordings, without keeping every batch's output.

        Recordings' outputs reach the user through :class:`util.callbacks.NightWriter`;
        keeping them in memory as well (Lightning's default) grew the process by about
        300 MB over an 8-hour night. ``--return_predictions true`` still keeps them. A
        ``--threads`` number is handed to :class:`util.callbacks.PredictEngine` as the
        workers of its ``workers: auto``. When not one recording could be read, it raises
        (:meth:`util.callbacks.NightWriter.check_any_read`): ``main.py`` exits with status 1.
        """
        recordings = getattr(self.datamodule, "predict_audio", None) is not None
        if recordings and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        for callback in self.trainer.callbacks:  # a --threads number caps its workers
            if isinstance(callback, PredictEngine) and self.threads.requested:
                callback.threads_requested = self.threads.threads
        self.trainer.predict(**kwargs)
        for callback in self.trainer.callbacks:  # every recording unreadable: exit status 1
            if isinstance(callback, NightWriter) and self.trainer.world_size == 1:
                callback.check_any_read()  # (a rank of several knows only its own share)

    def before_instantiate_classes(self) -> None:
        """Log ``validate``/``test``/``predict`` of a run's checkpoint into that run.

        With a ``--ckpt_path`` inside a run folder (``<run>/checkpoints/*.ckpt``), the
        logger writes into ``<run>/<subcommand>/version_<n>``, beside the model, instead of
        opening a new, otherwise empty run folder.
        """
        cmd = self.config.get("subcommand")
        if cmd:
            self._set_threads(self.config[cmd].get("threads", "auto"))
        if not cmd or cmd == "fit" or self._checkpoint is None:
            return
        ckpt = Path(self._checkpoint[0]).resolve()
        logger = self.config[cmd].trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if ckpt.parent.name != "checkpoints" or init_args is None:
            return
        init_args.save_dir = str(ckpt.parent.parent)
        init_args.name = cmd
        if "version" in init_args:
            init_args.version = None
        # where the file came from, not a new place; spelled as fit recorded it (a relative
        # path stays relative), or Lightning warns that "dirpath has changed"
        recorded = [d for d in self._checkpoint_dirs if Path(d).resolve() == ckpt.parent]
        for key in ("checkpoint", "last_checkpoint"):
            self.config[cmd][key].dirpath = recorded[0] if recorded else str(ckpt.parent)

    def _set_threads(self, requested: int | str) -> None:
        """Apply ``--threads`` (:func:`util.cpu.choose_threads`) before anything computes."""
        try:
            choice = choose_threads(requested)
        except ValueError as err:
            self._parser(self.config["subcommand"]).error(f"--{err}")
        torch.set_num_threads(choice.threads)
        self.threads = choice

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        """Parse, then check the options that fail late or unsafely, each in one line.

        Refused: ``--weights_only false``; a ``--ckpt_path`` that is missing, remote,
        unreadable, holds more than weights (read weights-only, never unpickled), or
        was made for another backbone or class list (Lightning would rebuild the model
        from the checkpoint's own hyperparameters, silently replacing the backbone the
        config names); a batch size below one.
        """
        super().parse_arguments(parser, args)
        self._checkpoint: tuple[str, dict] | None = None
        self._checkpoint_dirs: list[str] = []
        cmd = self.config.get("subcommand")
        if not cmd:
            return
        parser = self._parser(cmd)  # errors name the subcommand: `main.py test --help`
        batch_size = self.config[cmd].data.get("batch_size")
        if isinstance(batch_size, int) and batch_size < 1:
            parser.error(f"--data.batch_size must be a positive number of clips, got {batch_size}")
        if self.config[cmd].get("weights_only") is False:
            parser.error(
                "--weights_only false is refused: earsleep never unpickles arbitrary objects "
                "from a checkpoint; drop the option"
            )
        if "weights_only" in self.config[cmd]:
            self.config[cmd].weights_only = True
        ckpt_path = self.config[cmd].get("ckpt_path")
        if not ckpt_path or str(ckpt_path).split(":", 1)[0] in SPECIAL_CKPT_PATHS:
            return
        if "://" in str(ckpt_path):
            parser.error(
                f"--ckpt_path {ckpt_path}: earsleep reads checkpoints from local files only; "
                "download it and pass its path"
            )
        try:
            checkpoint = read_checkpoint(ckpt_path, what="--ckpt_path")
        except CheckpointError as err:
            parser.error(str(err))
        theirs = checkpoint.get("hyper_parameters") or {}
        self._checkpoint = (str(ckpt_path), theirs)
        self._checkpoint_dirs = [
            str(state["dirpath"])
            for key, state in (checkpoint.get("callbacks") or {}).items()
            if str(key).startswith("ModelCheckpoint")
            and isinstance(state, dict)
            and state.get("dirpath")
        ]
        if "predict_engine" in theirs:  # written before the engine became a callback
            parser.error(
                f"--ckpt_path {ckpt_path} records predict_engine, a model option earsleep no "
                "longer has (it is --predict_engine.runtime now); drop it from the file once: "
                'python -c "import sys, torch; c = torch.load(sys.argv[1], weights_only=True); '
                "c['hyper_parameters'].pop('predict_engine'); torch.save(c, sys.argv[1])\" "
                f"{ckpt_path}"
            )
        try:  # what the config alone tells; the front end is checked once it is built
            check_compatible(
                theirs,
                class_names=list(self.config[cmd].data.classes),
                backbone=self.config[cmd].model.init_args.get("backbone"),
                what=f"--ckpt_path {ckpt_path}",
            )
        except IncompatibleError as err:
            parser.error(str(err))

    def _check_checkpoint_data(self) -> None:
        """Refuse a ``--ckpt_path`` trained on other features or input shape than the data's.

        Lightning would load the weights and run them on whatever the data config's front
        end computes; a front end with other options (``--data.features.init_args.eps``,
        ``mel_scale``, ``scale``) gives features of the same shape and silently other
        predictions.
        """
        if self._checkpoint is None:
            return
        path, theirs = self._checkpoint
        try:
            check_compatible(
                theirs,
                input_shape=self.datamodule.input_shape,
                feature_config=self.datamodule.feature_config,
                what=f"--ckpt_path {path}",
                fix="drop the --data.features options or pass the config the model was trained "
                "with (config.yaml in its run folder)",
            )
        except IncompatibleError as err:
            self._parser(self.config["subcommand"]).error(str(err))


def main(args: list[str] | None = None, run: bool = True) -> EarSleepCLI:
    """Build and run the CLI; tests call ``main(["fit", "--config", ...])`` in-process.

    Errors propagate as exceptions (argument errors as ``SystemExit``); :func:`cli`
    turns them into one line. On a CPU, the GPU libraries' pages that the imports brought
    in are handed back first (:func:`util.memory.page_out_gpu_libraries`).
    """
    if run:
        page_out_gpu_libraries()
    return _build(EarSleepCLI, args, run)


class _ParserBuilt(Exception):
    """Carries the parser out of :class:`_ParserOnly` before anything is parsed."""

    def __init__(self, parser: LightningArgumentParser) -> None:
        super().__init__("parser built")
        self.parser = parser


class _ParserOnly(EarSleepCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        raise _ParserBuilt(parser)


def build_parser() -> LightningArgumentParser:
    """The parser :func:`main` parses with (subcommands, ``defaults.yaml``, links), unused.

    Building it takes about a second; one parser parses any number of command lines,
    ``parser.parse_args(["fit", "--config", ...])`` resolving a run's configuration as
    ``main.py`` would (defaults and included files too) without instantiating anything.
    """
    try:
        _build(_ParserOnly, [], True)
    except _ParserBuilt as built:
        return built.parser
    raise RuntimeError("the CLI parsed arguments before its parser could be taken")


def _build(cli_class: type[EarSleepCLI], args: list[str] | None, run: bool) -> EarSleepCLI:
    force_weights_only()  # every torch.load from here on, Lightning's and libraries' too
    defaults = {"default_config_files": [str(DEFAULTS)]}
    given = sys.argv[1:] if args is None else args
    # `main.py predict ...` builds the predict parser only; `main.py --help` (or options
    # before the subcommand) builds every one
    listed = isinstance(given, (list, tuple)) and len(given) > 0
    only = given[0] if run and listed and given[0] in SUBCOMMANDS else None
    return cli_class(
        Classifier,
        SleepSoundDataModule,
        only=only,
        subclass_mode_model=True,
        parser_class=EarSleepParser,
        save_config_callback=MaskedSaveConfig,
        parser_kwargs={cmd: defaults for cmd in ((only,) if only else SUBCOMMANDS)},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the model owns its optimizer (model.init_args.optimizer)
        args=args,
        run=run,
    )


def cli(args: list[str] | None = None) -> int:
    """``python main.py``: :func:`main` with one-line errors; returns the exit status.

    Any failure prints ``error: <what and what to do>`` and returns 1 (argument
    errors: 2). ``--debug`` anywhere on the command line, or ``EARSLEEP_DEBUG=1``,
    prints the full traceback as well.
    """
    given = sys.argv[1:] if args is None else args
    debug = "--debug" in given or debug_requested()
    if args is None:  # LightningCLI warns when given both sys.argv and args
        sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    else:
        args = [a for a in args if a != "--debug"]
    try:
        main(args)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        report_error(err, debug)
        return 1
    return 0


#: Set to ``1`` for the interpreter's full shutdown at exit (see :func:`exit_quickly`).
FULL_EXIT_ENV = "EARSLEEP_FULL_EXIT"


def exit_quickly(status: int) -> NoReturn:
    """End ``python main.py`` with ``status``, skipping the interpreter's teardown.

    Python's shutdown steps all run: non-daemon threads are joined (after thread pools
    are told to stop), exit handlers run (logging, multiprocessing, TensorBoard
    writers), and the standard streams are flushed. What is skipped is what comes
    after: module teardown and the static destructors of every shared library loaded.
    torch's wheel loads its CUDA libraries even on a CPU machine, and their destructors
    page in code and data the run never touched: measured 130 MB above the run's own
    peak memory and 1.5 s before the shell prompt returns (``import torch`` alone:
    484 MB resident, 623 MB peak at a normal exit, 496 MB at this one).
    ``EARSLEEP_FULL_EXIT=1`` exits the usual way.
    """
    if os.environ.get(FULL_EXIT_ENV) == "1":
        sys.exit(status)
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to write to
            stream.flush()
    os._exit(status)

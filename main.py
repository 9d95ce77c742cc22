"""earsleep's command line: ``python main.py fit|validate|test|predict --config config/<x>.yaml``.

Everything a user changes lives in YAML (``class_path``/``init_args``); the
defaults every experiment shares are in ``config/defaults.yaml``, read first.
``python main.py fit --help`` and ``python main.py fit --model.help Classifier``
document every option.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from data.datamodule import SleepSoundDataModule
from models.classifier import Classifier
from util.callbacks import ConfusionMatrixLogger, LatencyProfiler, NightWriter, RunArtifacts

DEFAULTS = Path(__file__).resolve().parent / "config" / "defaults.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Attributes the data module knows from its config that the model must agree with.
LINKED = ("num_classes", "in_channels", "class_names", "input_shape")
#: Model options that choose how a trained model runs, not what it computes. With a
#: ``--ckpt_path``, Lightning replaces the config's model options by those stored in the
#: checkpoint; for these the config (and the command line) wins.
RUN_TIME_OPTIONS = ("predict_engine",)


class EarSleepCLI(LightningCLI):
    """LightningCLI with the project's callbacks always present and data→model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ConfusionMatrixLogger, "confusion")
        parser.add_lightning_class_args(LatencyProfiler, "latency")
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.add_lightning_class_args(NightWriter, "night")
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/f1_macro",
                "early_stopping.mode": "max",
                "early_stopping.patience": 5,
                "checkpoint.monitor": "val/f1_macro",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:02d}-f1{val/f1_macro:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
            }
        )
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def before_fit(self) -> None:
        """Check a distillation teacher before the data module spends time on caches."""
        check = getattr(self.model, "check_teacher", None)
        if callable(check):
            check()

    def predict(self, **kwargs: object) -> None:
        """``Trainer.predict``; over recordings, without keeping every batch's output.

        Recordings' outputs reach the user through :class:`util.callbacks.NightWriter`;
        keeping them in memory as well (Lightning's default) grew the process by about
        300 MB over an 8-hour night. ``--return_predictions true`` still keeps them.
        """
        recordings = getattr(self.datamodule, "predict_audio", None) is not None
        if recordings and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Put back the run-time options the checkpoint's hyperparameters replaced."""
        cmd = self.config.get("subcommand")
        if cmd:
            for key, value in self._run_time_options.items():
                self.config[cmd].model.init_args[key] = value

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        """Parse, then refuse a ``--ckpt_path`` made for another backbone or class list.

        Lightning rebuilds the model from the checkpoint's own hyperparameters, which
        would silently replace the backbone the config names; say so instead.
        """
        super().parse_arguments(parser, args)
        cmd = self.config.get("subcommand")
        init_args = self.config[cmd].model.get("init_args") if cmd else None
        self._run_time_options = {
            key: init_args[key] for key in RUN_TIME_OPTIONS if init_args and key in init_args
        }
        ckpt_path = cmd and self.config[cmd].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        theirs = torch.load(ckpt_path, weights_only=True, map_location="cpu").get(
            "hyper_parameters", {}
        )
        model = self.config[cmd].model
        ours_backbone = _class_name(model.init_args.get("backbone"))
        their_backbone = _class_name(theirs.get("backbone"))
        ours_classes = list(self.config[cmd].data.classes)
        their_classes = list(theirs.get("class_names") or [])
        if (ours_backbone, ours_classes) != (their_backbone, their_classes or ours_classes):
            parser.error(
                f"{ckpt_path} holds a {their_backbone} for classes {their_classes}, but the config "
                f"asks for a {ours_backbone} for classes {ours_classes}; pass the config the "
                "checkpoint was trained with (config.yaml in its run folder)"
            )


def _class_name(spec: object) -> str | None:
    """Class name of a ``class_path`` spec (Namespace or dict) or of a class."""
    path = getattr(spec, "class_path", None) or (
        spec.get("class_path") if isinstance(spec, dict) else None
    )
    if path:
        return str(path).rsplit(".", 1)[-1]
    return getattr(spec, "__name__", None)


def main(args: list[str] | None = None, run: bool = True) -> EarSleepCLI:
    """Build and run the CLI; tests call ``main(["fit", "--config", ...])`` in-process."""
    defaults = {"default_config_files": [str(DEFAULTS)]}
    return EarSleepCLI(
        Classifier,
        SleepSoundDataModule,
        subclass_mode_model=True,
        parser_kwargs={cmd: defaults for cmd in SUBCOMMANDS},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the model owns its optimizer (model.init_args.optimizer)
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()

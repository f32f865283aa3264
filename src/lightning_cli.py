"""The LightningCLI subclass behind ``python -m src.cli fit|validate|test|predict``.

Kept apart from :mod:`src.cli` so that commands which do not train (``--help``, ``score``,
``compare``, ``build-camer``, ...) never import Lightning (and torch) at start-up; ``src.cli``
imports this module only when a Lightning subcommand runs.
"""

import warnings
from pathlib import Path

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from src.io.checkpoint_io import check_checkpoint_fits, use_safe_checkpoint_io
from src.tracking.config_artifact import LogConfigToMLflow
from src.tracking.mlflow_logger import check_logger_config
from src.tracking.resume import resolve_config_checkpoint, resume_logging

# The frozen backbone stays in eval mode on purpose (no dropout in frozen weights).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

__all__ = ["LogConfigToMLflow", "MoSEARCLI"]


class MoSEARCLI(LightningCLI):
    """LightningCLI with the data module's tokenizer, labels and streams linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in (
            ("data.tokenizer_path", "model.init_args.tokenizer"),
            ("data.label_names", "model.init_args.labels"),
            ("data.streams", "model.init_args.streams"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the best checkpoint (by validation) on the test split.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Before anything is built: `--ckpt_path last` becomes the newest last.ckpt under
        # default_root_dir, and the checkpoint is loaded weights-only (a crafted pickle is
        # refused with a clear message). See src/tracking/resume.py.
        self._checkpoint_run_id = resolve_config_checkpoint(self.config)

    def before_instantiate_classes(self) -> None:
        # An unreachable or locked tracking backend stops the run before data and model exist.
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and config.get("trainer") is not None:
            check_logger_config(config["trainer"].get("logger"))

    def before_fit(self) -> None:
        self._prepare_checkpoint_loading()
        # A resumed fit logs into the MLflow run its checkpoint came from.
        resume_logging(self.trainer, self._checkpoint_run_id)

    def before_validate(self) -> None:
        self._prepare_checkpoint_loading()
        resume_logging(self.trainer, None)

    def before_test(self) -> None:
        self._prepare_checkpoint_loading()
        resume_logging(self.trainer, None)

    def before_predict(self) -> None:
        self._prepare_checkpoint_loading()
        resume_logging(self.trainer, None)

    def _prepare_checkpoint_loading(self) -> None:
        # Weights-only loading and atomic saves; a checkpoint of another model config is refused
        # naming the file, the tensor and both shapes.
        use_safe_checkpoint_io(self.trainer.strategy)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_fits(self.model, ckpt_path)

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
            has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
            self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None
            )

"""``python -m src.cli``: LightningCLI subcommands (fit, validate, test, predict) plus extra ones.

With no ``--config``, ``conf/default.yaml`` (the embedded CPU demo) is used. After ``fit`` the best
checkpoint is tested on the test split (turn off with ``--test_after_fit false``).
"""

import importlib
import sys
import warnings
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from src.commands.registry import EXTRA_COMMANDS
from src.io.checkpoint_io import check_checkpoint_fits, use_safe_checkpoint_io
from src.models.adapters.base import Adapter
from src.tracking.config_artifact import LogConfigToMLflow
from src.tracking.mlflow_logger import check_logger_config
from src.tracking.resume import resolve_config_checkpoint, resume_logging

# The frozen backbone stays in eval mode on purpose (no dropout in frozen weights).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "default.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class Method:
    """The method under study, one config group (``conf/method/*.yaml``).

    Args:
        adapter: The trainable adapter (plain LoRA, MoSE); it becomes
            ``model.init_args.adapter``, which must then be unset.
        callbacks: The callbacks the method comes with (AR: attention reallocation at
            test/predict time); appended to ``trainer.callbacks``.
    """

    def __init__(
        self, adapter: Adapter | None = None, callbacks: list[Callback] | None = None
    ) -> None:
        self.adapter, self.callbacks = adapter, callbacks


class MoSEARCLI(LightningCLI):
    """LightningCLI with the data module's tokenizer, labels and streams linked into the model
    and a ``method`` group (adapter + its callbacks) beside trainer, model and data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            Method, "method", sub_configs=True, help="adapter + its callbacks (conf/method/)"
        )
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
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        self._place_method(config)
        # An unreachable or locked tracking backend stops the run before data and model exist.
        if config.get("trainer") is not None:
            check_logger_config(config["trainer"].get("logger"))

    def _place_method(self, config: Namespace) -> None:
        """Put the method's adapter and callbacks where the model and trainer take them, so the
        resolved config (and the ``config.yaml`` logged with the run) is a plain one."""
        adapter = config.get("method.adapter")
        if adapter is not None:
            if config.get("model.init_args.adapter") is not None:
                self.parser.error(
                    "the adapter is given twice, as method.adapter and model.init_args.adapter; "
                    "keep one (conf/model/ holds backbones, conf/method/ adapters)"
                )
            config["model.init_args.adapter"] = adapter
            config["method.adapter"] = None
        callbacks = config.get("method.callbacks")
        if callbacks:
            config["trainer.callbacks"] = [*(config.get("trainer.callbacks") or []), *callbacks]
            config["method.callbacks"] = None

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


def _with_default_config(argv: list[str]) -> list[str]:
    if (
        argv
        and argv[0] in LIGHTNING_SUBCOMMANDS
        and not any(a.startswith("--config") for a in argv)
    ):
        return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


def _run_extra(name: str, argv: list[str]) -> int:
    target, _ = EXTRA_COMMANDS[name]
    module_name, function = target.split(":")
    return int(getattr(importlib.import_module(module_name), function)(argv) or 0)


def main(args: list[str] | None = None) -> MoSEARCLI | int:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests call ``main([...])``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _run_extra(argv[0], argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, EXTRA_COMMANDS))
        print("extra commands (python -m src.cli <command> --help):")
        for name, (_, help_text) in EXTRA_COMMANDS.items():
            print(f"  {name:<{width}}  {help_text}")
        print()
    argv = _with_default_config(argv)
    if args is None:
        # From the shell: keep sys.argv complete (with the default config), since the DDP
        # launcher restarts this same command line in its worker processes.
        sys.argv[1:] = argv
    return MoSEARCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=None if args is None else argv,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    result = main()
    if isinstance(result, int):
        sys.exit(result)

"""The LightningCLI subclass behind ``python -m src.cli fit|validate|test|predict``.

Kept apart from :mod:`src.cli` so that commands which do not train (``--help``, ``score``,
``compare``, ``build-camer``, ...) never import Lightning (and torch) at start-up; ``src.cli``
imports this module only when a Lightning subcommand runs.
"""

import importlib
import warnings
from pathlib import Path

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from src.callbacks.preemption import CheckpointOnSigterm
from src.cli import LIGHTNING_SUBCOMMANDS
from src.core.errors import (
    STRICT_PARSER,
    UntrainedModelError,
)
from src.io.checkpoint_hparams import plain_checkpoint_hparams
from src.io.checkpoint_io import (
    check_checkpoint_fits,
    load_checkpoint_safely,
    use_safe_checkpoint_io,
)
from src.models.adapters.base import Adapter
from src.tracking.config_artifact import LogConfigToMLflow
from src.tracking.mlflow_logger import check_logger_config
from src.tracking.resume import (
    RunIdentity,
    config_identity,
    mark_untrained,
    resolve_config_checkpoint,
    resume_logging,
)

# Values of Any-typed arguments are never built as classes, and values may not name modules
# that run commands or import code (jsonargparse's denylist, enforced); our own init arguments
# that take data are typed plain (src/core/plain_data.py), so nothing there is imported either.
set_parsing_settings(instantiate_subclass_spec_in_any=False, import_path_denylist=[])

# The frozen backbone stays in eval mode on purpose (no dropout in frozen weights).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

#: Model arguments the data module links in (at instantiation): never taken from a checkpoint.
LINKED_FROM_DATA = ("tokenizer", "labels", "streams")


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
        for source, target in zip(
            ("data.tokenizer_path", "data.label_names", "data.streams"),
            (f"model.init_args.{name}" for name in LINKED_FROM_DATA),
            strict=True,
        ):
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the best checkpoint (by validation) on the test split.",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="Allow test/predict of a model whose adapter and projectors were never "
            "trained (no --ckpt_path, or a fit of 0 steps); the run is tagged "
            "mosear.untrained=true.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Before anything is built: `--ckpt_path last` becomes the newest last.ckpt of this
        # experiment (same experiment name and config identity) under default_root_dir, and the
        # checkpoint is loaded weights-only (a crafted pickle is refused with a clear message).
        # See src/tracking/resume.py.
        self._identity = config_identity(self.config)
        self._checkpoint_run_id = resolve_config_checkpoint(self.config, self._identity)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI merges the checkpoint's hyper_parameters through the parser, which
        # imports and builds any class_path in them. A checkpoint is data: only plain values
        # are merged, and the model class it names is compared as a string, never imported.
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        model = self.config[subcommand].get("model")
        class_path = model.get("class_path") if model is not None else None
        if not class_path:
            return
        # The class the (trusted) config names, to learn which of its arguments are plain.
        module, _, name = class_path.rpartition(".")
        model_class = getattr(importlib.import_module(module), name)
        checkpoint = load_checkpoint_safely(ckpt_path, mmap=True)
        hparams = plain_checkpoint_hparams(
            checkpoint, ckpt_path, class_path, model_class, skip=LINKED_FROM_DATA
        )
        if hparams:
            self.config = self.parser.parse_object(
                {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}},
                self.config,
            )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        self._place_method(config)
        # Untrained weights are refused before data and model are built.
        if self.subcommand in ("test", "predict"):
            self._refuse_untrained(self._untrained_reason(config.get("ckpt_path")))
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
        # Checkpoints name the experiment identity (`--ckpt_path last` finds this experiment's)
        # and a SIGTERM (pre-emption) writes a resumable last.ckpt before the process exits.
        self.trainer.callbacks.extend([RunIdentity(self._identity), CheckpointOnSigterm()])
        # A resumed fit logs into the MLflow run its checkpoint came from (never a finished one).
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        resume_logging(self.trainer, self._checkpoint_run_id, ckpt_path)

    def before_validate(self) -> None:
        self._prepare_checkpoint_loading()
        resume_logging(self.trainer, None)

    def before_test(self) -> None:
        self._prepare_checkpoint_loading()
        resume_logging(self.trainer, None)
        self._mark_untrained()

    def before_predict(self) -> None:
        self._prepare_checkpoint_loading()
        resume_logging(self.trainer, None)
        self._mark_untrained()

    @staticmethod
    def _untrained_reason(ckpt_path: str | None) -> str | None:
        """Why test/predict would evaluate weights that were never trained (the adapter and
        projectors of a fresh EmotionLLMModule are random), or ``None``."""
        if not ckpt_path:
            return "no --ckpt_path was given"
        if ckpt_path in ("best", "last", "hpc") or not Path(ckpt_path).is_file():
            return None
        if load_checkpoint_safely(ckpt_path, mmap=True).get("global_step", 1) == 0:
            return f"--ckpt_path {ckpt_path} holds 0 training steps"
        return None

    def _refuse_untrained(self, reason: str | None) -> None:
        self._is_untrained = reason is not None
        if reason is not None and not self.config[self.subcommand].get("allow_untrained"):
            raise UntrainedModelError(
                f"{self.subcommand}: refusing to evaluate an untrained model ({reason}; its "
                "adapter and projectors are random): pass --ckpt_path <trained checkpoint>, or "
                "--allow_untrained true to run it anyway (the run is tagged mosear.untrained)"
            )

    def _mark_untrained(self) -> None:
        if getattr(self, "_is_untrained", False):
            mark_untrained(self.trainer)

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
            if self.trainer.global_step == 0:
                self._refuse_untrained("the fit trained 0 steps")
            self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None
            )
            self._mark_untrained()


def run_lightning(argv: list[str], from_shell: bool) -> MoSEARCLI:
    """Run a Lightning subcommand (``argv[0]``) with the project's CLI settings."""
    return MoSEARCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"overwrite": True},
        # No abbreviations (`--trainer.max_epoch` is an error, not max_epochs) and parser errors
        # raised, so that main prints them as one line.
        parser_kwargs={
            "parser_mode": "omegaconf+",
            **STRICT_PARSER,
            **{name: dict(STRICT_PARSER) for name in LIGHTNING_SUBCOMMANDS},
        },
        args=None if from_shell else argv,
        auto_configure_optimizers=False,
    )

"""The LightningCLI subclass behind ``python -m src.cli fit|validate|test|predict``.

Kept apart from :mod:`src.cli` so that commands which do not train (``--help``, ``score``,
``compare``, ``build-camer``, ...) never import Lightning (and torch) at start-up; ``src.cli``
imports this module only when a Lightning subcommand runs.
"""

import importlib
import logging
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger

from src.callbacks.preemption import CheckpointOnSigterm
from src.callbacks.results_table import deferred_results_tables, print_results_tables
from src.cli import LIGHTNING_SUBCOMMANDS
from src.core.errors import (
    STRICT_PARSER,
    UntrainedModelError,
)
from src.evaluation.default_predictions import add_default_prediction_writer, log_predictions
from src.io.checkpoint_hparams import plain_checkpoint_hparams, plain_component_hparams
from src.io.checkpoint_io import (
    check_checkpoint_fits,
    load_checkpoint_safely,
    use_safe_checkpoint_io,
)
from src.models.adapters.base import Adapter
from src.tracking.config_artifact import LogConfigToMLflow, logged_config_text
from src.tracking.mlflow_logger import check_logger_config
from src.tracking.model_logging import best_checkpoint, log_best_checkpoint
from src.tracking.model_uri import fetch_mlflow_checkpoint
from src.tracking.resume import (
    RunIdentity,
    config_identity,
    mark_untrained,
    resolve_config_checkpoint,
    resume_logging,
)
from src.tracking.run_console import LIBRARY_LOGGERS, announce
from src.tracking.run_metadata import describe_run

# Values of Any-typed arguments are never built as classes, and values may not name modules
# that run commands or import code (jsonargparse's denylist, enforced); our own init arguments
# that take data are typed plain (src/core/plain_data.py), so nothing there is imported either.
set_parsing_settings(instantiate_subclass_spec_in_any=False, import_path_denylist=[])

# The frozen backbone stays in eval mode on purpose (no dropout in frozen weights).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
# Lightning's pytree helper against torch >= 2.10: a library-internal deprecation, not ours.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

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


class Tracking:
    """Where a run is kept, one config group (``conf/tracking/*.yaml``), so that
    ``conf/trainer/`` says only how the trainer runs (hardware, precision, epochs).

    Args:
        logger: The run's logger (``MoSEARMLFlowLogger``); it becomes ``trainer.logger``, which
            must then be unset (``--trainer.logger false`` drops it: no logger).
        callbacks: The run-keeping callbacks (best and last checkpoints, learning-rate monitor,
            results table); they come first in ``trainer.callbacks``, before the trainer's own
            and the method's.
    """

    def __init__(
        self, logger: Logger | None = None, callbacks: list[Callback] | None = None
    ) -> None:
        self.logger, self.callbacks = logger, callbacks


class MoSEARCLI(LightningCLI):
    """LightningCLI with the data module's tokenizer, labels and streams linked into the model
    and a ``method`` group (adapter + its callbacks) beside trainer, model and data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            Method, "method", sub_configs=True, help="adapter + its callbacks (conf/method/)"
        )
        parser.add_class_arguments(
            Tracking,
            "tracking",
            sub_configs=True,
            help="logger + checkpoint and results callbacks (conf/tracking/)",
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
        parser.add_argument(
            "--log_best_model",
            type=bool,
            default=True,
            help="After fit, log the best checkpoint and an MLflow logged model to the run.",
        )
        parser.add_argument(
            "--register_as",
            type=str | None,
            default=None,
            help="After fit, register the logged model as a new version of this name.",
        )
        parser.add_argument(
            "--predictions_folder",
            type=str | None,
            default=None,
            help="predict without a prediction writer in the config: write a new predictions CSV "
            "here (default <default_root_dir>/predictions).",
        )
        parser.add_argument(
            "--lightning_verbose",
            type=bool,
            default=False,
            help="Show Lightning's model summary, metric tables and info lines (off: the results "
            "table is the last thing printed).",
        )
        parser.set_defaults({"trainer.enable_model_summary": False})

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        settings = self.config.get(self.config.get("subcommand") or "") or {}
        if not settings.get("lightning_verbose"):
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        # `--ckpt_path runs:/...` or `models:/...`: downloaded into a cache folder first, then
        # handled as a local file (weights-only). See src/tracking/model_uri.py.
        self._ckpt_argument = fetch_mlflow_checkpoint(self.config)
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
            checkpoint, ckpt_path, class_path, model_class, skip=(*LINKED_FROM_DATA, "backbone")
        )
        backbone = self._backbone_hparams(checkpoint, ckpt_path, model)
        if backbone is not None:
            hparams["backbone"] = backbone
        if hparams:
            self.config = self.parser.parse_object(
                {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}},
                self.config,
            )

    @staticmethod
    def _backbone_hparams(
        checkpoint: dict[str, Any], ckpt_path: str, model: Namespace
    ) -> dict[str, Any] | None:
        """The checkpoint's backbone settings for the configured backbone class (compared as a
        string with the trusted config's ``class_path``), or ``None`` if it stores none."""
        stored = (checkpoint.get("hyper_parameters") or {}).get("backbone")
        configured = model.get("init_args.backbone") if model is not None else None
        if stored is None or configured is None or not configured.get("class_path"):
            return None
        class_path = configured["class_path"]
        module, _, name = class_path.rpartition(".")
        component = getattr(importlib.import_module(module), name)
        settings = plain_component_hparams(stored, ckpt_path, "backbone", class_path, component)
        return {"class_path": class_path, "init_args": settings}

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        self._place_tracking(config)
        self._place_method(config)
        # Untrained weights are refused before data and model are built.
        if self.subcommand in ("test", "predict"):
            self._refuse_untrained(self._untrained_reason(config.get("ckpt_path")))
        # An unreachable or locked tracking backend stops the run before data and model exist.
        if config.get("trainer") is not None:
            check_logger_config(config["trainer"].get("logger"))
            # Lightning's model summary and metric table (test/validate `verbose`) only on demand.
            if config.get("lightning_verbose"):
                config["trainer"]["enable_model_summary"] = True
            if "verbose" in config:
                config["verbose"] = bool(config.get("lightning_verbose"))

    def _place_tracking(self, config: Namespace) -> None:
        """Put the tracking group's logger and callbacks into the trainer (the logger once; the
        callbacks before the trainer's own), so the logged ``config.yaml`` is a plain one."""
        if config.get("trainer.logger") is False:
            # `--trainer.logger false` (export, the pyfunc model's predict): no logger at all.
            config["tracking.logger"] = None
        self._move_part(
            config, "logger", "tracking.logger", "trainer.logger", (None, True),
            "conf/trainer/ holds hardware, conf/tracking/ the logger and checkpoints",
        )  # fmt: skip
        self._join_callbacks(config, "tracking", first=True)

    def _place_method(self, config: Namespace) -> None:
        """Put the method's adapter and callbacks where the model and trainer take them, so the
        resolved config (and the ``config.yaml`` logged with the run) is a plain one."""
        self._move_part(
            config, "adapter", "method.adapter", "model.init_args.adapter", (None,),
            "conf/model/ holds backbones, conf/method/ adapters",
        )  # fmt: skip
        self._join_callbacks(config, "method", first=False)

    def _move_part(
        self, config: Namespace, part: str, source: str, target: str, unset: tuple, hint: str
    ) -> None:
        """Move a group's ``part`` from ``source`` to ``target``; an error if both are set."""
        value = config.get(source)
        if value is None:
            return
        if config.get(target) not in unset:
            self.parser.error(
                f"the {part} is given twice, as {source} and {target}; keep one ({hint})"
            )
        config[target] = value
        config[source] = None

    @staticmethod
    def _join_callbacks(config: Namespace, group: str, first: bool) -> None:
        """Add ``<group>.callbacks`` to ``trainer.callbacks``, before (``first``) or after."""
        callbacks = config.get(f"{group}.callbacks")
        if callbacks:
            own = config.get("trainer.callbacks") or []
            config["trainer.callbacks"] = [*callbacks, *own] if first else [*own, *callbacks]
            config[f"{group}.callbacks"] = None

    def before_fit(self) -> None:
        self._prepare_checkpoint_loading()
        # Checkpoints name the experiment identity (`--ckpt_path last` finds this experiment's)
        # and a SIGTERM (pre-emption) writes a resumable last.ckpt before the process exits.
        self.trainer.callbacks.extend([RunIdentity(self._identity), CheckpointOnSigterm()])
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            # Lightning's own "Restored all states" line is quiet by default: say it here.
            state = load_checkpoint_safely(ckpt_path, mmap=True)
            print(
                f"Resuming from {ckpt_path} (epoch {state.get('epoch')}, global step "
                f"{state.get('global_step')}); Lightning restores all states from it"
            )
        self._describe_run()
        # A resumed fit logs into the MLflow run its checkpoint came from (never a finished one).
        resume_logging(self.trainer, self._checkpoint_run_id, ckpt_path)

    def before_validate(self) -> None:
        self._prepare_checkpoint_loading()
        self._describe_run()
        resume_logging(self.trainer, None)

    def before_test(self) -> None:
        self._prepare_checkpoint_loading()
        self._describe_run()
        resume_logging(self.trainer, None)
        self._mark_untrained()

    def before_predict(self) -> None:
        self._prepare_checkpoint_loading()
        self._describe_run()
        resume_logging(self.trainer, None)
        self._mark_untrained()
        settings = self.config[self.subcommand]
        self._prediction_writer = add_default_prediction_writer(
            self.trainer, settings.get("predictions_folder")
        )

    def _describe_run(self) -> None:
        # Tags and a readable run name derived from the config as placed (the method group's
        # adapter and callbacks are in model/trainer by now): src/tracking/run_metadata.py.
        deferred_results_tables(self.trainer)
        describe_run(
            self.trainer,
            self.config[self.subcommand],
            self.subcommand,
            source_run=None if self.subcommand == "fit" else self._checkpoint_run_id,
            source_checkpoint=self._ckpt_argument,
        )

    def after_validate(self) -> None:
        announce(self.trainer)

    def after_test(self) -> None:
        print_results_tables(self.trainer)
        announce(self.trainer)

    def after_predict(self) -> None:
        log_predictions(self.trainer, self._prediction_writer)
        announce(self.trainer, predictions=self._prediction_writer)

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

    def _fit_untrained_reason(self, best: Path | None) -> str | None:
        """``"the fit trained 0 steps"`` or ``None``. Under ``ddp_spawn`` the launching process's
        trainer never counts the workers' steps (it stays at 0); the best checkpoint does."""
        steps = self.trainer.global_step
        if steps == 0 and best is not None:
            steps = load_checkpoint_safely(best, mmap=True).get("global_step", 0)
        return "the fit trained 0 steps" if steps == 0 else None

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
        settings = self.config[self.subcommand]
        best = best_checkpoint(self.trainer)
        logged: dict[str, str] = {}
        config_text = logged_config_text(self.trainer)
        if settings.get("log_best_model") and best and config_text and not self.trainer.interrupted:
            logged = log_best_checkpoint(
                self.trainer, best, config_text, settings.get("register_as")
            )
        if settings.get("test_after_fit") and not self.trainer.interrupted:
            self._refuse_untrained(self._fit_untrained_reason(best))
            self.trainer.test(
                self.model,
                datamodule=self.datamodule,
                ckpt_path=str(best) if best is not None else None,
                verbose=bool(settings.get("lightning_verbose")),
            )
            self._mark_untrained()
            print_results_tables(self.trainer)
        announce(self.trainer, logged=logged)


#: The project's LightningCLI settings (``run_lightning`` and ``build_cli``).
CLI_OPTIONS: dict = {
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "save_config_callback": LogConfigToMLflow,
    "save_config_kwargs": {"overwrite": True},
    "auto_configure_optimizers": False,
}


def run_lightning(argv: list[str], from_shell: bool) -> MoSEARCLI:
    """Run a Lightning subcommand (``argv[0]``) with the project's CLI settings."""
    return MoSEARCLI(
        **CLI_OPTIONS,
        # No abbreviations (`--trainer.max_epoch` is an error, not max_epochs) and parser errors
        # raised, so that main prints them as one line.
        parser_kwargs={
            "parser_mode": "omegaconf+",
            **STRICT_PARSER,
            **{name: dict(STRICT_PARSER) for name in LIGHTNING_SUBCOMMANDS},
        },
        args=None if from_shell else argv,
    )


def build_cli(args: list[str]) -> MoSEARCLI:
    """Parse ``args`` (``--config ...`` and overrides, no subcommand) and build the model and
    data module without running anything (the ``export`` command uses this)."""
    return MoSEARCLI(
        **CLI_OPTIONS,
        parser_kwargs={"parser_mode": "omegaconf+", **STRICT_PARSER},
        args=args,
        run=False,
    )

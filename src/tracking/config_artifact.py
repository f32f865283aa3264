"""Stores the full resolved LightningCLI config in the MLflow run (as an artifact)."""

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from src.tracking.artifacts import mlflow_logger
from src.tracking.run_metadata import flatten_config


class LogConfigToMLflow(SaveConfigCallback):
    """Logs ``config.yaml`` to the MLflow run instead of the logger's log_dir, and the same
    config flattened as the run's params.

    Lightning's stock callback writes into ``trainer.log_dir``, which an sqlite-backed MLflow
    logger does not have; this subclass sends the same resolved config to the run. Called on rank
    zero only.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every rank learns the run id (rank zero opened the run before the workers started).
        logger = mlflow_logger(trainer)
        if logger is not None and hasattr(logger, "share_run_id"):
            logger.share_run_id(trainer.strategy)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        text = self.parser.dump(self.config, skip_none=False)
        self.config_text = text  # also the logged model's config (model_logging)
        name = self.config_filename
        if getattr(logger, "resumed", False):
            # The interrupted run's config stays; the resumed one (possibly with moved data
            # paths or more epochs) is kept beside it.
            stem, _, suffix = name.rpartition(".")
            name = f"{stem}.resumed-step{logger.resumed_step}.{suffix}"
        logger.experiment.log_text(logger.run_id, text, name)
        # The run's params: the same resolved config, flattened (src/tracking/run_metadata.py);
        # a resumed run keeps its params, changed values become tags (mlflow_logger).
        if hasattr(logger, "log_config_params"):
            logger.log_config_params(flatten_config(self.config))


def logged_config_text(trainer: L.Trainer) -> str | None:
    """The ``config.yaml`` text the trainer's :class:`LogConfigToMLflow` logged, if any."""
    for callback in trainer.callbacks:
        if isinstance(callback, LogConfigToMLflow):
            return getattr(callback, "config_text", None)
    return None

"""Stores the full resolved LightningCLI config in the MLflow run (as an artifact)."""

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from src.tracking.artifacts import mlflow_logger


class LogConfigToMLflow(SaveConfigCallback):
    """Logs ``config.yaml`` to the MLflow run instead of the logger's log_dir.

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
        name = self.config_filename
        if getattr(logger, "resumed", False):
            # The interrupted run's config stays; the resumed one (possibly with moved data
            # paths or more epochs) is kept beside it.
            stem, _, suffix = name.rpartition(".")
            name = f"{stem}.resumed-step{logger.resumed_step}.{suffix}"
        logger.experiment.log_text(logger.run_id, text, name)

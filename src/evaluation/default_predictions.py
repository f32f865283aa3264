"""The predictions CSV ``predict`` writes when the config names no prediction writer."""

import secrets
import time
from pathlib import Path

import lightning.pytorch as pl

from src.evaluation.prediction_writer import PredictionCSVWriter


class NewPredictionCSVWriter(PredictionCSVWriter):
    """A :class:`PredictionCSVWriter` into a new file ``<folder>/predictions-<time>-<hex>.csv``.

    Rank zero picks the name when the run starts and tells the other ranks, so every rank
    writes its part for the same file; an existing file is never chosen (never overwritten).

    Args:
        folder: Where the file goes (created if missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        super().__init__(output=self.folder / "predictions.csv")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = None
        if trainer.is_global_zero:
            while name is None or (self.folder / name).exists():
                name = f"predictions-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}.csv"
        self.output = self.folder / trainer.strategy.broadcast(name, src=0)


def add_default_prediction_writer(
    trainer: pl.Trainer, folder: str | Path | None = None
) -> NewPredictionCSVWriter | None:
    """Append a :class:`NewPredictionCSVWriter` (into ``folder``, default
    ``<default_root_dir>/predictions``) unless the trainer has a prediction writer already."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    if any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
        return None
    writer = NewPredictionCSVWriter(folder or Path(trainer.default_root_dir) / "predictions")
    trainer.callbacks.append(writer)
    return writer


def log_predictions(trainer: pl.Trainer, writer: NewPredictionCSVWriter | None) -> None:
    """Log the files ``writer`` wrote as artifacts ``predictions/`` of the trainer's MLflow run."""
    from src.tracking.artifacts import mlflow_logger

    logger = mlflow_logger(trainer)
    if writer is None or logger is None or not trainer.is_global_zero or logger.run_id is None:
        return
    for path in writer.written:
        logger.experiment.log_artifact(logger.run_id, str(path), "predictions")

"""Logging figures and tables as MLflow artifacts from Lightning code (rank zero only)."""

import csv
import io
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from src.io.atomic import atomic_open, atomic_write_text


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    """The trainer's MLflow logger, if it has one."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger
    return None


@rank_zero_only
def log_figure(trainer: L.Trainer, figure: Any, name: str) -> str:
    """Log a matplotlib figure as an MLflow artifact (or save it under ``default_root_dir``).

    Returns where it went (``mlflow:<run id>/<name>`` or a file path). Closes the figure.
    """
    import matplotlib.pyplot as plt

    logger = mlflow_logger(trainer)
    try:
        if logger is not None:
            logger.experiment.log_figure(logger.run_id, figure, name)
            return f"mlflow:{logger.run_id}/{name}"
        path = Path(trainer.default_root_dir) / name
        with atomic_open(path, "wb") as f:
            figure.savefig(f, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
        return str(path)
    finally:
        plt.close(figure)


@rank_zero_only
def log_rows(trainer: L.Trainer, rows: list[dict[str, Any]], name: str) -> str | None:
    """Log rows of dicts as a CSV artifact (or a file under ``default_root_dir``)."""
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    logger = mlflow_logger(trainer)
    if logger is not None:
        logger.experiment.log_text(logger.run_id, buffer.getvalue(), name)
        return f"mlflow:{logger.run_id}/{name}"
    path = Path(trainer.default_root_dir) / name
    with atomic_open(path, "w") as f:
        f.write(buffer.getvalue())
    return str(path)


@rank_zero_only
def log_dict(trainer: L.Trainer, data: dict[str, Any], name: str) -> str:
    """Log a JSON-serialisable dict as a JSON artifact (or a file under ``default_root_dir``)."""
    logger = mlflow_logger(trainer)
    if logger is not None:
        logger.experiment.log_dict(logger.run_id, data, name)
        return f"mlflow:{logger.run_id}/{name}"
    path = Path(trainer.default_root_dir) / name
    atomic_write_text(path, json.dumps(data, indent=2))
    return str(path)

"""What the CLI prints: library chatter kept quiet, and where a run's results are at the end."""

import shlex
import sys
from typing import Any

#: Loggers whose INFO lines (device summary, "Seed set", adverts, store creation) are hidden
#: unless ``--lightning_verbose true``; warnings still show.
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "mlflow", "alembic")


def ui_hint(tracking_uri: str, experiment_id: str | None, run_id: str) -> str:
    """A command (or URL) that opens the run, working after the README's install: the MLflow
    of this Python (``<python> -m mlflow ui``), not an ``mlflow`` that may not be on PATH."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    python = shlex.quote(sys.executable)
    uri = shlex.quote(tracking_uri)
    return f"{python} -m mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def announce(trainer: Any, logged: dict[str, str] | None = None, predictions: Any = None) -> None:
    """Print (rank zero) the predictions file, the MLflow run and how to open it."""
    from src.tracking.artifacts import mlflow_logger

    if not trainer.is_global_zero:
        return
    lines = []
    for path in getattr(predictions, "written", None) or []:
        lines.append(f"predictions: {path}")
    logger = mlflow_logger(trainer)
    if logger is not None and logger.run_id is not None:
        uri = logger.experiment.tracking_uri
        run = logger.experiment.get_run(logger.run_id)
        lines.append(
            f"MLflow run {run.info.run_name!r} ({logger.run_id}, experiment "
            f"{logger._experiment_name!r}) in {uri}"
        )
        for key, value in (logged or {}).items():
            lines.append(f"  {key + ':':<12} {value}")
        lines.append(f"  open the UI:  {ui_hint(uri, run.info.experiment_id, logger.run_id)}")
    if lines:
        print("\n".join(lines))

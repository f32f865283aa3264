"""MLflow logging with an sqlite store by default (recent MLflow refuses the plain file store)."""

import os
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_MLFLOW_DIR = "mlruns"


def default_tracking_uri(directory: str | Path = DEFAULT_MLFLOW_DIR) -> str:
    """``sqlite:///<abs dir>/mlflow.db``, creating the folder."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


class MosearMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger with defaults that work offline on a laptop and on a cluster.

    Args:
        experiment_name: MLflow experiment.
        run_name: MLflow run name.
        tracking_uri: Tracking URI; default ``$MLFLOW_TRACKING_URI`` or an sqlite database in
            ``save_dir`` (``sqlite:///<save_dir>/mlflow.db``).
        save_dir: Folder for the default sqlite store and artifacts.
        artifact_location: Artifact root of a new experiment; default ``<save_dir>/artifacts``.
        tags: Run tags (for example ``method: mosear``, ``seed: 0``) used by ``compare``.
        log_model: Lightning's option to upload checkpoints as artifacts.
        run_id: Resume logging into this existing run.
    """

    def __init__(
        self,
        experiment_name: str = "mosear",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        save_dir: str = DEFAULT_MLFLOW_DIR,
        artifact_location: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = False,
        run_id: str | None = None,
    ) -> None:
        tracking_uri = (
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(save_dir)
        )
        if artifact_location is None and tracking_uri.startswith("sqlite:"):
            artifact_dir = Path(save_dir).resolve() / "artifacts"
            artifact_dir.mkdir(parents=True, exist_ok=True)
            artifact_location = artifact_dir.as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags={str(k): str(v) for k, v in (tags or {}).items()} or None,
            save_dir=save_dir,
            log_model=log_model,
            artifact_location=artifact_location,
            run_id=run_id,
        )

    @property
    def tracking_uri(self) -> str:
        """The tracking URI this logger writes to."""
        return self._tracking_uri

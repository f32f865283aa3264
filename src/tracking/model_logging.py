"""After ``fit``: the best checkpoint, and the trainable weights as an MLflow 3 logged model.

:func:`log_best_model` (rank zero, called by the CLI after fit) logs

- the best checkpoint (by the checkpoint callback's monitor) as the run artifact
  ``checkpoints/<file>`` (so ``--ckpt_path runs:/<run id>/checkpoints/<file>`` works);
- an MLflow logged model named ``model`` (a pyfunc, see ``pyfunc_model``) whose artifacts are that
  checkpoint and the run's resolved ``config.yaml``; ``mlflow.register_model`` accepts it
  (``models:/<model id>``) and ``--ckpt_path models:/<name>/<version>`` reads its checkpoint;
- optionally registers it as a new version of ``register_as``.

Everything goes through :class:`mlflow.MlflowClient` on the logger's own tracking URI, so no
global MLflow state (active run, tracking URI) is touched.
"""

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME = "model"
REQUIREMENTS = ("torch", "lightning", "transformers", "peft", "mlflow", "jsonargparse", "pandas")


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _requirements() -> list[str]:
    pins = []
    for package in REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_best_model(
    logger: Any, checkpoint: str | Path, config_text: str, register_as: str | None = None
) -> dict[str, str]:
    """Log ``checkpoint`` and the logged model into ``logger``'s run; returns the URIs made
    (``checkpoint``: ``runs:/...``, ``model``: ``models:/<model id>``, ``registered``:
    ``models:/<name>/<version>`` when registered)."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    client: mlflow.MlflowClient = logger.experiment
    run_id = logger.run_id
    checkpoint = Path(checkpoint)
    client.log_artifact(run_id, str(checkpoint), "checkpoints")
    uris = {"checkpoint": f"runs:/{run_id}/checkpoints/{checkpoint.name}"}
    experiment_id = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(config_text)
        folder = Path(tmp) / MODEL_NAME
        # A local copy: no per-file progress bar on the console. No input example on purpose:
        # MLflow would run predict (a whole predict command) on it to check it.
        with _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.pyfunc.save_model(
                path=str(folder),
                python_model=str(PYFUNC_FILE),
                artifacts={"checkpoint": str(checkpoint), "config": str(config)},
                pip_requirements=_requirements(),
                # Input: an optional `name` column selecting samples (see pyfunc_model).
                signature=ModelSignature(
                    inputs=Schema([ColSpec("string", "name", required=False)])
                ),
            )
        model = client.create_logged_model(
            experiment_id,
            name=MODEL_NAME,
            source_run_id=run_id,
            tags={"checkpoint": checkpoint.name},
        )
        client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    uris["model"] = f"models:/{model.model_id}"
    if register_as:
        try:
            client.get_registered_model(register_as)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(register_as)
        # The model's artifact location as the source: a `models:/<id>` source would make the
        # sqlite registry look the model up through MLflow's global tracking URI.
        registered = client.create_model_version(
            register_as, source=model.artifact_location, run_id=run_id, model_id=model.model_id
        )
        uris["registered"] = f"models:/{register_as}/{registered.version}"
    return uris


def best_checkpoint(trainer: Any) -> Path | None:
    """The best checkpoint of the trainer's (first) checkpoint callback, if it saved one."""
    path = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    return Path(path) if path and Path(path).is_file() else None


def log_best_checkpoint(
    trainer: Any, checkpoint: Path, config_text: str, register_as: str | None = None
) -> dict[str, str]:
    """:func:`log_best_model` into the trainer's MLflow run (rank zero; ``{}`` elsewhere or
    without an MLflow logger)."""
    from src.tracking.artifacts import mlflow_logger

    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero or logger.run_id is None:
        return {}
    return log_best_model(logger, checkpoint, config_text, register_as)

"""``--ckpt_path runs:/<run id>/<path>`` and ``models:/<name>/<version>``: fetch, then load locally.

The checkpoint is downloaded with MLflow's artifact API into a cache folder
(``<default_root_dir>/mlflow_downloads/<scheme>/<...>``, reused when already there) and then
loaded weights-only like any local checkpoint; nothing of the download is imported or run. A
``models:/`` URI names a registered model version (or ``models:/<model id>``, an MLflow 3 logged
model) logged by the CLI: its folder holds exactly one ``.ckpt`` (see ``model_logging``).
"""

import re
from pathlib import Path
from typing import Any

from src.core.errors import InvalidInputError, MissingInputError

URI_SCHEMES = ("runs:/", "models:/")


def is_mlflow_uri(value: object) -> bool:
    """Whether ``value`` is a ``runs:/`` or ``models:/`` URI."""
    return isinstance(value, str) and value.startswith(URI_SCHEMES)


def cache_folder(uri: str, root: str | Path) -> Path:
    """The download folder of ``uri`` under ``root`` (one folder per URI, safe names only)."""
    scheme, rest = uri.split(":/", 1)
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in rest.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidInputError(f"--ckpt_path {uri}: not a usable MLflow URI")
    return Path(root) / "mlflow_downloads" / scheme / Path(*parts)


def _single_checkpoint(folder: Path, uri: str) -> Path:
    found = sorted(p for p in folder.rglob("*.ckpt") if p.is_file())
    if len(found) != 1:
        raise MissingInputError(
            f"--ckpt_path {uri}: expected exactly one .ckpt in the downloaded artifacts "
            f"({folder}), found {len(found)}; name the file (runs:/<id>/<path>.ckpt)"
        )
    return found[0]


def download_checkpoint(uri: str, root: str | Path, tracking_uri: str) -> Path:
    """The local checkpoint file for an MLflow ``uri``, downloaded on first use.

    Raises:
        MissingInputError: The URI names no artifact, or its folder holds no single ``.ckpt``
            (a user error: one line, exit 2).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    folder = cache_folder(uri, root)
    if folder.is_dir() and any(folder.rglob("*.ckpt")):
        return _single_checkpoint(folder, uri)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(folder), tracking_uri=tracking_uri
            )
        )
    except (MlflowException, OSError) as err:
        message = getattr(err, "message", str(err))
        raise MissingInputError(
            f"--ckpt_path {uri}: cannot download it from {tracking_uri} ({message})"
        ) from None
    return local if local.is_file() else _single_checkpoint(local, uri)


def fetch_mlflow_checkpoint(config: Any) -> str | None:
    """Replace an MLflow URI ``ckpt_path`` of a parsed LightningCLI config by the downloaded
    file, in place; returns the ``ckpt_path`` as the user gave it (``None`` without one)."""
    subcommand = config.get("subcommand")
    settings = config.get(subcommand) if subcommand else None
    if settings is None or settings.get("ckpt_path") is None:
        return None
    given = str(settings["ckpt_path"])
    if is_mlflow_uri(given):
        from src.tracking.mlflow_logger import DEFAULT_MLFLOW_DIR, resolve_tracking_uri

        trainer = settings.get("trainer") or {}
        logger = trainer.get("logger")
        args = (logger.get("init_args") if hasattr(logger, "get") else None) or {}
        tracking_uri = resolve_tracking_uri(
            args.get("tracking_uri"), args.get("save_dir") or DEFAULT_MLFLOW_DIR
        )
        root = trainer.get("default_root_dir") or "."
        settings["ckpt_path"] = str(download_checkpoint(given, root, tracking_uri))
    return given

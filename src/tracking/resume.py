"""``fit --ckpt_path last``: find the checkpoint and log the resumed training to the same run.

The MLflow logger puts checkpoints under ``<default_root_dir>/<experiment id>/<run id>/``, so
Lightning's own ``ckpt_path="last"`` only looks in the folder of the run the logger is in, and a
restarted process is in a new run: Lightning then warns and trains from scratch. Each checkpoint
therefore carries its run id (``checkpoint["mlflow_run_id"]``, written by the module). Right
after parsing, :func:`resolve_config_checkpoint` turns ``last`` into the newest ``last.ckpt``
under ``default_root_dir`` and loads the checkpoint weights-only (a crafted pickle is refused
with a clear message before anything is built); before ``fit``, :func:`resume_logging` points
the logger at the checkpoint's run.
"""

import os
from pathlib import Path
from typing import Any

import lightning as L

from src.io.checkpoint_io import RUN_ID_KEY, load_checkpoint_safely, resolve_checkpoint_path
from src.tracking.artifacts import mlflow_logger


def resolve_config_checkpoint(config: Any) -> str | None:
    """Resolve and check the ``ckpt_path`` of a parsed LightningCLI config, in place.

    Args:
        config: The parsed config (``config[subcommand].ckpt_path``, ``.trainer``).

    Returns:
        The MLflow run id stored in the checkpoint, if any.

    Raises:
        FileNotFoundError: ``last`` with no ``last.ckpt`` under ``default_root_dir``, or a path
            that does not exist.
        UnsafeCheckpointError: The file holds pickled objects that could run code.
        CorruptCheckpointError: The file is empty, truncated or not a checkpoint.
    """
    subcommand = config.get("subcommand")
    if not subcommand or config[subcommand].get("ckpt_path") is None:
        return None
    settings = config[subcommand]
    root = settings.get("trainer") and settings["trainer"].get("default_root_dir")
    path = resolve_checkpoint_path(settings["ckpt_path"], root or os.getcwd())
    if not isinstance(path, Path):
        return None  # "best", "hpc", "registry:...": Lightning resolves them
    settings["ckpt_path"] = str(path)
    run_id = load_checkpoint_safely(path, mmap=True).get(RUN_ID_KEY)
    return str(run_id) if run_id else None


def resume_logging(trainer: L.Trainer, run_id: str | None) -> None:
    """Make the trainer's MLflow logger log into ``run_id`` (no-op without either), then open
    the run in this process (see :meth:`MoSEARMLFlowLogger.start_run`)."""
    logger = mlflow_logger(trainer)
    if run_id and logger is not None and hasattr(logger, "resume"):
        logger.resume(run_id)
    if logger is not None and hasattr(logger, "start_run"):
        logger.start_run()

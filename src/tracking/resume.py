"""``fit --ckpt_path last``: find this experiment's checkpoint and log the resumed training.

The MLflow logger puts checkpoints under ``<default_root_dir>/<experiment id>/<run id>/``, so
Lightning's own ``ckpt_path="last"`` only looks in the folder of the run the logger is in, and a
restarted process is in a new run: Lightning then warns and trains from scratch. Each checkpoint
therefore carries its run id (``checkpoint["mlflow_run_id"]``, written by the module) and the
identity of its experiment (``checkpoint["mosear_identity"]``: the MLflow experiment name and a
hash of the model config, the data module class and the seed; written by :class:`RunIdentity`).
Right after parsing, :func:`resolve_config_checkpoint` turns ``last`` into the newest
``last.ckpt`` under ``default_root_dir`` *of the same identity* (configs share the folder) and
loads it weights-only (a crafted pickle is refused before anything is built); before ``fit``,
:func:`resume_logging` points the logger at the checkpoint's run, unless that run is finished
(see :meth:`MoSEARMLFlowLogger.resume`).
"""

import hashlib
import json
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from src.io.checkpoint_io import (
    IDENTITY_KEY,
    RUN_ID_KEY,
    load_checkpoint_safely,
    resolve_checkpoint_path,
)
from src.tracking.artifacts import mlflow_logger

UNTRAINED_TAG = "mosear.untrained"
# Linked from the data module at instantiation (paths may move between runs of one experiment).
_LINK_TARGETS = ("tokenizer", "labels", "streams")


def _plain(value: Any) -> Any:
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else value


def _experiment_name(logger: Any) -> str | None:
    for entry in logger if isinstance(logger, list) else [logger]:
        args = getattr(entry, "get", lambda *_: None)("init_args")
        if args is not None and args.get("experiment_name") is not None:
            return str(args.get("experiment_name"))
    return None


def config_identity(config: Any) -> dict[str, str] | None:
    """``{"experiment": <MLflow experiment name>, "config": <hash>}`` of a parsed config.

    The hash covers the model (class and init arguments, without the paths linked from the
    data module), the method's adapter, the data module class and ``seed_everything``; the
    trainer settings (``max_epochs``, devices) and data paths may change between the runs of
    one experiment.
    """
    subcommand = config.get("subcommand")
    settings = config[subcommand] if subcommand else config
    if settings is None or settings.get("model") is None:
        return None
    model = _plain(settings["model"])
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        model = {**model, "init_args": dict(model["init_args"])}
        for key in _LINK_TARGETS:
            model["init_args"].pop(key, None)
    data = settings.get("data")
    method = settings.get("method")
    payload = {
        "model": model,
        # The adapter sits in the method group until it is placed into the model.
        "adapter": _plain(method.get("adapter")) if method is not None else None,
        "data": data.get("class_path") if data is not None else None,
        "seed": settings.get("seed_everything"),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    trainer = settings.get("trainer")
    return {
        "experiment": _experiment_name(trainer.get("logger") if trainer is not None else None),
        "config": hashlib.sha256(text.encode()).hexdigest()[:16],
    }


class RunIdentity(Callback):
    """Writes the experiment identity into every checkpoint (``checkpoint["mosear_identity"]``).

    Args:
        identity: From :func:`config_identity`.
    """

    def __init__(self, identity: dict[str, str] | None) -> None:
        self.identity = identity

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.identity is not None:
            checkpoint[IDENTITY_KEY] = dict(self.identity)


def resolve_config_checkpoint(config: Any, identity: dict[str, str] | None = None) -> str | None:
    """Resolve and check the ``ckpt_path`` of a parsed LightningCLI config, in place.

    Args:
        config: The parsed config (``config[subcommand].ckpt_path``, ``.trainer``).
        identity: With ``last``: take the newest checkpoint of this identity only.

    Returns:
        The MLflow run id stored in the checkpoint, if any.

    Raises:
        MissingInputError: ``last`` with no ``last.ckpt`` of this experiment under
            ``default_root_dir``, or a path that does not exist.
        UnsafeCheckpointError: The file holds pickled objects that could run code.
        CorruptCheckpointError: The file is empty, truncated or not a checkpoint.
    """
    subcommand = config.get("subcommand")
    if not subcommand or config[subcommand].get("ckpt_path") is None:
        return None
    settings = config[subcommand]
    root = settings.get("trainer") and settings["trainer"].get("default_root_dir")
    path = resolve_checkpoint_path(settings["ckpt_path"], root or os.getcwd(), identity)
    if not isinstance(path, os.PathLike):
        return None  # "best", "hpc", "registry:...": Lightning resolves them
    settings["ckpt_path"] = str(path)
    run_id = load_checkpoint_safely(path, mmap=True).get(RUN_ID_KEY)
    return str(run_id) if run_id else None


def resume_logging(trainer: L.Trainer, run_id: str | None, ckpt_path: str | None = None) -> None:
    """Make the trainer's MLflow logger log into ``run_id`` (no-op without either), then open
    the run in this process (see :meth:`MoSEARMLFlowLogger.start_run`). ``ckpt_path`` gives
    the step the run resumes from (its metrics up to there are not logged again)."""
    logger = mlflow_logger(trainer)
    if run_id and logger is not None and hasattr(logger, "resume"):
        step = None
        if ckpt_path and os.path.isfile(ckpt_path):
            step = load_checkpoint_safely(ckpt_path, mmap=True).get("global_step")
        logger.resume(run_id, step=step)
    if logger is not None and hasattr(logger, "start_run"):
        logger.start_run()


@rank_zero_only
def mark_untrained(trainer: L.Trainer) -> None:
    """Tag the run ``mosear.untrained=true`` (evaluated with weights that were never trained)."""
    rank_zero_warn(
        "evaluating an untrained model (--allow_untrained true): the metrics are those of "
        f"random adapters and projectors; the run is tagged {UNTRAINED_TAG}=true"
    )
    logger = mlflow_logger(trainer)
    if logger is not None and logger.run_id is not None:
        logger.experiment.set_tag(logger.run_id, UNTRAINED_TAG, "true")

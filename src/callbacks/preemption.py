"""SIGTERM (a cluster's pre-emption): write a resumable checkpoint, then exit non-zero.

Lightning's signal connector turns SIGTERM into ``trainer.received_sigterm``; the loops then
raise :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException` (a ``SystemExit``
with status 0) after the current batch, and nothing is saved. This callback saves
``last.ckpt`` in the run's checkpoint folder from ``on_exception``, so ``fit --ckpt_path last``
continues from the interrupted step; ``src.cli.main`` then exits with :data:`PREEMPTED_EXIT`.
"""

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: 128 + SIGTERM, what a shell reports for a process ended by SIGTERM.
PREEMPTED_EXIT = 143
_saved: dict[str, str] = {}


def preempted_message() -> str:
    """The one line printed when a fit stopped on SIGTERM."""
    where = _saved.get("path")
    if where is None:
        return "stopped by SIGTERM before a resumable checkpoint could be written"
    return (
        f"stopped by SIGTERM at global step {_saved['step']}; resumable checkpoint {where} "
        "(continue with the same command and --ckpt_path last)"
    )


class CheckpointOnSigterm(Callback):
    """On SIGTERM during fit, save ``<checkpoint folder>/<filename>.ckpt`` (resumable).

    Args:
        filename: Checkpoint name without suffix; ``last`` is what ``--ckpt_path last`` finds.
    """

    def __init__(self, filename: str = "last") -> None:
        self.filename = filename

    def _folder(self, trainer: L.Trainer) -> Path:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self._folder(trainer) / f"{self.filename}.ckpt"
        trainer.save_checkpoint(path)  # a collective under DDP; atomic via SafeCheckpointIO
        _saved.update(path=str(path), step=str(trainer.global_step))
        rank_zero_info(f"SIGTERM: saved a resumable checkpoint {path}")

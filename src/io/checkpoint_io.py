"""Checkpoint files: loaded without running code, written atomically, ``last`` found on disk.

A Lightning checkpoint is a pickle. Unpickling an arbitrary object can run arbitrary code, so
every checkpoint is loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings and
plain containers only. A file holding anything else is refused with
:class:`UnsafeCheckpointError`, naming the file and the offending object; a truncated or corrupt
file gets :class:`CorruptCheckpointError`.

:class:`SafeCheckpointIO` is the trainer's checkpoint plugin (the CLI installs it in place of
Lightning's default): it loads that way whatever ``weights_only`` the caller asked for, and
saves through a temporary file in the target's folder renamed over the target, so a kill during
the save leaves the previous checkpoint whole.
"""

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.core.errors import MissingInputError, UserError
from src.io.atomic import atomic_open

#: The checkpoint key holding the MLflow run id it was trained in (resume logs into that run).
RUN_ID_KEY = "mlflow_run_id"

#: Names ModelCheckpoint gives its "last" checkpoint (``last.ckpt``, ``last-v1.ckpt``, ...).
LAST_CHECKPOINT = re.compile(r"last(-v\d+)?\.ckpt")

# Boilerplate lines of torch's weights-only error, left out of our message.
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


class UnsafeCheckpointError(pickle.UnpicklingError, UserError):
    """A checkpoint holds pickled objects other than tensors and plain containers."""


class CorruptCheckpointError(UserError, ValueError):
    """A checkpoint file is empty, truncated or not a checkpoint at all."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's tensors do not fit the model (another architecture or config)."""


def _is_local(path: Any) -> bool:
    return get_protocol(str(path)) == "file"


def _torch_detail(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)]
    return " ".join(kept) or type(err).__name__


def load_checkpoint_safely(
    path: str | Path, map_location: Any = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say why.

    Args:
        path: The checkpoint file.
        map_location: Where tensors go (see :func:`torch.load`).
        mmap: Map the file instead of reading it (a cheap look at a large checkpoint; ignored
            for files not in torch's zip format).

    Raises:
        FileNotFoundError: No such file.
        UnsafeCheckpointError: The file holds objects that unpickling would have to construct
            by running code (e.g. a crafted ``__reduce__``), or is not a weights-only pickle.
        CorruptCheckpointError: Empty, truncated or garbled file, or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{path}: the checkpoint file is empty (0 bytes)")
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load this checkpoint: it holds pickled objects other than "
            f"tensors and plain containers ({_torch_detail(err)}). Loading such a file can run "
            "arbitrary code, so checkpoints are only ever read with weights_only=True. If you "
            "made the file yourself, re-save its tensors as a plain state dict."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CorruptCheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {_torch_detail(err)}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(
            f"{path}: a checkpoint must hold a dict, found {type(checkpoint).__name__}"
        )
    return checkpoint


def check_checkpoint_fits(module: torch.nn.Module, path: str | Path) -> None:
    """Check, before Lightning loads it, that the checkpoint's ``state_dict`` holds tensors of
    the module's shapes; the error names the file, the key and both shapes.

    Keys the module does not have are left to the module (``strict_loading``), as are keys it
    needs but the checkpoint lacks (``on_load_checkpoint``).
    """
    checkpoint = load_checkpoint_safely(path, mmap=True)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: field 'state_dict' is missing or not a dict")
    own = module.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                f"{path}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor"
            )
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointMismatchError(
                f"{path}: state_dict[{key!r}] has shape {tuple(value.shape)} but the model's is "
                f"{tuple(own[key].shape)}: the checkpoint was made with another model config "
                "(adapter rank, projector, streams, backbone size?)"
            )


#: Key of the experiment identity in a checkpoint (``{"experiment": ..., "config": ...}``).
IDENTITY_KEY = "mosear_identity"


def find_last_checkpoint(root: str | Path, identity: dict[str, Any] | None = None) -> Path:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) under ``root`` by mtime; with
    ``identity``, the newest one whose ``checkpoint["mosear_identity"]`` equals it (configs
    share ``default_root_dir``: another experiment's checkpoint is never taken).

    Raises :class:`~src.core.errors.MissingInputError` saying where it looked when there is none.
    """
    root = Path(root)
    found = [p for p in root.rglob("*.ckpt") if LAST_CHECKPOINT.fullmatch(p.name) and p.is_file()]
    if not found:
        raise MissingInputError(
            f"--ckpt_path last: no last.ckpt under trainer.default_root_dir={root} (is "
            "ModelCheckpoint(save_last=True) configured, and is default_root_dir the folder of "
            "the run to resume?); give the checkpoint file instead"
        )
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if identity is None:
        return found[0]
    for path in found:
        try:
            stored = load_checkpoint_safely(path, mmap=True).get(IDENTITY_KEY)
        except (UnsafeCheckpointError, CorruptCheckpointError):
            continue  # not ours to resume; never loaded beyond weights-only
        if stored == identity:
            return path
    raise MissingInputError(
        f"--ckpt_path last: none of the {len(found)} last checkpoint(s) under "
        f"trainer.default_root_dir={root} belongs to experiment {identity.get('experiment')!r} "
        f"with this config (identity {identity.get('config')}; newest is {found[0]}): give "
        "the checkpoint file instead"
    )


def resolve_checkpoint_path(
    ckpt_path: str | Path, root: str | Path, identity: dict[str, Any] | None = None
) -> Path | str:
    """``last`` -> :func:`find_last_checkpoint`; a file path is checked to exist; other special
    values of Lightning (``best``, ``hpc``, ``registry``) are returned unchanged."""
    if ckpt_path == "last":
        return find_last_checkpoint(root, identity)
    if str(ckpt_path) in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return ckpt_path
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingInputError(f"--ckpt_path: checkpoint not found: {path}")
    return path


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, loading weights-only and saving atomically."""

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local(path):
            # Remote files: Lightning's loader, still restricted to weights.
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        location = map_location if map_location is not None else "cpu"
        return load_checkpoint_safely(path, location)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        # A temporary file beside the target (same file system), renamed over it: readers and a
        # resumed run see the previous checkpoint or the new one, never half of one. Its mode
        # follows the umask, as a plain open() would.
        with atomic_open(path, "wb") as handle:
            torch.save(checkpoint, handle)


def use_safe_checkpoint_io(strategy: Any) -> None:
    """Make ``strategy`` (a trainer's) load and save through :class:`SafeCheckpointIO`.

    Only Lightning's default :class:`TorchCheckpointIO` is replaced (also inside a wrapping IO
    such as ``AsyncCheckpointIO``); a custom plugin chosen by the user is left alone.
    """
    io = strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
    elif type(getattr(io, "checkpoint_io", None)) is TorchCheckpointIO:
        io.checkpoint_io = SafeCheckpointIO()

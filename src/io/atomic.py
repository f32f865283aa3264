"""Atomic file writes: a reader never sees a half-written file, even if the writer dies.

The temporary file is created the way a plain ``open(path, "w")`` creates a file, so the
process's umask applies (``tempfile.mkstemp`` would make every file mode 0600, unreadable for the
group that shares a data set or a feature store); a file that is replaced keeps its mode.
"""

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# What open() asks the kernel for; the umask then takes its bits away.
_CREATE_MODE = 0o666


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty ``.<name>.<random>.tmp`` beside ``path`` (created exclusively), open."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, _CREATE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def _keep_mode(fd: int, path: Path) -> None:
    """Give the temporary file (open as ``fd``) the mode of the file it will replace."""
    try:
        os.chmod(fd, stat.S_IMODE(os.stat(path).st_mode))
    except FileNotFoundError:
        pass  # a new file: the umask decided


@contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", *, fsync: bool = True, **kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    A new file gets the mode ``open()`` would give it (``0o666`` minus the umask); a replaced
    file keeps its mode.

    Args:
        path: Final destination; its parent directory is created if needed.
        mode: ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``.
        fsync: Flush the file to disk before the rename. ``False`` only for a writer of many
            files that syncs them all at once (:func:`sync_all`) before it writes the marker
            that says they are complete: the rename is still atomic for readers.
        **kwargs: Passed to :func:`open` (e.g. ``newline=""`` for CSV).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    # Same directory as the target, so os.replace is a rename on one file system.
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            _keep_mode(handle.fileno(), path)
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_all() -> None:
    """Flush every file written so far to disk: one call instead of an fsync per file, for a
    writer of thousands of small files (``atomic_open(..., fsync=False)``) before it writes
    the file that marks them complete."""
    if hasattr(os, "sync"):
        os.sync()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_create_text(path: str | Path, text: str) -> bool:
    """Write ``text`` to ``path`` only if ``path`` does not exist, atomically; ``False`` when it
    existed (another process may have created it first: the file is never replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # fails if path exists: an exclusive, complete create
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)

"""Sample names from annotation files become file paths: they must never leave the data root.

A manifest or label file from someone else could name a sample ``../../home/me/.ssh/id_rsa`` or
``/etc/passwd``. Names are checked lexically where they are read (a name is one plain path
component) and again where they become paths (the resolved file must stay inside its folder, so
a symlinked *file* pointing elsewhere is refused; a symlinked *folder* set up by the user, e.g. a
feature folder on shared storage, is followed as usual).
"""

from pathlib import Path, PurePosixPath, PureWindowsPath


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` cannot be used as a sample name inside a folder, or ``None`` when it can.

    A safe name is a single path component: no ``/`` or ``\\``, not ``.`` or ``..``, not an
    absolute or drive path, no NUL or other control character.
    """
    if not name:
        return "empty name"
    if any(ord(c) < 32 for c in name):
        return f"name {name!r} contains a control character"
    if "/" in name or "\\" in name:
        return f"name {name!r} contains a path separator: it could point outside the data root"
    if name in (".", ".."):
        return f"name {name!r} is a relative folder reference, not a sample name"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"name {name!r} is an absolute path"
    return None


def path_inside(folder: str | Path, file_name: str) -> tuple[Path, str | None]:
    """``(folder / file_name, problem)``: ``problem`` says why the file escapes ``folder``.

    ``file_name`` must pass :func:`unsafe_name_reason`; when the joined path exists, its real
    location (symlinks resolved) must lie inside the real location of ``folder``.
    """
    folder = Path(folder)
    path = folder / file_name
    reason = unsafe_name_reason(file_name)
    if reason is not None:
        return path, reason
    try:
        # Only a symlink can lead elsewhere: a plain file named by one safe component lies in
        # the real folder by construction (resolving both paths of every feature file, as
        # this once did, was half of the demo's data loading).
        if path.is_symlink():
            real, real_folder = path.resolve(), folder.resolve()
            if not real.is_relative_to(real_folder):
                return (
                    path,
                    f"resolves to {real}, outside {real_folder} (symlink out of the data root)",
                )
    except OSError as err:  # e.g. a name longer than the file system allows
        return path, f"not usable as a file name ({err.strerror or err})"
    return path, None

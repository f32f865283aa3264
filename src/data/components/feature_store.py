"""Reads per-sample features in the Emotion-LLaMA layout: ``<root>/<dir>/<name>.npy``.

A pooled stream stores a ``(dim,)`` vector per sample, a sequence stream a ``(tokens, dim)``
array (one row per LLM token).
"""

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from src.core.errors import UserError
from src.core.streams import StreamSpec
from src.io.safe_paths import path_inside, unsafe_name_reason

# Every .npz is a zip archive; np.load would hand back a lazy archive instead of an array.
_ZIP_MAGIC = b"PK\x03\x04"


class FeatureFileError(UserError, ValueError):
    """A feature file is missing or unusable; the message names the file and the field."""

    def __init__(self, path: Path, field: str, reason: str) -> None:
        super().__init__(f"{path}: {field}: {reason}")
        self.path = path
        self.field = field
        self.reason = reason


class FeatureStore:
    """Loads and checks one ``.npy`` array per stream and sample.

    Args:
        root: Data root holding one folder per stream (``stream.feature_dir``).
        streams: The streams to read.
    """

    def __init__(self, root: str | Path, streams: list[StreamSpec]) -> None:
        self.root = Path(root)
        self.streams = list(streams)

    def path(self, stream: StreamSpec, name: str) -> Path:
        """Where the feature of ``name`` for ``stream`` lives; raises :class:`FeatureFileError`
        (field ``name``) when ``name`` would lead outside the stream's folder or cannot be a
        file name (too long for the file system, ...)."""
        path, problem = path_inside(self.root / stream.feature_dir, f"{name}.npy")
        problem = unsafe_name_reason(name) or problem  # the bare name: "..", "." are refused too
        if problem is not None:
            raise FeatureFileError(path, "name", problem)
        return path

    def load(self, name: str) -> dict[str, np.ndarray]:
        """All streams' features of sample ``name`` as float32 arrays of ``stream.shape``."""
        return {s.name: self.load_stream(s, name) for s in self.streams}

    def load_stream(self, stream: StreamSpec, name: str) -> np.ndarray:
        """One stream's vector of sample ``name``; raises :class:`FeatureFileError` when bad.

        The header is read and checked (format, dtype, shape, size against the file's size)
        before any data, so a file claiming a huge array costs nothing; finiteness is checked
        after the float32 cast, so a float64 beyond float32's range is refused, not ``inf``.
        """
        path = self.path(stream, name)
        field = f"feature {stream.name!r}"
        try:
            if not path.is_file():
                raise FeatureFileError(path, field, "file not found")
            with path.open("rb") as handle:
                array = _read_npy(handle, path, field, stream)
        except OSError as err:  # unreadable, or a name the file system refuses
            reason = f"cannot read the file ({err.strerror or err})"
            raise FeatureFileError(path, field, reason) from err
        with np.errstate(over="ignore", invalid="ignore"):
            vector = array.reshape(stream.shape).astype(np.float32)
        if not np.isfinite(vector).all():
            if np.isfinite(array).all():
                top = float(np.abs(array).max())
                reason = f"values beyond the float32 range (|x| up to {top:.3g}) become infinite"
            else:
                reason = "contains NaN or infinite values"
            raise FeatureFileError(path, field, reason)
        return vector


def _read_npy(handle: BinaryIO, path: Path, field: str, stream: StreamSpec) -> np.ndarray:
    """The array of an open ``.npy`` file, checked as a real array of ``stream.shape`` (a pooled
    stream's ``(dim,)`` vector may also be stored as ``(1, dim)``)."""
    size = os.fstat(handle.fileno()).st_size
    if handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
        raise FeatureFileError(path, field, "a .npz (zip) archive, not a .npy file")
    handle.seek(0)
    try:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, SyntaxError) as err:
        raise FeatureFileError(path, field, f"not a readable .npy file ({err})") from None
    if dtype.hasobject:
        raise FeatureFileError(path, field, "not a readable .npy file (holds Python objects)")
    if np.issubdtype(dtype, np.complexfloating):
        raise FeatureFileError(path, field, f"dtype {dtype} is complex, features are real")
    if not np.issubdtype(dtype, np.number):
        raise FeatureFileError(path, field, f"dtype {dtype} is not numeric")
    shape = tuple(shape)
    accepted = [stream.shape] if stream.sequence else [stream.shape, (1, *stream.shape)]
    if shape not in accepted:
        raise FeatureFileError(
            path, field, f"shape {shape} does not match the expected {stream.shape}"
        )
    need, have = int(np.prod(shape)) * dtype.itemsize, size - handle.tell()
    if have != need:
        raise FeatureFileError(
            path,
            field,
            f"not a readable .npy file (the header claims {need} data bytes, the file has {have})",
        )
    handle.seek(0)
    try:
        # allow_pickle=False: a feature file must never be able to run code.
        return npy_format.read_array(handle, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise FeatureFileError(path, field, f"not a readable .npy file ({err})") from None

"""Reads per-sample features in the Emotion-LLaMA layout: ``<root>/<dir>/<name>.npy``.

A pooled stream stores a ``(dim,)`` vector per sample, a sequence stream a ``(tokens, dim)``
array (one row per LLM token).
"""

from pathlib import Path

import numpy as np

from src.core.errors import UserError
from src.core.streams import StreamSpec
from src.io.safe_paths import path_inside, unsafe_name_reason


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
        (field ``name``) when ``name`` would lead outside the stream's folder."""
        path, problem = path_inside(self.root / stream.feature_dir, f"{name}.npy")
        problem = unsafe_name_reason(name) or problem  # the bare name: "..", "." are refused too
        if problem is not None:
            raise FeatureFileError(path, "name", problem)
        return path

    def load(self, name: str) -> dict[str, np.ndarray]:
        """All streams' features of sample ``name`` as float32 arrays of ``stream.shape``."""
        return {s.name: self.load_stream(s, name) for s in self.streams}

    def load_stream(self, stream: StreamSpec, name: str) -> np.ndarray:
        """One stream's vector of sample ``name``; raises :class:`FeatureFileError` when bad."""
        path = self.path(stream, name)
        field = f"feature {stream.name!r}"
        if not path.is_file():
            raise FeatureFileError(path, field, "file not found")
        try:
            # allow_pickle=False: a feature file must never be able to run code.
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise FeatureFileError(path, field, f"not a readable .npy file ({err})") from None
        if not np.issubdtype(array.dtype, np.number):
            raise FeatureFileError(path, field, f"dtype {array.dtype} is not numeric")
        if not stream.sequence and array.ndim == 2 and array.shape[0] == 1:
            array = array[0]  # (1, dim) is the same vector
        if array.shape != stream.shape:
            raise FeatureFileError(
                path, field, f"shape {array.shape} does not match the expected {stream.shape}"
            )
        if not np.isfinite(array).all():
            raise FeatureFileError(path, field, "contains NaN or infinite values")
        return array.astype(np.float32, copy=False)

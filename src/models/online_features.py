"""Online encoders: turn a batch's raw media into the features the projectors take.

A data module with ``source: media`` gives batches with ``frames`` (B, K, 3, S, S) and/or
``audio`` (B, n) + ``audio_lengths`` instead of stored ``features``; :func:`encode_media` runs
each stream's encoder so the rest of the model sees the same batch as with the feature store.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from src.core.modality import Modality
from src.core.streams import StreamSpec

MEDIA_KEYS: tuple[str, ...] = ("frames", "audio")


def has_media(batch: Mapping[str, Any]) -> bool:
    """Whether the batch carries raw media (decoded frames or audio)."""
    return any(key in batch for key in MEDIA_KEYS)


def encode_media(
    encoders: Mapping[str, nn.Module], streams: Sequence[StreamSpec], batch: dict[str, Any]
) -> dict[str, Any]:
    """``batch`` with ``features[stream]`` computed by ``encoders[stream]`` from raw media.

    Streams that already have features are left alone; an audio stream's encoder gets
    ``(audio, audio_lengths)``, a visual one ``frames``. A stream with neither features nor an
    encoder, missing media, or an encoder output that is not ``(B, *stream.shape)`` (a sequence
    stream needs an encoder configured with ``tokens``) is an error naming the stream.
    """
    if not has_media(batch):
        return batch
    features = dict(batch.get("features") or {})
    size = len(batch["names"])
    for stream in streams:
        if stream.name in features:
            continue
        encoder = encoders[stream.name] if stream.name in encoders else None
        if encoder is None:
            raise ValueError(
                f"stream {stream.name!r}: the batch has raw media but no stored features and the "
                f"model has no encoder for it (model.init_args.encoders.{stream.name})"
            )
        if stream.modality_id == Modality.AUDIO:
            if "audio" not in batch:
                raise ValueError(f"stream {stream.name!r}: its encoder needs 'audio' in the batch")
            out = encoder(batch["audio"], batch.get("audio_lengths"))
        else:
            if "frames" not in batch:
                raise ValueError(f"stream {stream.name!r}: its encoder needs 'frames' in the batch")
            out = encoder(batch["frames"])
        if tuple(out.shape) != (size, *stream.shape):
            raise ValueError(
                f"stream {stream.name!r}: encoder {type(encoder).__name__} gives "
                f"{tuple(out.shape)}, the stream needs {(size, *stream.shape)} (check dim, and "
                "the encoder's tokens for a sequence stream)"
            )
        features[stream.name] = out
    return {**batch, "features": features}

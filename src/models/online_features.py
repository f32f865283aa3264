"""Online encoders: turn a batch's raw media into the features the projectors take.

A data module with ``source: media`` gives batches with ``frames`` (B, K, 3, S, S) and/or
``audio`` (B, n) + ``audio_lengths`` instead of stored ``features``; :func:`encode_media` runs
each stream's encoder so the rest of the model sees the same batch as with the feature store.

An encoder may fill several streams from one forward (EVA-CLIP-g gives Emotion-LLaMA's patch and
CLS streams): it then has ``output_streams`` (the stream names, its key among them) and returns
``{stream: tensor}``; it is run once per batch and sits under one of those names.
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


def filled_streams(key: str, encoder: nn.Module) -> tuple[str, ...]:
    """The streams ``encoder`` (under ``key`` in the encoders mapping) fills."""
    names = tuple(getattr(encoder, "output_streams", (key,)))
    if key not in names:
        raise ValueError(
            f"encoders.{key}: {type(encoder).__name__} fills the streams {list(names)}; put it "
            "under one of them"
        )
    return names


def stream_owners(encoders: Mapping[str, nn.Module]) -> dict[str, str]:
    """Stream name -> the key of the encoder that fills it (each stream has at most one)."""
    owners: dict[str, str] = {}
    for key, encoder in encoders.items():
        for name in filled_streams(key, encoder):
            if name in owners:
                raise ValueError(f"stream {name!r} is filled by encoders.{owners[name]} and .{key}")
            owners[name] = key
    return owners


def encode_media(
    encoders: Mapping[str, nn.Module], streams: Sequence[StreamSpec], batch: dict[str, Any]
) -> dict[str, Any]:
    """``batch`` with ``features[stream]`` computed from raw media by the encoder filling it
    (``encoders[stream]``, or a multi-stream encoder naming it in ``output_streams``).

    Streams that already have features are left alone; an audio stream's encoder gets
    ``(audio, audio_lengths)``, a visual one ``frames``. A stream with neither features nor an
    encoder, missing media, or an encoder output that is not ``(B, *stream.shape)`` (a sequence
    stream needs an encoder configured with ``tokens``) is an error naming the stream.
    """
    if not has_media(batch):
        return batch
    features = dict(batch.get("features") or {})
    size = len(batch["names"])
    owners = stream_owners(encoders)
    outputs: dict[str, Any] = {}  # encoder key -> its output (a multi-stream one runs once)
    for stream in streams:
        if stream.name in features:
            continue
        key = owners.get(stream.name)
        encoder = encoders[key] if key is not None else None
        if encoder is None:
            raise ValueError(
                f"stream {stream.name!r}: the batch has raw media but no stored features and the "
                f"model has no encoder for it (model.init_args.encoders.{stream.name})"
            )
        if key not in outputs:
            outputs[key] = _run(encoder, stream, batch)
        out = outputs[key]
        if isinstance(out, Mapping):
            out = out[stream.name]
        if tuple(out.shape) != (size, *stream.shape):
            raise ValueError(
                f"stream {stream.name!r}: encoder {type(encoder).__name__} gives "
                f"{tuple(out.shape)}, the stream needs {(size, *stream.shape)} (check dim, and "
                "the encoder's tokens for a sequence stream)"
            )
        features[stream.name] = out
    return {**batch, "features": features}


def _run(encoder: nn.Module, stream: StreamSpec, batch: dict[str, Any]) -> Any:
    """The encoder's output on the batch's audio (audio streams) or frames (visual ones)."""
    if stream.modality_id == Modality.AUDIO:
        if "audio" not in batch:
            raise ValueError(f"stream {stream.name!r}: its encoder needs 'audio' in the batch")
        return encoder(batch["audio"], batch.get("audio_lengths"))
    if "frames" not in batch:
        raise ValueError(f"stream {stream.name!r}: its encoder needs 'frames' in the batch")
    return encoder(batch["frames"])

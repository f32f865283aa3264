"""What wrote a feature folder: the encoder identity a store records, and the refusal to mix.

``extract`` writes ``<output>/<feature_dir>/encoder.json`` before the first feature file of a
folder: the encoder's class, its config (init arguments), a SHA-256 over its weights, the
stream's size and the decoding settings the features depend on. A later run (a resume, more
samples) must have the same identity, else it is refused: a store holding half the files from
one encoder and half from another would train and test without any sign of it. The file lives
in the feature folder, so it travels with it when the folder is copied to another root.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.core.errors import InvalidInputError
from src.core.modality import Modality
from src.core.streams import StreamSpec
from src.data.components.media_source import MediaSpec
from src.io.atomic import atomic_create_text

IDENTITY_FILE = "encoder.json"
#: Init arguments that say where the weights are, not what they are (the weight hash does).
_LOCATION_ARGS = ("pretrained", "weights", "ln_vision")


class EncoderMismatchError(InvalidInputError):
    """A feature folder was written by another encoder (or by an unknown one)."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"{folder / IDENTITY_FILE}: encoder: {reason}")
        self.folder, self.field, self.reason = folder, "encoder", reason


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every tensor of ``module``'s state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(data))
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """A JSON value (tuples become lists, unknown objects their text form)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def encoder_location(encoder: nn.Module) -> dict[str, Any]:
    """Where the encoder's weights were read from (informational, beside the identity)."""
    hparams = dict(getattr(encoder, "hparams", {}) or {})
    extra = {k: hparams[k] for k in _LOCATION_ARGS[1:] if hparams.get(k) is not None}
    return {"pretrained": hparams.get("pretrained"), **extra}


def encoder_identity(encoder: nn.Module, stream: StreamSpec, media: MediaSpec) -> dict[str, Any]:
    """What a feature of ``stream`` written by ``encoder`` depends on."""
    hparams = dict(getattr(encoder, "hparams", {}) or {})
    kind = type(encoder)
    if stream.modality_id == Modality.AUDIO:
        decoding = {"sample_rate": media.sample_rate, "max_audio_seconds": media.max_audio_seconds}
    else:
        decoding = {
            "strategy": media.strategy,
            "num_frames": media.num_frames,
            "frame_size": media.frame_size,
            "crop": media.crop,
        }
        if media.interpolation != "bilinear":  # recorded only when set: older stores match
            decoding["interpolation"] = media.interpolation
    return _plain(
        {
            "encoder": f"{kind.__module__}.{kind.__qualname__}",
            "config": {k: v for k, v in hparams.items() if k not in _LOCATION_ARGS},
            "weights_sha256": weights_sha256(encoder),
            "shape": list(stream.shape),
            "decoding": decoding,
        }
    )


def _describe(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True)


def claim_feature_folder(
    folder: Path, identity: dict[str, Any], where: dict[str, Any] | None = None
) -> None:
    """Record ``identity`` as the writer of ``folder``, or check it is the recorded one.

    Raises :class:`EncoderMismatchError` naming the folder and both identities when the folder
    records another encoder, or when it holds feature files but no record (unknown writer).

    Args:
        folder: A feature folder (``<output>/<feature_dir>``); created if missing.
        identity: :func:`encoder_identity` of the encoder about to write there.
        where: Informational fields stored beside the identity (e.g. the weights' folder).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / IDENTITY_FILE
    if not path.is_file():
        existing = sum(1 for _ in folder.glob("*.npy"))
        if existing:
            raise EncoderMismatchError(
                folder,
                f"the folder holds {existing} feature file(s) but no record of the encoder that "
                f"wrote them; extending it with {_describe(identity)} could mix two encoders. "
                "Write to another --output, or move those files away",
            )
        record = {"identity": identity, **_plain(where or {})}
        atomic_create_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EncoderMismatchError(folder, f"unreadable encoder record ({err})") from None
    if recorded != identity:
        changed = sorted(
            key for key in {*recorded, *identity} if recorded.get(key) != identity.get(key)
        )
        raise EncoderMismatchError(
            folder,
            f"the store was written by another encoder (differs in {', '.join(changed)}): "
            f"recorded {_describe(recorded)}, this run {_describe(identity)}. Extending it "
            "would mix features of two encoders: use the same encoder settings, or write to "
            "another --output",
        )

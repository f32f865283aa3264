"""Raw media of a data set, for online encoders and for ``extract``: where the clips are and how
they are decoded into what the encoders take.

Both paths (training with encoders online, writing the feature store with ``extract``) decode
through :class:`MediaLoader`, so the same weights give the same features either way.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.transforms import v2

from src.core.modality import Modality
from src.core.streams import StreamSpec
from src.data.components.media import (
    SAMPLE_RATE,
    STRATEGIES,
    VIDEO_SUFFIXES,
    ClipDecoder,
    MediaDecodeError,
    decode_audio,
    find_clip,
    probe,
)

AUDIO_SUFFIXES: tuple[str, ...] = (".wav", ".flac")
INTERPOLATIONS: dict[str, v2.InterpolationMode] = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
CHECKS: tuple[str, ...] = ("none", "probe", "decode")


@dataclass
class MediaSpec:
    """Where a data set's clips are and how to decode them.

    Frames are kept ``uint8`` after a resize + centre crop to ``frame_size``; each visual encoder
    then applies its own resize and normalisation (``VisualEncoder.forward`` takes ``uint8``), so
    one decoded clip serves encoders with different input statistics.

    Args:
        video_dir: Folder of ``<name>.mp4`` (or ``.avi``, ...) clips; relative to the data root.
        audio_dir: Folder of ``<name>.wav``/``.flac`` files; ``None`` takes the clip's own audio.
        strategy: Frame sampling: ``uniform``, ``first`` or ``middle``.
        num_frames: Frames per clip for ``uniform`` (VideoMAE needs its ``num_frames``).
        frame_size: Side of the square ``uint8`` frames handed to the encoders.
        crop: Resize the shorter side and centre-crop (``True``) or squash to a square.
        interpolation: Resize filter, antialiased: ``bilinear``, or ``bicubic`` (BLIP-2's and
            Emotion-LLaMA's: EVA-CLIP-g's frames with ``frame_size: 448, crop: false``).
        sample_rate: Audio rate the encoders expect.
        max_audio_seconds: Keep only the first seconds of audio (``None``: all of it).
        video_suffixes: Clip suffixes tried in order (Emotion-LLaMA tries ``.mp4`` then ``.avi``).
    """

    video_dir: str = "video"
    audio_dir: str | None = None
    strategy: str = "uniform"
    num_frames: int = 8
    frame_size: int = 224
    crop: bool = True
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    sample_rate: int = SAMPLE_RATE
    max_audio_seconds: float | None = None
    video_suffixes: list[str] = field(default_factory=lambda: list(VIDEO_SUFFIXES))

    def __post_init__(self) -> None:
        # ``peak`` needs a per-sample index that no annotation format here provides.
        if self.strategy not in STRATEGIES or self.strategy == "peak":
            raise ValueError(
                f"media strategy must be one of uniform, first, middle; got {self.strategy!r}"
            )
        if self.num_frames < 1 or self.frame_size < 1:
            raise ValueError("media num_frames and frame_size must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"media interpolation must be one of {list(INTERPOLATIONS)}, got "
                f"{self.interpolation!r}"
            )
        if self.max_audio_seconds is not None and self.max_audio_seconds <= 0:
            raise ValueError("media max_audio_seconds must be positive (or null)")


class ResizeCrop(nn.Module):
    """Resize (antialiased) and centre-crop ``uint8`` frames ``(..., 3, H, W)`` to ``size``, as
    ``uint8`` (no normalisation: the encoders normalise)."""

    def __init__(self, size: int, crop: bool = True, interpolation: str = "bilinear") -> None:
        super().__init__()
        mode = INTERPOLATIONS[interpolation]
        square = [v2.Resize((size, size), interpolation=mode, antialias=True)]
        steps = [v2.Resize(size, interpolation=mode, antialias=True), v2.CenterCrop(size)]
        self.transform = v2.Compose(steps if crop else square)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.transform(frames)


class MediaLoader:
    """Finds and decodes one sample's media.

    Args:
        root: Data root (``spec``'s relative folders are under it).
        spec: Locations and decoding settings.
        video: Decode frames (some stream is visual).
        audio: Decode audio (some stream is audio).
    """

    def __init__(self, root: str | Path, spec: MediaSpec, *, video: bool, audio: bool) -> None:
        if not (video or audio):
            raise ValueError("MediaLoader needs video, audio or both")
        self.root, self.spec, self.video, self.audio = Path(root), spec, video, audio
        self.video_dir = self.root / spec.video_dir
        self.audio_dir = self.root / spec.audio_dir if spec.audio_dir is not None else None
        self.decoder = ClipDecoder(
            strategy=spec.strategy,
            num_frames=spec.num_frames,
            sample_rate=spec.sample_rate,
            video=video,
            audio=False,  # audio is decoded here, from the clip or a separate file
            transform=ResizeCrop(spec.frame_size, spec.crop, spec.interpolation),  # type: ignore[arg-type]
        )

    def clip_path(self, name: str) -> Path:
        """The clip of ``name``; :class:`MediaDecodeError` (field ``path``) when there is none."""
        return find_clip(self.video_dir, name, self.spec.video_suffixes)

    def audio_path(self, name: str) -> Path:
        """Where the audio of ``name`` is read from (its clip unless ``audio_dir`` is set)."""
        if self.audio_dir is None:
            return self.clip_path(name)
        return find_clip(self.audio_dir, name, AUDIO_SUFFIXES)

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """``{"frames": uint8 (K, 3, S, S), "audio": float32 (n,)}`` (the enabled parts)."""
        out: dict[str, torch.Tensor] = {}
        if self.video:
            out["frames"] = self.decoder(self.clip_path(name))["frames"]
        if self.audio:
            wave = decode_audio(self.audio_path(name), sample_rate=self.spec.sample_rate)
            if self.spec.max_audio_seconds is not None:
                wave = wave[: int(self.spec.max_audio_seconds * self.spec.sample_rate)]
            out["audio"] = wave
        return out

    def check(self, name: str, depth: str = "probe") -> None:
        """Raise :class:`MediaDecodeError` if ``name``'s media is unusable.

        ``probe`` reads headers only (missing or empty file, broken container, no video or audio
        stream); ``decode`` decodes everything once (also truncated streams, zero-length audio);
        ``none`` checks nothing.
        """
        if depth not in CHECKS:
            raise ValueError(f"media check must be one of {CHECKS}, got {depth!r}")
        if depth == "none":
            return
        if depth == "decode":
            self.load(name)
            return
        clip = self.clip_path(name)
        info = probe(clip)
        if self.video and info.n_frames == 0:
            raise MediaDecodeError(clip, "video", "the video stream has no frames")
        if self.audio:
            audio = self.audio_path(name)
            if audio == clip and not info.has_audio:
                raise MediaDecodeError(clip, "audio", "no audio stream in the container")
            if audio != clip and audio.stat().st_size == 0:
                raise MediaDecodeError(audio, "audio", "file is empty (0 bytes)")


def media_needs(streams: Sequence[StreamSpec]) -> tuple[bool, bool]:
    """``(video, audio)``: which parts to decode for these streams."""
    kinds = {s.modality_id for s in streams}
    return Modality.VISUAL in kinds, Modality.AUDIO in kinds

"""Decoding raw media: video frames with PyAV, audio from the container (PyAV) or a wav/flac file
(soundfile), mixed to mono and resampled to 16 kHz.

Every failure is a :class:`MediaDecodeError` naming the file, the field (``path``, ``container``,
``video``, ``audio``, ``peak_index``) and the reason, so that a data module can either stop with
it or skip the sample and list it in its report.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from torchvision.transforms import v2

from src.core.errors import UserError
from src.io.safe_paths import path_inside, unsafe_name_reason

#: Target audio sample rate of every audio encoder here (HuBERT, wav2vec2, Whisper).
SAMPLE_RATE = 16_000
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
STRATEGIES: tuple[str, ...] = ("uniform", "first", "middle", "peak")
#: Files read with soundfile; anything else goes through PyAV.
SOUNDFILE_SUFFIXES: tuple[str, ...] = (".wav", ".flac", ".ogg")
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm")


class MediaDecodeError(UserError, ValueError):
    """A clip or audio file that cannot be decoded.

    Args:
        path: The media file.
        field: What failed: ``path``, ``container``, ``video``, ``audio`` or ``peak_index``.
        reason: Why, in words.
    """

    def __init__(self, path: str | Path, field: str, reason: str) -> None:
        self.path, self.field, self.reason = str(path), field, reason
        super().__init__(f"{path}: {field}: {reason}")


@dataclass(frozen=True)
class MediaInfo:
    """What the container says about a clip (no decoding)."""

    path: str
    n_frames: int
    fps: float
    duration: float
    width: int
    height: int
    has_audio: bool
    sample_rate: int | None
    channels: int | None


def find_clip(directory: str | Path, name: str, suffixes: Sequence[str] = VIDEO_SUFFIXES) -> Path:
    """``<directory>/<name><suffix>`` for the first suffix that exists (Emotion-LLaMA tries .mp4
    then .avi); raises :class:`MediaDecodeError` (field ``path``) listing what was tried, or
    (field ``name``) when ``name`` would lead outside ``directory``."""
    tried = [Path(directory) / f"{name}{suffix}" for suffix in suffixes]
    for path in tried:
        _, problem = path_inside(directory, path.name)
        problem = unsafe_name_reason(name) or problem
        if problem is not None:
            raise MediaDecodeError(path, "name", problem)
        if path.is_file():
            return path
    raise MediaDecodeError(
        tried[0], "path", f"no clip for {name!r} (tried {', '.join(p.name for p in tried)})"
    )


def _open(path: str | Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise MediaDecodeError(path, "path", "file not found")
    if path.stat().st_size == 0:
        raise MediaDecodeError(path, "container", "file is empty (0 bytes)")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as err:
        raise MediaDecodeError(path, "container", f"cannot open: {err}") from None


def _video_stream(path: Path, container: av.container.InputContainer) -> av.VideoStream:
    if not container.streams.video:
        raise MediaDecodeError(path, "video", "no video stream")
    return container.streams.video[0]


def _count_frames(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    """Frames per the container index; demuxes (no decoding) when the index has no count."""
    if stream.frames > 0:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def probe(path: str | Path) -> MediaInfo:
    """Frame count, frame rate, duration, size and audio format of a clip, from its headers."""
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(path, container)
        n_frames = _count_frames(container, stream)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = n_frames / fps if fps else 0.0
        audio = container.streams.audio[0] if container.streams.audio else None
        return MediaInfo(
            path=str(path),
            n_frames=n_frames,
            fps=fps,
            duration=duration,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            has_audio=audio is not None,
            sample_rate=audio.sample_rate if audio is not None else None,
            channels=audio.channels if audio is not None else None,
        )


def sample_indices(
    n_frames: int, strategy: str = "uniform", num_frames: int = 8, peak_index: int | None = None
) -> list[int]:
    """Frame indices to keep.

    ``uniform``: ``num_frames`` segment centres ``floor((i + 0.5) * n / K)`` (repeats when the clip
    is shorter than ``K``); ``first``: frame 0; ``middle``: frame ``n // 2``; ``peak``: the given
    ``peak_index`` (e.g. Emotion-LLaMA's peak frame). The last three give one frame.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"frame sampling strategy must be one of {STRATEGIES}, got {strategy!r}")
    if n_frames <= 0:
        raise ValueError("a clip without frames has nothing to sample")
    if strategy == "uniform":
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return [int((i + 0.5) * n_frames / num_frames) for i in range(num_frames)]
    if strategy == "first":
        return [0]
    if strategy == "middle":
        return [n_frames // 2]
    if peak_index is None:
        raise ValueError("strategy 'peak' needs a peak_index")
    if not 0 <= peak_index < n_frames:
        raise IndexError(f"peak_index {peak_index} is outside 0..{n_frames - 1}")
    return [peak_index]


def decode_video(
    path: str | Path,
    *,
    strategy: str = "uniform",
    num_frames: int = 8,
    peak_index: int | None = None,
) -> torch.Tensor:
    """Decode the sampled frames of a clip as a ``uint8`` tensor ``(K, 3, H, W)`` (RGB).

    Frames are decoded in order and decoding stops after the last index needed, so ``first`` is
    cheap on long clips. A stream that ends before an index it announced is reported as truncated.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(path, container)
        stream.thread_type = "AUTO"  # frame + slice threads; decoding dominates the cost
        n_frames = _count_frames(container, stream)
        if n_frames == 0:
            raise MediaDecodeError(path, "video", "the video stream has no frames")
        try:
            indices = sample_indices(n_frames, strategy, num_frames, peak_index)
        except IndexError as err:
            raise MediaDecodeError(path, "peak_index", str(err)) from None
        wanted = set(indices)
        last = max(indices)
        kept: dict[int, torch.Tensor] = {}
        position = -1
        try:
            for position, frame in enumerate(container.decode(stream)):
                if position in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    kept[position] = torch.from_numpy(rgb).permute(2, 0, 1)
                if position >= last:
                    break
        except av.error.FFmpegError as err:
            raise MediaDecodeError(
                path, "video", f"corrupt stream after frame {position}: {err}"
            ) from None
        if last not in kept:
            raise MediaDecodeError(
                path,
                "video",
                f"truncated: the container announces {n_frames} frames but decoding stopped "
                f"after {position + 1}",
            )
    return torch.stack([kept[i] for i in indices])


class FrameTransform(torch.nn.Module):
    """Resize, crop and normalise ``uint8`` frames ``(..., 3, H, W)`` into float ``(..., 3, S, S)``.

    Resizes the shorter side to ``size`` (antialiased) and centre-crops ``size x size``, or, with
    ``crop=False``, resizes straight to ``size x size``; then scales to [0, 1] and normalises.

    Args:
        size: Output side length.
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation of the normalisation.
        crop: Keep the aspect ratio and centre-crop (``True``) or squash (``False``).
    """

    def __init__(
        self,
        size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop: bool = True,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {mean} and {std}")
        self.size, self.mean, self.std, self.crop = int(size), tuple(mean), tuple(std), crop
        resize = [v2.Resize(self.size, antialias=True), v2.CenterCrop(self.size)]
        if not crop:
            resize = [v2.Resize((self.size, self.size), antialias=True)]
        self.transform = v2.Compose(
            [
                *resize,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-3] != 3:
            raise ValueError(
                f"FrameTransform expects uint8 frames (..., 3, H, W), got {frames.dtype} "
                f"{tuple(frames.shape)}"
            )
        return self.transform(frames)


def _resample_mono(path: Path, mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample a mono float32 signal with FFmpeg's swresample (via PyAV)."""
    if rate == target:
        return mono
    frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    try:
        chunks = [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
    except av.error.FFmpegError as err:
        raise MediaDecodeError(
            path, "audio", f"cannot resample {rate} Hz -> {target}: {err}"
        ) from None
    return np.concatenate(chunks, axis=1)[0] if chunks else np.zeros(0, np.float32)


def _container_audio(path: Path) -> tuple[np.ndarray, int]:
    """All audio of the first audio stream as planar float32 ``(channels, n)`` and its rate."""
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaDecodeError(path, "audio", "no audio stream in the container")
        stream = container.streams.audio[0]
        rate = stream.sample_rate
        if not rate:
            raise MediaDecodeError(path, "audio", "the audio stream has no sample rate")
        # Only a format change (to planar float); channel mixing is done explicitly below.
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                chunks += [f.to_ndarray() for f in resampler.resample(frame)]
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
        except av.error.FFmpegError as err:
            raise MediaDecodeError(path, "audio", f"corrupt audio stream: {err}") from None
    if not chunks:
        return np.zeros((1, 0), np.float32), rate
    return np.concatenate(chunks, axis=1), rate


def _file_audio(path: Path) -> tuple[np.ndarray, int]:
    """A wav/flac/ogg file as float32 ``(channels, n)`` and its rate."""
    if not path.is_file():
        raise MediaDecodeError(path, "path", "file not found")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise MediaDecodeError(path, "audio", f"cannot read audio file: {err}") from None
    return np.ascontiguousarray(data.T), int(rate)


def decode_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode audio as a mono float32 tensor ``(n,)`` at ``sample_rate`` (16 kHz by default).

    wav/flac/ogg files are read with soundfile, anything else (mp4, avi, mkv, m4a, ...) with PyAV
    from the container's first audio stream. Channels are averaged (mono = mean of channels), then
    resampled with swresample.
    """
    path = Path(path)
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        channels, rate = _file_audio(path)
    else:
        channels, rate = _container_audio(path)
    if channels.shape[-1] == 0:
        raise MediaDecodeError(path, "audio", "zero-length audio (0 samples)")
    mono = np.ascontiguousarray(channels.mean(axis=0, dtype=np.float32))
    if not np.isfinite(mono).all():
        raise MediaDecodeError(path, "audio", "audio samples contain NaN or infinite values")
    out = _resample_mono(path, mono, rate, sample_rate)
    if out.size == 0:
        raise MediaDecodeError(path, "audio", "zero-length audio after resampling")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


class ClipDecoder:
    """Decodes one sample's clip into what the online encoders take.

    Args:
        strategy: Frame sampling: ``uniform``, ``first``, ``middle`` or ``peak``.
        num_frames: Frames for ``uniform`` (VideoMAE needs its ``num_frames``).
        size: Frame side after :class:`FrameTransform`.
        mean: Normalisation mean (take it from the visual encoder: ``encoder.frame_transform()``).
        std: Normalisation std.
        crop: Centre-crop instead of squashing.
        sample_rate: Audio rate.
        video: Decode frames.
        audio: Decode audio.
        transform: A ready :class:`FrameTransform` (e.g. ``VisualEncoder.frame_transform()``);
            overrides ``size``, ``mean``, ``std`` and ``crop``.
    """

    def __init__(
        self,
        *,
        strategy: str = "uniform",
        num_frames: int = 8,
        size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop: bool = True,
        sample_rate: int = SAMPLE_RATE,
        video: bool = True,
        audio: bool = True,
        transform: FrameTransform | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy, self.num_frames, self.sample_rate = strategy, num_frames, sample_rate
        self.video, self.audio = video, audio
        self.transform = transform or FrameTransform(size, mean, std, crop)

    def __call__(
        self,
        path: str | Path,
        *,
        audio_path: str | Path | None = None,
        peak_index: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"frames": (K, 3, S, S) float32, "audio": (n,) float32}`` (the enabled parts).

        Args:
            path: The clip.
            audio_path: A separate wav/flac file to take the audio from instead of the clip.
            peak_index: Frame index for the ``peak`` strategy.
        """
        out: dict[str, torch.Tensor] = {}
        if self.video:
            frames = decode_video(
                path, strategy=self.strategy, num_frames=self.num_frames, peak_index=peak_index
            )
            out["frames"] = self.transform(frames)
        if self.audio:
            out["audio"] = decode_audio(audio_path or path, sample_rate=self.sample_rate)
        return out


def pad_audio(waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad mono waveforms into ``(B, n_max)`` with their lengths ``(B,)`` (encoder input)."""
    if not waveforms:
        raise ValueError("pad_audio needs at least one waveform")
    lengths = torch.tensor([w.shape[-1] for w in waveforms], dtype=torch.long)
    batch = torch.zeros(len(waveforms), int(lengths.max()), dtype=torch.float32)
    for row, wave in enumerate(waveforms):
        batch[row, : wave.shape[-1]] = wave
    return batch, lengths

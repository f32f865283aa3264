"""Qwen2.5-Omni's own processor as the online "encoders" of its streams: raw clips -> the
processor's tensors, packed one row per LLM token (:mod:`src.models.backbones.qwen_omni`).

They have no weights: the thinker's towers run inside the backbone. As online encoders
(``model.init_args.encoders``) they let ``fit``/``test``/``predict`` read raw clips
(``data.source: media``); with ``extract`` they write the processor features once into a
feature store. Both read the processor settings of a local Qwen2.5-Omni directory
(``preprocessor_config.json``; the video processor falls back to it when the directory has no
``video_preprocessor_config.json``), as ``Qwen2_5OmniProcessor`` does.
"""

from pathlib import Path

import lightning as L
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from src.data.components.media import SAMPLE_RATE
from src.models.backbones.qwen_omni import MELS_PER_TOKEN, pack_audio, pack_video


def _local_dir(owner: str, processor: str, model: str = "Qwen2.5-Omni") -> str:
    if not Path(processor).is_dir():
        raise ValueError(
            f"{owner}: processor={processor!r} is not a local directory (the {model} "
            "checkpoint directory holding preprocessor_config.json); nothing is downloaded"
        )
    return processor


def whisper_extractor(owner: str, processor: str, model: str) -> WhisperFeatureExtractor:
    """The ``WhisperFeatureExtractor`` of a local ``model`` directory, at the decoder's rate."""
    extractor = WhisperFeatureExtractor.from_pretrained(
        _local_dir(owner, processor, model), local_files_only=True
    )
    if extractor.sampling_rate != SAMPLE_RATE:
        raise ValueError(f"the feature extractor expects {extractor.sampling_rate} Hz")
    return extractor


class QwenOmniAudioInput(L.LightningModule):
    """Waveforms -> the feature extractor's log-mels of a fixed length, ``(B, tokens, 4 n_mels)``.

    Every clip is cut or zero-padded to ``tokens x 4`` mel frames (``tokens / 25`` seconds at
    the 10 ms hop), so each gives the audio stream's ``tokens`` audio tokens.

    Args:
        processor: Local Qwen2.5-Omni directory (its ``WhisperFeatureExtractor`` settings).
        tokens: Audio tokens per clip (the audio stream's ``tokens``; 25 per second).
    """

    def __init__(self, processor: str, tokens: int) -> None:
        super().__init__()
        if tokens < 1:
            raise ValueError(f"QwenOmniAudioInput: tokens must be positive, got {tokens}")
        self.save_hyperparameters()
        self.extractor = whisper_extractor("QwenOmniAudioInput", processor, "Qwen2.5-Omni")
        self.tokens = tokens
        self.samples = tokens * MELS_PER_TOKEN * self.extractor.hop_length

    @property
    def feature_dim(self) -> int:
        return MELS_PER_TOKEN * int(self.extractor.feature_size)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full((waveforms.shape[0],), waveforms.shape[1])
        clips = [w[: int(n)].float().cpu().numpy() for w, n in zip(waveforms, lengths, strict=True)]
        mels = self.extractor(
            clips, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=self.samples,
            truncation=True, return_tensors="pt",
        ).input_features  # fmt: skip
        return pack_audio(mels).to(waveforms.device)


class QwenOmniVideoInput(L.LightningModule):
    """Frames ``(B, K, 3, S, S)`` (``uint8``) -> the video processor's patches, ``(B, t h w /
    m^2, m^2 C p_t p p)``; every clip must give the same grid (fixed frames and size).

    Args:
        processor: Local Qwen2.5-Omni directory (its ``Qwen2VLVideoProcessor`` settings).
    """

    def __init__(self, processor: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.video_processor = Qwen2VLVideoProcessor.from_pretrained(
            _local_dir("QwenOmniVideoInput", processor), local_files_only=True
        )
        self.merge = int(self.video_processor.merge_size)

    def grid(self, frames: torch.Tensor) -> list[int]:
        """The ``(t, h, w)`` patch grid of one clip of these frames (the backbone's
        ``video_grid``)."""
        return [int(v) for v in self._process(frames[:1])[1][0]]

    def _process(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.video_processor(
            videos=list(frames.cpu()), do_sample_frames=False, return_tensors="pt"
        )
        return out.pixel_values_videos, out.video_grid_thw

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (B, K, 3, H, W), got {frames.dtype} "
                             f"{tuple(frames.shape)}")  # fmt: skip
        pixels, grids = self._process(frames)
        if not bool((grids == grids[0]).all()):
            raise ValueError(f"clips of different patch grids {grids.tolist()}: decode them with "
                             "one num_frames and frame_size")  # fmt: skip
        return pack_video(pixels, frames.shape[0], self.merge).to(frames.device)

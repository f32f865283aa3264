"""Qwen2-Audio's own feature extractor as the online "encoder" of its audio stream: waveforms
-> the processor's log-mels of a fixed number of audio tokens, packed one row per LLM token
(:mod:`src.models.backbones.qwen2_audio`).

It has no weights (the tower runs inside the backbone). As an online encoder
(``model.init_args.encoders``) it lets ``fit``/``test``/``predict`` read raw clips
(``data.source: media``); with ``extract`` it writes the features once into a feature store.
"""

import lightning as L
import torch

from src.data.components.media import SAMPLE_RATE
from src.models.backbones.qwen_omni import MELS_PER_TOKEN, pack_audio
from src.models.qwen_omni_inputs import whisper_extractor


def audio_tokens_of(frames: int) -> int:
    """The audio tokens Qwen2-Audio's processor gives ``frames`` valid mel frames (its tower's
    stride-2 conv, then its stride-2 pooling)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


class Qwen2AudioInput(L.LightningModule):
    """Waveforms -> the processor's log-mels of ``tokens`` audio tokens, ``(B, tokens, 4 n_mels)``.

    Every clip is cut or zero-padded to ``4 tokens`` hops less half an STFT window (``tokens /
    25`` seconds less 12.5 ms) and goes through the extractor as Qwen2-Audio's processor calls
    it (padded with zeros to 30 s); the first ``4 tokens`` mel frames are kept. Its frames after
    them then hold nothing of the clip (their windows lie in the zeros): they are the
    extractor's value of silence, which the backbone recomputes to pad the tower's input, so
    the audio tokens are the released processor + model's on the clip so cut.

    Args:
        processor: Local Qwen2-Audio directory (its ``preprocessor_config.json``).
        tokens: Audio tokens per clip (the audio stream's ``tokens``; 25 per second).
    """

    def __init__(self, processor: str, tokens: int) -> None:
        super().__init__()
        self.extractor = whisper_extractor("Qwen2AudioInput", processor, "Qwen2-Audio")
        self.save_hyperparameters()
        self.tokens = tokens
        self.frames = tokens * MELS_PER_TOKEN
        self.samples = self.frames * self.extractor.hop_length - self.extractor.n_fft // 2
        most = audio_tokens_of(int(self.extractor.nb_max_frames))
        if not 1 <= tokens <= most:
            raise ValueError(
                f"Qwen2AudioInput: tokens must be 1..{most} (the extractor's "
                f"{self.extractor.chunk_length} s), got {tokens}"
            )

    @property
    def feature_dim(self) -> int:
        return MELS_PER_TOKEN * int(self.extractor.feature_size)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full((waveforms.shape[0],), waveforms.shape[1])
        clips = []
        for wave, n in zip(waveforms, lengths, strict=True):
            clip = wave[: min(int(n), self.samples)].float().cpu()
            clips.append(torch.nn.functional.pad(clip, (0, self.samples - len(clip))).numpy())
        out = self.extractor(
            clips, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=True,
            return_tensors="pt",
        )  # fmt: skip
        # Every clip is of one length: the processor's mask gives each the stream's tokens.
        valid = int(out.attention_mask[0].sum())
        if audio_tokens_of(valid) != self.tokens:
            raise RuntimeError(f"{valid} mel frames give {audio_tokens_of(valid)} tokens")
        return pack_audio(out.input_features[:, :, : self.frames]).to(waveforms.device)

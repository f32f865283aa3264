"""Frozen feature encoders (LightningModules) wrapping Hugging Face audio and vision models.

Both produce one pooled vector per clip, ``(B, dim)``, the shape of an Emotion-LLaMA feature file
``<feature_dir>/<name>.npy`` (``(dim,)``), or, with ``tokens: N``, a sequence ``(B, N, dim)`` for a
sequence stream: image patch tokens (ViT/CLIP, averaged over the sampled frames; VideoMAE's
tokens) or audio frames, cut into ``N`` contiguous segments of the valid steps and averaged per
segment (the identity when there are exactly ``N``; Emotion-LLaMA keeps EVA-CLIP's 256 patches).
Weights come only from a local directory (``pretrained``); tests build tiny random models from a
``config`` dict. The preprocessing that HF processors do (waveform normalisation, Whisper log-mel,
resize + normalise) is done here in torch from explicit config values, so a tiny model needs no
processor files.
"""

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import transformers
from torch import nn
from transformers.audio_utils import mel_filter_bank

from src.core.plain_data import PlainValue
from src.data.components.media import IMAGENET_MEAN, IMAGENET_STD, SAMPLE_RATE, FrameTransform

AUDIO_KINDS: dict[str, tuple[str, str]] = {
    # kind: (config class, model class used to load a local checkpoint)
    "hubert": ("HubertConfig", "HubertModel"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "whisper": ("WhisperConfig", "WhisperModel"),
}
VISUAL_KINDS: dict[str, tuple[str, str]] = {
    "vit": ("ViTConfig", "ViTModel"),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
    "videomae": ("VideoMAEConfig", "VideoMAEModel"),
}
#: Normalisation each vision kind was trained with (used when neither the config nor the
#: checkpoint's preprocessor_config.json gives one).
DEFAULT_IMAGE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "videomae": (IMAGENET_MEAN, IMAGENET_STD),
}


def _check_source(owner: str, pretrained: str | None, config: dict[str, Any] | None) -> None:
    """Exactly one source; a ``pretrained`` that is not a local directory is refused clearly."""
    if (pretrained is None) == (config is None):
        raise ValueError(
            f"{owner}: give exactly one of `pretrained` (a local checkpoint directory) or "
            "`config` (a dict for a randomly initialised model)"
        )
    if pretrained is not None and not Path(pretrained).is_dir():
        raise ValueError(
            f"{owner}: pretrained={pretrained!r} is not a local directory. Weights are never "
            "downloaded: fetch the checkpoint once on a machine with network (e.g. `hf download "
            f"<repo-id> --local-dir /models/<name>`) and set `pretrained` to that directory."
        )


def _preprocessor_values(pretrained: str | None) -> dict[str, Any]:
    """The checkpoint's ``preprocessor_config.json`` (``{}`` when absent or built from config)."""
    if pretrained is None:
        return {}
    path = Path(pretrained) / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class _FrozenEncoder(L.LightningModule):
    """Shared freezing: no gradients and eval mode that ``.train()`` does not undo."""

    def _freeze(self, freeze: bool) -> None:
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "_FrozenEncoder":
        # Lightning switches modules to train mode each epoch; a frozen encoder stays in eval
        # (no dropout), so online features equal the ones written to the feature store.
        return super().train(mode and not self.frozen)


class WhisperLogMel(nn.Module):
    """Whisper's log-mel spectrogram in torch (periodic Hann STFT, Slaney mel, log10, 8 dB floor).

    Args:
        n_mels: Mel bins (``num_mel_bins`` of the Whisper config).
        n_fft: FFT size.
        hop_length: Hop in samples.
        sample_rate: Audio rate.
    """

    def __init__(
        self, n_mels: int, n_fft: int = 400, hop_length: int = 160, sample_rate: int = SAMPLE_RATE
    ) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        filters = mel_filter_bank(
            num_frequency_bins=1 + n_fft // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=sample_rate / 2,
            sampling_rate=sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("filters", torch.tensor(filters, dtype=torch.float32).T, False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` float waveforms -> ``(B, n_mels, n // hop)`` log-mel features."""
        stft = torch.stft(
            waveforms.float(), self.n_fft, self.hop_length, window=self.window, return_complex=True
        )
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


class AudioEncoder(_FrozenEncoder):
    """HuBERT, wav2vec2 or the Whisper encoder; mean-pools the valid frames of each clip.

    Args:
        kind: ``hubert``, ``wav2vec2`` or ``whisper``.
        pretrained: Local checkpoint directory (never a hub id).
        config: Keyword arguments of the HF config class, for a random tiny model (tests).
        freeze: Freeze the weights and keep eval mode (the default).
        layer: Hidden state to pool (index into ``hidden_states``; ``None`` = last layer).
        normalize: Zero-mean unit-variance per clip before HuBERT/wav2vec2 (HF ``do_normalize``);
            ``None``: the checkpoint's ``preprocessor_config.json``, else ``True``.
        sample_rate: Rate of the waveforms given to :meth:`forward` (16 kHz for all three).
        tokens: ``None``: one mean-pooled vector per clip. ``N``: ``N`` frame features per clip
            (the valid frames in ``N`` contiguous segments, each averaged), for a sequence stream.
    """

    def __init__(
        self,
        kind: str = "hubert",
        pretrained: str | None = None,
        config: dict[str, PlainValue] | None = None,
        freeze: bool = True,
        layer: int | None = None,
        normalize: bool | None = None,
        sample_rate: int = SAMPLE_RATE,
        tokens: int | None = None,
    ) -> None:
        super().__init__()
        _check_tokens(tokens)
        self.tokens = tokens
        if kind not in AUDIO_KINDS:
            raise ValueError(
                f"audio encoder kind must be one of {tuple(AUDIO_KINDS)}, got {kind!r}"
            )
        _check_source(f"AudioEncoder({kind})", pretrained, config)
        self.save_hyperparameters()
        self.kind, self.layer, self.sample_rate = kind, layer, sample_rate
        config_cls, model_cls = (getattr(transformers, n) for n in AUDIO_KINDS[kind])
        if pretrained is not None:
            model = model_cls.from_pretrained(pretrained, local_files_only=True)
        else:
            model = model_cls(config_cls(**config))
        if kind == "whisper":
            model = model.encoder  # the decoder is never used
        self.model = model
        cfg = model.config
        if kind == "whisper":
            self.mel = WhisperLogMel(cfg.num_mel_bins, sample_rate=sample_rate)
            # The encoder takes exactly 2 * max_source_positions mel frames (30 s for real ones).
            self.window_samples = 2 * cfg.max_source_positions * self.mel.hop_length
        else:
            pre = _preprocessor_values(pretrained)
            self.normalize = pre.get("do_normalize", True) if normalize is None else normalize
            self.pass_attention_mask = cfg.feat_extract_norm == "layer"
        self._freeze(freeze)

    @property
    def feature_dim(self) -> int:
        """Size of the pooled vector."""
        return int(self.model.config.hidden_size)

    def _frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames covering ``lengths`` samples (the CNN feature extractor's arithmetic)."""
        cfg = self.model.config
        for kernel, stride in zip(cfg.conv_kernel, cfg.conv_stride, strict=True):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=1)

    def _hidden(self, outputs: Any) -> torch.Tensor:
        return (
            outputs.last_hidden_state if self.layer is None else outputs.hidden_states[self.layer]
        )

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``(B, dim)`` (or ``(B, tokens, dim)``) of ``(B, n)`` mono waveforms.

        Args:
            waveforms: Zero-padded waveforms.
            lengths: Valid samples per clip (``None``: all of ``n``).
        """
        if waveforms.ndim != 2:
            raise ValueError(f"waveforms must be (B, n), got {tuple(waveforms.shape)}")
        batch, n = waveforms.shape
        if lengths is None:
            lengths = torch.full((batch,), n, device=waveforms.device)
        lengths = lengths.to(waveforms.device).long()
        if int(lengths.min()) <= 0:
            raise ValueError("every waveform needs at least one sample (zero-length audio)")
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            if self.kind == "whisper":
                return self._whisper(waveforms, lengths)
            return self._ssl(waveforms, lengths)

    def _ssl(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = waveforms.shape[1]
        valid = torch.arange(n, device=waveforms.device)[None, :] < lengths[:, None]
        x = zero_mean_unit_var(waveforms, lengths) if self.normalize else waveforms.float() * valid
        mask = valid.long() if self.pass_attention_mask else None
        outputs = self.model(
            x, attention_mask=mask, output_hidden_states=self.layer is not None, return_dict=True
        )
        hidden = self._hidden(outputs)
        frames = self._frame_lengths(lengths).clamp(max=hidden.shape[1])
        return _pool_steps(hidden, frames, self.tokens)

    def _whisper(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n, window = waveforms.shape[1], self.window_samples
        x = waveforms.float()
        x = x[:, :window] if n >= window else nn.functional.pad(x, (0, window - n))
        valid = torch.arange(window, device=x.device)[None, :] < lengths[:, None]
        features = self.mel(x * valid)
        outputs = self.model(
            features, output_hidden_states=self.layer is not None, return_dict=True
        )
        hidden = self._hidden(outputs)
        mel_frames = torch.div(
            lengths.clamp(max=window), self.mel.hop_length, rounding_mode="floor"
        )
        frames = torch.div(mel_frames + 1, 2, rounding_mode="floor").clamp(1, hidden.shape[1])
        return _pool_steps(hidden, frames, self.tokens)


class VisualEncoder(_FrozenEncoder):
    """ViT or CLIP vision (per frame, mean over frames) or VideoMAE (per clip, mean over tokens).

    Args:
        kind: ``vit``, ``clip`` or ``videomae``.
        pretrained: Local checkpoint directory (never a hub id).
        config: Keyword arguments of the HF config class, for a random tiny model (tests).
        freeze: Freeze the weights and keep eval mode (the default).
        image_mean: Normalisation mean; ``None``: the checkpoint's ``preprocessor_config.json``,
            else the kind's default (:data:`DEFAULT_IMAGE_STATS`).
        image_std: Normalisation std, same rule.
        crop: Resize the shorter side and centre-crop (``True``) or squash to a square.
        pool: Per-frame vector for ``vit``/``clip``: ``cls`` (CLIP: its post-layernorm pooled
            output) or ``mean`` over patch tokens. VideoMAE always averages its tokens.
        tokens: ``None``: one pooled vector per clip. ``N``: ``N`` patch-token features per clip
            (ViT/CLIP: the patch tokens without CLS, averaged over frames; VideoMAE: its tokens),
            in ``N`` contiguous segments each averaged, for a sequence stream.
    """

    def __init__(
        self,
        kind: str = "clip",
        pretrained: str | None = None,
        config: dict[str, PlainValue] | None = None,
        freeze: bool = True,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        crop: bool = True,
        pool: str = "cls",
        tokens: int | None = None,
    ) -> None:
        super().__init__()
        _check_tokens(tokens)
        self.tokens = tokens
        if kind not in VISUAL_KINDS:
            raise ValueError(
                f"visual encoder kind must be one of {tuple(VISUAL_KINDS)}, got {kind!r}"
            )
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        _check_source(f"VisualEncoder({kind})", pretrained, config)
        self.save_hyperparameters()
        self.kind, self.pool = kind, pool
        config_cls, model_cls = (getattr(transformers, n) for n in VISUAL_KINDS[kind])
        extra = {"add_pooling_layer": False} if kind == "vit" else {}
        if pretrained is not None:
            self.model = model_cls.from_pretrained(pretrained, local_files_only=True, **extra)
        else:
            self.model = model_cls(config_cls(**config), **extra)
        pre = _preprocessor_values(pretrained)
        default_mean, default_std = DEFAULT_IMAGE_STATS[kind]
        mean = image_mean or pre.get("image_mean") or default_mean
        std = image_std or pre.get("image_std") or default_std
        self.image_size = int(self.model.config.image_size)
        self.num_frames = int(self.model.config.num_frames) if kind == "videomae" else None
        self.transform = FrameTransform(self.image_size, mean, std, crop)
        self._freeze(freeze)

    @property
    def feature_dim(self) -> int:
        """Size of the pooled vector."""
        return int(self.model.config.hidden_size)

    def frame_transform(self) -> FrameTransform:
        """The resize + normalise this encoder expects (data pipelines apply it to frames)."""
        return FrameTransform(
            self.transform.size, self.transform.mean, self.transform.std, self.transform.crop
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Features ``(B, dim)`` (or ``(B, tokens, dim)``) of frames ``(B, K, 3, H, W)`` (or
        ``(B, 3, H, W)``).

        ``uint8`` frames are resized and normalised here; float frames must already be
        :meth:`frame_transform`'s output (``image_size`` square).
        """
        if frames.ndim == 4:
            frames = frames[:, None]
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (B, K, 3, H, W), got {tuple(frames.shape)}")
        if frames.dtype == torch.uint8:
            frames = self.transform(frames)
        side = self.image_size
        if frames.shape[-2:] != (side, side):
            raise ValueError(
                f"{self.kind} encoder expects {side}x{side} frames, got "
                f"{tuple(frames.shape[-2:])}; apply encoder.frame_transform() or pass uint8"
            )
        batch, k = frames.shape[:2]
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            if self.kind == "videomae":
                if k != self.num_frames:
                    raise ValueError(
                        f"videomae encoder expects {self.num_frames} frames per clip, got {k}; "
                        f"sample with strategy='uniform', num_frames={self.num_frames}"
                    )
                hidden = self.model(pixel_values=frames).last_hidden_state
                if self.tokens is not None:
                    return _pool_steps(hidden, _full(hidden), self.tokens)
                return hidden.mean(dim=1)
            outputs = self.model(pixel_values=frames.flatten(0, 1))
            if self.tokens is not None:
                patches = outputs.last_hidden_state[:, 1:]  # without CLS
                patches = patches.view(batch, k, *patches.shape[1:]).mean(dim=1)
                return _pool_steps(patches, _full(patches), self.tokens)
            if self.pool == "mean":
                per_frame = outputs.last_hidden_state[:, 1:].mean(dim=1)
            elif self.kind == "clip":
                per_frame = outputs.pooler_output
            else:
                per_frame = outputs.last_hidden_state[:, 0]
            return per_frame.view(batch, k, -1).mean(dim=1)


def zero_mean_unit_var(waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-clip ``(x - mean) / sqrt(var + 1e-7)`` over the valid samples; padding stays 0.

    The normalisation of HF's ``Wav2Vec2FeatureExtractor(do_normalize=True)``, batched in torch.
    """
    valid = torch.arange(waveforms.shape[1], device=waveforms.device)[None, :] < lengths[:, None]
    x = waveforms.float() * valid
    count = lengths[:, None].float()
    mean = x.sum(1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + 1e-7) * valid


def _check_tokens(tokens: int | None) -> None:
    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be a positive number of sequence rows or null, got {tokens}")


def _full(hidden: torch.Tensor) -> torch.Tensor:
    """Every step of ``hidden`` (B, T, D) is valid."""
    return torch.full((hidden.shape[0],), hidden.shape[1], device=hidden.device)


def _pool_steps(hidden: torch.Tensor, lengths: torch.Tensor, tokens: int | None) -> torch.Tensor:
    """``(B, D)`` mean of the valid steps, or ``(B, tokens, D)`` segment means.

    Segment ``i`` of a row with ``L`` valid steps covers ``[floor(i L / N), ceil((i + 1) L / N))``
    (adaptive average pooling over the valid steps only; with ``L < N`` steps repeat).
    """
    if tokens is None:
        return _masked_mean(hidden, lengths)
    steps = torch.arange(hidden.shape[1], device=hidden.device)
    i = torch.arange(tokens, device=hidden.device)
    length = lengths.to(hidden.device).long()[:, None]
    start = torch.div(i[None, :] * length, tokens, rounding_mode="floor")
    end = -torch.div(-(i[None, :] + 1) * length, tokens, rounding_mode="floor")  # ceil
    weight = ((steps >= start[..., None]) & (steps < end[..., None])).to(hidden.dtype)
    weight = weight / weight.sum(-1, keepdim=True).clamp(min=1)
    return weight @ hidden  # (B, tokens, T) @ (B, T, D)


def _masked_mean(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the first ``lengths[b]`` steps of each row."""
    mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
    mask = mask.to(hidden.dtype)[..., None]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

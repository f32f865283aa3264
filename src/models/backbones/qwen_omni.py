"""Qwen2.5-Omni's thinker as a backbone: its own audio and vision towers fill the prompt's audio
and video positions, its language model (text model + ``lm_head``) runs the prompt.

The thinker (``Qwen2_5OmniThinkerForConditionalGeneration``) is one HF model holding an audio
encoder (Whisper-like, on 128-bin log-mels), a vision encoder (a Qwen2.5-VL ViT with 2 x 2 patch
merging) and a Qwen2.5 text model. Here it is split along the protocol:

- :attr:`QwenOmniThinker.language_model` is :class:`OmniThinkerLM`, the thinker's text model and
  ``lm_head`` as a transformers causal LM (the same modules, not a copy): what LoRA and MoSE
  adapt (``q_proj``/``v_proj`` by default, never the audio tower's), what AR switches (the audio
  tower shares the attention interface but its layers have no layer index) and what generates;
- :meth:`QwenOmniThinker.embed` runs the frozen towers on each stream's features, the thinker's
  *processor outputs* for one clip, and scatters their tokens into the stream's positions.

A stream's features are the processor's tensors of one clip, packed so that one row is what one
LLM token is made of (a sequence stream of ``tokens`` rows):

- audio: the feature extractor's log-mels ``(n_mels, 4 k)`` -> ``(k, 4 n_mels)`` (the tower
  halves the frames twice: 4 mel frames per token), see :func:`pack_audio`;
- video: the video processor's ``pixel_values_videos`` ``(t h w, C p_t p p)`` of grid ``(t, h,
  w)`` -> ``(t h w / m^2, m^2 C p_t p p)`` (the merger joins ``m x m`` consecutive patches into
  one token), see :func:`pack_video`; the grid is the ``video_grid`` setting.

With a fixed clip length, frame count and resolution every clip gives the same token counts, the
streams' ``tokens``. :mod:`src.models.qwen_omni_inputs` computes these features from raw clips
with the model's own processor (online encoders; ``extract`` stores them).

Positions are the thinker's TMRoPE (:meth:`QwenOmniThinker.position_ids`, computed by the
thinker's own ``get_rope_index``): video tokens at 3D (time, row, column) positions, time 25 per
second, audio and text sequential on all three axes; every forward (the LM loss, closed-set
scoring with its answer tree, generation) runs at them. Known differences from the released
pipeline: audio and video are two blocks (the processor interleaves them in 2 s chunks with
``use_audio_in_video``), and one ``seconds_per_grid`` holds for every clip (the processor takes
each clip's own frame rate; clips decoded to ``num_frames`` frames have
``seconds_per_grid = temporal_patch_size x duration / num_frames``).

As the thinker, the backbone finds its audio and video positions by their token ids, its
config's ``audio_token_id`` (``<|AUDIO|>``) and ``video_token_id`` (``<|VIDEO|>``): the data
config puts them there (``data.placeholder_tokens``), :meth:`QwenOmniThinker.modality_ids`
reads the modality of every position from them, and :meth:`QwenOmniThinker.embed` refuses a
prompt whose stream positions (hence the batch's ``modality_ids``, which AR and MoSE read)
disagree with its ids.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    GenerationMixin,
    PreTrainedTokenizerBase,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniPreTrainedModel,
    Qwen2_5OmniThinkerTextModel,
)

from src.core.errors import InvalidInputError
from src.core.modality import Modality
from src.core.plain_data import PlainValue
from src.core.streams import StreamSpec
from src.models.backbones.base import EmotionBackbone, require_weights
from src.models.backbones.causal_lm import load_multimodal_model

#: Mel frames per audio token: the tower's stride-2 conv, then its stride-2 average pooling.
MELS_PER_TOKEN = 4


def pack_audio(input_features: torch.Tensor) -> torch.Tensor:
    """Log-mels ``(B, n_mels, 4 k)`` -> the audio stream's rows ``(B, k, 4 n_mels)``."""
    batch, mels, frames = input_features.shape
    if frames % MELS_PER_TOKEN:
        raise ValueError(f"the mel frames ({frames}) must be a multiple of {MELS_PER_TOKEN}")
    rows = input_features.transpose(1, 2).reshape(batch, frames // MELS_PER_TOKEN, -1)
    return rows.contiguous()


def unpack_audio(rows: torch.Tensor, n_mels: int) -> torch.Tensor:
    """The inverse of :func:`pack_audio`: ``(B, k, 4 n_mels)`` -> ``(B, n_mels, 4 k)``."""
    batch, tokens, width = rows.shape
    if width != MELS_PER_TOKEN * n_mels:
        raise ValueError(f"audio rows of width {width}, the tower needs {MELS_PER_TOKEN * n_mels}")
    return rows.reshape(batch, tokens * MELS_PER_TOKEN, n_mels).transpose(1, 2)


def pack_video(pixel_values: torch.Tensor, clips: int, merge: int) -> torch.Tensor:
    """``pixel_values_videos`` of ``clips`` equal clips ``(clips t h w, D)`` -> the video
    stream's rows ``(clips, t h w / m^2, m^2 D)`` (the processor lays the ``m x m`` patches
    of one merged token consecutively)."""
    return pixel_values.reshape(clips, -1, merge * merge * pixel_values.shape[-1])


def unpack_video(rows: torch.Tensor, merge: int) -> torch.Tensor:
    """The inverse of :func:`pack_video`: ``(B, N, m^2 D)`` -> ``(B N m^2, D)``."""
    return rows.reshape(-1, rows.shape[-1] // (merge * merge))


def _runs(flags: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The start index and the length of each run of ``True`` in a 1D boolean tensor."""
    edges = torch.diff(torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).int())
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return starts, (ends - starts).tolist()


class OmniThinkerLM(Qwen2_5OmniPreTrainedModel, GenerationMixin):
    """The thinker's text model and ``lm_head`` as a causal LM (the thinker's own modules).

    ``forward`` is ``Qwen2ForCausalLM``'s: the text model on ids or embeddings, then the head on
    the kept positions, and the LM loss when ``labels`` are given.

    Args:
        model: The thinker's ``Qwen2_5OmniThinkerTextModel``.
        lm_head: The thinker's output head.
    """

    _no_split_modules = ["Qwen2_5OmniDecoderLayer"]

    def __init__(self, model: Qwen2_5OmniThinkerTextModel, lm_head: nn.Linear) -> None:
        super().__init__(model.config)
        # No post_init: the modules are the (loaded or seeded) thinker's, not to be re-initialised.
        self.model, self.lm_head = model, lm_head

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


class QwenOmniThinker(EmotionBackbone):
    """Qwen2.5-Omni's thinker: its audio tower for audio streams, its vision tower for visual
    streams, its text model as the frozen LM. Prompts use its chat template (``chat``).

    Args:
        path: Local Qwen2.5-Omni directory (the full model or a thinker saved alone), or a hub
            id already in the local Hugging Face cache (nothing is downloaded). When given,
            ``config`` is not used.
        config: ``Qwen2_5OmniThinkerConfig`` kwargs (``audio_config``, ``vision_config``,
            ``text_config``) of a randomly initialised thinker (tests); the text vocabulary
            defaults to the tokenizer's.
        seed: Seed of that random initialisation (the frozen weights are not checkpointed).
        dtype: Parameter dtype of the thinker (``float32``, ``bfloat16``, ``float16``).
        attn_implementation: transformers attention implementation; ``None``: the default.
        video_grid: The ``(t, h, w)`` patch grid of one clip's ``pixel_values_videos`` (what
            the video processor gives for the data's ``media.num_frames`` and ``frame_size``:
            ``t = frames / 2``, ``h = w = side / 14``); needed with a visual stream, whose
            ``tokens`` must be ``t h w / 4``.
        seconds_per_grid: Seconds one temporal patch of a clip spans (TMRoPE puts video tokens
            ``25 x seconds_per_grid`` apart in time): the processor's ``video_second_per_grid``,
            ``temporal_patch_size / fps`` of the sampled frames; 1.0 is its default (2 frames
            per patch at 2 fps).
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, PlainValue] | None = None,
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        video_grid: list[int] | None = None,
        seconds_per_grid: float = 1.0,
    ) -> None:
        super().__init__(prompt_format="chat")
        require_weights(path, config, "a local Qwen2.5-Omni directory")
        if video_grid is not None and (len(video_grid) != 3 or min(video_grid) < 1):
            raise ValueError(f"model.backbone.video_grid must be 3 positive ints, got {video_grid}")
        self.path, self.config, self.seed = path, config, seed
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.video_grid = None if video_grid is None else [int(v) for v in video_grid]
        if not seconds_per_grid > 0:
            raise ValueError(f"model.backbone.seconds_per_grid must be > 0, got {seconds_per_grid}")
        self.seconds_per_grid = float(seconds_per_grid)
        self.streams: list[StreamSpec] = []

    def settings(self) -> dict[str, PlainValue]:
        return {
            "path": self.path,
            "config": self.config,
            "seed": self.seed,
            "dtype": self.dtype_name,
            "attn_implementation": self.attn_implementation,
            "video_grid": self.video_grid,
            "seconds_per_grid": self.seconds_per_grid,
        }

    # ---------------------------------------------------------------------------- building
    def build(self, tokenizer: PreTrainedTokenizerBase, streams: Sequence[StreamSpec]) -> None:
        if self.is_built:
            raise RuntimeError(f"{type(self).__name__}.build() was already called")
        self.streams = list(streams)
        thinker = load_multimodal_model(
            Qwen2_5OmniThinkerForConditionalGeneration, Qwen2_5OmniThinkerConfig, self.path,
            self.config, len(tokenizer), self.dtype_name, self.attn_implementation, self.seed,
        )  # fmt: skip
        self.audio_tower = thinker.model.audio_tower
        self.visual = thinker.model.visual
        self.language_model = OmniThinkerLM(thinker.model.language_model, thinker.lm_head)
        self.language_model.eval()
        # The thinker's TMRoPE (a bound method: a plain attribute, so the thinker's modules are
        # not registered twice). It finds each block by its start marker, which the released
        # config.json names; a config without them takes the tokenizer's markers.
        self._rope_index = thinker.model.get_rope_index
        self._block_starts = {}
        for key, marker in (("audio_start_token_id", "<|audio_bos|>"),
                            ("vision_start_token_id", "<|vision_bos|>")):  # fmt: skip
            value = getattr(thinker.config, key, None)
            if value is None:
                value = tokenizer.convert_tokens_to_ids(marker)
                if value is None or value == tokenizer.unk_token_id:
                    raise InvalidInputError(
                        f"the thinker's config has no {key} and the tokenizer no {marker!r}: "
                        "use the checkpoint's own tokenizer and config"
                    )
                setattr(thinker.config, key, int(value))
            self._block_starts[key] = int(value)
        #: The placeholder ids of the thinker's audio and video positions, and their tokens.
        self.audio_token_id = int(thinker.config.audio_token_id)
        self.video_token_id = int(thinker.config.video_token_id)
        self._placeholder_tokens = tokenizer.convert_ids_to_tokens(
            [self.audio_token_id, self.video_token_id]
        )
        self._check_streams()

    @property
    def merge(self) -> int:
        """Patches merged per side into one video token (2 for Qwen2.5-Omni)."""
        return int(self.visual.spatial_merge_size)

    def stream_width(self, stream: StreamSpec) -> int:
        """The row width ``dim`` a stream must have for its tower."""
        if stream.modality_id == Modality.AUDIO:
            return MELS_PER_TOKEN * int(self.audio_tower.config.num_mel_bins)
        cfg = self.visual.config
        patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        return self.merge**2 * patch

    def _check_streams(self) -> None:
        for stream in self.streams:
            width = self.stream_width(stream)
            if not stream.sequence or stream.dim != width:
                raise InvalidInputError(
                    f"stream {stream.name!r}: Qwen2.5-Omni takes its processor's features as a "
                    f"sequence stream of dim {width} (got sequence={stream.sequence}, "
                    f"dim={stream.dim})"
                )
            if stream.modality_id == Modality.VISUAL:
                if self.video_grid is None:
                    raise InvalidInputError(
                        f"stream {stream.name!r} is visual: set model.backbone.video_grid to the "
                        "(t, h, w) patch grid of one clip"
                    )
                t, h, w = self.video_grid
                made = t * h * w // self.merge**2
                if h % self.merge or w % self.merge or made != stream.tokens:
                    raise InvalidInputError(
                        f"stream {stream.name!r}: video_grid {self.video_grid} (h and w multiples "
                        f"of {self.merge}) makes {made} tokens, the stream has {stream.tokens}"
                    )

    def train(self, mode: bool = True) -> "QwenOmniThinker":
        super().train(mode)
        if self.is_built:  # the frozen towers never train (no dropout at fit time)
            self.audio_tower.eval()
            self.visual.eval()
        return self

    # ------------------------------------------------------------------------------ running
    @torch.no_grad()
    def audio_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The audio tower's tokens ``(B k, hidden)`` of audio rows ``(B, k, 4 n_mels)``, as
        the thinker's ``get_audio_features`` on the unpacked log-mels of full length."""
        mels = unpack_audio(rows, int(self.audio_tower.config.num_mel_bins))
        batch, _, frames = mels.shape
        lengths = torch.full((batch,), frames, dtype=torch.long, device=mels.device)
        after_cnn, _ = self.audio_tower._get_feat_extract_output_lengths(lengths)
        flat = mels.permute(1, 0, 2).reshape(mels.shape[1], -1)  # (n_mels, sum of frames)
        out = self.audio_tower(
            flat.to(self.audio_tower.dtype), feature_lens=lengths, aftercnn_lens=after_cnn
        )
        return out.last_hidden_state

    @torch.no_grad()
    def video_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The vision tower's merged tokens ``(B N, hidden)`` of video rows ``(B, N, m^2 D)``,
        as the thinker's ``get_video_features`` with every clip of grid ``video_grid``."""
        pixels = unpack_video(rows, self.merge).to(self.visual.dtype)
        grid = torch.tensor([self.video_grid] * rows.shape[0], device=rows.device)
        return self.visual(pixels, grid_thw=grid).pooler_output

    def modality_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The modality of every position as the thinker reads it from the token ids: audio at
        ``audio_token_id``, visual at ``video_token_id``, text elsewhere."""
        out = torch.full_like(input_ids, int(Modality.TEXT))
        out[input_ids == self.audio_token_id] = int(Modality.AUDIO)
        out[input_ids == self.video_token_id] = int(Modality.VISUAL)
        return out

    def position_ids(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """TMRoPE positions ``(3, B, T)``, as the thinker's ``get_rope_index`` gives them for
        these prompts (its ``<|vision_bos|>``/``<|audio_bos|>`` blocks): each video block of
        grid ``video_grid`` at ``seconds_per_grid``, each audio block of ``4 k`` mel frames for
        its ``k`` tokens; padding (``~valid``) is skipped."""
        ids = input_ids.masked_fill(~valid, -1)
        audio = [n for row in ids for n in _runs(row == self.audio_token_id)[1]]
        videos = sum(len(_runs(row == self.video_token_id)[1]) for row in ids)
        for row in ids:
            for token, key, block in (
                (self.audio_token_id, "audio_start_token_id", "audio"),
                (self.video_token_id, "vision_start_token_id", "video"),
            ):
                starts, _ = _runs(row == token)
                before = row[(starts - 1).clamp(min=0)]
                if bool((starts == 0).any() or (before != self._block_starts[key]).any()):
                    raise InvalidInputError(
                        f"Qwen2.5-Omni's positions need every {block} block right after its "
                        f"start marker (token id {self._block_starts[key]}): put "
                        f"<|{'audio' if block == 'audio' else 'vision'}_bos|> before the "
                        "placeholder in data.templates (as conf/experiment/qwen2_5_omni.yaml)"
                    )
        device = input_ids.device
        grids = torch.tensor([self.video_grid or [1, 1, 1]] * videos, device=device).view(-1, 3)
        positions, _ = self._rope_index(
            input_ids,
            video_grid_thw=grids,
            attention_mask=valid.long(),
            audio_seqlens=torch.tensor(audio, device=device) * MELS_PER_TOKEN,
            second_per_grids=torch.full((videos,), self.seconds_per_grid),
        )
        return positions

    def _check_placeholders(self, input_ids: torch.Tensor, stream_ids: torch.Tensor) -> None:
        """The stream positions are exactly the positions the token ids mark, each of its
        stream's modality: the batch's ``modality_ids`` (made from the stream positions) are
        then the ones the token ids say."""
        streams = torch.full_like(input_ids, int(Modality.TEXT))
        for index, stream in enumerate(self.streams):
            streams[stream_ids == index] = int(stream.modality_id)
        if not torch.equal(streams, self.modality_ids(input_ids)):
            audio, video = self._placeholder_tokens
            names = {Modality.AUDIO: audio, Modality.VISUAL: video}
            wanted = ", ".join(f"{s.name}: {names[s.modality_id]!r}" for s in self.streams)
            raise InvalidInputError(
                f"Qwen2.5-Omni finds its audio/video positions by the token ids "
                f"{self.audio_token_id} ({audio}) and {self.video_token_id} ({video}), and the "
                f"prompt's stream positions hold other ids: set data.placeholder_tokens "
                f"{{{wanted}}} (as conf/experiment/qwen2_5_omni.yaml)"
            )

    def embed(
        self, input_ids: torch.Tensor, stream_ids: torch.Tensor, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        self._check_placeholders(input_ids, stream_ids)
        embeds = self.input_embeddings()(input_ids)
        for index, stream in enumerate(self.streams):
            rows = features[stream.name]
            audio = stream.modality_id == Modality.AUDIO
            tokens = self.audio_tokens(rows) if audio else self.video_tokens(rows)
            made_by = f"stream {stream.name!r} (the {'audio' if audio else 'vision'} tower)"
            embeds = self.fill_stream(embeds, stream_ids == index, tokens, made_by)
        return embeds

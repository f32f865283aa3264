"""Qwen2-Audio plus frames: Qwen2-Audio's own audio tower fills the prompt's audio positions,
trainable per-stream projectors put frame features into its visual positions, and its Qwen2
language model (+ ``lm_head``) runs the prompt.

``Qwen2AudioForConditionalGeneration`` holds a Whisper-like audio encoder (on 128-bin log-mels,
input padded to 30 s), a linear ``multi_modal_projector`` into the LM's width and a plain
``Qwen2Model``; it has no vision tower, hence the frames. Split along the protocol:

- :attr:`Qwen2AudioWithFrames.language_model` is a transformers ``Qwen2ForCausalLM`` holding the
  model's own text model and ``lm_head`` (the same modules, not a copy): what LoRA and MoSE
  adapt (``q_proj``/``v_proj`` by default, never the audio tower's, which has the same names),
  what AR switches (the tower keeps its own attention) and what generates. Positions are the
  LM's plain RoPE (``position_ids`` stays the protocol's default);
- :meth:`Qwen2AudioWithFrames.embed` runs the frozen tower and projector on each audio stream's
  log-mels and the trainable projectors on each visual stream's features (one row -> one token
  for a sequence stream, as :class:`~src.models.backbones.projected_causal_lm.ProjectedCausalLM`).

An audio stream's rows are the feature extractor's log-mels of one clip, 4 mel frames per LLM
token (:func:`~src.models.backbones.qwen_omni.pack_audio`: ``(n_mels, 4 k) -> (k, 4 n_mels)``).
The tower only takes its full input (``2 x max_source_positions`` frames, 3000 = 30 s): as the
model does with its processor's ``feature_attention_mask``, the backbone pads the clip's
``4 k`` frames to that length, lets the tower attend to the clip's ``2 k`` positions after its
stride-2 conv only, and keeps the first ``k`` tokens after its average pooling. The padding
frames are the extractor's value of silence, recomputed from the clip's own frames
(:func:`silence_value`); :class:`~src.models.qwen2_audio_inputs.Qwen2AudioInput` ends each clip
with half an STFT window of zeros so that the extractor's frames after the clip are exactly
that, and the tokens equal the released processor + model's on that clip.

The audio positions hold the config's ``audio_token_id`` (``<|AUDIO|>``), as the processor
writes them (``data.placeholder_tokens``); :meth:`Qwen2AudioWithFrames.embed` refuses a prompt
whose audio stream positions are not exactly those ids. Visual positions keep the pad id (the
vocabulary has no vision token); only the stream positions tell them.
"""

from collections.abc import Sequence

import torch
from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import create_bidirectional_mask

from src.core.errors import InvalidInputError
from src.core.modality import Modality
from src.core.plain_data import PlainValue
from src.core.streams import StreamSpec
from src.models.backbones.base import EmotionBackbone, require_weights
from src.models.backbones.causal_lm import load_multimodal_model
from src.models.backbones.qwen_omni import MELS_PER_TOKEN, unpack_audio
from src.models.projector import FeatureProjector

#: Whisper's log-mel normalisation (``WhisperFeatureExtractor``): ``log10`` of the power floored
#: at 1e-10, clipped to 8 below the clip's maximum, then ``(x + 4) / 4``.
LOG_FLOOR, DYNAMIC_RANGE = -10.0, 8.0


def silence_value(mels: torch.Tensor) -> torch.Tensor:
    """The extractor's value of a silent frame in each clip of normalised log-mels ``(B,
    n_mels, frames)``: ``(max(-10, M - 8) + 4) / 4`` with ``M`` the clip's largest log-mel,
    ``(M + 4) / 4`` being its largest value here; ``(B,)``."""
    top = mels.amax(dim=(1, 2))
    return torch.maximum(top - DYNAMIC_RANGE / 4, top.new_tensor((LOG_FLOOR + 4) / 4))


class Qwen2AudioWithFrames(EmotionBackbone):
    """Qwen2-Audio's audio tower for audio streams, linear projectors for visual streams, its
    Qwen2 text model as the frozen LM. Prompts use its chat template (``chat``).

    Args:
        path: Local Qwen2-Audio directory (``Qwen2-Audio-7B-Instruct``), or a hub id already in
            the local Hugging Face cache (nothing is downloaded). When given, ``config`` is not
            used.
        config: ``Qwen2AudioConfig`` kwargs (``audio_config``, ``text_config``,
            ``audio_token_index``) of a randomly initialised model (tests); the text vocabulary
            defaults to the tokenizer's.
        seed: Seed of that random initialisation (the frozen weights are not checkpointed).
        dtype: Parameter dtype of the model (``float32``, ``bfloat16``, ``float16``); the
            projectors train in float32.
        attn_implementation: transformers attention implementation; ``None``: the default.
        projector_hidden: Hidden width of MLP visual projectors; ``None``: linear.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, PlainValue] | None = None,
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        projector_hidden: int | None = None,
    ) -> None:
        super().__init__(prompt_format="chat")
        require_weights(path, config, "a local Qwen2-Audio directory")
        self.path, self.config, self.seed = path, config, seed
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.projector_hidden = projector_hidden
        self.streams: list[StreamSpec] = []

    def settings(self) -> dict[str, PlainValue]:
        return {
            "path": self.path,
            "config": self.config,
            "seed": self.seed,
            "dtype": self.dtype_name,
            "attn_implementation": self.attn_implementation,
            "projector_hidden": self.projector_hidden,
        }

    # ---------------------------------------------------------------------------- building
    def build(self, tokenizer: PreTrainedTokenizerBase, streams: Sequence[StreamSpec]) -> None:
        if self.is_built:
            raise RuntimeError(f"{type(self).__name__}.build() was already called")
        self.streams = list(streams)
        model = load_multimodal_model(
            Qwen2AudioForConditionalGeneration, Qwen2AudioConfig, self.path, self.config,
            len(tokenizer), self.dtype_name, self.attn_implementation, self.seed,
        )  # fmt: skip
        self.audio_tower = model.model.audio_tower
        self.audio_projector = model.model.multi_modal_projector
        # The text part is a plain Qwen2Model + head: HF's own Qwen2ForCausalLM around the
        # loaded modules (made on the meta device, so nothing is allocated or initialised).
        with torch.device("meta"):
            language_model = Qwen2ForCausalLM(model.model.language_model.config)
        language_model.model, language_model.lm_head = model.model.language_model, model.lm_head
        self.language_model = language_model.eval()
        #: The placeholder id of the audio positions, and its token.
        self.audio_token_id = int(model.config.audio_token_id)
        self._audio_token = tokenizer.convert_ids_to_tokens(self.audio_token_id)
        self._check_streams()
        visual = [s for s in self.streams if s.modality_id == Modality.VISUAL]
        self.projectors = nn.ModuleDict(
            {
                s.name: FeatureProjector(
                    s.dim, self.hidden_size, s.tokens, self.projector_hidden, s.sequence
                )
                for s in visual
            }
        )

    @property
    def mel_bins(self) -> int:
        return int(self.audio_tower.config.num_mel_bins)

    @property
    def input_frames(self) -> int:
        """The tower's one input length in mel frames (3000: 30 s at the 10 ms hop)."""
        tower = self.audio_tower
        return int(tower.max_source_positions * tower.conv1.stride[0] * tower.conv2.stride[0])

    def _check_streams(self) -> None:
        width, most = MELS_PER_TOKEN * self.mel_bins, self.input_frames // MELS_PER_TOKEN
        for stream in self.streams:
            if stream.modality_id != Modality.AUDIO:
                continue
            if not stream.sequence or stream.dim != width or stream.tokens > most:
                raise InvalidInputError(
                    f"stream {stream.name!r}: Qwen2-Audio takes its feature extractor's log-mels "
                    f"as a sequence stream of dim {width} and at most {most} tokens (got "
                    f"sequence={stream.sequence}, dim={stream.dim}, tokens={stream.tokens})"
                )

    def train(self, mode: bool = True) -> "Qwen2AudioWithFrames":
        super().train(mode)
        if self.is_built:  # the frozen tower never trains (no dropout at fit time)
            self.audio_tower.eval()
            self.audio_projector.eval()
        return self

    # ------------------------------------------------------------------------------ running
    @torch.no_grad()
    def audio_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The audio tokens ``(B k, hidden)`` of audio rows ``(B, k, 4 n_mels)``: the tower on
        the clip's log-mels padded with silence to its input length, attending to the clip's
        positions only (as the model's ``feature_attention_mask`` makes it), then the model's
        projector on the first ``k`` pooled positions."""
        mels = unpack_audio(rows, self.mel_bins)
        batch, bins, frames = mels.shape
        pad = silence_value(mels)[:, None, None].expand(batch, bins, self.input_frames - frames)
        padded = torch.cat([mels, pad.to(mels.dtype)], dim=-1).to(self.audio_tower.dtype)
        lengths = torch.full((batch,), frames, dtype=torch.long, device=mels.device)
        after_conv, tokens = self.audio_tower._get_feat_extract_output_lengths(lengths)
        positions = self.audio_tower.max_source_positions
        attended = torch.arange(positions, device=mels.device)[None] < after_conv[:, None]
        mask = create_bidirectional_mask(
            config=self.audio_tower.config,
            inputs_embeds=padded.new_zeros(batch, positions, 1),
            attention_mask=attended.long(),
        )
        hidden = self.audio_tower(padded, attention_mask=mask).last_hidden_state
        return self.audio_projector(hidden[:, : int(tokens[0])]).flatten(0, 1)

    def modality_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The modality of every position as the model reads it from the token ids: audio at
        ``audio_token_id``, text elsewhere (visual positions hold the pad id: only the stream
        positions tell them)."""
        out = torch.full_like(input_ids, int(Modality.TEXT))
        out[input_ids == self.audio_token_id] = int(Modality.AUDIO)
        return out

    def _check_placeholders(self, input_ids: torch.Tensor, stream_ids: torch.Tensor) -> None:
        """The audio stream positions are exactly the positions holding ``audio_token_id``."""
        audio = torch.zeros_like(input_ids, dtype=torch.bool)
        for index, stream in enumerate(self.streams):
            if stream.modality_id == Modality.AUDIO:
                audio |= stream_ids == index
        if not torch.equal(audio, input_ids == self.audio_token_id):
            names = [s.name for s in self.streams if s.modality_id == Modality.AUDIO]
            wanted = ", ".join(f"{name}: {self._audio_token!r}" for name in names)
            raise InvalidInputError(
                f"Qwen2-Audio's audio positions hold its token id {self.audio_token_id} "
                f"({self._audio_token}) and nothing else does, and this prompt differs: set "
                f"data.placeholder_tokens {{{wanted}}} (as conf/experiment/qwen2_audio.yaml)"
            )

    def embed(
        self, input_ids: torch.Tensor, stream_ids: torch.Tensor, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        self._check_placeholders(input_ids, stream_ids)
        embeds = self.input_embeddings()(input_ids)
        for index, stream in enumerate(self.streams):
            rows = features[stream.name]
            if stream.modality_id == Modality.AUDIO:
                tokens, made_by = self.audio_tokens(rows), "the audio tower"
            else:
                tokens, made_by = self.projectors[stream.name](rows), "its projector"
            embeds = self.fill_stream(
                embeds, stream_ids == index, tokens, f"stream {stream.name!r} ({made_by})"
            )
        return embeds

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        visual = [s for s in self.streams if s.modality_id == Modality.VISUAL]
        return self.by_modality(visual, lambda s: self.projectors[s.name])

"""Today's backbone: feature projectors in front of a frozen Hugging Face causal LM."""

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from src.core.plain_data import PlainValue
from src.core.streams import StreamSpec
from src.models.backbones.base import EmotionBackbone, PromptFormat, require_weights
from src.models.backbones.causal_lm import load_causal_lm
from src.models.projector import FeatureProjector


class ProjectedCausalLM(EmotionBackbone):
    """One trainable projector per feature stream (Emotion-LLaMA's ``llama_proj`` and
    ``feats_llama_proj``) writing into the input embeddings of any ``AutoModelForCausalLM``.

    Args:
        path: Local checkpoint directory of the LLM (LLaMA-2-7B, Qwen2, ...), or a hub id of a
            model already in the local Hugging Face cache (nothing is downloaded). When given,
            it is what is loaded and ``config`` is not used, so ``--model.backbone.path DIR``
            points a config-built setup (the demo) at real weights.
        config: Model config kwargs (``model_type`` defaults to ``llama``) for a randomly
            initialised LM, e.g. the tiny demo backbone; used when ``path`` is not given.
        seed: Seed of that random initialisation: the frozen weights are not saved in
            checkpoints, so every process and run must rebuild the same ones.
        dtype: Parameter dtype of the LM (``float32``, ``bfloat16``, ``float16``).
        attn_implementation: transformers attention implementation (``sdpa``, ``eager``, ...);
            ``None``: the family's default (``sdpa`` where supported).
        projector_hidden: Hidden width of MLP projectors; ``None``: linear, as Emotion-LLaMA.
        prompt_format: The prompt format the LM expects (``auto``: any).
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, PlainValue] | None = None,
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        projector_hidden: int | None = None,
        prompt_format: PromptFormat = "auto",
    ) -> None:
        super().__init__(prompt_format)
        require_weights(path, config, "a local LLM directory")
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
            "prompt_format": self.prompt_format,
        }

    def build(self, tokenizer: PreTrainedTokenizerBase, streams: Sequence[StreamSpec]) -> None:
        if self.is_built:
            raise RuntimeError(f"{type(self).__name__}.build() was already called")
        # A path is loaded; the config is the recipe for a random LM without one.
        recipe = None if self.path is not None else self.config
        self.language_model = load_causal_lm(
            self.path, recipe, len(tokenizer), self.dtype_name, self.attn_implementation,
            self.seed,
        )  # fmt: skip
        self.streams = list(streams)
        hidden = self.hidden_size
        self.projectors = nn.ModuleDict(
            {
                s.name: FeatureProjector(s.dim, hidden, s.tokens, self.projector_hidden, s.sequence)
                for s in self.streams
            }
        )

    def embed(
        self, input_ids: torch.Tensor, stream_ids: torch.Tensor, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        embeds = self.input_embeddings()(input_ids)
        for index, stream in enumerate(self.streams):
            projected = self.projectors[stream.name](features[stream.name])
            made_by = f"stream {stream.name!r} (its projector)"
            embeds = self.fill_stream(embeds, stream_ids == index, projected, made_by)
        return embeds

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return self.by_modality(self.streams, lambda s: self.projectors[s.name])

"""A second kind of backbone, outside ``src``: the proof that the protocol suffices.

:class:`ModalityEmbeddedLM` differs from :class:`ProjectedCausalLM` in how features enter the
LM: one projector per modality (shared by that modality's streams) plus a learned embedding of
the modality type. It is chosen by ``class_path`` like any backbone; the Lightning module, the
adapters and AR are not edited for it.
"""

from collections.abc import Sequence

import torch
from torch import nn

from src.core.plain_data import PlainValue
from src.core.streams import StreamSpec
from src.models.backbones.base import EmotionBackbone, PromptFormat
from src.models.backbones.causal_lm import load_causal_lm


class ModalityEmbeddedLM(EmotionBackbone):
    """Shared per-modality projectors and a modality-type embedding in front of a random LM.

    Args:
        config: Model config kwargs of the randomly initialised LM.
        seed: Seed of its initialisation.
        prompt_format: The prompt format the LM expects (``auto``: any).
    """

    def __init__(
        self, config: dict[str, PlainValue], seed: int = 0, prompt_format: PromptFormat = "auto"
    ) -> None:
        super().__init__(prompt_format)
        self.config, self.seed = config, seed
        self.streams: list[StreamSpec] = []

    def settings(self) -> dict[str, PlainValue]:
        return {"config": self.config, "seed": self.seed, "prompt_format": self.prompt_format}

    def build(self, tokenizer, streams: Sequence[StreamSpec]) -> None:
        self.language_model = load_causal_lm(None, self.config, len(tokenizer), seed=self.seed)
        self.streams = list(streams)
        modalities = sorted({s.modality for s in self.streams})
        dims = {m: {s.dim for s in self.streams if s.modality == m} for m in modalities}
        for modality, sizes in dims.items():
            if len(sizes) != 1:
                raise ValueError(f"{modality} streams of different sizes {sorted(sizes)}")
        hidden = self.hidden_size
        self.projectors = nn.ModuleDict({m: nn.Linear(dims[m].pop(), hidden) for m in modalities})
        self.type_embedding = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(hidden)) for m in modalities}
        )

    def embed(
        self, input_ids: torch.Tensor, stream_ids: torch.Tensor, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        embeds = self.input_embeddings()(input_ids)
        for index, stream in enumerate(self.streams):
            x = features[stream.name]
            x = x if stream.sequence else x.unsqueeze(1).expand(-1, stream.tokens, -1)
            tokens = self.projectors[stream.modality](x) + self.type_embedding[stream.modality]
            mask = (stream_ids == index).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, tokens.to(embeds.dtype))
        return embeds

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            m: [*self.projectors[m].parameters(), self.type_embedding[m]] for m in self.projectors
        }


class ReadyLM(EmotionBackbone):
    """The protocol around a ready transformers model (text-only prompts): for toy modules
    that test callbacks and adapters on a bare LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.language_model = model

    def build(self, tokenizer, streams) -> None:
        pass

    def settings(self) -> dict:
        return {}

    def embed(self, input_ids, stream_ids, features) -> torch.Tensor:
        return self.input_embeddings()(input_ids)

"""The backbone protocol: what the Lightning module needs of a multimodal language backbone.

:class:`~src.models.emotion_module.EmotionLLMModule` takes its backbone as a component chosen in
YAML by ``class_path`` (``conf/model/``), as lightning-hydra-template passes ``net:``. A backbone
turns a prompt whose feature positions are marked by ``stream_ids`` into input embeddings (its
projectors, or a model's own audio and vision towers) and runs a frozen causal language model on
them. Scoring, the training loss, generation, adapters (LoRA, MoSE) and attention reallocation
(AR) only use the members below, so a new family or a new kind of backbone is one new class and
never an edit of the Lightning module.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.core.plain_data import PlainValue
from src.core.streams import StreamSpec
from src.models.fsdp_policy import no_split_module_names

#: How prompts are rendered (``data.prompt_format``): the tokenizer's chat template (``chat``),
#: Llama-2's ``[INST]`` (``inst``), or whichever fits the tokenizer (``auto``).
PromptFormat = Literal["auto", "chat", "inst"]


class BackboneNotBuiltError(RuntimeError):
    """A backbone member was used before :meth:`EmotionBackbone.build`."""


class EmotionBackbone(nn.Module, ABC):
    """A frozen causal LM with a way to put feature streams into its input embeddings.

    Built in two steps: the config makes the object (plain settings only, nothing loaded), and
    :meth:`build` loads or creates the network once the data module has given the tokenizer and
    the streams (the CLI links them to the Lightning module, which calls :meth:`build`).

    Args:
        prompt_format: The prompt format the backbone was trained with; ``auto`` accepts any.
            A backbone fine-tuned on one format (Emotion-LLaMA's ``[INST]``) names it, and a run
            whose ``data.prompt_format`` differs is refused before it starts.
    """

    def __init__(self, prompt_format: PromptFormat = "auto") -> None:
        super().__init__()
        self.prompt_format = prompt_format

    #: The frozen transformers causal LM, set by :meth:`build`: what adapters adapt (they may
    #: replace it, e.g. with a peft-injected copy), AR reallocates and ``generate`` runs.
    language_model: PreTrainedModel

    # ---------------------------------------------------------------------------- building
    @abstractmethod
    def build(self, tokenizer: PreTrainedTokenizerBase, streams: Sequence[StreamSpec]) -> None:
        """Load or create the network for this tokenizer and these feature streams, frozen."""

    @abstractmethod
    def settings(self) -> dict[str, PlainValue]:
        """The init arguments, as plain values: stored in checkpoints (as data, never built) so
        ``test --ckpt_path`` rebuilds the same frozen backbone."""

    @property
    def is_built(self) -> bool:
        return "language_model" in self._modules

    def input_embeddings(self) -> nn.Embedding:
        """The language model's token embedding table."""
        if not self.is_built:
            raise BackboneNotBuiltError(f"{type(self).__name__}.build() was not called")
        return self.language_model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings().embedding_dim

    @property
    def embedding_dtype(self) -> torch.dtype:
        """The dtype of the frozen embeddings (and of the inputs the LM expects)."""
        return self.input_embeddings().weight.dtype

    def layers(self) -> list[nn.Module]:
        """The language model's transformer blocks, in order: the modules its family lists in
        ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ...), the same units FSDP
        wraps. A backbone whose LM holds other such blocks (an audio tower) overrides this."""
        names = no_split_module_names(self.language_model)  # also inside a peft wrapper
        return [m for m in self.language_model.modules() if type(m).__name__ in names]

    def attention_model(self) -> nn.Module:
        """The model whose attention implementation AR switches (``set_attn_implementation``):
        the language model only, never an encoder tower that shares the attention interface."""
        return self.language_model

    # ------------------------------------------------------------------------------ running
    @abstractmethod
    def embed(
        self, input_ids: torch.Tensor, stream_ids: torch.Tensor, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Input embeddings of the prompts, ``(B, T, hidden)``: text tokens embedded, and every
        position with ``stream_ids == i`` filled from stream ``i``'s features."""

    def position_ids(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """The model's own position ids of right- or left-padded sequences (``valid``: the
        non-padding positions, ``(B, T)`` boolean), ``(B, T)`` or ``(axes, B, T)``; ``None``
        (the default): positions count the sequence's tokens, as the LM does by itself. A
        model with multimodal positions (Qwen2.5-Omni's TMRoPE) overrides this."""
        return None

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The backbone's own trainable parameters by modality name (``audio``, ``visual``),
        e.g. its projectors: they join that modality's optimizer group."""
        return {}

    # ----------------------------------------------------------------- helpers of subclasses
    @staticmethod
    def fill_stream(
        embeds: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, made_by: str
    ) -> torch.Tensor:
        """``embeds`` with the ``positions`` (``(B, T)`` boolean) filled, in order, by the rows
        of ``tokens`` (``(B, N, hidden)`` or ``(B N, hidden)``); a count mismatch is an error
        naming ``made_by`` (which stream and which projector or tower made the tokens)."""
        made = tokens.shape[0] * tokens.shape[1] if tokens.ndim == 3 else tokens.shape[0]
        if int(positions.sum()) != made:
            raise ValueError(
                f"{made_by}: the prompt has {int(positions.sum())} feature positions but "
                f"{made} tokens were made"
            )
        return embeds.masked_scatter(positions.unsqueeze(-1), tokens.to(embeds.dtype))

    @staticmethod
    def by_modality(
        streams: Sequence[StreamSpec], modules: Callable[[StreamSpec], nn.Module]
    ) -> dict[str, list[nn.Parameter]]:
        """The parameters of each stream's module (``modules(stream)``), grouped by the
        stream's modality name: a :meth:`modality_parameters` for per-stream projectors."""
        groups: dict[str, list[nn.Parameter]] = {}
        for stream in streams:
            groups.setdefault(stream.modality_id.name.lower(), []).extend(
                modules(stream).parameters()
            )
        return groups

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> Any:
        """The language model on input embeddings (``kwargs``: labels, position ids, ...)."""
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )


def require_weights(path: str | None, config: object, what: str) -> None:
    """A backbone needs a local directory (``path``) or a config for a random init."""
    if path is None and config is None:
        raise ValueError(
            f"give model.backbone.path ({what}) or model.backbone.config (a model config for a "
            "randomly initialised model)"
        )

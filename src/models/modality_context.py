"""A shared holder for the ``modality_ids`` of the sequence currently inside the backbone.

Hugging Face models do not pass arbitrary tensors down to every linear layer, so the multimodal
model binds the batch's ``modality_ids`` here before calling the backbone, and the components that
need them (MoSE layers, the AR attention function) read them back. Tokens beyond the bound ids
(new tokens during ``generate()`` with a KV cache) are generated text.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from src.core.modality import Modality


class ModalityContext:
    """Holds ``modality_ids`` (batch, seq) for the forward pass in progress."""

    def __init__(self) -> None:
        self._ids: torch.Tensor | None = None

    @property
    def bound(self) -> bool:
        """Whether modality ids are bound (inside :meth:`bind`)."""
        return self._ids is not None

    @contextmanager
    def bind(self, modality_ids: torch.Tensor) -> Iterator["ModalityContext"]:
        """Bind ``modality_ids`` (batch, seq) for the duration of a forward or generate call."""
        if modality_ids.dim() != 2:
            raise ValueError(
                f"modality_ids must be (batch, seq), got shape {tuple(modality_ids.shape)}"
            )
        previous, self._ids = self._ids, modality_ids
        try:
            yield self
        finally:
            self._ids = previous

    def keys(self, key_len: int) -> torch.Tensor:
        """Modality ids of ``key_len`` key positions; positions past the bound ids are text."""
        ids = self._require()
        if key_len <= ids.shape[1]:
            return ids[:, :key_len]
        extra = ids.new_full((ids.shape[0], key_len - ids.shape[1]), int(Modality.TEXT))
        return torch.cat([ids, extra], dim=1)

    def queries(self, query_len: int, key_len: int | None = None) -> torch.Tensor:
        """Modality ids of the last ``query_len`` positions of a sequence of ``key_len`` keys.

        Without ``key_len`` (a linear layer does not see the cache length), a forward whose length
        equals the bound ids is the prompt itself; any other length is a continuation of generated
        text.
        """
        ids = self._require()
        if key_len is None:
            if query_len == ids.shape[1]:
                return ids
            return ids.new_full((ids.shape[0], query_len), int(Modality.TEXT))
        return self.keys(key_len)[:, key_len - query_len :]

    def _require(self) -> torch.Tensor:
        if self._ids is None:
            raise RuntimeError(
                "no modality_ids are bound: call the backbone through MultimodalEmotionLLM, "
                "or wrap the call in `with context.bind(modality_ids):`"
            )
        return self._ids

"""The contract between the emotion LightningModule and a parameter-efficient adapter.

The backbone LLM is frozen; an adapter decides which new parameters train (plain LoRA through
peft, MoSE experts, ...), may add an auxiliary loss (MoSE's gating loss) and reports per-step
diagnostics. The LightningModule only talks to this interface.
"""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from src.models.multimodal_llm import MultimodalEmotionLLM


class Adapter(ABC):
    """Puts trainable parameters into a frozen :class:`MultimodalEmotionLLM` backbone."""

    @abstractmethod
    def apply(self, llm: "MultimodalEmotionLLM") -> None:
        """Insert the adapter into ``llm.language_model`` (in place, or by setting
        ``llm.backbone.language_model``)."""

    def trainable_modules(self, llm: "MultimodalEmotionLLM") -> list[nn.Module]:
        """Modules whose parameters are the adapter's (default: none beyond what apply unfroze)."""
        return []

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Extra loss from the last training forward (for example a gating loss), or ``None``."""
        return None

    def on_train_batch_start(
        self, llm: "MultimodalEmotionLLM", batch: dict[str, Any], step: int
    ) -> None:
        """Hook before each training forward (for example to update dynamic modality weights)."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Scalars to log as ``train/<key>`` after each training step."""
        return {}

    def modality_weights(self) -> dict[str, float] | None:
        """Current audio/visual weights, when the adapter has them (AR may target these)."""
        return None

    def prepare_train_batch(
        self, llm: "MultimodalEmotionLLM", batch: dict[str, Any], step: int
    ) -> dict[str, Any]:
        """The batch the training forward uses (for example with a modality dropped)."""
        return batch

    def modality_parameters(self, llm: "MultimodalEmotionLLM") -> dict[str, list[nn.Parameter]]:
        """The adapter's parameters that belong to one modality (``audio``/``visual``: MoSE's
        experts); they join that modality's optimizer group with its projectors."""
        return {}

    def lr_scales(self) -> dict[str, float] | None:
        """Per-modality learning-rate factors for this step (``None``: no modulation). They
        scale the update itself, which, unlike a gradient scale, AdamW does not undo."""
        return None

    def figures(self) -> dict[str, Any]:
        """Matplotlib figures to log as MLflow artifacts at the end of fit (file name -> figure)."""
        return {}

    def export(self, llm: "MultimodalEmotionLLM", folder: Path) -> list[Path]:
        """Write the adapter's weights in a format other tools read (``python -m src.cli
        export``; see docs/tracking.md); returns the files written."""
        raise NotImplementedError(f"{type(self).__name__} has no export format")


class NoAdapter(Adapter):
    """Train only the projectors; the backbone stays exactly as loaded."""

    def apply(self, llm: "MultimodalEmotionLLM") -> None:
        return None

    def export(self, llm: "MultimodalEmotionLLM", folder: Path) -> list[Path]:
        return []  # nothing beyond the projectors, which the export command writes

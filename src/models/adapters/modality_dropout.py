"""Modality dropout on plain LoRA: a baseline against audio over-reliance.

During training each sample, with probability ``p``, loses one modality (chosen uniformly among
``modalities``): its tokens are masked out of attention, exactly as the unimodal evidence
passes mask them. The model thus has to answer from the other modality alone now and then, so it
cannot lean on audio only. Evaluation sees every modality.
"""

from typing import TYPE_CHECKING, Any

import torch

from src.core.modality import Modality
from src.models.adapters.lora import LoRAAdapter

if TYPE_CHECKING:  # pragma: no cover
    from src.models.multimodal_llm import MultimodalEmotionLLM


class ModalityDropoutLoRAAdapter(LoRAAdapter):
    """peft LoRA trained with per-sample modality dropout (MLflow ``method`` tag
    ``LoRA+dropout``; exports as a peft adapter folder like :class:`LoRAAdapter`).

    Args:
        p: Probability that a training sample loses one modality.
        modalities: The modalities that may be dropped (one per dropped sample).
        seed: Seed of the dropout draws (combined with the global step, so a resumed run draws
            the same masks).
        **kwargs: :class:`~src.models.adapters.lora.LoRAAdapter` arguments (r, alpha, dropout,
            target_modules, layers).
    """

    def __init__(
        self,
        p: float = 0.3,
        modalities: list[str] = ["audio", "visual"],  # noqa: B006 - jsonargparse default
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"modality dropout p must be in [0, 1], got {p}")
        self.modalities = [Modality.parse(m) for m in modalities]
        if not self.modalities or any(
            m not in (Modality.AUDIO, Modality.VISUAL) for m in self.modalities
        ):
            raise ValueError(f"modality dropout modalities must be audio/visual, got {modalities}")
        self.p, self.seed = float(p), int(seed)
        self.last_rate = 0.0

    def prepare_train_batch(
        self, llm: "MultimodalEmotionLLM", batch: dict[str, Any], step: int
    ) -> dict[str, Any]:
        ids = batch["modality_ids"]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = ids.shape[0]
        drop = torch.rand(n, generator=generator) < self.p
        which = torch.randint(len(self.modalities), (n,), generator=generator)
        codes = torch.tensor([int(m) for m in self.modalities])[which]
        masked = drop[:, None].to(ids.device) & (ids == codes[:, None].to(ids.device))
        self.last_rate = float(drop.float().mean())
        mask = batch["attention_mask"] * (~masked).long()
        return {**batch, "attention_mask": mask}

    def step_metrics(self) -> dict[str, float]:
        return {"modality_dropout/rate": self.last_rate}

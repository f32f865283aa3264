"""``logit_scale``: PAI's ``s' = s + alpha |s|`` on one modality's logits (the eager baseline)."""

from typing import Any

import torch

from src.core.modality import Modality
from src.models.attention.reallocator import Reallocator
from src.models.attention.spans import MONITORED, pai_logits


class LogitScale(Reallocator):
    """PAI-style logit amplification on an explicit eager path (the peer baseline).

    The amplification is ``alpha * strength``; ``s + a |s|`` grows with ``a`` for every logit,
    so the scaled modality's share grows monotonically with the strength.

    Args:
        scale_modality: the modality whose logits are amplified (default ``visual``: away from
            the over-relied audio).
        alpha: PAI's amplification ``alpha >= 0``.
        **kwargs: the shared settings of :class:`Reallocator`.
    """

    name = "logit_scale"
    eager = True

    def __init__(self, scale_modality: str = "visual", alpha: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if alpha < 0.0:
            raise ValueError(f"AR alpha must be >= 0, got {alpha}")
        self.scale_modality = Modality.parse(scale_modality)
        if self.scale_modality not in MONITORED:
            raise ValueError(f"AR scale_modality must be audio, visual or text: {scale_modality!r}")
        self.alpha = float(alpha)

    @property
    def is_identity(self) -> bool:
        return self.strength == 0.0 or self.alpha == 0.0

    def transform_logits(
        self, logits: torch.Tensor, key_ids: torch.Tensor, acting: torch.Tensor
    ) -> torch.Tensor:
        target = (key_ids == int(self.scale_modality))[:, None, None] & acting
        return pai_logits(logits, target, self.alpha * self.strength)

    def settings(self) -> dict[str, Any]:
        return {"scale_modality": self.scale_modality.name.lower(), "alpha": self.alpha}

    def direction_warning(self) -> str | None:
        if self.scale_modality.name.lower() == self.over_relied:
            return "it amplifies that modality's logits"
        return None

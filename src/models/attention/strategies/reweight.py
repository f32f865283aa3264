"""``reweight``: fixed post-softmax multipliers per modality, as an additive ``log w`` bias."""

from typing import Any

import torch

from src.models.attention.reallocator import Reallocator, modality_index
from src.models.attention.spans import MONITORED


class Reweight(Reallocator):
    """Multiply each modality's post-softmax weights by ``w_m ** strength`` and renormalise.

    The bias depends only on the key's modality, so one mask serves every layer of a forward.
    Strength interpolates in log space: ``strength = 0`` gives all multipliers 1 (identity),
    1 the configured ones; the over-relied modality's share is monotone in between.

    Args:
        multipliers: modality (``audio``, ``visual``, ``text``) -> multiplier ``> 0``; missing
            modalities keep 1. Default: ``{<over_relied>: 0.5}`` (halve the over-relied
            modality's weights), which narrowed the gap smoothly where ``span_mass`` at full
            strength did not (issue 14).
        **kwargs: the shared settings of :class:`Reallocator` (strength, layers, heads,
            query_rows, gate, over_relied, monitor).
    """

    name = "reweight"

    def __init__(self, multipliers: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        given = {self.over_relied: 0.5} if multipliers is None else dict(multipliers)
        self.multipliers: dict[str, float] = {}
        for name, value in given.items():
            modality_index(name)  # a clear error for a modality AR does not know
            if not float(value) > 0.0:
                raise ValueError(f"AR multipliers[{name!r}] must be > 0, got {value}")
            self.multipliers[str(name).lower()] = float(value)
        self._weights = torch.tensor([self.multipliers.get(m.name.lower(), 1.0) for m in MONITORED])

    @property
    def is_identity(self) -> bool:
        return self.strength == 0.0 or bool((self._weights == 1.0).all())

    def factors(self, masses: torch.Tensor | None, plan: Any) -> torch.Tensor:
        return self._weights.pow(self.strength)

    def settings(self) -> dict[str, Any]:
        return {"multipliers": dict(self.multipliers)}

    def label(self) -> str:
        own = ",".join(f"{k}={v:g}" for k, v in sorted(self.multipliers.items()))
        return f"reweight({own}) s={self.strength:g} gate={self.gate}"

    def direction_warning(self) -> str | None:
        over = modality_index(self.over_relied)
        other = modality_index("visual" if self.over_relied == "audio" else "audio")
        if self._weights[over] > self._weights[other]:
            return (
                f"its multiplier ({float(self._weights[over]):g}) exceeds the other modality's "
                f"({float(self._weights[other]):g})"
            )
        return None

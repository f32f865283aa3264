"""Modality ids: the one source of truth about which token is which.

The collator builds a ``modality_ids`` tensor of shape ``(batch, seq)`` once per batch; MoSE
(routing) and AR (attention reallocation) both read it. Nothing recomputes spans from fixed token
counts.
"""

from enum import IntEnum


class Modality(IntEnum):
    """Integer code of a token's modality in ``modality_ids``."""

    PAD = -1
    TEXT = 0
    AUDIO = 1
    VISUAL = 2

    @classmethod
    def parse(cls, name: str) -> "Modality":
        """Return the modality called ``name`` (case-insensitive), with a clear error otherwise."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            known = ", ".join(m.name.lower() for m in cls if m is not cls.PAD)
            raise ValueError(f"unknown modality {name!r}; expected one of: {known}") from None


#: Modalities that carry non-text evidence, in a fixed order used by plots and metrics.
PERCEPTUAL_MODALITIES: tuple[Modality, ...] = (Modality.AUDIO, Modality.VISUAL)

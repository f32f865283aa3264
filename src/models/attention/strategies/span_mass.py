"""``span_mass``: move each row's audio/visual mass toward a target share, exactly."""

from typing import Any, Literal

import torch

from src.models.attention.reallocator import Reallocator, modality_index
from src.models.attention.spans import share_pair, span_mass_factors

Target = Literal["fixed", "proportional", "from_adapter"]
TARGETS: tuple[str, ...] = ("fixed", "proportional", "from_adapter")


class SpanMass(Reallocator):
    """Per row and head: ``M_a' = (1 - s) M_a + s t P``, ``M_v' = (1 - s) M_v + s (1 - t) P``.

    ``P = M_a + M_v`` and the text mass stay fixed, so rows still sum to one; ``s`` is the
    strength, so the new masses interpolate linearly from each sample's own shares (``s = 0``,
    identity) to the target (``s = 1``).

    Args:
        target: where the target audio share ``t`` comes from: ``fixed`` (``audio_share``),
            ``proportional`` (visible audio keys / visible audio+visual keys of the row) or
            ``from_adapter`` (``w_a / (w_a + w_v)`` of MoSE's modality weights).
        audio_share: ``t`` for ``target: fixed``, in ``[0, 1]``.
        only_away: leave a row alone when reaching the target would raise the over-relied
            modality's share (the default never moves attention toward it).
        **kwargs: the shared settings of :class:`Reallocator`.
    """

    name = "span_mass"
    needs_masses = True

    def __init__(
        self,
        target: Target = "proportional",
        audio_share: float = 0.5,
        only_away: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if target not in TARGETS:
            raise ValueError(f"AR target must be one of {TARGETS}, got {target!r}")
        if not 0.0 <= audio_share <= 1.0:
            raise ValueError(f"AR audio_share must be in [0, 1], got {audio_share}")
        self.target = target
        self.audio_share = float(audio_share)
        self.only_away = bool(only_away)
        self._adapter_share: float | None = None
        self._shares: torch.Tensor | None = None

    def on_bind(self, modality_weights: dict[str, float] | None) -> None:
        self._adapter_share = None
        self._shares = None
        if self.target == "from_adapter":
            self._adapter_share = share_from_weights(modality_weights)

    def factors(self, masses: torch.Tensor | None, plan: Any) -> torch.Tensor:
        assert masses is not None
        factors = span_mass_factors(masses, self._target_shares(plan), self.strength)
        if self.only_away:
            over = modality_index(self.over_relied)
            toward = factors[..., over : over + 1] > 1.0
            factors = factors.masked_fill(toward, 1.0)
        return factors

    def _target_shares(self, plan: Any) -> torch.Tensor:
        """Target shares ``(t, 1 - t)`` of the audio and visual span, ``(2,)`` or ``(B,1,U,2)``."""
        if self.target == "proportional":
            return plan.proportional_shares()
        if self.target == "from_adapter" and self._adapter_share is None:
            raise RuntimeError("AR target 'from_adapter' needs modality weights in bind()")
        device = plan.key_ids.device
        if self._shares is None or self._shares.device != device:
            share = self.audio_share if self.target == "fixed" else self._adapter_share
            self._shares = share_pair(share).to(device)
        return self._shares

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target}
        if self.target == "fixed":
            out["audio_share"] = self.audio_share
        out["only_away"] = self.only_away
        return out

    def direction_warning(self) -> str | None:
        if self.only_away:
            return None
        return (
            "only_away is off, so rows whose share of it is below the target move toward it "
            "(the end-of-test check reports whether they did)"
        )


def share_from_weights(weights: dict[str, float] | None) -> float:
    """``w_a / (w_a + w_v)`` from MoSE modality weights, with clear errors."""
    if weights is None:
        raise ValueError(
            "AR target 'from_adapter' needs modality weights, but the adapter has none "
            "(Adapter.modality_weights() returned None)"
        )
    try:
        audio, visual = float(weights["audio"]), float(weights["visual"])
    except KeyError as err:
        raise ValueError(f"AR modality weights lack {err.args[0]!r}: got {weights}") from None
    if audio < 0 or visual < 0 or audio + visual <= 0:
        raise ValueError(f"AR modality weights must be >= 0 with a positive sum, got {weights}")
    return audio / (audio + visual)

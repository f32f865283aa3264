"""The regularised gating loss of MoSE.

Two terms, both computed from what the MoSE layers recorded during the training forward:

- **within-modality load balancing**: inside each modality's group of experts, either the squared
  coefficient of variation of expert importance (``cv2``, as in LoRAMoE / Shazeer et al.) or the
  Switch Transformer loss (``switch``);
- **cross-modality balance**: the squared relative difference between the audio and the visual
  experts' mean per-token contribution ``c_m = mean_tokens ||delta_m||^2``, which is zero when both
  modalities' experts move their tokens equally far and at most one when one modality does all.

``L_gate = balance_weight * L_balance + modality_balance_weight * L_modality``; each term is
averaged over layers (and forwards since the last step). Equations: ``docs/mose.md``.
"""

from dataclasses import dataclass

import torch

from src.data.modality import Modality

BALANCE_LOSSES = ("cv2", "switch")


@dataclass
class GateRecord:
    """What one MoSE layer saw of one modality group in one forward.

    Attributes:
        probs: ``(tokens, experts)`` gate softmax probabilities, attached to the graph.
        usage: ``(experts,)`` sum over tokens of the mixing weights actually applied (top-k
            renormalised in top-k mode), detached.
        dispatch: ``(experts,)`` number of tokens that selected each expert (top-k, or the
            arg-max in dense mode), detached.
        count: Number of tokens of the group.
        contribution: Mean over tokens of ``||delta||^2`` of the group's adapter output, attached
            to the graph (a zero that still touches the graph when ``count == 0``).
    """

    probs: torch.Tensor
    usage: torch.Tensor
    dispatch: torch.Tensor
    count: int
    contribution: torch.Tensor


#: One forward of one layer: group name (``audio``, ``visual``, ``text``) -> record.
LayerRecord = dict[str, GateRecord]

_AUDIO = Modality.AUDIO.name.lower()
_VISUAL = Modality.VISUAL.name.lower()


@dataclass
class GateLossOutput:
    """The gating loss and its two (unweighted) terms."""

    loss: torch.Tensor
    balance: torch.Tensor
    modality: torch.Tensor


def cv_squared(importance: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``Var(I) / Mean(I)^2`` (population variance)."""
    importance = importance.float()
    return importance.var(unbiased=False) / (importance.mean() ** 2 + eps)


def switch_balance(probs: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss ``E * sum_e f_e P_e`` (1 when perfectly balanced)."""
    n_experts = probs.shape[1]
    fraction = dispatch.to(probs.dtype) / dispatch.sum().clamp_min(1)
    return n_experts * (fraction * probs.float().mean(0)).sum()


class MoSEGateLoss:
    """Regularised gating loss over the records of all MoSE layers.

    Args:
        balance: ``"cv2"`` (LoRAMoE / Shazeer importance CV^2) or ``"switch"`` (Switch
            Transformer ``E * sum f_e P_e``), applied inside each modality's experts.
        balance_weight: Weight of the within-modality balancing term.
        modality_balance_weight: Weight of the cross-modality contribution balance term.
        eps: Stabiliser of the cross-modality ratio.
    """

    def __init__(
        self,
        balance: str = "cv2",
        balance_weight: float = 0.01,
        modality_balance_weight: float = 0.01,
        eps: float = 1e-8,
    ) -> None:
        if balance not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss: unknown {balance!r}; expected one of {BALANCE_LOSSES}")
        if balance_weight < 0 or modality_balance_weight < 0:
            raise ValueError(
                "balance_weight and modality_balance_weight must be >= 0, got "
                f"{balance_weight} and {modality_balance_weight}"
            )
        self.balance = balance
        self.balance_weight = balance_weight
        self.modality_balance_weight = modality_balance_weight
        self.eps = eps

    def group_balance(self, record: GateRecord) -> torch.Tensor | None:
        """Balancing term of one group, or ``None`` when it has no tokens or a single expert."""
        if record.count == 0 or record.probs.shape[1] < 2:
            return None
        if self.balance == "cv2":
            return cv_squared(record.probs.sum(0))
        return switch_balance(record.probs, record.dispatch)

    def modality_balance(self, record: LayerRecord) -> torch.Tensor | None:
        """Cross-modality term of one layer forward, or ``None`` unless both modalities occur."""
        audio, visual = record.get(_AUDIO), record.get(_VISUAL)
        if audio is None or visual is None or audio.count == 0 or visual.count == 0:
            return None
        c_a, c_v = audio.contribution.float(), visual.contribution.float()
        return ((c_a - c_v) / (c_a + c_v + self.eps)) ** 2

    def __call__(self, records: list[LayerRecord]) -> GateLossOutput:
        """Loss over ``records`` (one entry per layer and forward).

        Terms that have nothing to measure (absent modality, single expert) contribute an exact
        zero that is still attached to every recorded tensor, so the backward pass reaches the
        same parameters whatever the batch holds (DDP needs that).
        """
        if not records:
            raise ValueError("MoSEGateLoss: no gate records (was there a training forward?)")
        tensors = [
            t for record in records for r in record.values() for t in (r.probs, r.contribution)
        ]
        if not tensors:
            raise ValueError("MoSEGateLoss: the gate records hold no modality group")
        anchor = torch.stack([t.float().sum() for t in tensors]).sum() * 0.0
        balance_terms = [
            term
            for record in records
            for r in record.values()
            if (term := self.group_balance(r)) is not None
        ]
        modality_terms = [
            term for record in records if (term := self.modality_balance(record)) is not None
        ]
        balance = torch.stack(balance_terms).mean() if balance_terms else anchor.new_zeros(())
        modality = torch.stack(modality_terms).mean() if modality_terms else anchor.new_zeros(())
        loss = self.balance_weight * balance + self.modality_balance_weight * modality + anchor
        return GateLossOutput(loss=loss, balance=balance.detach(), modality=modality.detach())

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

from src.core.modality import Modality

BALANCE_LOSSES = ("cv2", "switch")
_AUDIO = Modality.AUDIO.name.lower()
_VISUAL = Modality.VISUAL.name.lower()


@dataclass
class GateRecord:
    """What one MoSE layer saw of one modality group in one forward.

    Attributes:
        importance: ``(experts,)`` sum over the group's tokens of the gate softmax
            probabilities, attached to the graph.
        usage: ``(experts,)`` sum over tokens of the mixing weights actually applied (top-k
            renormalised in top-k mode), detached.
        dispatch: ``(experts,)`` number of tokens that selected each expert (top-k, or the
            arg-max in dense mode), detached.
        count: Number of tokens of the group.
        contribution: Mean over the group's tokens of ``||delta||^2`` of the adapter output,
            attached to the graph when the layer tracks it (an exact zero when ``count == 0``).
    """

    importance: torch.Tensor
    usage: torch.Tensor
    dispatch: torch.Tensor
    count: int
    contribution: torch.Tensor


@dataclass
class LayerRecord:
    """One forward of one MoSE layer, for all its groups at once (few tensors per layer).

    Attributes:
        groups: Group names in the layer's order (``audio``, ``visual``[, ``text``]).
        columns: ``(start, stop)`` of each group's experts in the column tensors.
        counts: Tokens of each group.
        importance: ``(columns,)`` per-expert sums of gate probabilities (graph).
        usage: ``(columns,)`` per-expert sums of applied mixing weights (detached).
        dispatch: ``(columns,)`` per-expert counts of selecting tokens (detached).
        contribution: ``(groups,)`` per-token mean ``||delta||^2`` of each group.
    """

    groups: tuple[str, ...]
    columns: tuple[tuple[int, int], ...]
    counts: tuple[int, ...]
    importance: torch.Tensor
    usage: torch.Tensor
    dispatch: torch.Tensor
    contribution: torch.Tensor

    def __contains__(self, name: str) -> bool:
        return name in self.groups

    def __getitem__(self, name: str) -> GateRecord:
        """The record of group ``name`` (slices of the layer's tensors)."""
        index = self.groups.index(name)
        start, stop = self.columns[index]
        return GateRecord(
            importance=self.importance[start:stop],
            usage=self.usage[start:stop],
            dispatch=self.dispatch[start:stop],
            count=self.counts[index],
            contribution=self.contribution[index],
        )

    def layout(self) -> tuple:
        """Records with the same layout stack into one tensor per field."""
        return self.groups, self.columns


def stack_group(
    records: list[LayerRecord], name: str, field: str, where: str = "present"
) -> torch.Tensor | None:
    """``(records, experts)`` rows of ``field`` for group ``name``, over the records where the
    group has tokens (``where="present"``) or all of them (``"all"``); ``None`` if none."""
    rows = [r for r in records if name in r and (where == "all" or r.counts[r.groups.index(name)])]
    if not rows:
        return None
    index = rows[0].groups.index(name)
    start, stop = rows[0].columns[index]
    return torch.stack([getattr(r, field) for r in rows])[:, start:stop]


@dataclass
class GateLossOutput:
    """The gating loss and its two (unweighted) terms."""

    loss: torch.Tensor
    balance: torch.Tensor
    modality: torch.Tensor


def cv_squared(importance: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``Var(I) / Mean(I)^2`` over the last dimension."""
    importance = importance.float()
    return importance.var(-1, unbiased=False) / (importance.mean(-1) ** 2 + eps)


def switch_balance(importance: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss ``E * sum_e f_e P_e`` over the last dimension (1 if balanced).

    ``P_e = importance_e / count`` is the mean gate probability (gate rows sum to one, so the
    token count is ``sum_e importance_e``) and ``f_e`` the fraction of dispatched (token,
    expert) pairs that went to expert ``e``.
    """
    n_experts = importance.shape[-1]
    importance = importance.float()
    mean_prob = importance / importance.detach().sum(-1, keepdim=True).clamp_min(1e-12)
    fraction = dispatch.float() / dispatch.float().sum(-1, keepdim=True).clamp_min(1)
    return n_experts * (fraction * mean_prob).sum(-1)


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

    def balance_terms(self, records: list[LayerRecord], name: str) -> torch.Tensor | None:
        """Balancing term of group ``name`` in each record where it has tokens, or ``None``.

        Records without tokens of the group, and single-expert groups, have nothing to balance.
        """
        importance = stack_group(records, name, "importance")
        if importance is None or importance.shape[-1] < 2:
            return None
        if self.balance == "cv2":
            return cv_squared(importance)
        return switch_balance(importance, stack_group(records, name, "dispatch"))

    def modality_terms(self, records: list[LayerRecord]) -> torch.Tensor | None:
        """``((c_a - c_v) / (c_a + c_v))^2`` of each layer forward where both modalities occur."""
        both = [
            r
            for r in records
            if _AUDIO in r
            and _VISUAL in r
            and r.counts[r.groups.index(_AUDIO)] > 0
            and r.counts[r.groups.index(_VISUAL)] > 0
        ]
        if not both:
            return None
        a, v = both[0].groups.index(_AUDIO), both[0].groups.index(_VISUAL)
        contribution = torch.stack([r.contribution for r in both]).float()
        c_a, c_v = contribution[:, a], contribution[:, v]
        return ((c_a - c_v) / (c_a + c_v + self.eps)) ** 2

    def __call__(self, records: list[LayerRecord]) -> GateLossOutput:
        """Loss over ``records`` (one per layer and forward, all with the same group layout).

        Each term is the mean over what it can measure (absent modalities and single experts
        are skipped). The loss also carries an exact zero attached to every recorded tensor, so
        it is a graph tensor whatever the batch holds.
        """
        if not records:
            raise ValueError("MoSEGateLoss: no gate records (was there a training forward?)")
        if len({r.layout() for r in records}) != 1:
            raise ValueError("MoSEGateLoss: records of differently configured MoSE layers")
        importance = torch.stack([r.importance for r in records]).float()
        contribution = torch.stack([r.contribution for r in records]).float()
        anchor = (importance.sum() + contribution.sum()) * 0.0
        balance_terms = [
            t for name in records[0].groups if (t := self.balance_terms(records, name)) is not None
        ]
        modality_terms = self.modality_terms(records)
        balance = torch.cat(balance_terms).mean() if balance_terms else anchor.new_zeros(())
        modality = modality_terms.mean() if modality_terms is not None else anchor.new_zeros(())
        loss = self.balance_weight * balance + self.modality_balance_weight * modality + anchor
        return GateLossOutput(loss=loss, balance=balance.detach(), modality=modality.detach())

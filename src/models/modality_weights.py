"""Dynamic modality weights: how strongly the audio and the visual experts speak.

Every MoSE layer multiplies the output of a modality's experts by that modality's weight
``w_m`` (``m`` in audio, visual; text is always 1). A strategy decides ``w = (w_audio, w_visual)``:

- ``none`` (:class:`FixedModalityWeights`): constant weights, ``(1, 1)`` unless configured.
- ``learned`` (:class:`LearnedModalityWeights`): ``w = 2 * softmax(theta)``, trained with the rest
  of MoSE (``theta`` starts at zero, so ``w`` starts at ``(1, 1)`` and always sums to 2).
- ``dominance`` (:class:`DominanceModalityWeights`): OGM-GE-style. Before a training step it
  measures how well the model does on the gold label from audio alone (visual tokens masked)
  and from visual alone (audio masked), and shrinks the weight of the dominant modality, giving
  the difference to the other one. The measure (``signal``) is the gold-label probability, the
  gold log-likelihood over chance (``log p + log K``, which moves where probabilities are
  compressed near chance) or the unimodal batch accuracy over chance. See ``docs/mose.md``.

The weights live in one module registered on the backbone (``mose_modality_weights``), so the
learned parameters train and the measured weights travel with MoSE checkpoints.
"""

import math
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from src.core.modality import Modality

#: Names of the weighted modalities, in the order of the weight vector.
WEIGHTED_MODALITIES: tuple[Modality, ...] = (Modality.AUDIO, Modality.VISUAL)


class LabelScorer(Protocol):
    """What the dominance strategy needs from the multimodal model."""

    training: bool

    def score_labels(
        self, batch: dict[str, Any], drop_modalities: tuple[Modality, ...] = ()
    ) -> torch.Tensor:  # pragma: no cover - protocol
        """(batch, num_labels) log-likelihoods, with ``drop_modalities`` masked out."""

    def train(self, mode: bool = True) -> Any:  # pragma: no cover - protocol
        """Switch train/eval mode."""


class ModalityWeights(nn.Module):
    """Base class: ``weights()`` returns the tensor ``(w_audio, w_visual)``."""

    def weights(self) -> torch.Tensor:
        """Current weights, shape ``(2,)``, order :data:`WEIGHTED_MODALITIES`."""
        raise NotImplementedError

    def update(self, llm: LabelScorer, batch: dict[str, Any], step: int) -> None:
        """Hook before a training step (only the dominance strategy uses it)."""

    def as_dict(self) -> dict[str, float]:
        """Current weights as ``{"audio": w_a, "visual": w_v}`` (plain floats, for logging)."""
        values = self.weights().detach().float().cpu().tolist()
        return {m.name.lower(): float(v) for m, v in zip(WEIGHTED_MODALITIES, values, strict=True)}


class FixedModalityWeights(ModalityWeights):
    """Strategy ``none``: constant weights.

    Args:
        audio: Weight of the audio experts' output.
        visual: Weight of the visual experts' output.
    """

    def __init__(self, audio: float = 1.0, visual: float = 1.0) -> None:
        super().__init__()
        if audio < 0 or visual < 0:
            raise ValueError(
                f"fixed modality weights must be >= 0, got audio={audio}, visual={visual}"
            )
        # Not persistent: the value comes from the config, not from a checkpoint.
        self.register_buffer(
            "_w", torch.tensor([audio, visual], dtype=torch.float32), persistent=False
        )

    def weights(self) -> torch.Tensor:
        return self._w


class LearnedModalityWeights(ModalityWeights):
    """Strategy ``learned``: ``w = 2 * softmax(theta)`` (or ``softplus(theta) / softplus(0)``).

    Args:
        normalize: Keep ``w_audio + w_visual = 2`` (a softmax over the two modalities), so the
            weights can only shift contribution from one modality to the other. Without it each
            weight is ``softplus(theta_m) / log 2`` and the two move independently.
    """

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.logits = nn.Parameter(torch.zeros(len(WEIGHTED_MODALITIES)))

    def weights(self) -> torch.Tensor:
        if self.normalize:
            return len(WEIGHTED_MODALITIES) * torch.softmax(self.logits, dim=0)
        return F.softplus(self.logits) / math.log(2.0)


class DominanceModalityWeights(ModalityWeights):
    """Strategy ``dominance``: shrink the modality that already dominates (OGM-GE style).

    With ``s_a`` and ``s_v`` the mean probability of the gold label (softmax over the label set)
    when only audio, resp. only visual, tokens are visible, and ``rho = s_a / s_v``: if
    ``rho > 1`` audio dominates and its target weight is ``max(min_weight, 1 - tanh(alpha (rho
    - 1)))``; the visual target is ``2`` minus that (and symmetrically when visual dominates).
    Targets are smoothed with an exponential moving average of ``momentum``.

    Args:
        alpha: Strength of the modulation (OGM-GE's ``alpha``).
        momentum: EMA factor of the weights (0 = jump to each new target).
        interval: Measure every ``interval`` training steps (each measurement costs two extra
            no-grad scoring passes).
        min_weight: Floor of the dominant modality's weight (the other gets at most
            ``2 - min_weight``).
        signal: What ``s_a``, ``s_v`` measure: ``confidence`` (mean gold-label probability),
            ``loglik`` (mean gold log-likelihood over chance, ``max(0, mean log p + log K)``)
            or ``accuracy`` (unimodal batch accuracy over chance, ``max(0, acc - 1/K)``).
        conserve_sum: Give the weaker modality ``2 - w_dom`` (the sum stays 2: MoSE's
            rebalancing); ``False`` keeps it at 1 (OGM-GE's coefficient, which only slows the
            dominant modality).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        momentum: float = 0.9,
        interval: int = 1,
        min_weight: float = 0.1,
        signal: Literal["confidence", "loglik", "accuracy"] = "confidence",
        conserve_sum: bool = True,
    ) -> None:
        super().__init__()
        if signal not in SIGNALS:
            raise ValueError(f"dominance signal must be one of {SIGNALS}, got {signal!r}")
        if alpha < 0:
            raise ValueError(f"dominance alpha must be >= 0, got {alpha}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"dominance momentum must be in [0, 1), got {momentum}")
        if interval < 1:
            raise ValueError(f"dominance interval must be >= 1, got {interval}")
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError(f"dominance min_weight must be in [0, 1], got {min_weight}")
        self.alpha = alpha
        self.momentum = momentum
        self.interval = interval
        self.min_weight = min_weight
        self.signal = signal
        self.conserve_sum = conserve_sum
        # Persistent: the measured weights change predictions, so checkpoints must carry them.
        self.register_buffer("_w", torch.ones(len(WEIGHTED_MODALITIES)))
        #: Last measured ``(s_audio, s_visual, rho)``, for logging.
        self.last_measurement: tuple[float, float, float] | None = None

    def weights(self) -> torch.Tensor:
        return self._w

    def target(self, s_audio: float, s_visual: float) -> torch.Tensor:
        """Target weights for unimodal gold-label confidences ``s_audio`` and ``s_visual``."""
        eps = 1e-8
        rho = (s_audio + eps) / (s_visual + eps)
        dominant = 0 if rho >= 1.0 else 1
        ratio = rho if dominant == 0 else 1.0 / rho
        w_dom = max(self.min_weight, 1.0 - math.tanh(self.alpha * (ratio - 1.0)))
        target = torch.empty(2)
        target[dominant] = w_dom
        target[1 - dominant] = 2.0 - w_dom if self.conserve_sum else 1.0
        return target

    @torch.no_grad()
    def observe(self, s_audio: float, s_visual: float) -> None:
        """Move the weights towards :meth:`target` of the given confidences."""
        target = self.target(s_audio, s_visual).to(self._w)
        self._w.mul_(self.momentum).add_((1.0 - self.momentum) * target)
        self.last_measurement = (s_audio, s_visual, (s_audio + 1e-8) / (s_visual + 1e-8))

    @torch.no_grad()
    def update(self, llm: LabelScorer, batch: dict[str, Any], step: int) -> None:
        if step % self.interval != 0:
            return
        measured = unimodal_confidence(llm, batch, self.signal)
        if measured is not None:
            self.observe(*measured)


@torch.no_grad()
def unimodal_confidence(
    llm: LabelScorer, batch: dict[str, Any], signal: str = "confidence"
) -> tuple[float, float] | None:
    """The unimodal ``signal`` (see :class:`DominanceModalityWeights`) from audio only and from
    visual only, over all ranks.

    Runs ``llm.score_labels`` twice in eval mode (no dropout) with the other modality dropped.
    Under DDP the sums are all-reduced so every rank gets the same weights. Returns ``None`` when
    no sample of the batch (on any rank) has a label.
    """
    if signal not in SIGNALS:
        raise ValueError(f"dominance signal must be one of {SIGNALS}, got {signal!r}")
    labels = batch.get("labels")
    if labels is None:
        raise KeyError("batch field 'labels' is required by the dominance modality weights")
    was_training = llm.training
    llm.train(False)
    try:
        audio_only = llm.score_labels(batch, drop_modalities=(Modality.VISUAL,))
        visual_only = llm.score_labels(batch, drop_modalities=(Modality.AUDIO,))
    finally:
        llm.train(was_training)
    labels = labels.to(audio_only.device)
    valid = labels >= 0
    gold = labels.clamp_min(0).unsqueeze(1)

    def per_sample(scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float(), -1)
        if signal == "confidence":
            return logp.gather(1, gold).squeeze(1).exp()
        if signal == "loglik":
            return logp.gather(1, gold).squeeze(1)
        return (logp.argmax(-1) == gold.squeeze(1)).float()

    sums = torch.stack(
        [
            (per_sample(audio_only) * valid).sum(),
            (per_sample(visual_only) * valid).sum(),
            valid.sum().float(),
        ]
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    if sums[2].item() == 0:
        return None
    s_a, s_v = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    chance = 1.0 / audio_only.shape[-1]
    if signal == "loglik":  # nats over chance
        s_a, s_v = max(0.0, s_a - math.log(chance)), max(0.0, s_v - math.log(chance))
    elif signal == "accuracy":  # accuracy over chance
        s_a, s_v = max(0.0, s_a - chance), max(0.0, s_v - chance)
    return s_a, s_v


STRATEGIES = ("none", "learned", "dominance")
SIGNALS = ("confidence", "loglik", "accuracy")


def build_modality_weights(strategy: str, **kwargs: Any) -> ModalityWeights:
    """Build the strategy called ``strategy`` (one of :data:`STRATEGIES`) with ``kwargs``."""
    if strategy == "none":
        return FixedModalityWeights(**kwargs)
    if strategy == "learned":
        return LearnedModalityWeights(**kwargs)
    if strategy == "dominance":
        return DominanceModalityWeights(**kwargs)
    raise ValueError(
        f"modality_weighting: unknown strategy {strategy!r}; expected one of {STRATEGIES}"
    )

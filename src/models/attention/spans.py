"""Per-modality attention mass and the exact log-biases that reallocate it.

A multiplicative change of the post-softmax weights of a group of keys by ``c`` equals adding
``log c`` to their logits and renormalising, which is what a float mask in SDPA does; so the
reallocation never needs the attention output computed in eager form, only the softmax of the
selected rows' logits to read the masses.

Shapes: probabilities ``(B, H, Q, K)``; key one-hot ``(B, 1, K, 3)`` over :data:`MONITORED`
(audio, visual, text; padding keys belong to none); masses ``(B, H, Q, 3)``.
"""

import torch

from src.data.modality import Modality

#: Modalities whose attention share is measured, in the order used by masses, metrics and plots.
MONITORED: tuple[Modality, ...] = (Modality.AUDIO, Modality.VISUAL, Modality.TEXT)

#: Stand-in for ``log 0`` in biases: finite, so ``0 * bias`` in a matmul stays 0, and still
#: exactly zero weight after ``exp``.
LOG_ZERO = -1e30


def key_one_hot(key_ids: torch.Tensor) -> torch.Tensor:
    """Float32 membership ``(B, 1, K, 3)`` of each key in the monitored modalities."""
    return torch.stack([key_ids == int(m) for m in MONITORED], dim=-1)[:, None].float()


def span_masses(probs: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Mass each row puts on audio, visual and text keys: ``probs @ one_hot``, ``(..., 3)``."""
    return torch.matmul(probs, one_hot)


def reweighted_masses(masses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Masses after ``p'_j = w_m(j) p_j / sum_k w_m(k) p_k`` (``weights``: ``(3,)``)."""
    scaled = masses * weights
    return scaled / scaled.sum(-1, keepdim=True)


def span_mass_factors(
    masses: torch.Tensor, audio_share: torch.Tensor | float, strength: float
) -> torch.Tensor:
    """Factors for the audio and visual keys that move mass toward a target audio share.

    With ``M_a``, ``M_v`` the row's audio and visual masses and ``P = M_a + M_v``, the new masses
    are ``M_a' = (1 - s) M_a + s t P`` and ``M_v' = (1 - s) M_v + s (1 - t) P`` (``t`` the target
    audio share, ``s`` the strength). Text mass and ``P`` are unchanged, so the row still sums to
    one. Rows without audio or without visual mass (no such key visible, or a mass that
    underflows float32) are left alone (factor 1).

    Args:
        masses: ``(..., >=2)`` masses from :func:`span_masses`.
        audio_share: target audio share of ``P``: a float or a tensor broadcastable to
            ``masses[..., 0]``.
        strength: ``s`` in ``[0, 1]``; 1 reaches the target exactly.

    Returns:
        ``(..., 2)`` factors ``M_a'/M_a``, ``M_v'/M_v``.
    """
    audio, visual = masses[..., 0], masses[..., 1]
    perceptual = audio + visual
    factor_a = (1.0 - strength) + strength * audio_share * perceptual / audio
    factor_v = (1.0 - strength) + strength * (1.0 - audio_share) * perceptual / visual
    valid = (audio > 0) & (visual > 0)  # False for NaN rows (fully masked padding) too
    factors = torch.stack([factor_a, factor_v], dim=-1)
    return torch.where(valid[..., None], factors, 1.0)


def span_mass_masses(masses: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Masses after :func:`span_mass_factors`, ``(..., 3)`` (text unchanged)."""
    return torch.cat([masses[..., :2] * factors, masses[..., 2:]], dim=-1)


def keys_bias(factors: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Spread per-modality factors ``(B, H, Q, n)`` onto the keys as a log-bias ``(B, H, Q, K)``.

    The first ``n`` monitored modalities get ``log factor``; other keys (text, padding) 0.
    """
    n = factors.shape[-1]
    log_factors = factors.log().clamp_min(LOG_ZERO)
    return torch.matmul(log_factors, one_hot[..., :n].transpose(-1, -2))


def pai_logits(logits: torch.Tensor, target_keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """PAI's intervention on the logits of one modality's keys: ``s' = s + alpha |s|``.

    Args:
        logits: ``(B, H, Q, K)`` logits (finite where visible).
        target_keys: boolean, broadcastable to ``logits``: the visible keys to amplify in the
            selected rows and heads.
        alpha: amplification; 0 leaves the logits unchanged.
    """
    return torch.where(target_keys, logits + alpha * logits.abs(), logits)

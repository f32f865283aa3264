"""Per-modality attention mass and the exact log-biases that reallocate it.

Everything here works on attention *logits* (scaled ``q k^T`` plus mask, ``-inf`` where masked)
so that the attention matrix after softmax is never needed: a multiplicative change of the
post-softmax weights of a group of keys by ``c`` equals adding ``log c`` to their logits and
renormalising, which is what a float mask in SDPA does.

Shapes: logits ``(B, H, Q, K)``; key modality ids ``(B, K)``; masses ``(B, H, Q, 3)`` in the
order of :data:`MONITORED` (audio, visual, text).
"""

import math

import torch

from src.data.modality import Modality

#: Modalities whose attention share is measured, in the order used by masses, metrics and plots.
MONITORED: tuple[Modality, ...] = (Modality.AUDIO, Modality.VISUAL, Modality.TEXT)


def key_groups(key_ids: torch.Tensor) -> torch.Tensor:
    """Boolean membership ``(B, 1, 1, K, 3)`` of each key in the monitored modalities."""
    return torch.stack([key_ids == int(m) for m in MONITORED], dim=-1)[:, None, None]


def span_log_masses(
    logits: torch.Tensor, key_ids: torch.Tensor, count: int = len(MONITORED)
) -> torch.Tensor:
    """Log of the softmax mass each query row puts on audio, visual and text keys.

    Args:
        logits: ``(B, H, Q, K)`` attention logits, ``-inf`` on masked keys.
        key_ids: ``(B, K)`` modality ids of the keys.
        count: how many of the monitored modalities to measure (2: audio and visual only).

    Returns:
        ``(B, H, Q, count)`` log masses; ``-inf`` for a modality with no visible key and for
        rows with no visible key at all.
    """
    total = torch.logsumexp(logits, dim=-1, keepdim=True)
    groups = key_groups(key_ids)
    spans = [
        torch.logsumexp(logits.masked_fill(~groups[..., i], -math.inf), dim=-1)
        for i in range(count)
    ]
    log_masses = torch.stack(spans, dim=-1)
    # A fully masked row (left padding) has total -inf; report no mass instead of NaN.
    return torch.where(torch.isfinite(total), log_masses - total, -math.inf)


def reweight_log_factors(multipliers: dict[Modality, float], device: torch.device) -> torch.Tensor:
    """``log w`` per monitored modality, shape ``(3,)`` (modalities absent from the dict: 1)."""
    weights = [float(multipliers.get(m, 1.0)) for m in MONITORED]
    return torch.tensor(weights, dtype=torch.float32, device=device).log()


def reweighted_log_masses(log_masses: torch.Tensor, log_factors: torch.Tensor) -> torch.Tensor:
    """Masses after ``p'_j = w_m(j) p_j / sum_k w_m(k) p_k``, in log space, ``(..., 3)``."""
    scaled = log_masses + log_factors
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def span_mass_log_factors(
    log_masses: torch.Tensor, audio_share: torch.Tensor | float, strength: float
) -> torch.Tensor:
    """Log factors for the audio and visual keys that move mass toward a target audio share.

    With ``M_a``, ``M_v`` the row's audio and visual masses and ``P = M_a + M_v``, the new masses
    are ``M_a' = (1 - s) M_a + s t P`` and ``M_v' = (1 - s) M_v + s (1 - t) P`` (``t`` the target
    audio share, ``s`` the strength). Text mass and ``P`` are unchanged, so the row still sums to
    one. Rows that see no audio or no visual key are left alone (factor 1).

    Args:
        log_masses: ``(..., 3)`` log masses from :func:`span_log_masses`.
        audio_share: target share of the audio span in ``P``, a float or a tensor broadcastable
            to ``log_masses[..., 0]``.
        strength: ``s`` in ``[0, 1]``; 1 reaches the target exactly.

    Returns:
        ``(..., 2)`` log factors ``log(M_a'/M_a)``, ``log(M_v'/M_v)``.
    """
    log_a, log_v = log_masses[..., 0], log_masses[..., 1]
    share = torch.as_tensor(audio_share, dtype=log_masses.dtype, device=log_masses.device)
    log_p = torch.logaddexp(log_a, log_v)
    target_a = torch.log(share) + log_p
    target_v = torch.log1p(-share) + log_p
    if strength < 1.0:
        keep, move = math.log1p(-strength), math.log(strength) if strength > 0 else -math.inf
        target_a = torch.logaddexp(keep + log_a, move + target_a)
        target_v = torch.logaddexp(keep + log_v, move + target_v)
    valid = torch.isfinite(log_a) & torch.isfinite(log_v)
    factor_a = torch.where(valid, target_a - log_a, 0.0)
    factor_v = torch.where(valid, target_v - log_v, 0.0)
    return torch.stack([factor_a, factor_v], dim=-1)


def span_mass_log_masses(log_masses: torch.Tensor, log_factors: torch.Tensor) -> torch.Tensor:
    """Masses after :func:`span_mass_log_factors`, ``(..., 3)`` (text unchanged)."""
    return torch.cat([log_masses[..., :2] + log_factors, log_masses[..., 2:]], dim=-1)


def per_key_bias(log_factors: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """Spread per-modality log factors ``(B, H, Q, n)`` onto keys: ``(B, H, Q, K)``.

    The first ``n`` monitored modalities get their factor, every other key (text, padding) 0.
    """
    groups = key_groups(key_ids)
    bias = torch.zeros((), dtype=log_factors.dtype, device=log_factors.device)
    for i in reversed(range(log_factors.shape[-1])):
        bias = torch.where(groups[..., i], log_factors[..., i, None], bias)
    return bias


def pai_logits(logits: torch.Tensor, target_keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """PAI's intervention on the logits of one modality's keys: ``s' = s + alpha |s|``.

    Args:
        logits: ``(B, H, Q, K)`` logits (finite where visible).
        target_keys: boolean, broadcastable to ``logits``: the visible keys to amplify in the
            selected rows and heads.
        alpha: amplification; 0 leaves the logits unchanged.
    """
    return torch.where(target_keys, logits + alpha * logits.abs(), logits)

"""Per-modality attention mass and the exact log-biases that reallocate it.

A multiplicative change of the post-softmax weights of a group of keys by ``c`` equals adding
``log c`` to their logits and renormalising, which is what a float mask in SDPA does; so the
reallocation never needs the attention output computed in eager form, only the softmax of the
selected rows' logits to read the masses.

Shapes: probabilities ``(B, H, Q, K)``; key one-hot ``(B, 1, K, 3)`` over :data:`MONITORED`
(audio, visual, text; padding keys belong to none); masses ``(B, H, Q, 3)``.
"""

import torch

from src.core.modality import Modality

#: Modalities whose attention share is measured, in the order used by masses, metrics and plots.
MONITORED: tuple[Modality, ...] = (Modality.AUDIO, Modality.VISUAL, Modality.TEXT)

#: Stand-in for ``log 0`` in biases: finite, so ``0 * bias`` in a matmul stays 0, and still
#: exactly zero weight after ``exp``.
LOG_ZERO = -1e30


def key_one_hot(key_ids: torch.Tensor) -> torch.Tensor:
    """Float32 membership ``(B, 1, K, 3)`` of each key in the monitored modalities."""
    return torch.stack([key_ids == int(m) for m in MONITORED], dim=-1)[:, None].float()


def _per_sample_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x (B, H, Q, n) @ y (B, 1, n, m)`` as one ``bmm`` over ``(B, H*Q, n)``: broadcasting
    ``y`` over heads would copy it."""
    batch, heads, rows, n = x.shape
    out = torch.bmm(x.reshape(batch, heads * rows, n), y.reshape(batch, n, -1))
    return out.reshape(batch, heads, rows, -1)


def span_masses(probs: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Mass each row puts on audio, visual and text keys: ``probs @ one_hot``, ``(..., 3)``."""
    return _per_sample_matmul(probs, one_hot.expand(probs.shape[0], 1, -1, -1))


def reweighted_masses(masses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Masses after ``p'_j = w_m(j) p_j / sum_k w_m(k) p_k`` (``weights``: ``(3,)``)."""
    scaled = masses * weights
    return scaled / scaled.sum(-1, keepdim=True)


def share_pair(audio_share: torch.Tensor | float) -> torch.Tensor:
    """Target shares ``(..., 2)`` of the audio and the visual span: ``(t, 1 - t)``."""
    share = torch.as_tensor(audio_share, dtype=torch.float32)
    return torch.stack([share, 1.0 - share], dim=-1)


def span_mass_factors(
    masses: torch.Tensor,
    shares: torch.Tensor,
    strength: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Factors for the audio and visual keys that move mass toward target shares.

    With ``M_a``, ``M_v`` the row's audio and visual masses and ``P = M_a + M_v``, the new masses
    are ``M_a' = (1 - s) M_a + s t P`` and ``M_v' = (1 - s) M_v + s (1 - t) P`` (``t`` the target
    audio share, ``s`` the strength). Text mass and ``P`` are unchanged, so the row still sums to
    one. Rows without audio or without visual mass (no such key visible, or a mass that
    underflows float32) are left alone (factor 1).

    Args:
        masses: ``(..., >=2)`` masses from :func:`span_masses`.
        shares: ``(t, 1 - t)`` from :func:`share_pair`, broadcastable to ``masses[..., :2]``.
        strength: ``s`` in ``[0, 1]``; 1 reaches the target exactly.
        rows: optional boolean broadcastable to ``masses[..., 0]``: only these rows change.

    Returns:
        ``(..., 2)`` factors ``M_a'/M_a``, ``M_v'/M_v``.
    """
    pair = masses[..., :2]
    perceptual = pair.sum(-1, keepdim=True)
    factors = (1.0 - strength) + (strength * shares) * (perceptual / pair)
    # False for NaN rows (fully masked padding) too.
    valid = (pair > 0).all(-1, keepdim=True)
    if rows is not None:
        valid = valid & rows[..., None]
    return factors.masked_fill_(~valid, 1.0)


def span_mass_masses(masses: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Masses after :func:`span_mass_factors`, ``(..., 3)`` (text unchanged)."""
    return torch.cat([masses[..., :2] * factors, masses[..., 2:]], dim=-1)


def keys_bias(factors: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Spread per-modality factors ``(B, H, Q, n)`` onto the keys as a log-bias ``(B, H, Q, K)``.

    The first ``n`` monitored modalities get ``log factor``; other keys (text, padding) 0.
    """
    n = factors.shape[-1]
    log_factors = factors.log().clamp_min_(LOG_ZERO)
    one_hot = one_hot.expand(factors.shape[0], 1, -1, -1)
    return _per_sample_matmul(log_factors, one_hot[..., :n].transpose(-1, -2))


def pai_logits(logits: torch.Tensor, target_keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """PAI's intervention on the logits of one modality's keys: ``s' = s + alpha |s|``.

    Args:
        logits: ``(B, H, Q, K)`` logits (finite where visible).
        target_keys: boolean, broadcastable to ``logits``: the visible keys to amplify in the
            selected rows and heads.
        alpha: amplification; 0 leaves the logits unchanged.
    """
    return torch.where(target_keys, logits + alpha * logits.abs(), logits)

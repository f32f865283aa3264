"""Per-modality evidence for a batch: label probabilities fused, from audio alone and from visual
alone, whether the two single-modality answers conflict, and per-clip attention shares.

Definitions (ours; the paper gives none for a single clip):

- probabilities: ``softmax`` over the closed label set of the label scores
  (:meth:`MultimodalEmotionLLM.score_labels`, summed or length-normalised log-likelihoods);
- audio alone / visual alone: the same scoring with the other modality's tokens masked out of
  attention (``drop_modalities``), so no information flows from them; text stays;
- conflict flag: the audio-alone and the visual-alone arg-max labels differ (and, when a
  threshold is set, the conflict score reaches it);
- conflict score: the Jensen-Shannon divergence in bits between the two single-modality
  distributions, in ``[0, 1]`` (0: identical, 1: disjoint supports), reported also without a
  flag, so a near-tie is visible;
- ``fused_follows``: when the two sides disagree, ``audio`` or ``visual`` when the fused arg-max
  equals that side's arg-max, else ``neither``; when they agree, ``both`` when the fused arg-max
  is the shared answer, else ``neither``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from src.core.modality import Modality
from src.models.attention.spans import MONITORED

#: ``drop_modalities`` of each single-modality prediction.
ALONE: dict[str, tuple[Modality, ...]] = {
    "audio": (Modality.VISUAL,),
    "visual": (Modality.AUDIO,),
}


def label_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """``softmax`` of ``(B, L)`` label scores over the labels, in float64."""
    return torch.softmax(scores.detach().double(), dim=-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits of the rows of two ``(B, L)`` distributions, ``(B,)``."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        # 0 log 0 = 0; m > 0 wherever a > 0.
        ratio = torch.where(a > 0, a / m.clamp_min(1e-300), torch.ones_like(a))
        return (a * torch.log2(ratio)).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


def unimodal_scores(model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """Label scores from audio alone and from visual alone (``None`` for a modality the model has
    no stream of, or when it is the only one: nothing would be left to mask against).

    Args:
        model: A :class:`~src.models.multimodal_llm.MultimodalEmotionLLM`.
        batch: A batch whose ``features`` are filled (stored or encoded).
    """
    present = {s.modality_id for s in model.streams}
    both = {Modality.AUDIO, Modality.VISUAL} <= present
    return {
        side: model.score_labels(batch, drop_modalities=drop) if both else None
        for side, drop in ALONE.items()
    }


def conflicts(
    fused: torch.Tensor,
    audio: torch.Tensor | None,
    visual: torch.Tensor | None,
    threshold: float = 0.0,
) -> list[dict[str, Any] | None]:
    """Per sample ``{"flag", "score", "fused_follows"}`` from ``(B, L)`` probabilities (see the
    module docstring); ``None`` entries without both single-modality predictions.

    Args:
        fused: Probabilities with every modality.
        audio: Probabilities from audio alone.
        visual: Probabilities from visual alone.
        threshold: Minimum Jensen-Shannon divergence (bits) for the flag.
    """
    if audio is None or visual is None:
        return [None] * fused.shape[0]
    top_f, top_a, top_v = fused.argmax(-1), audio.argmax(-1), visual.argmax(-1)
    scores = js_divergence(audio, visual)
    out: list[dict[str, Any] | None] = []
    for f, a, v, s in zip(
        top_f.tolist(), top_a.tolist(), top_v.tolist(), scores.tolist(), strict=True
    ):
        flag = a != v and s >= threshold
        # A disagreement under the threshold still says which side the fused answer took.
        if a != v:
            follows = "audio" if f == a else "visual" if f == v else "neither"
        else:
            follows = "both" if f == a else "neither"
        out.append({"flag": flag, "score": float(s), "fused_follows": follows})
    return out


def clip_attention_shares(
    rows: Mapping[int, torch.Tensor], batch_size: int
) -> list[dict[str, Any] | None]:
    """Per-clip shares from a :class:`~src.models.attention.share_monitor.ShareMonitor` row
    record: ``{"before": {modality: share}, "after": {...}, "entries": n}`` per sample.

    Every forward of the model puts a sample's rows together (label scoring runs one row per
    sample; a forward that repeats samples does it with ``repeat_interleave``), so row ``r`` of a
    forward with ``R`` rows is sample ``r // (R / B)``. A share is the mean over the sample's
    monitored entries (layer, head, query row) of the softmax mass on that modality's keys, as
    the AR metrics are.
    """
    total = None
    for n, sums in rows.items():
        if n % batch_size:
            raise ValueError(
                f"attention record of {n} rows does not divide into {batch_size} samples"
            )
        per_sample = sums.detach().cpu().double().view(batch_size, n // batch_size, -1).sum(1)
        total = per_sample if total is None else total + per_sample
    if total is None:
        return [None] * batch_size
    k = len(MONITORED)
    out: list[dict[str, Any] | None] = []
    for row in total:
        count = float(row[-1])
        if count == 0:
            out.append(None)
            continue
        shares = {
            stage: {m.name.lower(): float(row[offset + i]) / count for i, m in enumerate(MONITORED)}
            for stage, offset in (("before", 0), ("after", k))
        }
        out.append({**shares, "entries": int(count)})
    return out


def distribution(probs: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
    """``{"prediction": label, "probabilities": {label: p}}`` of one ``(L,)`` distribution."""
    values = probs.tolist()
    return {
        "prediction": labels[int(probs.argmax())],
        "probabilities": {label: float(p) for label, p in zip(labels, values, strict=True)},
    }

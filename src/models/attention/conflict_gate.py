"""The conflict gate: which samples' audio-only and visual-only predictions disagree.

Conflict-gated AR (as EmoMM's CHASE gates its intervention) reallocates attention only on those
samples; the two unimodal passes are the masked-modality scorings of the clip evidence
(:func:`src.evaluation.clip_evidence.unimodal_scores`), run with AR suspended.
"""

from typing import Any

import torch

from src.evaluation.clip_evidence import unimodal_scores


@torch.no_grad()
def conflict_gate(pl_module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``(B,)`` boolean: the audio-alone and the visual-alone arg-max labels differ.

    All ``False`` when the model lacks an audio or a visual stream (nothing can conflict).

    Args:
        pl_module: the LightningModule (``.model`` a multimodal LLM with ``score_labels``;
            ``encode_batch`` fills features from raw media when it has it).
        batch: a collated batch on the module's device.
    """
    encode = getattr(pl_module, "encode_batch", None)
    batch = encode(batch) if callable(encode) else batch
    sides = unimodal_scores(pl_module.model, batch)
    audio, visual = sides["audio"], sides["visual"]
    if audio is None or visual is None:
        return torch.zeros(len(batch["input_ids"]), dtype=torch.bool)
    return (audio.argmax(-1) != visual.argmax(-1)).cpu()

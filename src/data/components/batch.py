"""The batch every data set produces and the model consumes, and the one way to extend it.

:class:`EmotionBatch` is what :class:`~src.data.components.collate.EmotionCollator` returns (a
typed dict, so Lightning moves it to the device as it is). :func:`pack_rows` pads token rows
into it; :func:`with_continuations` appends answer tokens after each prompt (training targets,
label scoring) and :func:`left_aligned` moves the prompts to the right edge (generation).
"""

from collections.abc import Mapping, Sequence
from typing import Literal, NotRequired, TypedDict

import torch

from src.core.modality import Modality

#: The per-token tensors of a batch, each ``(B, T)``.
TOKEN_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "modality_ids", "stream_ids")
#: Label of a position that is not a continuation token (ignored by the LM loss).
IGNORE_INDEX = -100


class EmotionBatch(TypedDict):
    """One padded batch.

    Keys: ``input_ids``, ``attention_mask``, ``modality_ids`` (``Modality``; PAD=-1 on padding),
    ``stream_ids`` (index into the streams; -1 on text and padding), all ``(B, T)``;
    ``features`` (stream -> ``(B, dim)``, ``(B, tokens, dim)`` for a sequence stream);
    ``labels``, ``audio_labels``, ``video_labels`` (what the whole clip, its audio and its video
    show) and ``subset_ids`` (``(B,)``, -1 when unknown); ``target_ids`` (answer tokens per
    sample); ``names``, ``subsets``, ``tasks``. A raw-media batch also has ``frames``
    ``(B, K, 3, S, S)`` and/or ``audio`` ``(B, n)`` with ``audio_lengths``; a sequence made by
    :func:`with_continuations` has ``lm_labels``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    modality_ids: torch.Tensor
    stream_ids: torch.Tensor
    features: dict[str, torch.Tensor]
    labels: NotRequired[torch.Tensor]
    audio_labels: NotRequired[torch.Tensor]
    video_labels: NotRequired[torch.Tensor]
    subset_ids: NotRequired[torch.Tensor]
    target_ids: NotRequired[list[list[int]]]
    names: NotRequired[list[str]]
    subsets: NotRequired[list[str | None]]
    tasks: NotRequired[list[str]]
    frames: NotRequired[torch.Tensor]
    audio: NotRequired[torch.Tensor]
    audio_lengths: NotRequired[torch.Tensor]
    lm_labels: NotRequired[torch.Tensor]


_FILL = {
    "input_ids": None,  # the tokenizer's pad id
    "attention_mask": 0,
    "modality_ids": int(Modality.PAD),
    "stream_ids": -1,
    "lm_labels": IGNORE_INDEX,
}


def pack_rows(
    prompts: Sequence[Mapping[str, torch.Tensor]],
    pad_id: int,
    continuations: Sequence[Sequence[int]] | None = None,
    *,
    side: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Pad token rows into ``(B, T)`` tensors of :data:`TOKEN_KEYS` (+ ``lm_labels``).

    Each prompt maps :data:`TOKEN_KEYS` to 1-D tensors of its own length. A continuation (text
    tokens, attended) follows its prompt and is the only labelled part of ``lm_labels``, which
    is returned only when ``continuations`` are given. ``side`` is where the padding goes.
    """
    if continuations is not None and len(continuations) != len(prompts):
        raise ValueError(f"need {len(prompts)} continuations, got {len(continuations)}")
    conts = continuations if continuations is not None else [()] * len(prompts)
    lengths = [len(p["input_ids"]) for p in prompts]
    width = max((n + len(c) for n, c in zip(lengths, conts, strict=True)), default=0)
    keys = TOKEN_KEYS + (("lm_labels",) if continuations is not None else ())
    out = {
        k: torch.full(
            (len(prompts), width),
            pad_id if _FILL[k] is None else _FILL[k],
            dtype=torch.long,
            device=device,
        )
        for k in keys
    }
    for row, (prompt, n, cont) in enumerate(zip(prompts, lengths, conts, strict=True)):
        start = 0 if side == "right" else width - n - len(cont)
        for key in TOKEN_KEYS:
            out[key][row, start : start + n] = prompt[key]
        if len(cont):
            c = torch.as_tensor(cont, dtype=torch.long, device=device)
            span = slice(start + n, start + n + len(cont))
            out["input_ids"][row, span] = c
            out["lm_labels"][row, span] = c
            out["attention_mask"][row, span] = 1
            out["modality_ids"][row, span] = int(Modality.TEXT)
    return out


def prompt_lengths(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Length of each right-padded prompt (the attention mask may also hide dropped tokens)."""
    return (batch["modality_ids"] != int(Modality.PAD)).sum(dim=1)


def _prompt_rows(batch: Mapping[str, torch.Tensor], repeat: int) -> list[dict[str, torch.Tensor]]:
    lengths = prompt_lengths(batch).repeat_interleave(repeat).tolist()
    source = {k: batch[k].repeat_interleave(repeat, dim=0) for k in TOKEN_KEYS}
    return [{k: source[k][row, :n] for k in TOKEN_KEYS} for row, n in enumerate(lengths)]


def with_continuations(
    batch: EmotionBatch, continuations: Sequence[Sequence[int]], pad_id: int, repeat: int = 1
) -> EmotionBatch:
    """The prompts of ``batch`` (each repeated ``repeat`` times) followed by one continuation
    per row: token tensors, ``features`` and ``lm_labels`` (-100 except on continuations)."""
    rows = _prompt_rows(batch, repeat)
    seq = pack_rows(rows, pad_id, continuations, device=batch["input_ids"].device)
    features = {k: v.repeat_interleave(repeat, dim=0) for k, v in batch["features"].items()}
    return EmotionBatch(**seq, features=features)


def left_aligned(batch: EmotionBatch, pad_id: int) -> EmotionBatch:
    """The prompts of ``batch`` padded on the left (decoder-only generation continues them)."""
    seq = pack_rows(_prompt_rows(batch, 1), pad_id, side="left", device=batch["input_ids"].device)
    return EmotionBatch(**seq, features=batch["features"])

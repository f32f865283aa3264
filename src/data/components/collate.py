"""One collator for every data set: pads prompts and builds ``modality_ids`` once per batch."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from src.core.records import SUBSETS
from src.data.components.batch import EmotionBatch, pack_rows
from src.data.components.media import pad_audio
from src.data.components.prompt import PromptBuilder


def collate_media(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Decoded media of ``items``: ``frames`` stacked, ``audio`` zero-padded with its
    ``audio_lengths`` (each only when every item has it)."""
    media: dict[str, torch.Tensor] = {}
    if items and all("frames" in it for it in items):
        media["frames"] = torch.stack([it["frames"] for it in items])
    if items and all("audio" in it for it in items):
        media["audio"], media["audio_lengths"] = pad_audio([it["audio"] for it in items])
    return media


class EmotionCollator:
    """Turns dataset items into a padded :class:`~src.data.components.batch.EmotionBatch`.

    Items are dicts with ``name``, ``subtitle``, ``label`` (class index or -1), ``subset``
    (str or None), ``audio_label``/``video_label`` (what each modality shows; -1 when unknown),
    ``features`` (stream name -> ``(dim,)`` array, ``(tokens, dim)`` for a sequence stream),
    ``task`` and ``target`` (answer text or None). The batch holds right-padded ``input_ids``,
    ``attention_mask``, ``modality_ids`` (PAD=-1 on padding), ``stream_ids`` (-1 on text and
    padding), ``features`` (stream -> ``(B, dim)`` or ``(B, tokens, dim)``), ``labels``,
    ``audio_labels``, ``video_labels`` and ``subset_ids`` (-1 when unknown), ``target_ids``
    (answer tokens per sample, for the LM loss), and the plain lists ``names``, ``subsets``,
    ``tasks``.
    Items of a raw-media data set carry ``frames`` (K, 3, S, S) and/or ``audio`` (n,) instead of
    ``features``; the batch then has ``frames`` (B, K, 3, S, S), ``audio`` (B, n_max) zero-padded
    with ``audio_lengths`` (B,), and the model's online encoders fill ``features``.

    Args:
        prompt_builder: Builds each sample's prompt tokens.
    """

    def __init__(self, prompt_builder: PromptBuilder) -> None:
        self.prompt_builder = prompt_builder
        self.pad_id = prompt_builder.tokenizer.pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> EmotionBatch:
        encoded = [
            self.prompt_builder.encode(it["subtitle"], it.get("task", "emotion")) for it in items
        ]
        tokens = pack_rows(
            [
                {
                    "input_ids": torch.tensor(e.input_ids),
                    "attention_mask": torch.ones(len(e.input_ids), dtype=torch.long),
                    "modality_ids": torch.tensor(e.modality_ids),
                    "stream_ids": torch.tensor(e.stream_ids),
                }
                for e in encoded
            ],
            self.pad_id,
        )
        # Stored features; raw media (online encoders) instead when the items carry it.
        features = {
            s.name: torch.from_numpy(np.stack([it["features"][s.name] for it in items]))
            for s in self.prompt_builder.streams
            if all(s.name in it.get("features", ()) for it in items)
        }
        media = collate_media(items)
        targets = [
            self.prompt_builder.answer_ids(it["target"]) if it.get("target") else [] for it in items
        ]
        return {
            **tokens,
            "features": features,
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "audio_labels": torch.tensor(
                [it.get("audio_label", -1) for it in items], dtype=torch.long
            ),
            "video_labels": torch.tensor(
                [it.get("video_label", -1) for it in items], dtype=torch.long
            ),
            "subset_ids": torch.tensor(
                [SUBSETS.index(it["subset"]) if it.get("subset") else -1 for it in items],
                dtype=torch.long,
            ),
            "target_ids": targets,
            "names": [it["name"] for it in items],
            "subsets": [it.get("subset") for it in items],
            "tasks": [it.get("task", "emotion") for it in items],
            **media,
        }

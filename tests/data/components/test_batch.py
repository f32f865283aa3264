"""The batch helpers: one packing of token rows for the collator, training/scoring
continuations and left-aligned generation prompts."""

import torch

from src.core.modality import Modality
from src.data.components.batch import IGNORE_INDEX, left_aligned, pack_rows, with_continuations

PAD = 0
TEXT, AUDIO, VISUAL, NONE = int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VISUAL), -1


def prompts() -> list[dict[str, torch.Tensor]]:
    rows = [
        ([5, 6, 7], [TEXT, AUDIO, TEXT], [NONE, 1, NONE], [1, 1, 1]),
        ([8, 9], [VISUAL, TEXT], [0, NONE], [0, 1]),  # a dropped (masked) visual token
    ]
    return [
        {
            "input_ids": torch.tensor(ids),
            "modality_ids": torch.tensor(mods),
            "stream_ids": torch.tensor(streams),
            "attention_mask": torch.tensor(mask),
        }
        for ids, mods, streams, mask in rows
    ]


def batch() -> dict:
    packed = pack_rows(prompts(), PAD)
    return {**packed, "features": {"audio": torch.arange(2.0).unsqueeze(1)}}


def test_pack_rows_pads_on_the_right_with_each_key_fill():
    packed = pack_rows(prompts(), PAD)
    assert packed["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert packed["modality_ids"].tolist() == [[TEXT, AUDIO, TEXT], [VISUAL, TEXT, -1]]
    assert packed["stream_ids"].tolist() == [[NONE, 1, NONE], [0, NONE, NONE]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 0]]
    assert "lm_labels" not in packed


def test_continuations_follow_each_prompt_and_are_the_only_labels():
    seq = with_continuations(batch(), [[11], [12, 13]], PAD)
    assert seq["input_ids"].tolist() == [[5, 6, 7, 11], [8, 9, 12, 13]]
    assert seq["lm_labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 11],
        [IGNORE_INDEX, IGNORE_INDEX, 12, 13],
    ]
    # Continuations are attended text; the prompt keeps its own mask (dropped tokens stay 0).
    assert seq["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert seq["modality_ids"].tolist() == [[TEXT, AUDIO, TEXT, TEXT], [VISUAL, TEXT, TEXT, TEXT]]
    assert seq["stream_ids"].tolist() == [[NONE, 1, NONE, NONE], [0, NONE, NONE, NONE]]


def test_repeated_prompts_get_one_continuation_each_with_their_features():
    seq = with_continuations(batch(), [[11], [12], [13], [14]], PAD, repeat=2)
    assert seq["input_ids"].tolist() == [
        [5, 6, 7, 11],
        [5, 6, 7, 12],
        [8, 9, 13, PAD],
        [8, 9, 14, PAD],
    ]
    assert seq["features"]["audio"].squeeze(1).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_left_aligned_prompts_end_at_the_right_edge():
    left = left_aligned(batch(), PAD)
    assert left["input_ids"].tolist() == [[5, 6, 7], [PAD, 8, 9]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["modality_ids"].tolist() == [[TEXT, AUDIO, TEXT], [-1, VISUAL, TEXT]]

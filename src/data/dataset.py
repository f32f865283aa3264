"""A map-style dataset over annotated samples and their (preloaded, checked) features."""

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from src.data.records import SampleRecord


class FeatureDataset(Dataset):
    """Items for :class:`~src.data.collate.EmotionCollator`.

    Args:
        records: Annotated samples.
        features: Checked feature vectors per sample name (stream -> (dim,) array).
        label_index: Maps a canonical label word to its class index.
        task: ``emotion`` (answer = label word) or ``reason`` (answer = reasoning text).
    """

    def __init__(
        self,
        records: list[SampleRecord],
        features: dict[str, dict[str, np.ndarray]],
        label_index: dict[str, int],
        task: str = "emotion",
    ) -> None:
        self.records = list(records)
        self.features = features
        self.label_index = label_index
        self.task = task

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        target = r.label if self.task == "emotion" else r.reason
        return {
            "name": r.name,
            "subtitle": r.subtitle,
            "label": self.label_index[r.label] if r.label is not None else -1,
            "subset": r.subset,
            "features": self.features[r.name],
            "task": self.task,
            "target": target,
        }

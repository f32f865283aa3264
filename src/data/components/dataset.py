"""Map-style datasets over annotated samples: preloaded features, or raw media decoded per item."""

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from src.core.records import SampleRecord
from src.data.components.media_source import MediaLoader


def task_target(record: SampleRecord, task: str) -> str | None:
    """The answer text of ``record`` for ``task``: the label word or the reasoning text."""
    return record.label if task == "emotion" else record.reason


class FeatureDataset(Dataset):
    """Items for :class:`~src.data.components.collate.EmotionCollator`.

    Args:
        records: Annotated samples.
        features: Checked feature vectors per sample name (stream -> (dim,) array).
        label_index: Maps a canonical label word to its class index.
        task: ``emotion`` (answer = label word) or ``reason`` (answer = reasoning text).
        tasks: Per-record task, overriding ``task`` (task mixing: a record may appear once per
            task, each entry with its own prompt and target).
    """

    def __init__(
        self,
        records: list[SampleRecord],
        features: dict[str, dict[str, np.ndarray]],
        label_index: dict[str, int],
        task: str = "emotion",
        tasks: Sequence[str] | None = None,
    ) -> None:
        self.records = list(records)
        self.features = features
        self.label_index = label_index
        self.task = task
        self.tasks = list(tasks) if tasks is not None else [task] * len(self.records)
        if len(self.tasks) != len(self.records):
            raise ValueError(f"{len(self.tasks)} tasks for {len(self.records)} records")

    def __len__(self) -> int:
        return len(self.records)

    def payload(self, record: SampleRecord) -> dict[str, Any]:
        """The sample's model inputs besides the prompt."""
        return {"features": self.features[record.name]}

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        task = self.tasks[i]
        return {
            "name": r.name,
            "subtitle": r.subtitle,
            "label": self.label_index[r.label] if r.label is not None else -1,
            "subset": r.subset,
            # What each modality shows (conflict samples): which one the prediction followed.
            "audio_label": self.label_index.get(r.audio_label, -1) if r.audio_label else -1,
            "video_label": self.label_index.get(r.video_label, -1) if r.video_label else -1,
            **self.payload(r),
            "task": task,
            "target": task_target(r, task),
        }


class MediaDataset(FeatureDataset):
    """Like :class:`FeatureDataset`, with decoded ``frames``/``audio`` instead of features.

    Args:
        records: Annotated samples.
        loader: Decodes a sample's media.
        label_index: Maps a canonical label word to its class index.
        task: ``emotion`` or ``reason``.
        tasks: Per-record task (task mixing).
        features: Stored vectors of the streams read from the feature store anyway (per sample
            name: stream -> array); the collator keeps them and the encoders fill the rest.
    """

    def __init__(
        self,
        records: list[SampleRecord],
        loader: MediaLoader,
        label_index: dict[str, int],
        task: str = "emotion",
        tasks: Sequence[str] | None = None,
        features: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> None:
        super().__init__(records, features or {}, label_index, task, tasks)
        self.loader = loader

    def payload(self, record: SampleRecord) -> dict[str, Any]:
        media = self.loader.load(record.name)
        return {**media, "features": self.features[record.name]} if self.features else media

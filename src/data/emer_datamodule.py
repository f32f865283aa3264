"""EMER (explainable multimodal emotion reasoning) as a LightningDataModule: V1 and V2."""

import dataclasses
from typing import Any, Literal

from src.core.records import SampleRecord
from src.data.base_datamodule import EmotionDataModule
from src.data.components.splits import carve_split
from src.data.formats.emer import read_emer_v1, read_emer_v2
from src.data.formats.mer2023 import with_subtitles
from src.data.formats.subtitles import read_subtitles


class EMERDataModule(EmotionDataModule):
    """EMER reasoning samples: evaluation by default, reasoning targets for training on request.

    V1 (``names,emotions,subtitles,reasons``) has a label, the subtitle and the reasoning; V2
    (``name,chinese,english``) has only the reasoning text. With ``task: reason`` the answer the
    model learns (causal-LM loss masked to the answer tokens) is the written reasoning; with
    ``task: emotion`` it is the label word (V1 only). ``tasks`` mixes both.

    Args:
        root: Data root (annotations, feature folders, clips).
        version: ``v1`` or ``v2``.
        annotations: The annotation CSV under ``root``.
        language: V2: which column is the reasoning (``english`` or ``chinese``).
        subtitles: Optional subtitle CSV under ``root`` (``name,chinese,english`` or
            ``name,sentence``); when given, every sample needs a subtitle from it (V2 has none
            of its own; for V1 it replaces the file's ``subtitles`` column).
        subtitle_language: Language taken from a ``name,chinese,english`` subtitle file.
        train_fraction: Fraction of the samples (seeded, stratified by label) used for
            training; the rest is ``test``. ``0``: everything is ``test`` (evaluation).
        val_fraction: Fraction of the remaining samples used for validation.
        split_seed: Seed of the carving.
        task: ``reason`` (default) or ``emotion``.
        label_space: Label space of V1's ``emotions`` column.
        **kwargs: :class:`~src.data.base_datamodule.EmotionDataModule` options.
    """

    def __init__(
        self,
        root: str,
        version: Literal["v1", "v2"] = "v1",
        annotations: str = "gt-eng.csv",
        language: Literal["english", "chinese"] = "english",
        subtitles: str | None = None,
        subtitle_language: Literal["english", "chinese"] = "english",
        train_fraction: float = 0.0,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        task: Literal["emotion", "reason"] = "reason",
        label_space: str | list[str] = "mer2023",
        **kwargs: Any,
    ) -> None:
        super().__init__(root, label_space=label_space, task=task, **kwargs)
        self.version = version
        self.annotations = annotations
        self.language = language
        self.subtitles = subtitles
        self.subtitle_language = subtitle_language
        self.train_fraction = train_fraction
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def load_records(self) -> list[SampleRecord]:
        path = self.root / self.annotations
        if self.version == "v1":
            records = read_emer_v1(path, label_space=self.label_space, **self.parse_options)
        else:
            records = read_emer_v2(path, language=self.language, **self.parse_options)
        if self.subtitles is not None:
            sub_path = self.root / self.subtitles
            texts = read_subtitles(sub_path, column=self.subtitle_language, **self.parse_options)
            records = [dataclasses.replace(r, subtitle="") for r in records]
            records = with_subtitles(records, texts, source=sub_path, **self.parse_options)
        records = carve_split(records, self.train_fraction, self.split_seed, split="train")
        train = [r for r in records if r.split == "train"]
        rest = [r for r in records if r.split != "train"]
        return train + carve_split(rest, self.val_fraction, self.split_seed + 1, split="val")

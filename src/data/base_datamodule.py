"""Shared machinery of every data module: tokenizer, prompts, feature checks, loaders."""

import csv
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from src.data.collate import EmotionCollator
from src.data.dataset import FeatureDataset
from src.data.feature_store import FeatureFileError, FeatureStore
from src.data.label_space import LabelSpace, get_label_space
from src.data.prompt import PromptBuilder
from src.data.records import SampleRecord
from src.data.streams import EMOTION_LLAMA_STREAMS, StreamSpec
from src.data.tokenizer import load_tokenizer


def read_subtitles(path: str | Path, column: str = "english") -> dict[str, str]:
    """``name -> text`` from a subtitle CSV (``name,english``, ``name,chinese,english`` or
    Emotion-LLaMA's ``name,sentence``); names the file and the missing column on error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subtitle file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "name" not in fields or column not in fields:
            raise ValueError(f"{path}: needs columns 'name' and {column!r}, has {fields}")
        return {row["name"].strip(): (row[column] or "").strip() for row in reader}


class EmotionDataModule(L.LightningDataModule):
    """Base of the data modules: subclasses implement :meth:`load_records`.

    Args:
        root: Data root (feature folders, annotation files).
        streams: Feature streams to read and their token counts.
        tokenizer: Local tokenizer directory (the backbone's); default ``<root>/tokenizer``.
        label_space: ``mer2023``, ``dfew``, ``merr`` or an explicit list of labels.
        task: ``emotion`` (closed-set answer) or ``reason`` (reasoning text as the answer).
        batch_size: Training batch size.
        eval_batch_size: Validation/test/predict batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        on_error: ``raise`` stops at the first bad sample; ``skip`` drops it and lists it in
            :attr:`skipped` (logged to MLflow by the module as ``skipped_samples.csv``).
        templates: Prompt templates per task (default: Emotion-LLaMA style).
        shuffle_seed: Seed of the training order; epoch ``e`` uses ``shuffle_seed + e`` whatever
            happened before, so a run resumed from a checkpoint sees the same batches.
    """

    def __init__(
        self,
        root: str,
        streams: list[StreamSpec] = list(EMOTION_LLAMA_STREAMS),  # noqa: B006 - jsonargparse default
        tokenizer: str | None = None,
        label_space: str | list[str] = "mer2023",
        task: Literal["emotion", "reason"] = "emotion",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
        templates: dict[str, str] | None = None,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.streams = list(streams)
        self._tokenizer_dir = tokenizer
        self.label_space: LabelSpace = get_label_space(label_space)
        self.task = task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.on_error = on_error
        self.templates = templates
        self.shuffle_seed = shuffle_seed
        self.skipped: list[dict[str, str]] = []
        self.datasets: dict[str, FeatureDataset] = {}
        self._collator: EmotionCollator | None = None

    # Values the CLI links into the model (the model must agree with the data on these).
    @property
    def tokenizer_path(self) -> str:
        """Local tokenizer directory."""
        return str(self._tokenizer_dir or (self.root / "tokenizer"))

    @property
    def label_names(self) -> list[str]:
        """Label words in class order."""
        return list(self.label_space.labels)

    def load_records(self) -> list[SampleRecord]:
        """All annotated samples of the data set (every split)."""
        raise NotImplementedError

    @property
    def collator(self) -> EmotionCollator:
        """The shared collator (built on first use: it needs the tokenizer on disk)."""
        if self._collator is None:
            builder = PromptBuilder(
                load_tokenizer(self.tokenizer_path),
                self.streams,
                self.label_names,
                self.templates,
            )
            self._collator = EmotionCollator(builder)
        return self._collator

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        store = FeatureStore(self.root, self.streams)
        features: dict[str, dict[str, Any]] = {}
        kept: list[SampleRecord] = []
        for record in self.load_records():
            try:
                features[record.name] = store.load(record.name)
            except FeatureFileError as err:
                if self.on_error == "raise":
                    raise
                self.skipped.append(
                    {
                        "name": record.name,
                        "file": str(err.path),
                        "field": err.field,
                        "reason": err.reason,
                    }
                )
                continue
            kept.append(record)
        if self.skipped:
            rank_zero_warn(
                f"skipped {len(self.skipped)} sample(s) with bad features (on_error=skip)"
            )
        label_index = {w: i for i, w in enumerate(self.label_names)}
        for split in ("train", "val", "test"):
            split_records = [r for r in kept if r.split == split]
            self.datasets[split] = FeatureDataset(split_records, features, label_index, self.task)

    def _sampler(self, dataset: FeatureDataset, shuffle: bool) -> Sampler:
        """Epoch-seeded shuffling for training; every sample exactly once for evaluation.

        Lightning leaves a dataloader's own distributed sampler alone. Evaluation uses the
        unrepeated sampler: the default one pads ranks with repeated samples, which would make a
        2-process test differ from a 1-process test.
        """
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if shuffle:
            return DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.shuffle_seed
            )
        return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        if len(dataset) == 0:
            raise ValueError(
                f"{self.__class__.__name__} at {self.root}: the {split} split is empty"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=self._sampler(dataset, shuffle),
            num_workers=self.num_workers,
            collate_fn=self.collator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

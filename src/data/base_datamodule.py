"""Shared machinery of every data module: tokenizer, prompts, feature checks, loaders."""

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from src.core.label_space import LabelSpace, get_label_space
from src.core.records import SPLITS, SampleRecord
from src.core.streams import EMOTION_LLAMA_STREAMS, StreamSpec
from src.data.components.collate import EmotionCollator
from src.data.components.dataset import FeatureDataset, MediaDataset, task_target
from src.data.components.feature_store import FeatureFileError, FeatureStore
from src.data.components.media import MediaDecodeError
from src.data.components.media_source import MediaLoader, MediaSpec, media_needs
from src.data.components.prompt import PromptBuilder, label_answer_ids, placeholder_ids
from src.data.components.skip_report import SkipReport
from src.data.components.tokenizer import load_tokenizer, unknown_words
from src.data.formats.rows import FormatError

TASKS: tuple[str, ...] = ("emotion", "reason")


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
        prompt_format: ``auto`` (the tokenizer's chat template when it has one and ``templates``
            is unset, else Llama-2's ``[INST]``), ``chat`` or ``inst``
            (:class:`~src.data.components.prompt.PromptBuilder`).
        placeholder_tokens: Stream name -> the token its feature positions hold (e.g.
            ``{audio: "<|AUDIO|>", video: "<|VIDEO|>"}`` for Qwen2.5-Omni, which finds its
            audio/video positions by these ids); default: the pad token for every stream.
        shuffle_seed: Seed of the training order; epoch ``e`` uses ``shuffle_seed + e`` whatever
            happened before, so a run resumed from a checkpoint sees the same batches.
        source: ``features`` reads the feature store (``<root>/<feature_dir>/<name>.npy``);
            ``media`` decodes the clips and the model's online encoders compute the features.
        media: Where the clips are and how they are decoded (``source: media`` and ``extract``).
        stored_streams: With ``source: media``, the streams still read from the feature store
            (features no online encoder here computes, e.g. Emotion-LLaMA's face-MAE, VideoMAE
            and HuBERT vectors beside an online EVA-CLIP-g); the others come from the clips.
        media_check: What :meth:`setup` checks of every clip with ``source: media``: ``probe``
            (headers: missing/empty file, broken container, missing stream), ``decode`` (decode
            every clip once: also truncated streams and zero-length audio) or ``none``.
        tasks: Task mixing for training, e.g. ``{emotion: 1.0, reason: 1.0}``: each training
            sample appears ``weight`` times per epoch under each task it has a target for (the
            fractional part is a seeded, fixed subset), each entry with its own prompt and
            target. ``None``: every sample once, under ``task``. Evaluation always uses ``task``.
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
        prompt_format: Literal["auto", "chat", "inst"] = "auto",
        placeholder_tokens: dict[str, str] | None = None,
        shuffle_seed: int = 0,
        source: Literal["features", "media"] = "features",
        media: MediaSpec | None = None,
        media_check: Literal["none", "probe", "decode"] = "probe",
        tasks: dict[str, float] | None = None,
        stored_streams: list[str] | None = None,
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
        self.prompt_format = prompt_format
        self.placeholder_tokens = dict(placeholder_tokens) if placeholder_tokens else None
        self.shuffle_seed = shuffle_seed
        self.source = source
        self.media = media or MediaSpec()
        self.media_check = media_check
        self.stored_streams = list(stored_streams or [])
        unknown = sorted(set(self.stored_streams) - {s.name for s in self.streams})
        if unknown:
            raise ValueError(f"stored_streams: {unknown} are not among the streams")
        self.tasks = dict(tasks) if tasks else None
        for name, weight in (self.tasks or {}).items():
            if name not in TASKS or not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"tasks: {name!r}: {weight} (tasks are {TASKS}, weights >= 0)")
        #: Every sample dropped under ``on_error: skip`` (parsers, features, media, checks).
        self.skip_report = SkipReport()
        #: Subtitle words the tokenizer does not know (they become ``<unk>``) -> occurrences.
        self.unknown_subtitle_words: dict[str, int] = {}
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

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """The skipped samples as rows (``file, line, name, field, reason``), for MLflow."""
        return self.skip_report.to_rows()

    def bayes_bounds(self, split: str) -> dict[str, float] | None:
        """Bayes-optimal accuracies of ``split`` (``acc``, ``<subset>/acc``, ``modality_gap``,
        ``counts``) when the data set knows its likelihood (synthetic worlds); ``None`` here."""
        return None

    @property
    def parse_options(self) -> dict[str, Any]:
        """``on_error`` and ``report`` for the annotation parsers of :meth:`load_records`."""
        return {"on_error": self.on_error, "report": self.skip_report}

    def load_records(self) -> list[SampleRecord]:
        """All annotated samples of the data set (every split).

        Subclasses call the parsers with :attr:`parse_options`, so that ``on_error: skip``
        collects parse-level skips in :attr:`skip_report`.
        """
        raise NotImplementedError

    def media_loader(self) -> MediaLoader:
        """Decodes this data set's clips for its streams (online encoders, ``extract``)."""
        video, audio = media_needs(
            [s for s in self.streams if s.name not in self.stored_streams] or self.streams
        )
        return MediaLoader(self.root, self.media, video=video, audio=audio)

    def _reject(self, err: Exception, file: str | Path, field: str, reason: str, name: str) -> None:
        """Raise ``err`` (``on_error: raise``) or list the sample in the skip report."""
        if self.on_error == "raise":
            raise err
        self.skip_report.add(file, field, reason, name)

    @property
    def collator(self) -> EmotionCollator:
        """The shared collator (built on first use: it needs the tokenizer on disk)."""
        if self._collator is None:
            builder = PromptBuilder(
                load_tokenizer(self.tokenizer_path),
                self.streams,
                self.label_names,
                self.templates,
                self.prompt_format,
                self.placeholder_tokens,
            )
            self._collator = EmotionCollator(builder)
        return self._collator

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        records = self._check_records(self.load_records())
        self._check_words(records)
        label_index = {w: i for i, w in enumerate(self.label_names)}
        loader = self.media_loader() if self.source == "media" else None
        if loader is None:
            records, features = self._load_features(records)
        else:
            stored = [s for s in self.streams if s.name in self.stored_streams]
            records, features = self._load_features(records, stored) if stored else (records, {})
            records = self._check_media(records, loader)
        if len(self.skip_report):
            rank_zero_warn(
                f"{self.__class__.__name__}: skipped {len(self.skip_report)} sample(s) "
                f"(on_error=skip; logged as skipped_samples.csv):\n{self.skip_report.summary()}"
            )
        for split in SPLITS:
            split_records = [r for r in records if r.split == split]
            if split == "train" and self.tasks:
                split_records, tasks = self._mix_tasks(split_records)
            else:
                tasks = [self.task] * len(split_records)
            if loader is None:
                dataset = FeatureDataset(split_records, features, label_index, self.task, tasks)
            else:
                dataset = MediaDataset(
                    split_records, loader, label_index, self.task, tasks, features
                )
            self.datasets[split] = dataset

    def _check_records(self, records: list[SampleRecord]) -> list[SampleRecord]:
        """Names unique across all annotation files, labels in the label space, a target for
        every training sample of the task."""
        where = f"{self.__class__.__name__} at {self.root}"
        train_tasks = list(self.tasks) if self.tasks else [self.task]
        seen: dict[str, str] = {}
        kept: list[SampleRecord] = []
        for r in records:
            problem: tuple[str, str] | None = None
            if r.name in seen:
                problem = ("name", f"duplicate name (in the {seen[r.name]} and {r.split} splits)")
            elif r.split not in SPLITS:
                problem = ("split", f"{r.split!r} is not one of {SPLITS}")
            elif r.label is not None and r.label not in self.label_names:
                problem = ("label", f"{r.label!r} is not in the labels {self.label_names}")
            elif r.split == "train" and not any(task_target(r, t) for t in train_tasks):
                problem = (
                    "label" if train_tasks == ["emotion"] else "reason",
                    f"a train sample needs a target for the task(s) {train_tasks}",
                )
            if problem is not None:
                field, reason = problem
                err = FormatError(where, field, reason, name=r.name)
                self._reject(err, where, field, reason, r.name)
                continue
            seen[r.name] = r.split
            kept.append(r)
        return kept

    def _check_words(self, records: list[SampleRecord]) -> None:
        """Refuse label words the tokenizer encodes alike (:class:`LabelCollisionError`); count
        the subtitle words it maps to ``<unk>`` and warn (never silently)."""
        tokenizer = load_tokenizer(self.tokenizer_path)
        label_answer_ids(tokenizer, self.label_names)
        placeholder_ids(tokenizer, self.streams, self.placeholder_tokens)  # before any batch
        subtitles = [r.subtitle for r in records if r.subtitle]
        unknown = unknown_words(tokenizer, subtitles)
        self.unknown_subtitle_words = dict(unknown.most_common())
        if unknown:
            total = sum(len(text.split()) for text in subtitles)
            shown = ", ".join(f"{w!r} x{n}" for w, n in unknown.most_common(20))
            rank_zero_warn(
                f"{self.__class__.__name__} at {self.root}: {unknown.total()} of {total} subtitle "
                f"words ({len(unknown)} distinct) are unknown to the tokenizer "
                f"{self.tokenizer_path} and become {tokenizer.unk_token}: {shown}"
                + (" ..." if len(unknown) > 20 else "")
                + " (logged as unknown_subtitle_words.csv)"
            )

    def _load_features(
        self, records: list[SampleRecord], streams: list[StreamSpec] | None = None
    ) -> tuple[list[SampleRecord], dict[str, dict[str, np.ndarray]]]:
        store = FeatureStore(self.root, self.streams if streams is None else streams)
        features: dict[str, dict[str, np.ndarray]] = {}
        kept: list[SampleRecord] = []
        for record in records:
            try:
                features[record.name] = store.load(record.name)
            except FeatureFileError as err:
                self._reject(err, err.path, err.field, err.reason, record.name)
                continue
            kept.append(record)
        return kept, features

    def _check_media(self, records: list[SampleRecord], loader: MediaLoader) -> list[SampleRecord]:
        kept: list[SampleRecord] = []
        for record in records:
            try:
                loader.check(record.name, self.media_check)
            except MediaDecodeError as err:
                self._reject(err, err.path, err.field, err.reason, record.name)
                continue
            kept.append(record)
        return kept

    def _mix_tasks(self, records: list[SampleRecord]) -> tuple[list[SampleRecord], list[str]]:
        """Training entries under task mixing (see ``tasks``); fixed for a given seed."""
        assert self.tasks is not None
        rng = np.random.default_rng(self.shuffle_seed)
        entries: list[tuple[SampleRecord, str]] = []
        for task, weight in self.tasks.items():
            eligible = [r for r in records if task_target(r, task)]
            if len(eligible) < len(records):
                rank_zero_warn(
                    f"task mixing: {len(records) - len(eligible)} training sample(s) have no "
                    f"{task!r} target and train on the other task(s) only"
                )
            whole, part = divmod(weight, 1.0)
            entries += [(r, task) for r in eligible] * int(whole)
            extra = rng.permutation(len(eligible))[: round(part * len(eligible))]
            entries += [(eligible[i], task) for i in sorted(extra)]
        return [r for r, _ in entries], [t for _, t in entries]

    def _sampler(self, dataset: FeatureDataset, shuffle: bool) -> Sampler:
        """Epoch-seeded shuffling for training; every sample exactly once for evaluation.

        Lightning leaves a dataloader's own distributed sampler alone. Evaluation uses the
        unrepeated sampler: the default one pads ranks with repeated samples, which would make a
        2-process test differ from a 1-process test.
        """
        # The process group is up by the time Lightning asks for dataloaders.
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
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

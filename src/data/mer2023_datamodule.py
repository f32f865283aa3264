"""MER2023 as a LightningDataModule: official label CSVs or Emotion-LLaMA lists, and subtitles."""

from pathlib import Path
from typing import Any, Literal

from src.core.records import SPLITS, SampleRecord
from src.data.base_datamodule import EmotionDataModule
from src.data.components.splits import carve_split
from src.data.formats.mer2023 import (
    read_emotion_llama_list,
    read_label_csv,
    with_subtitles,
)
from src.data.formats.rows import FormatError
from src.data.formats.subtitles import read_subtitles

#: Official MER2023 files: train on ``train``, test on MER-MULTI (``test1``).
DEFAULT_SPLITS: dict[str, list[str]] = {"train": ["train-label.csv"], "test": ["test1-label.csv"]}


class MER2023DataModule(EmotionDataModule):
    """MER2023 (six classes, weighted F1) in the official or the Emotion-LLaMA layout.

    Annotation files are read by suffix: ``.csv`` is an official label CSV
    (``name,discrete[,valence]``), ``.txt`` an Emotion-LLaMA list (``name n_frames emotion
    [valence]``). Features live in the Emotion-LLaMA layout under ``root``
    (``<feature_dir>/<name>.npy``), clips under ``media.video_dir``.

    Args:
        root: Data root.
        splits: Annotation files (relative to ``root``) per split, e.g. ``{train:
            [train-label.csv], test: [test1-label.csv, test2-label.csv]}``. A file's rows all get
            the split of its key.
        val_fraction: Without a ``val`` entry in ``splits``, this fraction of the training samples
            (stratified by label, seeded) becomes the validation split.
        split_seed: Seed of that carving.
        subtitles: Subtitle CSV under ``root``: ``name,chinese,english`` or Emotion-LLaMA's
            ``name,sentence`` transcription; ``None``: no subtitles.
        language: Subtitle language of a ``name,chinese,english`` file.
        require_subtitles: A sample without a subtitle is an error (or skipped and reported);
            ``False``: it gets an empty subtitle.
        label_space: ``mer2023`` (default); ``merr`` for the nine-class MERR lists.
        **kwargs: :class:`~src.data.base_datamodule.EmotionDataModule` options (``streams``,
            ``tokenizer``, ``task``, ``tasks``, ``batch_size``, ``on_error``, ``source``,
            ``media``, ...).
    """

    def __init__(
        self,
        root: str,
        splits: dict[str, list[str]] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        subtitles: str | None = "transcription.csv",
        language: Literal["english", "chinese"] = "english",
        require_subtitles: bool = True,
        label_space: str | list[str] = "mer2023",
        **kwargs: Any,
    ) -> None:
        super().__init__(root, label_space=label_space, **kwargs)
        self.splits = {k: list(v) for k, v in (splits or DEFAULT_SPLITS).items()}
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"MER2023 splits must be among {SPLITS}, got {sorted(unknown)}")
        if not any(self.splits.values()):
            raise ValueError("MER2023 splits name no annotation file")
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.subtitles = subtitles
        self.language = language
        self.require_subtitles = require_subtitles

    def _read(self, path: Path, split: str) -> list[SampleRecord]:
        options = {"split": split, "label_space": self.label_space, **self.parse_options}
        if path.suffix.lower() == ".txt":
            return read_emotion_llama_list(path, **options)
        return read_label_csv(path, **options)

    def load_records(self) -> list[SampleRecord]:
        records: list[SampleRecord] = []
        first_file: dict[str, Path] = {}
        for split, files in self.splits.items():
            for file in files:
                path = self.root / file
                for record in self._read(path, split):
                    if record.name in first_file:  # e.g. a test clip also in the train list
                        reason = f"duplicate name: also in {first_file[record.name]}"
                        err = FormatError(path, "name", reason, name=record.name)
                        self._reject(err, path, "name", reason, record.name)
                        continue
                    first_file[record.name] = path
                    records.append(record)
        if "val" not in self.splits:
            train = [r for r in records if r.split == "train"]
            rest = [r for r in records if r.split != "train"]
            records = carve_split(train, self.val_fraction, self.split_seed) + rest
        if self.subtitles is None:
            return records
        path = self.root / self.subtitles
        texts = read_subtitles(path, column=self.language, **self.parse_options)
        return with_subtitles(
            records, texts, source=path, required=self.require_subtitles, **self.parse_options
        )

"""DFEW as a LightningDataModule: one of the five folds, in the official or a text protocol."""

from pathlib import Path
from typing import Any, Literal

from src.core.records import SampleRecord
from src.data.base_datamodule import EmotionDataModule
from src.data.components.splits import carve_split
from src.data.formats.dfew import FOLDS, read_fold


class DFEWDataModule(EmotionDataModule):
    """DFEW (seven classes, UAR and WAR over five folds): one fold per run.

    The fold's train file gives ``train`` (minus a seeded, stratified ``val_fraction`` that
    becomes ``val``); its test file gives ``test``. Labels are the DFEW label space (0 happy,
    1 sad, 2 neutral, 3 angry, 4 surprise, 5 disgust, 6 fear); DFEW has no subtitles. Run the
    five folds with ``--data.init_args.fold 1`` ... ``5`` and average UAR/WAR.

    Args:
        root: Data root (feature folders ``<feature_dir>/<clip id>.npy``, clips).
        fold: The fold, 1-5.
        protocol: ``official`` (``EmoLabel_DataSplit/{train,test}(single-labeled)/set_k.csv``),
            ``dfer-clip`` (``DFEW_set_k_{train,test}.txt``) or ``mae-dfer``
            (``split0k/{train,test}.csv``).
        split_dir: Folder of the split files (``official``: the DFEW root or its
            ``EmoLabel_DataSplit``); relative to ``root``; ``None``: ``root`` itself.
        val_fraction: Fraction of the fold's training clips used for validation; ``0`` leaves
            the validation split empty (then run with ``--trainer.limit_val_batches 0``).
        split_seed: Seed of the validation carving.
        **kwargs: :class:`~src.data.base_datamodule.EmotionDataModule` options (``streams``,
            ``tokenizer``, ``batch_size``, ``on_error``, ``source``, ``media``, ...).
    """

    def __init__(
        self,
        root: str,
        fold: int = 1,
        protocol: Literal["official", "dfer-clip", "mae-dfer"] = "official",
        split_dir: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, label_space="dfew", **kwargs)
        if fold not in FOLDS:
            raise ValueError(f"DFEW fold must be one of {FOLDS}, got {fold}")
        self.fold = fold
        self.protocol = protocol
        self.split_dir = split_dir
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    @property
    def split_root(self) -> Path:
        """Where the fold files are."""
        return self.root / self.split_dir if self.split_dir else self.root

    def load_records(self) -> list[SampleRecord]:
        train, test = read_fold(
            self.split_root, self.fold, protocol=self.protocol, **self.parse_options
        )
        return carve_split(train, self.val_fraction, self.split_seed) + test

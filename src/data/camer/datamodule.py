"""CA-MER as a LightningDataModule: the manifest, its features and subtitles.

Two classes, so that a real-data config can never inherit generator settings: composing
``--data conf/data/camer_real.yaml`` over the demo changes the class, and jsonargparse drops the
init args the new class does not have (``synthetic``).
"""

import json
from dataclasses import replace
from typing import Any

from src.core.records import SUBSETS, SampleRecord
from src.data.base_datamodule import EmotionDataModule
from src.data.camer.manifest import read_manifest
from src.data.camer.synthetic import BAYES_FILE, SyntheticCAMERConfig, ensure_synthetic_camer
from src.data.components.splits import carve_split
from src.data.formats.subtitles import read_subtitles


class CAMERDataModule(EmotionDataModule):
    """CA-MER: every test sample keeps its subset (video_aligned, audio_aligned, consistent).

    Args:
        root: Data root holding the manifest, subtitle CSV and feature folders.
        manifest: Manifest file name under ``root``.
        subtitles: Subtitle CSV under ``root`` (``name,english`` or ``name,chinese,english``).
        subtitle_column: Which subtitle column to use (``english``, ``chinese``, ``sentence``).
        val_fraction: When the manifest has no ``val`` split: the fraction of the test split
            carved into one, within each subset (:func:`~src.data.components.splits.carve_split`,
            stratified by label), so that validation mirrors the test's subset mix; the carved
            samples leave the test split. 0 turns carving off.
        split_seed: Seed of that carving.
        **kwargs: The options of :class:`EmotionDataModule` (``streams``, ``tokenizer``,
            ``label_space``, ``batch_size``, ``on_error``, ...).
    """

    def __init__(
        self,
        root: str,
        manifest: str = "manifest.csv",
        subtitles: str = "transcription.csv",
        subtitle_column: str = "english",
        val_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.manifest = manifest
        self.subtitles = subtitles
        self.subtitle_column = subtitle_column
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction, self.split_seed = val_fraction, split_seed

    def load_records(self) -> list[SampleRecord]:
        records = read_manifest(self.root / self.manifest, self.label_space, **self.parse_options)
        subtitles = read_subtitles(
            self.root / self.subtitles, column=self.subtitle_column, **self.parse_options
        )
        records = [replace(r, subtitle=subtitles.get(r.name, "")) for r in records]
        if self.val_fraction > 0 and not any(r.split == "val" for r in records):
            records = self._carve_val(records)
        return records

    def _carve_val(self, records: list[SampleRecord]) -> list[SampleRecord]:
        """A val split carved out of the test split, subset by subset (same subset mix)."""
        test = [r for r in records if r.split == "test"]
        carved: dict[str, SampleRecord] = {}
        for i, subset in enumerate((*SUBSETS, None)):
            group = [r for r in test if r.subset == subset]
            if len(group) > 1:
                for r in carve_split(group, self.val_fraction, self.split_seed + i):
                    carved[r.name] = r
        return [carved.get(r.name, r) for r in records]


class SyntheticCAMERDataModule(CAMERDataModule):
    """The synthetic CA-MER: generated into ``root`` on first use, then read as CA-MER is.

    The generator writes only into an empty folder or one it made
    (:func:`~src.data.camer.synthetic.claim_folder`); a folder holding other files is refused
    with :class:`~src.data.camer.synthetic.ForeignDataError`, and nothing is written there.

    Args:
        root: Folder of the generated data set.
        synthetic: Generator settings (default: :class:`SyntheticCAMERConfig`'s defaults).
        **kwargs: :class:`CAMERDataModule` options (``streams``, ``batch_size``, ...).
    """

    def __init__(
        self, root: str, synthetic: SyntheticCAMERConfig | None = None, **kwargs: Any
    ) -> None:
        super().__init__(root, **kwargs)
        self.synthetic = synthetic or SyntheticCAMERConfig()
        # Generated at construction: the model needs the tokenizer before setup() runs.
        ensure_synthetic_camer(self.root, self.streams, self.synthetic)

    def bayes_bounds(self, split: str) -> dict[str, float] | None:
        """The synthetic world's Bayes bounds of ``split`` under its own subset mix
        (``bayes.json``, written by the generator); ``None`` without that file."""
        path = self.root / BAYES_FILE
        if not path.is_file():
            return None
        entry = json.loads(path.read_text()).get("splits", {}).get(split)
        if entry is None:
            return None
        bounds = dict(entry["eval_prior"])
        bounds.update({f"train_prior/{k}": v for k, v in entry["train_prior"].items()})
        bounds["counts"] = entry["counts"]
        return bounds

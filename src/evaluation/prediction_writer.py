"""Write one CSV row per predicted sample; merge the ranks under DDP; replace the file atomically.

Columns: ``name, subset, label, prediction, score_<label>... , text, extracted``.

- ``label``: the true label word, empty when unknown;
- ``prediction``: the arg-max label of the scores, or else the one label the generated text names
  (:func:`text_to_label`), or else empty (unparsed: never guessed);
- ``score_<label>``: the log-likelihood of each candidate label (empty without scores);
- ``text``: the generated text (empty without generation);
- ``extracted``: the emotion words the rule-based extractor finds in ``text`` (a JSON list).

``python -m src.cli score --predictions FILE`` computes every metric from such a file.
"""

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from src.core.label_space import LABEL_SPACES, LabelSpace, get_label_space
from src.evaluation.rank_parts import INDEX, RANK, clear_stale_parts, dataset_order
from src.io.atomic import atomic_open
from src.metrics.emotion_vocabulary import EmotionVocabulary
from src.metrics.open_vocabulary import RuleBasedExtractor, text_to_label

BASE_COLUMNS = ("name", "subset", "label", "prediction")
TAIL_COLUMNS = ("text", "extracted")
# Bookkeeping columns of the per-rank part files, dropped in the merged file.


def prediction_columns(label_names: Sequence[str]) -> list[str]:
    """Column names of a prediction file for the given label order."""
    return [*BASE_COLUMNS, *(f"score_{label}" for label in label_names), *TAIL_COLUMNS]


def prediction_rows(
    prediction: dict[str, Any],
    label_space: LabelSpace,
    extractor: RuleBasedExtractor,
) -> list[dict[str, str]]:
    """CSV rows (column -> text) for one ``predict_step`` output.

    Args:
        prediction: ``names`` (list[str]); optional ``subsets`` (list[str | None]), ``labels``
            (Tensor ``(B,)``, ``-1`` unknown), ``scores`` (Tensor ``(B, L)`` log-likelihoods in
            label-space order, or ``None``), ``texts`` (list[str] or ``None``).
        label_space: Gives the label words and maps generated text to a label.
        extractor: Finds the emotion words of each text.
    """
    if not isinstance(prediction, dict) or "names" not in prediction:
        raise ValueError("predict_step must return a dict with at least 'names'")
    names = [str(n) for n in prediction["names"]]
    size = len(names)
    labels_ = label_space.labels

    def column(key: str) -> list[Any] | None:
        value = prediction.get(key)
        if value is None:
            return None
        value = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        if len(value) != size:
            raise ValueError(
                f"predict_step output '{key}' has {len(value)} entries, 'names' {size}"
            )
        return value

    subsets, labels, texts = column("subsets"), column("labels"), column("texts")
    scores = prediction.get("scores")
    if scores is not None:
        scores = scores.detach().float().cpu()
        if scores.shape != (size, len(labels_)):
            raise ValueError(
                f"predict_step output 'scores' has shape {tuple(scores.shape)}, expected "
                f"({size}, {len(labels_)}) for labels {list(labels_)}"
            )
    rows = []
    for i, name in enumerate(names):
        label = int(labels[i]) if labels is not None else -1
        if not -1 <= label < len(labels_):
            raise ValueError(f"predict_step output 'labels' for {name}: {label} is out of range")
        text = "" if texts is None or texts[i] is None else str(texts[i])
        if scores is not None:
            prediction_word = labels_[int(scores[i].argmax())]
        else:
            index = text_to_label(text, label_space) if text else None
            prediction_word = "" if index is None else labels_[index]
        row = {
            "name": name,
            "subset": "" if subsets is None or subsets[i] is None else str(subsets[i]),
            "label": labels_[label] if label >= 0 else "",
            "prediction": prediction_word,
            "text": text,
            "extracted": json.dumps(extractor.extract(text) if text else [], ensure_ascii=False),
        }
        for j, word in enumerate(labels_):
            row[f"score_{word}"] = repr(float(scores[i, j])) if scores is not None else ""
        rows.append(row)
    return rows


def merge_part_files(parts: Sequence[Path], output: Path, columns: Sequence[str]) -> int:
    """Merge per-rank part files into ``output`` (atomically); returns the number of rows.

    Rows are ordered by dataset index when every row has one, else by rank then arrival; a
    sample seen twice (a distributed sampler pads the last batch by repeating samples) is kept
    once: the first copy by index, or by name when indices are unknown (names are sample ids).
    """
    rows: list[dict[str, str]] = []
    for part in parts:
        with open(part, newline="", encoding="utf-8") as handle:
            rows.extend(csv.DictReader(handle))
    unique = dataset_order(rows)
    with atomic_open(output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(unique)
    return len(unique)


class PredictionCSVWriter(BasePredictionWriter):
    """Lightning callback writing ``predict`` outputs to a CSV file (one row per sample).

    Every rank appends its rows to a part file beside the output as batches finish; at the end
    of ``predict`` the ranks meet at a barrier and rank zero merges the parts (ordered by dataset
    index, DDP padding duplicates removed) into the output through a temporary file and
    ``os.replace``, then deletes the parts. With several predict dataloaders, dataloader ``k > 0``
    goes to ``<stem>-<k><suffix>``.

    Args:
        output: Path of the CSV file.
        label_names: Label order of the score columns; by default
            ``pl_module.model.label_space.labels`` or ``pl_module.model.labels``.
        vocabulary: A ``name,format`` emotion vocabulary for the ``extracted`` column; the
            built-in vocabulary when ``None``.
        negation: Apply the extractor's negation rule.
    """

    def __init__(
        self,
        output: str | Path,
        label_names: Sequence[str] | None = None,
        vocabulary: str | Path | None = None,
        negation: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.label_names = tuple(label_names) if label_names is not None else None
        self.extractor = RuleBasedExtractor(EmotionVocabulary.load(vocabulary), negation=negation)
        self._label_space: LabelSpace | None = None
        self.written: list[Path] = []

    def output_path(self, dataloader_idx: int) -> Path:
        """Output file of dataloader ``dataloader_idx``."""
        if dataloader_idx == 0:
            return self.output
        return self.output.with_name(f"{self.output.stem}-{dataloader_idx}{self.output.suffix}")

    def _part(self, dataloader_idx: int, rank: int) -> Path:
        out = self.output_path(dataloader_idx)
        return out.with_name(f".{out.name}.rank{rank}.part")

    def _parts(self) -> list[Path]:
        parent = self.output.parent
        if not parent.is_dir():
            return []
        stem, suffix = re.escape(self.output.stem), re.escape(self.output.suffix)
        pattern = re.compile(rf"\.{stem}(-\d+)?{suffix}\.rank\d+\.part")
        return sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name))

    def _resolve_label_space(self, pl_module: pl.LightningModule) -> LabelSpace:
        model = getattr(pl_module, "model", None)
        model_space = getattr(model, "label_space", None)
        if isinstance(model_space, LabelSpace) and self.label_names in (None, model_space.labels):
            return model_space
        names = self.label_names
        if names is None and getattr(model, "labels", None) is not None:
            names = tuple(model.labels)
        if names is None:
            raise ValueError(
                "PredictionCSVWriter needs label_names, or pl_module.model.label_space / .labels"
            )
        # A known label space keeps its name; any other list becomes a custom one.
        for space in LABEL_SPACES.values():
            if space.labels == tuple(names):
                return space
        return get_label_space(list(names))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._label_space = self._resolve_label_space(pl_module)
        self.written = []
        clear_stale_parts(trainer, self._parts(), "PredictionCSVWriter")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self._label_space is not None
        rows = prediction_rows(prediction, self._label_space, self.extractor)
        indices = list(batch_indices) if batch_indices is not None else []
        if len(indices) != len(rows):
            indices = [""] * len(rows)
        columns = [*prediction_columns(self._label_space.labels), INDEX, RANK]
        part = self._part(dataloader_idx, trainer.global_rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        new = not part.exists()
        with open(part, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if new:
                writer.writeheader()
            for row, index in zip(rows, indices, strict=True):
                writer.writerow({**row, INDEX: index, RANK: trainer.global_rank})

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("PredictionCSVWriter.merge")
        if trainer.is_global_zero:
            assert self._label_space is not None
            columns = prediction_columns(self._label_space.labels)
            by_output: dict[Path, list[Path]] = {}
            for part in self._parts():
                output = part.with_name(part.name[1:].rsplit(".rank", 1)[0])
                by_output.setdefault(output, []).append(part)
            for output, parts in sorted(by_output.items()):
                parts.sort(key=lambda p: int(p.name.rsplit(".rank", 1)[1].split(".")[0]))
                merge_part_files(parts, output, columns)
                for part in parts:
                    part.unlink()
                self.written.append(output)
        trainer.strategy.barrier("PredictionCSVWriter.done")

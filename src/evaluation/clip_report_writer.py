"""A person-readable report of ``predict`` on clips: one JSON record and one summary line per clip.

Per clip (see :mod:`src.evaluation.clip_evidence` for the definitions):

- ``prediction`` and ``probabilities`` (closed label set, fused);
- ``audio_alone`` / ``visual_alone``: the prediction with the other modality masked;
- ``conflict``: ``flag`` (the two single-modality answers differ), ``score`` (their
  Jensen-Shannon divergence in bits) and ``fused_follows`` (``audio``, ``visual``, ``both``,
  ``neither``);
- ``attention``: with the :class:`~src.callbacks.attention_reallocation.AttentionReallocation`
  callback active, the clip's attention share per modality before and after reallocation in the
  closed-set scoring pass; else ``null``;
- ``text`` and ``emotion_words`` with ``generate: true`` (the reasoning prompt when the data
  gives one, and the rule-based extractor's emotion words); else ``null``.

A clip skipped by the data module (``on_error: skip``) gets a record with ``status: skipped`` and
its ``error`` (file, field, reason), and a summary line: nothing is dropped silently.

Output: JSON Lines, written per rank as batches finish and merged by rank zero at the end (in
dataset order, through a temporary file and ``os.replace``).
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

from src.callbacks.attention_reallocation import AttentionReallocation
from src.evaluation.clip_evidence import (
    clip_attention_shares,
    conflicts,
    distribution,
    label_probabilities,
    unimodal_scores,
)
from src.evaluation.rank_parts import INDEX, RANK, clear_stale_parts, dataset_order
from src.io.atomic import atomic_open
from src.metrics.emotion_vocabulary import EmotionVocabulary
from src.metrics.open_vocabulary import RuleBasedExtractor
from src.models.attention.share_monitor import ShareMonitor


def summary_line(record: dict[str, Any]) -> str:
    """One readable line of a record, e.g. ``clip: surprise (p=0.41) | audio alone: angry 0.38 |
    visual alone: surprise 0.52 | CONFLICT 0.31 -> fused follows visual | attn audio 0.03->0.25,
    visual 0.60->0.25``.
    """
    name = record["name"]
    if record.get("status") == "skipped":
        error = record["error"]
        return f"{name}: SKIPPED ({error['field']}: {error['reason']}) [{error['file']}]"
    top = record["prediction"]
    parts = [f"{name}: {top} (p={record['probabilities'][top]:.2f})"]
    for side in ("audio", "visual"):
        alone = record.get(f"{side}_alone")
        if alone is not None:
            label = alone["prediction"]
            parts.append(f"{side} alone: {label} {alone['probabilities'][label]:.2f}")
    conflict = record.get("conflict")
    if conflict is not None:
        score, follows = conflict["score"], conflict["fused_follows"]
        if conflict["flag"]:
            parts.append(f"CONFLICT {score:.2f} -> fused follows {follows}")
        elif _sides_agree(record):
            differs = ", fused differs" if follows == "neither" else ""
            parts.append(f"agree ({score:.2f}){differs}")
        else:
            parts.append(f"weak disagreement {score:.2f} -> fused follows {follows}")
    attention = record.get("attention")
    if attention is not None:
        before, after = attention["before"], attention["after"]
        parts.append(
            f"attn audio {before['audio']:.2f}->{after['audio']:.2f}, "
            f"visual {before['visual']:.2f}->{after['visual']:.2f}"
        )
    if record.get("emotion_words"):
        parts.append("words: " + ", ".join(record["emotion_words"]))
    return " | ".join(parts)


class ClipReportWriter(BasePredictionWriter):
    """Writes one JSON record per clip and prints a summary line per clip.

    Args:
        output: JSON Lines file (one record per clip).
        evidence: Also predict from audio alone and from visual alone (two more scoring passes
            per batch) and report the conflict.
        conflict_threshold: Minimum conflict score (Jensen-Shannon divergence, bits) for the
            flag, besides different single-modality answers; 0 flags every disagreement.
        generate: Generate text per clip (greedy) and extract its emotion words.
        max_new_tokens: Generation length limit.
        vocabulary: ``name,format`` emotion vocabulary of the extractor (``None``: built-in).
        negation: Apply the extractor's negation rule.
        print_summary: Print the summary lines (rank zero, at the end).
    """

    def __init__(
        self,
        output: str = "predictions/clips.jsonl",
        evidence: bool = True,
        conflict_threshold: float = 0.0,
        generate: bool = False,
        max_new_tokens: int = 64,
        vocabulary: str | None = None,
        negation: bool = True,
        print_summary: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        if not 0.0 <= conflict_threshold <= 1.0:
            raise ValueError(f"conflict_threshold must be in [0, 1] bits, got {conflict_threshold}")
        self.evidence, self.generate = evidence, generate
        self.conflict_threshold = conflict_threshold
        self.max_new_tokens = max_new_tokens
        self.extractor = RuleBasedExtractor(EmotionVocabulary.load(vocabulary), negation=negation)
        self.print_summary = print_summary
        #: The merged records of the last run (rank zero).
        self.records: list[dict[str, Any]] = []
        self._labels: list[str] = []
        self._monitor: ShareMonitor | None = None

    # --------------------------------------------------------------------------- files
    def _part(self, rank: int) -> Path:
        return self.output.with_name(f".{self.output.name}.rank{rank}.part")

    def _parts(self) -> list[Path]:
        if not self.output.parent.is_dir():
            return []
        pattern = re.compile(rf"\.{re.escape(self.output.name)}\.rank(\d+)\.part")
        found = [(p, pattern.fullmatch(p.name)) for p in self.output.parent.iterdir()]
        return [p for p, m in sorted(found, key=lambda x: int(x[1][1]) if x[1] else -1) if m]

    # --------------------------------------------------------------------------- hooks
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if model is None or not hasattr(model, "score_labels"):
            raise AttributeError(
                "ClipReportWriter needs pl_module.model with score_labels (EmotionLLMModule)"
            )
        self._labels = list(model.labels)
        self.records = []
        clear_stale_parts(trainer, self._parts(), "ClipReportWriter")

    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Found per batch: the AR callback binds a fresh monitor in its own on_predict_start.
        self._monitor = _active_monitor(trainer)
        if self._monitor is not None:
            self._monitor.start_row_record()

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
        # Only predict_step's passes (the fused scoring) are in the per-clip attention record.
        rows = self._monitor.take_row_record() if self._monitor is not None else None
        records = self.batch_records(trainer, pl_module, prediction, batch, rows)
        indices = list(batch_indices) if batch_indices is not None else []
        if len(indices) != len(records):
            indices = [None] * len(records)
        part = self._part(trainer.global_rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "a", encoding="utf-8") as handle:
            for record, index in zip(records, indices, strict=True):
                extra = {INDEX: index, RANK: trainer.global_rank}
                handle.write(json.dumps({**record, **extra}, ensure_ascii=False) + "\n")

    def batch_records(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch: dict[str, Any],
        rows: dict[int, torch.Tensor] | None,
    ) -> list[dict[str, Any]]:
        """The records of one batch from ``predict_step``'s output and the batch."""
        model = pl_module.model
        names = [str(n) for n in prediction["names"]]
        fused = label_probabilities(prediction["scores"])
        alone: dict[str, torch.Tensor | None] = {"audio": None, "visual": None}
        texts = prediction.get("texts")
        if self.evidence or self.generate:
            features = prediction.get("features")
            with trainer.precision_plugin.predict_step_context():
                if features is None:  # a predict_step that does not hand its features on
                    features = pl_module.encode_batch(batch)["features"]
                full = {**batch, "features": features}
                if self.evidence:
                    alone = self._unimodal(model, full)
                if self.generate:
                    prompt = {**full, **batch.get("reason_prompt", {})}
                    texts = model.generate(prompt, self.max_new_tokens)
        attention = (
            clip_attention_shares(rows, len(names)) if rows is not None else [None] * len(names)
        )
        conflict = conflicts(fused, alone["audio"], alone["visual"], self.conflict_threshold)
        datamodule = trainer.datamodule
        paths = getattr(datamodule, "clip_paths", {}) if datamodule is not None else {}
        sources = getattr(datamodule, "subtitle_sources", {}) if datamodule is not None else {}
        subtitles = batch.get("subtitles") or [None] * len(names)
        records = []
        for i, name in enumerate(names):
            text = None if texts is None or texts[i] is None else str(texts[i])
            record = {
                "name": name,
                "status": "ok",
                "clip": str(paths[name]) if name in paths else None,
                "subtitle": subtitles[i],
                "subtitle_source": sources.get(name),
                **distribution(fused[i], self._labels),
                "audio_alone": _side(alone["audio"], i, self._labels),
                "visual_alone": _side(alone["visual"], i, self._labels),
                "conflict": conflict[i],
                "attention": attention[i],
                "text": text,
                "emotion_words": self.extractor.extract(text) if text is not None else None,
            }
            records.append(record)
        return records

    def _unimodal(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        # The extra passes run under AR too, but must not enter the AR callback's totals.
        saved = self._monitor.state().clone() if self._monitor is not None else None
        scores = unimodal_scores(model, batch)
        if saved is not None:
            self._monitor.load_state(saved)
        return {k: None if v is None else label_probabilities(v) for k, v in scores.items()}

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("ClipReportWriter.merge")
        if trainer.is_global_zero:
            self.records = self._merge(trainer)
            with atomic_open(self.output, "w") as handle:
                for record in self.records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if self.print_summary:
                for record in self.records:
                    tqdm.write(summary_line(record))
                skipped = sum(r["status"] == "skipped" for r in self.records)
                tqdm.write(
                    f"clips: {len(self.records) - skipped} predicted, {skipped} skipped "
                    f"-> {self.output}"
                )
        trainer.strategy.barrier("ClipReportWriter.done")

    def _merge(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        parts = self._parts()
        for part in parts:
            with open(part, encoding="utf-8") as handle:
                rows.extend(json.loads(line) for line in handle if line.strip())
        records = [
            {k: v for k, v in row.items() if k not in (INDEX, RANK)} for row in dataset_order(rows)
        ]
        for part in parts:
            part.unlink()
        datamodule = trainer.datamodule
        for skipped in getattr(datamodule, "skipped", None) or []:
            records.append(
                {
                    "name": skipped.get("name") or "",
                    "status": "skipped",
                    "clip": skipped.get("file"),
                    "error": {k: skipped.get(k) for k in ("file", "field", "reason")},
                }
            )
        return records


def _sides_agree(record: dict[str, Any]) -> bool:
    return record["audio_alone"]["prediction"] == record["visual_alone"]["prediction"]


def _side(probs: torch.Tensor | None, row: int, labels: list[str]) -> dict[str, Any] | None:
    return None if probs is None else distribution(probs[row], labels)


def _active_monitor(trainer: pl.Trainer) -> ShareMonitor | None:
    for callback in trainer.callbacks:
        if isinstance(callback, AttentionReallocation) and callback.active:
            return callback.reallocator.monitor
    return None

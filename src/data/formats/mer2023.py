"""MER2023 annotation formats: official label CSVs, subtitle CSVs, the Emotion-LLaMA list.

- Official labels: ``{train,test1,test2,test3}-label.csv`` with ``name,discrete,valence``
  (``test3`` has no ``valence`` column).
- Subtitles: ``name,chinese,english`` (choose the language) or Emotion-LLaMA's ``name,sentence``.
- Emotion-LLaMA annotation list (``MERR_coarse_grained.txt`` etc.): whitespace-separated lines
  ``name n_frames emotion [valence]``.
"""

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

from src.core.label_space import MER2023, LabelSpace
from src.core.records import SampleRecord
from src.data.components.skip_report import SkipReport
from src.data.formats.rows import (
    NameRegistry,
    OnError,
    RowPolicy,
    RowReader,
    check_split,
    iter_text_rows,
    parse_float,
    parse_label,
    require_file,
)

SUBTITLE_LANGUAGES: tuple[str, ...] = ("english", "chinese")


def infer_split(path: str | Path) -> str:
    """``train`` for ``train-label.csv``/``train*.txt``, ``test`` for ``test1-label.csv`` etc."""
    stem = Path(path).name.lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith("test"):
        return "test"
    if stem.startswith("val"):
        return "val"
    raise ValueError(
        f"{path}: cannot tell the split from the file name; pass split='train'|'val'|'test'"
    )


def read_label_csv(
    path: str | Path,
    *,
    split: str | None = None,
    label_space: LabelSpace = MER2023,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read an official MER2023 label CSV (``name,discrete[,valence]``).

    Args:
        path: The CSV file.
        split: Split of every record; inferred from the file name when ``None``.
        label_space: Where ``discrete`` is normalised (case, synonyms).
        on_error: ``"raise"`` a :class:`FormatError` on the first bad row, or ``"skip"`` it.
        report: Receives skipped rows (required with ``on_error="skip"``).
    """
    rows = RowReader(path, ("name", "discrete"), ("valence",), on_error=on_error, report=report)
    split = check_split(split or infer_split(rows.path), str(rows.path))
    records: list[SampleRecord] = []
    for row in rows:
        where = {"line": row.line, "name": row.name}
        ok, label = parse_label(
            row["discrete"], label_space, rows.policy, field="discrete", **where
        )
        if not ok:
            continue
        ok, valence = parse_float(row.get("valence"), rows.policy, field="valence", **where)
        if not ok or not rows.claim(row):
            continue
        records.append(SampleRecord(name=row.name, split=split, label=label, valence=valence))
    return records


def read_transcription(
    path: str | Path, *, on_error: OnError = "raise", report: SkipReport | None = None
) -> dict[str, str]:
    """Read Emotion-LLaMA's ``name,sentence`` transcription CSV into ``{name: sentence}``."""
    rows = RowReader(
        path, ("name", "sentence"), on_error=on_error, report=report, what="transcription file"
    )
    return {row.name: row["sentence"] for row in rows if rows.claim(row)}


def read_emotion_llama_list(
    path: str | Path,
    *,
    split: str = "train",
    label_space: LabelSpace = MER2023,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read an Emotion-LLaMA annotation list: lines ``name n_frames emotion [valence]``.

    ``n_frames`` is checked (a non-negative integer) but not kept. Pass ``label_space=MERR`` for
    the nine-class MERR lists.
    """
    path = require_file(path)
    split = check_split(split, str(path))
    policy = RowPolicy(path, on_error, report)
    names = NameRegistry(policy)
    records: list[SampleRecord] = []
    for line, fields in iter_text_rows(path):
        if len(fields) not in (3, 4):
            policy.reject(
                "<row>",
                f"expected 'name n_frames emotion [valence]', got {len(fields)} fields",
                line=line,
                name=fields[0],
            )
            continue
        name, n_frames = fields[0], fields[1]
        if not n_frames.isdigit():
            policy.reject(
                "n_frames", f"{n_frames!r} is not a non-negative integer", line=line, name=name
            )
            continue
        ok, label = parse_label(
            fields[2], label_space, policy, field="emotion", line=line, name=name
        )
        if not ok:
            continue
        ok, valence = parse_float(
            fields[3] if len(fields) == 4 else None, policy, field="valence", line=line, name=name
        )
        if ok and names.claim(name, line):
            records.append(SampleRecord(name=name, split=split, label=label, valence=valence))
    return records


def with_subtitles(
    records: Iterable[SampleRecord],
    subtitles: Mapping[str, str],
    *,
    source: str | Path,
    required: bool = True,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Attach subtitles to records (``dataclasses.replace``).

    Args:
        records: The records.
        subtitles: ``{name: text}`` from :func:`read_subtitles` / :func:`read_transcription`.
        source: The subtitle file, named in errors.
        required: A record without a subtitle is an error (``False``: it keeps ``""``).
        on_error: ``"raise"`` or ``"skip"`` (the record is dropped and reported).
        report: Receives skipped records.
    """
    policy = RowPolicy(source, on_error, report)
    out: list[SampleRecord] = []
    for record in records:
        text = subtitles.get(record.name)
        if text is None and required:
            policy.reject("name", "no subtitle for this sample", line=None, name=record.name)
            continue
        out.append(dataclasses.replace(record, subtitle=text or ""))
    return out

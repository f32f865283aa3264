"""EMER reasoning annotations.

- EMER-V1 (``gt-eng.csv``): ``names,emotions,subtitles,reasons``; one label per sample.
- EMER-V2: ``name,chinese,english``, the long reasoning text in two languages, no label column.
"""

from pathlib import Path

from src.core.label_space import MER2023, LabelSpace
from src.core.records import SampleRecord
from src.data.components.skip_report import SkipReport
from src.data.formats.mer2023 import SUBTITLE_LANGUAGES
from src.data.formats.rows import (
    OnError,
    RowReader,
    check_split,
    parse_label,
)


def read_emer_v1(
    path: str | Path,
    *,
    split: str = "test",
    label_space: LabelSpace = MER2023,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read EMER-V1 (``names,emotions,subtitles,reasons``) into labelled records with a reason.

    Args:
        path: The CSV file.
        split: Split of every record (EMER is an evaluation set: ``test``).
        label_space: Where ``emotions`` is normalised.
        on_error: ``"raise"`` or ``"skip"``.
        report: Receives skipped rows (required with ``on_error="skip"``).
    """
    columns = ("names", "emotions", "subtitles", "reasons")
    rows = RowReader(path, columns, on_error=on_error, report=report, name_field="names")
    split = check_split(split, str(rows.path))
    records: list[SampleRecord] = []
    for row in rows:
        ok, label = parse_label(
            row["emotions"],
            label_space,
            rows.policy,
            field="emotions",
            line=row.line,
            name=row.name,
        )
        if not ok:
            continue
        if not row["reasons"]:
            rows.reject(row, "reasons", "empty reasoning text")
            continue
        if rows.claim(row):
            records.append(
                SampleRecord(
                    name=row.name,
                    split=split,
                    label=label,
                    subtitle=row["subtitles"],
                    reason=row["reasons"],
                )
            )
    return records


def read_emer_v2(
    path: str | Path,
    *,
    language: str = "english",
    split: str = "test",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read EMER-V2 (``name,chinese,english``): unlabelled records whose ``reason`` is the text.

    Args:
        path: The CSV file.
        language: Which column is the reasoning text (``english`` or ``chinese``).
        split: Split of every record.
        on_error: ``"raise"`` or ``"skip"``.
        report: Receives skipped rows (required with ``on_error="skip"``).
    """
    if language not in SUBTITLE_LANGUAGES:
        raise ValueError(f"language must be one of {SUBTITLE_LANGUAGES}, got {language!r}")
    rows = RowReader(path, ("name", language), on_error=on_error, report=report)
    split = check_split(split, str(rows.path))
    records: list[SampleRecord] = []
    for row in rows:
        if not row[language]:
            rows.reject(row, language, "empty reasoning text")
        elif rows.claim(row):
            records.append(SampleRecord(name=row.name, split=split, reason=row[language]))
    return records

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
    NameRegistry,
    OnError,
    RowPolicy,
    check_split,
    iter_csv_rows,
    parse_label,
    require_file,
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
    path = require_file(path)
    split = check_split(split, str(path))
    policy = RowPolicy(path, on_error, report)
    names = NameRegistry(policy)
    records: list[SampleRecord] = []
    for line, row, problem in iter_csv_rows(path, ("names", "emotions", "subtitles", "reasons")):
        if row is None:
            policy.reject("<row>", str(problem), line=line, name=None)
            continue
        name = row["names"]
        if not name:
            policy.reject("names", "empty name", line=line, name=None)
            continue
        ok, label = parse_label(
            row["emotions"], label_space, policy, field="emotions", line=line, name=name
        )
        if not ok:
            continue
        if not row["reasons"]:
            policy.reject("reasons", "empty reasoning text", line=line, name=name)
            continue
        if names.claim(name, line):
            records.append(
                SampleRecord(
                    name=name,
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
    path = require_file(path)
    split = check_split(split, str(path))
    policy = RowPolicy(path, on_error, report)
    names = NameRegistry(policy)
    records: list[SampleRecord] = []
    for line, row, problem in iter_csv_rows(path, ("name", language)):
        if row is None:
            policy.reject("<row>", str(problem), line=line, name=None)
            continue
        name = row["name"]
        if not name:
            policy.reject("name", "empty name", line=line, name=None)
        elif not row[language]:
            policy.reject(language, "empty reasoning text", line=line, name=name)
        elif names.claim(name, line):
            records.append(SampleRecord(name=name, split=split, reason=row[language]))
    return records

"""Builds the CA-MER manifest from per-modality annotations, with a report of what went where.

Input: a CSV ``name,video_label,audio_label,label`` (optional ``split``, ``reason``) or a folder of
JSON-per-subset files. Rule (:func:`~src.data.camer.manifest.classify_conflict`): all three labels
equal -> ``consistent``; label = video label only -> ``video_aligned``; label = audio label only
-> ``audio_aligned``; anything else is *rejected* and listed with its reason. Rows that are not
valid input (unknown label, empty field, duplicate name, bad split) are errors, or with
``on_error="skip"`` listed as *invalid*; no row disappears without a line in the report.
"""

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.core.label_space import LabelSpace
from src.core.records import SPLITS, SUBSETS, SampleRecord
from src.data.camer.manifest import classify_conflict, read_subset_jsons, write_manifest
from src.data.components.skip_report import SkippedRow, SkipReport
from src.data.formats.rows import (
    OnError,
    RowReader,
    check_split,
    parse_label,
    require_file,
)
from src.io.atomic import atomic_open, atomic_write_text

ANNOTATION_COLUMNS: tuple[str, ...] = ("name", "video_label", "audio_label", "label")
OPTIONAL_ANNOTATION_COLUMNS: tuple[str, ...] = ("split", "reason")
MANIFEST_NAME = "manifest.csv"
REPORT_JSON = "build_report.json"
REPORT_CSV = "build_report.csv"
REJECTED_CSV = "rejected.csv"


@dataclass
class BuildResult:
    """Accepted records, rule rejections and invalid rows of one build.

    Args:
        source: The input (annotation CSV or JSON folder).
        records: Accepted samples, each with its subset.
        rejected: Rows the CA-MER rule rejects (labels that match neither side).
        invalid: Rows skipped as invalid input (only with ``on_error="skip"``).
        total_rows: Data rows read.
    """

    source: str
    records: list[SampleRecord] = field(default_factory=list)
    rejected: SkipReport = field(default_factory=SkipReport)
    invalid: SkipReport = field(default_factory=SkipReport)
    total_rows: int = 0

    def counts(self) -> dict[str, Any]:
        """Counts per subset, label, split and their crossings (every subset and split listed)."""
        by_split_subset = {
            split: {subset: 0 for subset in SUBSETS}
            for split in SPLITS
            if any(r.split == split for r in self.records)
        }
        by_subset_label: dict[str, dict[str, int]] = {subset: {} for subset in SUBSETS}
        for r in self.records:
            by_split_subset[r.split][r.subset] += 1
            by_subset_label[r.subset][r.label] = by_subset_label[r.subset].get(r.label, 0) + 1
        return {
            "total_rows": self.total_rows,
            "accepted": len(self.records),
            "rejected": len(self.rejected),
            "invalid": len(self.invalid),
            "by_subset": {s: sum(r.subset == s for r in self.records) for s in SUBSETS},
            "by_label": dict(sorted(Counter(r.label for r in self.records).items())),
            "by_split": dict(Counter(r.split for r in self.records)),
            "by_split_subset": by_split_subset,
            "by_subset_label": {s: dict(sorted(v.items())) for s, v in by_subset_label.items()},
        }


def build_from_annotations(
    path: str | Path,
    label_space: LabelSpace,
    *,
    split: str = "test",
    on_error: OnError = "raise",
) -> BuildResult:
    """Apply the CA-MER rule to a per-modality annotation CSV.

    Args:
        path: CSV with ``name,video_label,audio_label,label`` and optionally ``split``, ``reason``.
        label_space: Labels are normalised through it (case, synonyms).
        split: Split of rows without a ``split`` value.
        on_error: ``"raise"`` a :class:`~src.data.formats.rows.FormatError` on invalid input,
            or ``"skip"`` it into :attr:`BuildResult.invalid`.
    """
    path = require_file(path, "per-modality annotation file")
    check_split(split, str(path))
    result = BuildResult(source=str(path))
    rows = RowReader(
        path,
        ANNOTATION_COLUMNS,
        OPTIONAL_ANNOTATION_COLUMNS,
        on_error=on_error,
        report=result.invalid,
        what="per-modality annotation file",
    )
    policy = rows.policy
    for row in rows:
        line, name = row.line, row.name
        labels: dict[str, str] = {}
        for column in ("label", "video_label", "audio_label"):
            ok, labels[column] = parse_label(
                row[column], label_space, policy, field=column, line=line, name=name
            )
            if not ok:
                break
        else:
            row_split = row.get("split") or split
            if row_split not in SPLITS:
                policy.reject(
                    "split", f"{row_split!r} is not one of {SPLITS}", line=line, name=name
                )
                continue
            if not rows.claim(row):
                continue
            subset, why = classify_conflict(
                labels["label"], labels["video_label"], labels["audio_label"]
            )
            if subset is None:
                result.rejected.add(path, "label", why, name, line=line)
                continue
            result.records.append(
                SampleRecord(
                    name=name,
                    split=row_split,
                    subset=subset,
                    reason=row.get("reason") or None,
                    **labels,
                )
            )
    result.total_rows = rows.rows_seen
    return result


def build_from_subset_jsons(
    directory: str | Path,
    label_space: LabelSpace,
    *,
    split: str = "test",
    on_error: OnError = "raise",
) -> BuildResult:
    """Convert a JSON-per-subset release (``video_aligned.json``, ...) into a build result."""
    result = BuildResult(source=str(directory))
    result.records = read_subset_jsons(
        directory, label_space, split=split, on_error=on_error, report=result.invalid
    )
    result.total_rows = len(result.records) + len(result.invalid)
    return result


def _write_rejected(path: Path, rows: list[tuple[str, SkippedRow]]) -> None:
    columns = ("kind", "file", "line", "name", "field", "reason")
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for kind, row in rows:
            values = (kind, row.file, row.line, row.name, row.field, row.reason)
            writer.writerow(["" if v is None else v for v in values])


def write_build_outputs(
    result: BuildResult, output_dir: str | Path, manifest_name: str = MANIFEST_NAME
) -> dict[str, Path]:
    """Write the manifest, the JSON report, the counts CSV and the rejected-rows CSV.

    Returns the paths by role: ``manifest``, ``report_json``, ``report_csv``, ``rejected_csv``.
    """
    out = Path(output_dir)
    paths = {
        "manifest": out / manifest_name,
        "report_json": out / REPORT_JSON,
        "report_csv": out / REPORT_CSV,
        "rejected_csv": out / REJECTED_CSV,
    }
    write_manifest(paths["manifest"], result.records)
    listed = [("rejected", r) for r in result.rejected.rows]
    listed += [("invalid", r) for r in result.invalid.rows]
    report = {
        "source": result.source,
        "manifest": str(paths["manifest"]),
        "counts": result.counts(),
        "rejected": result.rejected.to_rows(),
        "invalid": result.invalid.to_rows(),
    }
    atomic_write_text(paths["report_json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    counts = Counter((r.split, r.subset, r.label) for r in result.records)
    with atomic_open(paths["report_csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("split", "subset", "label", "count"))
        for (split, subset, label), n in sorted(counts.items()):
            writer.writerow((split, subset, label, n))
    _write_rejected(paths["rejected_csv"], listed)
    return paths


def summary(result: BuildResult, max_listed: int = 10) -> str:
    """A human-readable summary: counts and the first rejected/invalid rows."""
    counts = result.counts()
    lines = [
        f"CA-MER build from {result.source}: {counts['total_rows']} rows, "
        f"{counts['accepted']} accepted, {counts['rejected']} rejected, "
        f"{counts['invalid']} invalid",
        "  subsets: " + ", ".join(f"{k}={v}" for k, v in counts["by_subset"].items()),
        "  splits:  " + ", ".join(f"{k}={v}" for k, v in counts["by_split"].items()),
        "  labels:  " + ", ".join(f"{k}={v}" for k, v in counts["by_label"].items()),
    ]
    listed = [("rejected", r) for r in result.rejected.rows]
    listed += [("invalid", r) for r in result.invalid.rows]
    for kind, row in listed[:max_listed]:
        lines.append(f"  {kind}: line {row.line} {row.name or ''} [{row.field}] {row.reason}")
    if len(listed) > max_listed:
        lines.append(f"  ... and {len(listed) - max_listed} more (see {REJECTED_CSV})")
    return "\n".join(lines)

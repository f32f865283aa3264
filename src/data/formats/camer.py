"""The CA-MER manifest: one CSV for all splits, shared by the synthetic generator and real data.

Columns: ``name,split,subset,label,video_label,audio_label`` and an optional ``reason``.
``split`` is train/val/test; ``subset`` is consistent, video_aligned or audio_aligned; labels are
words of the label space (normalised on read).
"""

import csv
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from src.data.label_space import LabelSpace
from src.data.records import SPLITS, SUBSETS, SampleRecord

MANIFEST_COLUMNS: tuple[str, ...] = (
    "name",
    "split",
    "subset",
    "label",
    "video_label",
    "audio_label",
)


def write_manifest(path: str | Path, records: Iterable[SampleRecord]) -> None:
    """Write ``records`` as a CA-MER manifest, atomically (temp file + rename)."""
    path = Path(path)
    records = list(records)
    with_reason = any(r.reason for r in records)
    columns = [*MANIFEST_COLUMNS, "reason"] if with_reason else list(MANIFEST_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in records:
                row = {c: getattr(r, c) or "" for c in MANIFEST_COLUMNS}
                if with_reason:
                    row["reason"] = r.reason or ""
                writer.writerow(row)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: str | Path, label_space: LabelSpace) -> list[SampleRecord]:
    """Read a CA-MER manifest; every error names the file, the row and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CA-MER manifest not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {MANIFEST_COLUMNS}")
        records: list[SampleRecord] = []
        seen: dict[str, int] = {}
        for row_no, row in enumerate(reader, start=2):
            where = f"{path}:{row_no}"
            name = (row["name"] or "").strip()
            if not name:
                raise ValueError(f"{where}: field 'name' is empty")
            if name in seen:
                raise ValueError(f"{where}: duplicate name {name!r} (first at row {seen[name]})")
            seen[name] = row_no
            split = (row["split"] or "").strip()
            if split not in SPLITS:
                raise ValueError(f"{where}: field 'split' is {split!r}; expected one of {SPLITS}")
            subset = (row["subset"] or "").strip() or None
            if subset is not None and subset not in SUBSETS:
                raise ValueError(f"{where}: field 'subset' is {subset!r}; expected one of {SUBSETS}")
            if split == "test" and subset is None:
                raise ValueError(f"{where}: test sample {name!r} has no 'subset'")

            def word(field: str, *, _row: dict = row, _where: str = where) -> str | None:
                value = (_row.get(field) or "").strip()
                if not value:
                    return None
                return label_space.labels[label_space.index(value, source=f"{_where} field {field!r}")]

            label = word("label")
            if label is None:
                raise ValueError(f"{where}: field 'label' is empty")
            records.append(
                SampleRecord(
                    name=name,
                    split=split,
                    label=label,
                    subset=subset,
                    video_label=word("video_label"),
                    audio_label=word("audio_label"),
                    reason=(row.get("reason") or "").strip() or None,
                )
            )
    return records

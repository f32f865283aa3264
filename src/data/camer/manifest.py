"""The CA-MER manifest (one CSV for all splits) and the JSON-per-subset release form.

Manifest columns: ``name,split,subset,label,video_label,audio_label`` and, when any sample has
reference reasoning, ``reason``. ``split`` is ``train``/``val``/``test``; ``subset`` is one of
:data:`~src.core.records.SUBSETS` (required on test rows, may be empty elsewhere); labels are
label-space words; ``video_label``/``audio_label`` may be empty when not annotated, but whatever
is given must agree with the subset rule (:func:`classify_conflict`).

JSON-per-subset: files ``video_aligned.json``, ``audio_aligned.json``, ``consistent.json``, each a
list of objects (or an object mapping name -> entry); see :data:`JSON_KEYS` for accepted keys.
"""

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from src.core.label_space import LabelSpace
from src.core.records import SPLITS, SUBSETS, SampleRecord
from src.data.components.skip_report import SkipReport
from src.data.formats.rows import (
    FormatError,
    NameRegistry,
    OnError,
    RowPolicy,
    RowReader,
    check_split,
    parse_label,
    require_file,
    utf8_errors,
)
from src.io.atomic import atomic_open
from src.io.safe_paths import unsafe_name_reason

MANIFEST_COLUMNS: tuple[str, ...] = (
    "name",
    "split",
    "subset",
    "label",
    "video_label",
    "audio_label",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("reason",)

#: Accepted keys of a JSON entry, per field, first match wins.
JSON_KEYS: dict[str, tuple[str, ...]] = {
    "name": ("name", "video_name", "video_id", "id"),
    "label": ("label", "emotion"),
    "video_label": ("video_label", "visual_label"),
    "audio_label": ("audio_label",),
    "reason": ("reason", "reasoning"),
    "split": ("split",),
}


def classify_conflict(label: str, video_label: str, audio_label: str) -> tuple[str | None, str]:
    """Apply the CA-MER rule to canonical labels: ``(subset, why)``; ``subset`` ``None`` = reject.

    Equal labels -> ``consistent``; the label equals the video side only -> ``video_aligned``;
    the audio side only -> ``audio_aligned``; otherwise the sample is rejected.
    """
    if video_label == audio_label == label:
        return "consistent", "video, audio and label agree"
    if video_label == audio_label:
        return None, (
            f"video_label and audio_label agree on {video_label!r} but label is {label!r}"
        )
    if label == video_label:
        return "video_aligned", f"label follows video ({video_label!r}), not audio"
    if label == audio_label:
        return "audio_aligned", f"label follows audio ({audio_label!r}), not video"
    return None, (
        f"label {label!r} matches neither video_label {video_label!r} nor audio_label "
        f"{audio_label!r}"
    )


def subset_conflict(
    subset: str, label: str | None, video_label: str | None, audio_label: str | None
) -> str | None:
    """Why ``subset`` contradicts the (possibly partial) labels, or ``None`` when it does not."""
    if subset not in SUBSETS:
        return f"{subset!r} is not a subset ({', '.join(SUBSETS)})"
    if label is None:
        return None
    follows = {"consistent": ("video", "audio"), "video_aligned": ("video",)}.get(
        subset, ("audio",)
    )
    for side, value in (("video", video_label), ("audio", audio_label)):
        if value is None:
            continue
        if side in follows and value != label:
            return f"subset {subset!r} needs {side}_label == label, got {value!r} vs {label!r}"
        if side not in follows and value == label:
            return f"subset {subset!r} needs {side}_label != label, both are {value!r}"
    return None


def write_manifest(path: str | Path, records: Iterable[SampleRecord]) -> Path:
    """Write records as a CA-MER manifest CSV, atomically; returns the path.

    Raises ``ValueError`` naming the sample and field for an empty or duplicate name, an unknown
    split or subset, a missing label or subset on a test row, or labels that contradict the
    subset. Labels are written as given (they should be canonical words of one label space).
    """
    records = list(records)
    seen: set[str] = set()
    for r in records:
        where = f"{path}: sample {r.name!r}"
        if not r.name or r.name in seen:
            raise ValueError(f"{where}: field 'name': empty or duplicate name")
        if unsafe_name_reason(r.name):
            raise ValueError(f"{where}: field 'name': {unsafe_name_reason(r.name)}")
        seen.add(r.name)
        if r.split not in SPLITS:
            raise ValueError(f"{where}: field 'split': {r.split!r} is not one of {SPLITS}")
        if not r.label:
            raise ValueError(f"{where}: field 'label': CA-MER samples need a label")
        if r.subset is None and r.split == "test":
            raise ValueError(f"{where}: field 'subset': test samples need a subset")
        if r.subset is not None:
            problem = subset_conflict(r.subset, r.label, r.video_label, r.audio_label)
            if problem:
                raise ValueError(f"{where}: field 'subset': {problem}")
    columns = MANIFEST_COLUMNS + (
        OPTIONAL_COLUMNS if any(r.reason is not None for r in records) else ()
    )
    path = Path(path)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in records:
            values = [getattr(r, c) for c in columns]
            writer.writerow(["" if v is None else v for v in values])
    return path


def read_manifest(
    path: str | Path,
    label_space: LabelSpace,
    *,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read a CA-MER manifest CSV into records (labels normalised through ``label_space``).

    Args:
        path: The manifest.
        label_space: The label space of ``label``, ``video_label`` and ``audio_label``.
        on_error: ``"raise"`` a :class:`FormatError` naming file, line and field, or ``"skip"``.
        report: Receives skipped rows (required with ``on_error="skip"``).
    """
    rows = RowReader(
        path,
        MANIFEST_COLUMNS,
        OPTIONAL_COLUMNS,
        on_error=on_error,
        report=report,
        check_name=unsafe_name_reason,
        what="CA-MER manifest",
    )
    policy = rows.policy
    records: list[SampleRecord] = []
    for row in rows:
        line, name = row.line, row.name
        if row["split"] not in SPLITS:
            policy.reject("split", f"{row['split']!r} is not one of {SPLITS}", line=line, name=name)
            continue
        subset = row["subset"] or None
        if subset is None and row["split"] == "test":
            policy.reject("subset", "test samples need a subset", line=line, name=name)
            continue
        labels: dict[str, str | None] = {}
        for field in ("label", "video_label", "audio_label"):
            ok, labels[field] = parse_label(
                row[field],
                label_space,
                policy,
                field=field,
                line=line,
                name=name,
                required=field == "label",
            )
            if not ok:
                break
        else:
            conflict = subset and subset_conflict(subset, **labels)
            if conflict:
                policy.reject("subset", conflict, line=line, name=name)
            elif rows.claim(row):
                records.append(
                    SampleRecord(
                        name=name,
                        split=row["split"],
                        subset=subset,
                        reason=row.get("reason") or None,
                        **labels,
                    )
                )
    return records


def _entries(path: Path, data: Any) -> list[tuple[int, dict[str, Any]]]:
    """``(index, entry)`` pairs of a JSON subset file (a list, or a mapping name -> entry)."""
    if isinstance(data, dict):
        items = []
        for key, value in data.items():
            entry = {"label": value} if isinstance(value, str) else value
            if isinstance(entry, dict):
                entry = {"name": key, **entry}
            items.append(entry)
    elif isinstance(data, list):
        items = data
    else:
        raise FormatError(path, "<root>", "expected a JSON list of entries or an object")
    return list(enumerate(items, start=1))


def _wrongly_typed(entry: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, why)`` for the first known key holding a list, object or boolean, else None."""
    for field, keys in JSON_KEYS.items():
        for key in keys:
            value = entry.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, str | int | float)
            ):
                return field, f"{key!r} must be text, got {type(value).__name__} {value!r}"
    return None


def _pick(entry: dict[str, Any], field: str) -> str | None:
    for key in JSON_KEYS[field]:
        value = entry.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def read_subset_json(
    path: str | Path,
    label_space: LabelSpace,
    *,
    subset: str | None = None,
    split: str = "test",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read one JSON-per-subset file into records of that subset.

    The subset is the file stem unless given. An entry without per-modality labels gets the ones
    its subset implies (``consistent``: both sides = label; ``video_aligned``: video = label;
    ``audio_aligned``: audio = label); given ones must agree with the subset.
    """
    path = require_file(path, "CA-MER subset file")
    subset = subset or path.stem
    if subset not in SUBSETS:
        raise FormatError(
            path, "subset", f"{subset!r} (from the file name) is not one of {SUBSETS}"
        )
    check_split(split, str(path))
    try:
        with utf8_errors(path):
            data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise FormatError(path, "<json>", f"invalid JSON: {err}", line=err.lineno) from None
    policy = RowPolicy(path, on_error, report)
    names = NameRegistry(policy)
    records: list[SampleRecord] = []
    for index, entry in _entries(path, data):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            policy.reject("<entry>", f"{where} is not an object", line=None, name=None)
            continue
        wrong = _wrongly_typed(entry)
        if wrong is not None:
            policy.reject(wrong[0], f"{where}: {wrong[1]}", line=None, name=None)
            continue
        name = _pick(entry, "name")
        if name is None:
            policy.reject(
                "name", f"{where} has no name ({JSON_KEYS['name']})", line=None, name=None
            )
            continue
        if unsafe_name_reason(name):
            policy.reject("name", f"{where}: {unsafe_name_reason(name)}", line=None, name=None)
            continue
        labels: dict[str, str | None] = {}
        for field in ("label", "video_label", "audio_label"):
            ok, labels[field] = parse_label(
                _pick(entry, field),
                label_space,
                policy,
                field=field,
                line=None,
                name=name,
                required=field == "label",
            )
            if not ok:
                break
        else:
            row_split = _pick(entry, "split") or split
            conflict = subset_conflict(subset, **labels)
            if row_split not in SPLITS:
                policy.reject(
                    "split", f"{row_split!r} is not one of {SPLITS}", line=None, name=name
                )
            elif conflict:
                policy.reject("subset", f"{where}: {conflict}", line=None, name=name)
            elif names.claim(name, index):
                label = labels["label"]
                implied_video = label if subset in ("consistent", "video_aligned") else None
                implied_audio = label if subset in ("consistent", "audio_aligned") else None
                records.append(
                    SampleRecord(
                        name=name,
                        split=row_split,
                        label=label,
                        subset=subset,
                        video_label=labels["video_label"] or implied_video,
                        audio_label=labels["audio_label"] or implied_audio,
                        reason=_pick(entry, "reason"),
                    )
                )
    return records


def read_subset_jsons(
    directory: str | Path,
    label_space: LabelSpace,
    *,
    split: str = "test",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read every ``<subset>.json`` present in ``directory`` (at least one must exist).

    A name in two subset files is an error naming both files.
    """
    directory = Path(directory)
    paths = [directory / f"{s}.json" for s in SUBSETS if (directory / f"{s}.json").is_file()]
    if not paths:
        raise FileNotFoundError(
            f"{directory}: no CA-MER subset file ({', '.join(s + '.json' for s in SUBSETS)})"
        )
    records: list[SampleRecord] = []
    origin: dict[str, Path] = {}
    for path in paths:
        policy = RowPolicy(path, on_error, report)
        for record in read_subset_json(
            path, label_space, split=split, on_error=on_error, report=report
        ):
            if record.name in origin:
                policy.reject(
                    "name",
                    f"duplicate name {record.name!r}: already in {origin[record.name]}",
                    line=None,
                    name=record.name,
                )
                continue
            origin[record.name] = path
            records.append(record)
    return records

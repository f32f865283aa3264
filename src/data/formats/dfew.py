"""DFEW split files in the three forms in use, and the five-fold protocol.

- ``official``: ``EmoLabel_DataSplit/{train,test}(single-labeled)/set_{k}.csv`` with
  ``video_name,label``; label 1 happy, 2 sad, 3 neutral, 4 angry, 5 surprise, 6 disgust, 7 fear.
- ``dfer-clip``: ``DFEW_set_{k}_{train,test}.txt`` lines ``<path>/<id> <n_frames> <label0>``.
- ``mae-dfer``: ``split0{k}/{train,test}.csv`` lines ``<path>/<id> <label0>``.

``label0`` is the official label minus one, i.e. the class index of :data:`DFEW`. Clip names are
the clip ids, zero-padded to five digits (``1`` and ``00001`` are the same clip).
"""

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from src.core.label_space import DFEW
from src.core.records import SampleRecord
from src.data.components.skip_report import SkipReport
from src.data.formats.rows import (
    FormatError,
    NameRegistry,
    OnError,
    RowPolicy,
    RowReader,
    check_split,
    iter_text_rows,
    read_header,
    require_file,
)

PROTOCOLS: tuple[str, ...] = ("official", "dfer-clip", "mae-dfer")
FOLDS: tuple[int, ...] = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class FoldFiles:
    """The train and test split files of one DFEW fold."""

    fold: int
    train: Path
    test: Path


def clip_name(raw: str) -> str:
    """Clip id from a ``video_name`` cell or a ``<path>/<id>`` entry; digits padded to 5."""
    stem = PurePosixPath(raw.replace("\\", "/").rstrip("/")).name
    for suffix in (".mp4", ".avi"):
        stem = stem.removesuffix(suffix)
    return stem.zfill(5) if stem.isdigit() else stem


def _split_from_path(path: Path) -> str:
    """``train``/``test`` from the last two path parts (``test(single-labeled)/set_1.csv`` ...)."""
    tail = "/".join(path.parts[-2:]).lower()
    has_train, has_test = "train" in tail, ("test" in tail or "val" in path.name.lower())
    if has_train != has_test:
        return "train" if has_train else "test"
    raise ValueError(f"{path}: cannot tell the split from the path; pass split='train'|'test'")


def _label_from_int(
    value: str, offset: int, policy: RowPolicy, *, field: str, line: int, name: str
) -> str | None:
    """Canonical DFEW label of an integer cell (``offset`` 1 for official labels, 0 for label0)."""
    low, high = offset, offset + len(DFEW) - 1
    if not value.strip().lstrip("-").isdigit() or not low <= int(value) <= high:
        policy.reject(
            field, f"{value!r} is not an integer label in {low}..{high}", line=line, name=name
        )
        return None
    return DFEW.labels[int(value) - offset]


def detect_protocol(path: str | Path) -> str:
    """``official`` (CSV with a ``video_name,label`` header), ``dfer-clip`` or ``mae-dfer``."""
    path = require_file(path, "DFEW split file")
    header = read_header(path)
    if "video_name" in header and "label" in header:
        return "official"
    for _, fields in iter_text_rows(path):
        if len(fields) == 3:
            return "dfer-clip"
        if len(fields) == 2:
            return "mae-dfer"
        break
    raise FormatError(
        path,
        "<header>",
        "not a DFEW split: expected a 'video_name,label' CSV, '<path> <n_frames> <label0>' or "
        "'<path> <label0>' lines",
        line=1,
    )


def read_split(
    path: str | Path,
    *,
    split: str | None = None,
    protocol: str | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[SampleRecord]:
    """Read one DFEW split file in any of the three forms.

    Args:
        path: The split file.
        split: ``train`` or ``test``; inferred from the path when ``None``.
        protocol: ``official``, ``dfer-clip`` or ``mae-dfer``; detected from the content when
            ``None``.
        on_error: ``"raise"`` or ``"skip"``.
        report: Receives skipped rows (required with ``on_error="skip"``).
    """
    path = require_file(path, "DFEW split file")
    split = check_split(split or _split_from_path(path), str(path))
    protocol = protocol or detect_protocol(path)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    policy = RowPolicy(path, on_error, report)
    names = NameRegistry(policy)
    records: list[SampleRecord] = []

    def add(line: int, raw_name: str, raw_label: str, offset: int, field: str) -> None:
        name = clip_name(raw_name)
        if not name:
            policy.reject("video_name", "empty clip name", line=line, name=None)
            return
        label = _label_from_int(raw_label, offset, policy, field=field, line=line, name=name)
        if label is not None and names.claim(name, line):
            records.append(SampleRecord(name=name, split=split, label=label))

    if protocol == "official":
        rows = RowReader(
            path, ("video_name", "label"), on_error=on_error, report=report, name_field=None
        )
        for row in rows:
            add(row.line, row["video_name"], row["label"], 1, "label")
        return records
    n_fields = 3 if protocol == "dfer-clip" else 2
    form = "<path> <n_frames> <label0>" if n_fields == 3 else "<path> <label0>"
    for line, fields in iter_text_rows(path):
        if len(fields) != n_fields:
            policy.reject(
                "<row>", f"expected '{form}', got {len(fields)} fields", line=line, name=None
            )
            continue
        if n_fields == 3 and not fields[1].isdigit():
            policy.reject(
                "n_frames",
                f"{fields[1]!r} is not a non-negative integer",
                line=line,
                name=clip_name(fields[0]),
            )
            continue
        add(line, fields[0], fields[-1], 0, "label0")
    return records


def fold_files(
    root: str | Path, protocol: str = "official", folds: tuple[int, ...] = FOLDS
) -> list[FoldFiles]:
    """The train/test files of each fold; raises ``FileNotFoundError`` listing every missing one.

    Args:
        root: ``official``: the DFEW root or its ``EmoLabel_DataSplit`` folder. ``dfer-clip``: the
            folder of ``DFEW_set_{k}_{train,test}.txt``. ``mae-dfer``: the folder of
            ``split0{k}/`` (its ``test.csv``, or ``val.csv`` where MAE-DFER wrote only that).
        protocol: ``official``, ``dfer-clip`` or ``mae-dfer``.
        folds: Which folds (1-5).
    """
    root = Path(root)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    bad = [k for k in folds if k not in FOLDS]
    if bad:
        raise ValueError(f"DFEW folds are {FOLDS}, got {bad}")
    out: list[FoldFiles] = []
    missing: list[str] = []
    for k in folds:
        if protocol == "official":
            base = root if root.name == "EmoLabel_DataSplit" else root / "EmoLabel_DataSplit"
            train = base / "train(single-labeled)" / f"set_{k}.csv"
            test = base / "test(single-labeled)" / f"set_{k}.csv"
        elif protocol == "dfer-clip":
            train, test = root / f"DFEW_set_{k}_train.txt", root / f"DFEW_set_{k}_test.txt"
        else:
            train, test = root / f"split0{k}" / "train.csv", root / f"split0{k}" / "test.csv"
            if not test.is_file() and (test.parent / "val.csv").is_file():
                test = test.parent / "val.csv"
        missing += [str(p) for p in (train, test) if not p.is_file()]
        out.append(FoldFiles(k, train, test))
    if missing:
        raise FileNotFoundError(
            f"DFEW {protocol} split files missing under {root}: {', '.join(missing)}"
        )
    return out


def read_fold(
    root: str | Path,
    fold: int,
    *,
    protocol: str = "official",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> tuple[list[SampleRecord], list[SampleRecord]]:
    """``(train, test)`` records of one fold; a clip in both files is an error naming both."""
    (files,) = fold_files(root, protocol, (fold,))
    kwargs = {"protocol": protocol, "on_error": on_error, "report": report}
    train = read_split(files.train, split="train", **kwargs)
    test = read_split(files.test, split="test", **kwargs)
    overlap = sorted({r.name for r in train} & {r.name for r in test})
    if overlap:
        raise FormatError(
            files.test,
            "name",
            f"{len(overlap)} clip(s) also in the train file {files.train} (e.g. {overlap[0]!r}); "
            "a fold's train and test must be disjoint",
            name=overlap[0],
        )
    return train, test

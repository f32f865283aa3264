"""The annotation parsers' shared machinery: errors, the on_error policy, and the row readers.

:class:`RowReader` is the one CSV row loop of every format reader: it names the file, turns a
malformed row or an empty name into a rejection (raised, or skipped into the report), and keeps
the duplicate-name check; the reader itself only validates its own columns.
"""

import csv
import errno
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from src.core.errors import UserError
from src.core.label_space import LabelSpace
from src.core.records import SPLITS
from src.data.components.skip_report import SkipReport

OnError = Literal["raise", "skip"]
_Reader = TypeVar("_Reader")
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")


class FormatError(UserError, ValueError):
    """A bad annotation row or file; the message names the file, the line and the field.

    Args:
        file: The annotation file.
        field: The column (or ``<header>``, ``<row>``) that is wrong.
        reason: What is wrong.
        line: 1-based line where the row starts (header included), when known.
        name: The sample name, when known.
    """

    def __init__(
        self,
        file: str | Path,
        field: str,
        reason: str,
        *,
        line: int | None = None,
        name: str | None = None,
    ) -> None:
        self.file, self.field, self.reason, self.line, self.name = (
            str(file),
            field,
            reason,
            line,
            name,
        )
        where = f"{file}, line {line}" if line is not None else str(file)
        who = f" (sample {name!r})" if name else ""
        super().__init__(f"{where}: field {field!r}{who}: {reason}")


class RowPolicy:
    """Raises a :class:`FormatError` for a bad row, or records it in a report (``on_error="skip"``).

    Args:
        file: The file being read (named in every error).
        on_error: ``"raise"`` or ``"skip"``.
        report: Where skipped rows go; required with ``on_error="skip"`` so nothing is dropped
            silently.
    """

    def __init__(self, file: str | Path, on_error: str, report: SkipReport | None) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if on_error == "skip" and report is None:
            raise ValueError(
                f"reading {file} with on_error='skip' needs a SkipReport to list skipped rows"
            )
        self.file, self.on_error, self.report = str(file), on_error, report

    def reject(self, field: str, reason: str, *, line: int | None, name: str | None) -> None:
        """Handle one bad row: raise, or add it to the report."""
        if self.on_error == "raise":
            raise FormatError(self.file, field, reason, line=line, name=name)
        assert self.report is not None
        self.report.add(self.file, field, reason, name or None, line=line)


class NameRegistry:
    """Detects duplicate sample names; the error names both rows."""

    def __init__(self, policy: RowPolicy) -> None:
        self.policy = policy
        self.first_line: dict[str, int | None] = {}

    def claim(self, name: str, line: int | None) -> bool:
        """``True`` if ``name`` is new; otherwise rejects the row and returns ``False``."""
        if name in self.first_line:
            first = self.first_line[name]
            self.policy.reject(
                "name",
                f"duplicate name {name!r}: first at line {first}, again at line {line}",
                line=line,
                name=name,
            )
            return False
        self.first_line[name] = line
        return True


def require_file(path: str | Path, what: str = "annotation file") -> Path:
    """``path`` as a :class:`Path`; raises ``FileNotFoundError`` naming it when absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{what} not found", str(path))
    return path


@contextmanager
def utf8_errors(path: str | Path) -> Iterator[Callable[[_Reader], _Reader]]:
    """Turn a decoding failure while reading ``path`` into a :class:`FormatError` naming it
    (field ``<encoding>``): a corrupt or binary file must not surface as a bare codec error.

    A CSV error (a field over Python's field size limit, a stray quote with ``strict``) becomes
    a :class:`FormatError` too (field ``<row>``); pass the reader through the yielded function
    (``reader = track(csv.reader(handle))``) and the error names its line.
    """
    readers: list[Any] = []

    def track(reader: _Reader) -> _Reader:
        readers.append(reader)
        return reader

    try:
        yield track
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.start + 4]
        raise FormatError(
            path, "<encoding>", f"not UTF-8 text ({err.reason} at bytes {bad!r}): corrupt file?"
        ) from None
    except csv.Error as err:
        # A DictReader's own line_num is updated after a row is read: ask its csv reader.
        line = getattr(readers[-1], "reader", readers[-1]).line_num if readers else None
        raise FormatError(path, "<row>", f"not a readable CSV row ({err})", line=line) from None


def read_header(path: Path) -> list[str]:
    """The stripped column names of a CSV file's first row (``[]`` for an empty file)."""
    with utf8_errors(path) as track, path.open(newline="", encoding="utf-8-sig") as handle:
        return [h.strip() for h in next(track(csv.reader(handle)), [])]


def iter_csv_rows(
    path: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[int, dict[str, str] | None, str | None]]:
    """Yield ``(line, row, problem)`` for each data row of a CSV file with a header.

    ``row`` maps the header's columns to stripped values (``required`` + ``optional`` present);
    when the row has the wrong number of fields, ``row`` is ``None`` and ``problem`` says why.
    Raises :class:`FormatError` for an empty file or a header without a required column.
    """
    with utf8_errors(path) as track, path.open(newline="", encoding="utf-8-sig") as handle:
        reader = track(csv.reader(handle))
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise FormatError(path, "<header>", "file is empty (no header row)") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise FormatError(
                path,
                missing[0],
                f"missing column(s) {', '.join(missing)}; header is {','.join(header)}",
                line=1,
            )
        line = reader.line_num + 1
        for fields in reader:
            start, line = line, reader.line_num + 1
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                problem = f"expected {len(header)} fields ({','.join(header)}), got {len(fields)}"
                yield start, None, problem
                continue
            yield start, {h: v.strip() for h, v in zip(header, fields, strict=True)}, None


def empty_name_reason(name: str) -> str | None:
    """Why ``name`` cannot name a sample (``None`` when it can): the default name check."""
    return None if name else "empty name"


@dataclass(frozen=True)
class Row:
    """One well-formed data row of a CSV file.

    Args:
        line: 1-based line where the row starts (header included).
        name: The sample name (the reader's ``name_field``), checked.
        values: Column -> stripped value (the required columns and the optional ones present).
    """

    line: int
    name: str
    values: dict[str, str]

    def __getitem__(self, column: str) -> str:
        return self.values[column]

    def get(self, column: str, default: str | None = None) -> str | None:
        return self.values.get(column, default)


class RowReader:
    """Iterate the well-formed rows of an annotation CSV with a header, under an on_error policy.

    A row with the wrong number of fields (field ``<row>``) or a bad name (``name_field``, by
    ``check_name``) is rejected: :class:`FormatError` with ``on_error="raise"``, a report entry
    with ``"skip"``. The caller validates its own columns with :meth:`reject` and claims the
    name with :meth:`claim` once the row is good (a duplicate is rejected naming both lines).

    Args:
        path: The CSV file (missing: ``FileNotFoundError`` naming ``what``).
        required: Columns the header must have (else :class:`FormatError` naming the first).
        optional: Columns kept when present.
        on_error: ``"raise"`` or ``"skip"``.
        report: Receives skipped rows (required with ``on_error="skip"``).
        name_field: The column holding the sample name; ``None``: no name check.
        check_name: Why a name is unusable (``None`` when fine).
        what: How the file is named in a missing-file error.
    """

    def __init__(
        self,
        path: str | Path,
        required: Sequence[str],
        optional: Sequence[str] = (),
        *,
        on_error: OnError = "raise",
        report: SkipReport | None = None,
        name_field: str | None = "name",
        check_name: Callable[[str], str | None] = empty_name_reason,
        what: str = "annotation file",
    ) -> None:
        self.path = require_file(path, what)
        self.required, self.optional = tuple(required), tuple(optional)
        self.policy = RowPolicy(self.path, on_error, report)
        self.names = NameRegistry(self.policy)
        self.name_field, self.check_name = name_field, check_name
        #: Data rows seen so far, the malformed and rejected ones included.
        self.rows_seen = 0

    def __iter__(self) -> Iterator[Row]:
        for line, values, problem in iter_csv_rows(self.path, self.required, self.optional):
            self.rows_seen += 1
            if values is None:
                self.policy.reject("<row>", str(problem), line=line, name=None)
                continue
            name = values[self.name_field] if self.name_field else ""
            why = self.check_name(name) if self.name_field else None
            if why:
                self.policy.reject(str(self.name_field), why, line=line, name=None)
                continue
            yield Row(line, name, values)

    def reject(self, row: Row, field: str, reason: str) -> None:
        """Reject ``row`` for ``field``: raise, or add it to the report."""
        self.policy.reject(field, reason, line=row.line, name=row.name or None)

    def claim(self, row: Row) -> bool:
        """``True`` if the row's name is new; a duplicate is rejected naming both lines."""
        return self.names.claim(row.name, row.line)


def iter_text_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, whitespace-separated fields)`` for each non-empty line of a text file."""
    with utf8_errors(path), path.open(encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            fields = text.split()
            if fields:
                yield number, fields


def parse_label(
    value: str | None,
    label_space: LabelSpace,
    policy: RowPolicy,
    *,
    field: str,
    line: int | None,
    name: str | None,
    required: bool = True,
) -> tuple[bool, str | None]:
    """Normalise one label cell: ``(ok, canonical label or None)``; a bad cell is rejected."""
    if value is None or not value.strip():
        if required:
            policy.reject(field, "empty label", line=line, name=name)
            return False, None
        return True, None
    label = label_space.normalise(value)
    if label is None:
        policy.reject(
            field,
            f"{value!r} is not in the {label_space.name} label space "
            f"({', '.join(label_space.labels)})",
            line=line,
            name=name,
        )
        return False, None
    return True, label


def parse_float(
    value: str | None, policy: RowPolicy, *, field: str, line: int | None, name: str | None
) -> tuple[bool, float | None]:
    """Parse an optional finite float cell: ``(ok, value or None)``."""
    if value is None or not value.strip():
        return True, None
    try:
        number = float(value)
    except ValueError:
        policy.reject(field, f"{value!r} is not a number", line=line, name=name)
        return False, None
    if not math.isfinite(number):
        policy.reject(field, f"{value!r} is not a finite number", line=line, name=name)
        return False, None
    return True, number


def check_split(split: str, where: str) -> str:
    """Validate a split name given by the caller."""
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    return split

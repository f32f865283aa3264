"""The list of samples skipped under ``on_error: skip``, so that nothing is dropped silently."""

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

from src.io.atomic import atomic_open

REPORT_COLUMNS: tuple[str, ...] = ("file", "line", "name", "field", "reason")


@dataclass(frozen=True)
class SkippedRow:
    """One skipped row or sample.

    Args:
        file: The file the problem was found in (annotation file, clip, feature file).
        field: The column or part that was wrong (``label``, ``name``, ``audio``, ...).
        reason: What was wrong, in words.
        name: The sample name, when known.
        line: The line (1-based, header included) where the row starts, when known.
    """

    file: str
    field: str
    reason: str
    name: str | None = None
    line: int | None = None


@dataclass
class SkipReport:
    """Collects skipped rows from parsers, decoders and the feature store.

    A data module passes one report to every reader it calls with ``on_error="skip"`` and logs
    :meth:`write_csv`'s file as an MLflow artifact when the report is not empty.
    """

    rows: list[SkippedRow] = field(default_factory=list)

    def add(
        self,
        file: str | Path,
        field: str,
        reason: str,
        name: str | None = None,
        *,
        line: int | None = None,
    ) -> None:
        """Record one skipped row."""
        self.rows.append(SkippedRow(str(file), field, reason, name, line))

    def extend(self, other: "SkipReport") -> None:
        """Append the rows of another report."""
        self.rows.extend(other.rows)

    def names(self) -> set[str]:
        """Names of the skipped samples (rows without a name are left out)."""
        return {row.name for row in self.rows if row.name is not None}

    def to_rows(self) -> list[dict[str, str | int | None]]:
        """The rows as dicts with the keys of :data:`REPORT_COLUMNS`."""
        return [{key: asdict(row)[key] for key in REPORT_COLUMNS} for row in self.rows]

    def write_csv(self, path: str | Path) -> Path:
        """Write the report as CSV (columns :data:`REPORT_COLUMNS`) atomically; returns the path."""
        path = Path(path)
        with atomic_open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS)
            writer.writeheader()
            for row in self.to_rows():
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return path

    def summary(self) -> str:
        """One line per skipped row, for logs."""
        lines = [f"{len(self)} skipped:"] if self.rows else ["nothing skipped"]
        for row in self.rows:
            where = f"{row.file}:{row.line}" if row.line is not None else row.file
            who = f" [{row.name}]" if row.name else ""
            lines.append(f"  {where}{who} {row.field}: {row.reason}")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.rows)

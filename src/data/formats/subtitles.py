"""Subtitle CSVs, one reader for every data set: ``name,english``, ``name,chinese,english``
(MER2023's ``transcription.csv``) or Emotion-LLaMA's one-language ``name,sentence``."""

from pathlib import Path

from src.data.components.skip_report import SkipReport
from src.data.formats.rows import OnError, RowReader, read_header, require_file

SUBTITLE_COLUMNS: tuple[str, ...] = ("english", "chinese", "sentence")


def read_subtitles(
    path: str | Path,
    *,
    column: str = "english",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> dict[str, str]:
    """Read a subtitle CSV into ``{name: text}``.

    ``column`` picks the language of a ``name,chinese,english`` file; a ``name,sentence`` file
    (one language) gives ``sentence`` whatever ``column`` is. Empty texts are kept as ``""``. A
    malformed row, an empty or duplicate name is raised as a :class:`FormatError` naming the
    file, line and field, or skipped into ``report`` with ``on_error="skip"``.
    """
    if column not in SUBTITLE_COLUMNS:
        raise ValueError(f"subtitle column must be one of {SUBTITLE_COLUMNS}, got {column!r}")
    header = read_header(require_file(path, "subtitle file"))
    if column not in header and "sentence" in header:
        column = "sentence"
    rows = RowReader(path, ("name", column), on_error=on_error, report=report, what="subtitle file")
    return {row.name: row[column] for row in rows if rows.claim(row)}

"""What both prediction writers share: per-rank part files, merged once on rank zero.

Every rank appends its rows, tagged with the dataset index and the rank, to its own part file
while predicting; at the end rank zero reads all parts, restores the dataset order and drops the
copies a distributed sampler adds to even out ranks.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

#: Bookkeeping columns of a part row: dataset index (empty or ``None`` when unknown) and rank.
INDEX, RANK = "_index", "_rank"


def _index(row: dict[str, Any]) -> int | None:
    value = row[INDEX]
    return None if value in (None, "") else int(value)


def dataset_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` of all parts (in rank order) sorted by dataset index when every row has one,
    each sample once: the first copy by index, else by name (names are sample ids)."""
    indexed = bool(rows) and all(_index(r) is not None for r in rows)
    if indexed:
        rows = sorted(rows, key=lambda r: (_index(r), int(r[RANK])))
    seen: set[Any] = set()
    unique = []
    for row in rows:
        key = _index(row) if indexed else row["name"]
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def clear_stale_parts(trainer: pl.Trainer, parts: Iterable[Path], name: str) -> None:
    """Rank zero deletes the parts of an interrupted run (possibly with more ranks), then every
    rank waits, so none of them leaks into this run's output."""
    if trainer.is_global_zero:
        for part in parts:
            part.unlink()
    trainer.strategy.barrier(f"{name}.start")

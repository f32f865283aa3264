"""Deterministic carving of a validation split out of a training split."""

import dataclasses
from collections import defaultdict

import numpy as np

from src.core.records import SampleRecord


def carve_split(
    records: list[SampleRecord], fraction: float, seed: int = 0, split: str = "val"
) -> list[SampleRecord]:
    """Move ``round(fraction * n)`` records (at least one when ``fraction > 0``) into ``split``.

    Stratified and independent of row order: records are grouped by label, each group is sorted
    by name and shuffled with ``seed``, and the groups are interleaved round-robin (in label
    order) before taking the first records. The same files and seed always give the same split.

    Args:
        records: The records to carve from (all of one split).
        fraction: Fraction to move, in ``[0, 1)``.
        seed: Seed of the shuffles.
        split: The split the moved records get.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a split fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or not records:
        return list(records)
    count = max(1, round(fraction * len(records)))
    if count >= len(records):
        raise ValueError(
            f"carving {fraction:.0%} of {len(records)} record(s) into {split!r} would leave none"
        )
    groups: dict[str, list[str]] = defaultdict(list)
    for r in records:
        groups[r.label or ""].append(r.name)
    rng = np.random.default_rng(seed)
    shuffled = {
        label: [names[i] for i in rng.permutation(len(names))]
        for label, names in ((k, sorted(groups[k])) for k in sorted(groups))
    }
    order: list[str] = []
    depth = max(len(v) for v in shuffled.values())
    for i in range(depth):
        order += [names[i] for names in shuffled.values() if i < len(names)]
    chosen = set(order[:count])
    return [dataclasses.replace(r, split=split) if r.name in chosen else r for r in records]

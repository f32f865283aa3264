"""Deterministic carving of a validation split out of a training split."""

import dataclasses
import math
from collections import defaultdict

import numpy as np

from src.core.records import SampleRecord


def stratified_counts(sizes: dict[str, int], count: int, seed: int = 0) -> dict[str, int]:
    """How many of each group to take so that ``count`` in all keeps the groups' proportions.

    Every group gets ``floor(q)`` or ``ceil(q)`` of its share ``q = count * size / total``
    (largest remainder method), so each group's count is within one sample of proportional.
    The extra samples go to the largest remainders; a group that would be emptied by an extra
    sample gets it only when no other group can take it; ties are broken by ``seed``.

    Args:
        sizes: Group -> number of items.
        count: Items to take in all, at most the total.
        seed: Seed of the tie-breaking order.
    """
    total = sum(sizes.values())
    if not 0 <= count <= total:
        raise ValueError(f"cannot take {count} of {total} item(s)")
    if total == 0:
        return {}
    shares = {g: count * n / total for g, n in sizes.items()}
    taken = {g: math.floor(q) for g, q in shares.items()}
    tie = {g: i for i, g in enumerate(np.random.default_rng(seed).permutation(sorted(sizes)))}
    order = sorted(
        (g for g in sizes if taken[g] < sizes[g]),
        key=lambda g: (taken[g] + 1 >= sizes[g], -(shares[g] - taken[g]), tie[g]),
    )
    for g in order[: count - sum(taken.values())]:
        taken[g] += 1
    return taken


def carve_split(
    records: list[SampleRecord], fraction: float, seed: int = 0, split: str = "val"
) -> list[SampleRecord]:
    """Move ``round(fraction * n)`` records (at least one when ``fraction > 0``) into ``split``.

    Stratified and independent of row order: each label keeps its share of the carved records
    within one sample (:func:`stratified_counts`); within a label, the records are sorted by
    name and shuffled with ``seed`` before the first ones are taken. The same files and seed
    always give the same split.

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
    counts = stratified_counts({label: len(names) for label, names in groups.items()}, count, seed)
    chosen: set[str] = set()
    for label in sorted(groups):
        names = sorted(groups[label])
        chosen.update(names[i] for i in rng.permutation(len(names))[: counts[label]])
    return [dataclasses.replace(r, split=split) if r.name in chosen else r for r in records]

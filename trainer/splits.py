"""Train/validation/test splits: stratified by label, grouped by patient, seeded.

All images of a patient land in the same split, so no patient is on both sides.
Groups are assigned greedily, largest first within each label stratum in a
seeded shuffle, to the split furthest below its target share of that stratum.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from screener.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitSpec:
    validation: float = 0.15
    test: float = 0.15
    seed: int = 20241122

    def __post_init__(self) -> None:
        if not (0 < self.validation < 1 and 0 < self.test < 1 and self.validation + self.test < 1):
            raise DataError("split fractions must be in (0, 1) and leave room for training")

    @property
    def fractions(self) -> dict[str, float]:
        return {"train": 1 - self.validation - self.test, "validation": self.validation, "test": self.test}


def split_groups(groups: Sequence[str], labels: Sequence[int], spec: SplitSpec) -> list[str]:
    """The split name for each item; items sharing a group share a split."""
    if len(groups) != len(labels):
        raise ValueError("groups and labels differ in length")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    # A group's stratum is its majority label (CSXA groups are single-label).
    strata: dict[int, list[str]] = defaultdict(list)
    for g, idx in members.items():
        ones = sum(labels[i] for i in idx)
        strata[1 if ones * 2 >= len(idx) else 0].append(g)
    rng = random.Random(spec.seed)
    assignment: dict[str, str] = {}
    for label in sorted(strata):
        gs = sorted(strata[label])
        rng.shuffle(gs)
        gs.sort(key=lambda g: -len(members[g]))  # stable: shuffled order within equal sizes
        total = sum(len(members[g]) for g in gs)
        filled = {s: 0 for s in SPLITS}
        # Make sure validation and test each get at least one group of every class when possible.
        order = list(SPLITS)
        for k, g in enumerate(gs):
            if k < 3 and len(gs) >= 3:
                target = ("test", "validation", "train")[k]
            else:
                deficit = {s: spec.fractions[s] * total - filled[s] for s in order}
                target = max(order, key=lambda s: (deficit[s], -order.index(s)))
            assignment[g] = target
            filled[target] += len(members[g])
    return [assignment[g] for g in groups]


def split_counts(splits: Sequence[str], labels: Sequence[int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {s: {"n": 0, "positive": 0, "negative": 0} for s in SPLITS}
    for s, y in zip(splits, labels):
        out[s]["n"] += 1
        out[s]["positive" if y == 1 else "negative"] += 1
    return out

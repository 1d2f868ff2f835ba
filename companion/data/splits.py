"""Train, validation and test splits drawn with the fixed ``SPLIT_SEED``: plain or class-balanced."""

from __future__ import annotations

import random
from typing import Callable

from .schema import SPLIT_SEED, SPLITS, DataError


def split_rows(rows: list[dict], validation_size: int, test_size: int) -> dict[str, list[dict]]:
    """Shuffle with ``SPLIT_SEED`` and cut test, validation, then train from the rest."""
    if validation_size + test_size >= len(rows):
        raise DataError(
            f"{len(rows)} rows are too few for validation={validation_size} + test={test_size}"
        )
    shuffled = list(rows)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    return {
        "test": shuffled[:test_size],
        "validation": shuffled[test_size:test_size + validation_size],
        "train": shuffled[test_size + validation_size:],
    }


def split_balanced(rows: list[dict], validation_size: int, test_size: int,
                   group: Callable[[dict], str] = lambda row: row["id"]) -> dict[str, list[dict]]:
    """Like ``split_rows``, but every split gets each label in the same share as the whole.

    Rows with the same ``group(row)`` (e.g. the true and false statement of one question)
    always land in the same split, so no question leaks from train into test. Groups are
    stratified by the labels they hold, shuffled with ``SPLIT_SEED``, and dealt to test,
    validation, then train.
    """
    if validation_size + test_size >= len(rows):
        raise DataError(f"{len(rows)} rows are too few for validation={validation_size} + test={test_size}")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    strata: dict[tuple, list[list[dict]]] = {}
    for members in groups.values():
        strata.setdefault(tuple(sorted(r["label"] for r in members)), []).append(members)
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for key in sorted(strata):
        stratum = strata[key]
        random.Random(SPLIT_SEED).shuffle(stratum)
        size = sum(len(members) for members in stratum)
        quota = {"test": round(test_size * size / len(rows)), "validation": round(validation_size * size / len(rows))}
        taken = {"test": 0, "validation": 0}
        for members in stratum:
            split = next((s for s in ("test", "validation") if taken[s] < quota[s]), "train")
            if split != "train":
                taken[split] += len(members)
            splits[split] += members
    for split in SPLITS:  # so that the first n rows of a split are balanced too
        random.Random(SPLIT_SEED).shuffle(splits[split])
    return splits

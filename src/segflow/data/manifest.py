"""The ingest contract's ``manifest.csv``, read by every stage after ingest (torch-free): reading it, whether the
source defined its own splits, how its rows group (duplicates and near-copies share a split), and how many groups a
split fraction gives (the validate stage checks those sizes before the split stage makes them).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from segflow.config import GROUP_COLUMN_PREFIX
from segflow.errors import SegflowError

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"


def read_manifest(data_dir: Path) -> pd.DataFrame:
    """``manifest.csv`` with every column as text and empty cells as ``""`` (not NaN)."""
    path = Path(data_dir) / "manifest.csv"
    try:
        manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SegflowError(f"{path}: manifest not found; run the ingest stage first.") from None
    missing = {"image_id", "image_path", "mask_path", "width", "height", "split"} - set(manifest.columns)
    if missing:
        raise SegflowError(f"{path}: missing column(s) {', '.join(sorted(missing))}; re-run the ingest stage.")
    return manifest


def has_predefined_splits(manifest: pd.DataFrame) -> bool:
    """The source defined its own splits when any manifest row names one."""
    return bool((manifest["split"] != "").any())


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
            raise SegflowError(f"split.{name} must be a number between 0 and 1 (exclusive), got {value!r}.")
    if val_fraction + test_fraction >= 1:
        raise SegflowError(
            f"split.val_fraction + split.test_fraction must be below 1 to leave training data, "
            f"got {val_fraction} + {test_fraction} = {val_fraction + test_fraction:g}."
        )


def expected_split_sizes(n_groups: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many duplicate groups go to each split; validate uses the same rule to check the minimums.

    Sizes round half up; with 3 or more groups every split gets at least one, taken from the larger
    of val/test when train would otherwise be empty. With fewer, train is filled first.
    """
    val = math.floor(n_groups * val_fraction + 0.5)
    test = math.floor(n_groups * test_fraction + 0.5)
    if n_groups >= 3:
        val, test = max(val, 1), max(test, 1)
    while n_groups > 0 and val + test > n_groups - 1:
        if test >= val and test > 0:
            test -= 1
        else:
            val -= 1
    return {"train": n_groups - val - test, "val": val, "test": test}


def group_keys(rows: pd.DataFrame, group_by: str | None, manifest_csv: Path) -> list[str | None]:
    """Each manifest row's group key from ``group_by``: ``column:NAME`` takes the manifest column NAME; any other
    text is a regular expression searched in the image's file name, its first group (else the whole match) the
    key. None (no key: the image is grouped only with identical pixels) for an empty cell or no match."""
    if group_by is None:
        return [None] * len(rows)
    if group_by.startswith(GROUP_COLUMN_PREFIX):
        column = group_by.removeprefix(GROUP_COLUMN_PREFIX)
        if column not in rows.columns:
            raise SegflowError(f"{manifest_csv}: split.group_by names the column {column!r}, which the manifest "
                               f"does not have (columns: {', '.join(rows.columns)}).")
        return [value or None for value in rows[column]]
    pattern = re.compile(group_by)
    keys = []
    for image_path in rows["image_path"]:
        match = pattern.search(Path(image_path).name)
        keys.append(None if match is None else match.group(1) if match.re.groups else match.group(0))
    return keys

"""Split stage: assign every manifest row to train/val/test/unlabeled, reproducibly.

Predefined splits (the ``split`` column of ``manifest.csv``) are kept as they are. Otherwise labeled
images are split by seeded iterative stratification (Sechidis et al., 2011) on multi-label class
presence taken from the validate stage's ``stats.csv``, so a rare class lands in every split. Exact
duplicates (same decoded-pixel ``content_hash``) form one group and always share a split, so no
picture leaks from train into evaluation; ``group_by`` also groups near-copies (a video's frames, a labeling
tool's augmented exports) by a key from the file name or a manifest column. Rows without a mask get
``unlabeled``.

The semi-supervised protocol (``labeled_fraction``) keeps a seeded share of the training images labeled and
moves the rest to ``unlabeled``: their masks stay in the manifest, hidden from training, so the pseudo-label
stage can score itself against them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.data.manifest import (
    SPLITS,
    UNLABELED,
    check_fractions,
    expected_split_sizes,
    has_predefined_splits,
    read_manifest,
)
from segflow.data.near_copies import pictures, split_groups
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json, atomic_write_text

PIXEL_COUNT_PREFIX = "px_"


def make_splits(
    data_dir: Path, stats_csv: Path, out_csv: Path, *, seed: int, val_fraction: float, test_fraction: float,
    labeled_fraction: float | None = None, group_by: str | None = None, summary_json: Path | None = None,
) -> pd.DataFrame:
    """Write ``out_csv`` (``image_id,split`` for every manifest row, in manifest order) and return it.

    Near-copies of a picture share a split (the validate stage's ``stats.csv`` names the images whose pixels
    register onto each other, ``split.near_copy_similarity``), and so do images with the same ``group_by`` key
    (segflow.data.near_copies.split_groups). ``summary_json`` gets the split's sizes and how many test images
    have a near-copy among the training images (0 unless a predefined split let one in)."""
    check_fractions(val_fraction, test_fraction)
    manifest = read_manifest(Path(data_dir))
    labeled = manifest["mask_path"] != ""
    split = pd.Series(UNLABELED, index=manifest.index, dtype=object)
    stats = _read_stats(Path(stats_csv), manifest.loc[labeled, "image_id"])
    picture_of = pictures(stats, manifest.loc[labeled])
    if has_predefined_splits(manifest):
        invalid = manifest.loc[labeled & ~manifest["split"].isin(SPLITS), ["image_id", "split"]]
        if len(invalid):
            examples = ", ".join(f"{r.image_id} ({r.split!r})" for r in invalid.head(5).itertuples())
            raise SegflowError(
                f"{Path(data_dir) / 'manifest.csv'}: {len(invalid)} labeled row(s) have no valid predefined "
                f"split (train/val/test): {examples}. Run the validate stage for the full list."
            )
        split[labeled] = manifest.loc[labeled, "split"]
    else:
        groups = split_groups(picture_of, manifest.loc[labeled], group_by, Path(data_dir) / "manifest.csv")
        group_of_image, presence = _image_groups(stats, groups)
        sizes = expected_split_sizes(len(presence), val_fraction, test_fraction)
        group_split = _iterative_stratification(presence, sizes, np.random.default_rng(seed))
        split[labeled] = [group_split[group_of_image[i]] for i in manifest.loc[labeled, "image_id"]]
    if labeled_fraction is not None and labeled_fraction < 1:
        split = _hide_labels(split, labeled_fraction, np.random.default_rng([seed, 1]))
    result = pd.DataFrame({"image_id": manifest["image_id"], "split": split.astype(str)})
    atomic_write_text(out_csv, result.to_csv(index=False, lineterminator="\n"))
    if summary_json is not None:
        atomic_write_json(summary_json, _summary(split, labeled, picture_of))
    return result


def _summary(split: pd.Series, labeled: pd.Series, picture_of: list[int]) -> dict:
    """The split's sizes, and the test images whose picture is also among the training images (train, or
    unlabeled with its mask hidden)."""
    of_labeled = split[labeled].to_numpy()
    pictures = np.array(picture_of, dtype=np.int64)
    training = set(pictures[np.isin(of_labeled, ["train", UNLABELED])].tolist())
    in_test = of_labeled == "test"
    return {"images": {name: int((split == name).sum()) for name in [*SPLITS, UNLABELED]},
            "test_images_with_a_near_copy_in_training": int(np.isin(pictures[in_test], list(training)).sum()),
            "test_images": int(in_test.sum())}


def _hide_labels(split: pd.Series, labeled_fraction: float, rng: np.random.Generator) -> pd.Series:
    """Keep ``labeled_fraction`` of the train rows (at least one), chosen by ``rng``; the rest become unlabeled."""
    train_rows = split.index[split == "train"].to_numpy()
    keep = max(1, math.floor(len(train_rows) * labeled_fraction + 0.5))
    hidden = rng.permutation(train_rows)[keep:]
    return split.where(~split.index.isin(hidden), UNLABELED)


def _read_stats(stats_csv: Path, labeled_ids: pd.Series) -> pd.DataFrame:
    """Rows of ``stats.csv`` for the labeled images, in manifest order."""
    try:
        stats = pd.read_csv(stats_csv, dtype={"image_id": str, "content_hash": str, "near_copy_group": str},
                            keep_default_na=False)
    except FileNotFoundError:
        raise SegflowError(f"{stats_csv}: not found; run the validate stage first.") from None
    pixel_columns = [c for c in stats.columns if re.fullmatch(rf"{PIXEL_COUNT_PREFIX}\d+", c)]
    if not {"content_hash", "near_copy_group"} <= set(stats.columns) or not pixel_columns:
        raise SegflowError(f"{stats_csv}: no content_hash/near_copy_group/px_<class> columns; re-run the validate "
                           "stage.")
    stats = stats.drop_duplicates("image_id").set_index("image_id")
    missing = labeled_ids[~labeled_ids.isin(stats.index)]
    if len(missing):
        raise SegflowError(
            f"{stats_csv}: no statistics for {len(missing)} labeled image(s) of the manifest "
            f"(e.g. {', '.join(missing.head(3))}); the file is stale, re-run the validate stage."
        )
    return stats.loc[labeled_ids.to_list(), ["content_hash", "near_copy_group", *pixel_columns]]


def _image_groups(stats: pd.DataFrame, groups: list[int]) -> tuple[dict[str, int], np.ndarray]:
    """Map image_id -> group number and the groups' class-presence matrix (groups x classes, bool)."""
    numbers = np.array(groups, dtype=np.int64)
    counts = stats.drop(columns=["content_hash", "near_copy_group"]).apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy()
    presence = np.zeros((numbers.max(initial=-1) + 1, counts.shape[1]), dtype=bool)
    np.logical_or.at(presence, numbers, counts > 0)
    return dict(zip(stats.index, numbers.tolist())), presence


def _iterative_stratification(
    presence: np.ndarray, sizes: dict[str, int], rng: np.random.Generator
) -> dict[int, str]:
    """Assign each group (row of ``presence``) to a split so that every split gets exactly its size
    and each class is spread over the splits in proportion to those sizes.

    The rarest class still unassigned is handled first, so its few groups go where it is most
    lacking; ties are broken by the seeded generator.
    """
    n_groups = presence.shape[0]
    names = list(sizes)
    capacity = np.array([sizes[s] for s in names], dtype=float)
    share = capacity / max(n_groups, 1)
    wanted = np.outer(share, presence.sum(axis=0))  # splits x classes: groups with each class still wanted
    # Visit groups in a seeded random order so the seed decides ties between otherwise equal groups.
    remaining = list(rng.permutation(n_groups))
    assignment: dict[int, str] = {}
    while remaining:
        left = presence[remaining]
        class_counts = left.sum(axis=0)
        if class_counts.any():
            rarest = np.flatnonzero(class_counts == class_counts[class_counts > 0].min())
            label = int(rng.choice(rarest))
            batch = [g for g in remaining if presence[g, label]]
        else:  # groups with no class present at all (every pixel ignored)
            label = None
            batch = list(remaining)
        for group in batch:
            open_splits = np.flatnonzero(capacity > 0)
            first_key = wanted[open_splits, label] if label is not None else capacity[open_splits]
            best = open_splits[first_key == first_key.max()]
            best = best[capacity[best] == capacity[best].max()]
            chosen = int(rng.choice(best))
            assignment[int(group)] = names[chosen]
            capacity[chosen] -= 1
            wanted[chosen] -= presence[group]
        taken = set(batch)
        remaining = [g for g in remaining if g not in taken]
    return assignment

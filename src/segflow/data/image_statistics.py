"""Per-image statistics of an ingested dataset: one row of facts per ``manifest.csv`` row (does the image decode,
its size, a hash of its decoded pixels; for a labeled one, the same of its mask, its out-of-range values and its
pixel counts per class), the table the validate stage checks and writes as ``stats.csv``; and each labeled
image's thumbnail, which segflow.data.near_copies compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.data.imageio import content_hash, read_image, read_mask
from segflow.data.near_copies import thumbnail
from segflow.errors import SegflowError


def image_statistics(data_dir: Path, manifest: pd.DataFrame, n_classes: int,
                     ignore_index: int) -> tuple[pd.DataFrame, list[np.ndarray | None]]:
    """One row per manifest row, and each labeled image's thumbnail (None for the others and for a file that
    does not decode); files that fail to decode give a row with the reason, not an exception."""
    records, thumbnails = [], []
    for position, row in enumerate(manifest.itertuples(index=False)):
        record, image = _row_statistics(Path(data_dir), position, row, n_classes, ignore_index)
        records.append(record)
        thumbnails.append(thumbnail(image) if image is not None and record["labeled"] else None)
    columns = _statistics_dtypes(n_classes)
    return pd.DataFrame.from_records(records, columns=list(columns)).astype(columns), thumbnails


def _statistics_dtypes(n_classes: int) -> dict[str, str]:
    # Nullable dtypes: a fact that does not apply (no mask, undecodable file) is missing, not False or 0,
    # so GX skips it instead of reporting the same file twice.
    return {
        "manifest_row": "int64",
        "image_id": "str",
        "image_path": "str",
        "mask_path": "str",
        "labeled": "bool",
        "split": "str",
        "manifest_width": "Int64",
        "manifest_height": "Int64",
        "image_decodes": "bool",
        "image_error": "str",
        "image_width": "Int64",
        "image_height": "Int64",
        "image_size_matches_manifest": "boolean",
        "content_hash": "str",
        "mask_decodes": "boolean",
        "mask_error": "str",
        "mask_width": "Int64",
        "mask_height": "Int64",
        "mask_size_matches_image": "boolean",
        "n_bad_values": "Int64",
        "bad_values": "str",
        **{f"px_{k}": "Int64" for k in range(n_classes)},
        "px_ignore": "Int64",
        "labeled_pixel_fraction": "Float64",
        "has_foreground": "boolean",
    }


def _row_statistics(data_dir: Path, position: int, row: Any, n_classes: int,
                    ignore_index: int) -> tuple[dict[str, Any], np.ndarray | None]:
    """The row's facts, and its image (None when it does not decode)."""
    stats: dict[str, Any] = {
        "manifest_row": position,
        "image_id": row.image_id,
        "image_path": row.image_path,
        "mask_path": row.mask_path,
        "labeled": row.mask_path != "",
        "split": row.split,
        "manifest_width": _whole_number(row.width),
        "manifest_height": _whole_number(row.height),
        "image_decodes": False,
        "image_error": "",
        "mask_error": "",
        "bad_values": "",
    }
    image = None
    image_path = data_dir / row.image_path
    try:
        image = read_image(image_path)
    except SegflowError as exc:
        stats["image_error"] = str(exc).removeprefix(f"{image_path}: ")
    else:
        height, width = image.shape[:2]
        stats.update(
            image_decodes=True,
            image_width=width,
            image_height=height,
            image_size_matches_manifest=(width, height) == (stats["manifest_width"], stats["manifest_height"]),
            content_hash=content_hash(image),
        )
    if not stats["labeled"]:
        return stats, image
    mask_path = data_dir / row.mask_path
    try:
        mask = read_mask(mask_path)
    except SegflowError as exc:
        stats.update(mask_decodes=False, mask_error=str(exc).removeprefix(f"{mask_path}: "))
        return stats, image
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = np.flatnonzero(counts[n_classes:]) + n_classes
    bad = bad[bad != ignore_index]
    stats.update(
        mask_decodes=True,
        mask_width=mask.shape[1],
        mask_height=mask.shape[0],
        n_bad_values=int(counts[bad].sum()),
        bad_values=" ".join(str(v) for v in bad),
        px_ignore=int(counts[ignore_index]),
        **{f"px_{k}": int(counts[k]) for k in range(n_classes)},
        labeled_pixel_fraction=1 - counts[ignore_index] / mask.size,
        has_foreground=bool(counts[1:n_classes].any()),
    )
    if image is not None:
        stats["mask_size_matches_image"] = mask.shape == image.shape[:2]
    return stats, image


def _whole_number(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None

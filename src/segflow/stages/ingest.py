"""Ingest stage: turn COCO annotations or folders of index masks into segflow's dataset layout.

Output, written inside ``fsutil.owned_dir`` so a failed ingest leaves the previous output untouched (and an
output folder that overlaps the inputs, or that segflow did not write, is refused):

- ``OUT/masks/<image_id>.png``: uint8 single-channel index mask, same size as its image, 255 = ignore.
- ``OUT/manifest.csv``: ``image_id,image_path,mask_path,width,height,split``, one row per image. Paths
  are relative to OUT (``..`` allowed); images are not copied. Unlabeled images have an empty
  ``mask_path``; ``split`` is empty unless the source defines splits.
- ``OUT/classes.json``: ``names``, ``coco_category_ids`` (``null`` for mask input), ``ignore_index``, ``source``.

Image ids, which files count as images and the symbolic-link policy: segflow.data.source_images. A COCO source's
unlabeled folder lying inside its images folder is skipped (an output folder inside an input is refused:
segflow.fsutil.refuse_overlap).

COCO (parsing and rasterizing: segflow.data.coco): categories become indices 1..K in ascending category id
(0 = ``background``). Crowd annotations (``iscrowd: 1``) are painted with their category like any other
annotation rather than ignored: they do mark that category's pixels, only as a group.

Mask folders (pairing and value mapping: segflow.data.mask_folders): class names are given, or ``class_0`` up to
the highest class index found.

Manifest rows: labeled images in source order (the COCO file's order; mask sources in the order given,
each sorted by name), then unlabeled images sorted by path. Warnings (unpaired or unlisted images) are
logged on ``segflow.stages.ingest`` and returned in the report; ``strict=True`` makes them an error instead.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from segflow import IGNORE_INDEX
from segflow.data.coco import BACKGROUND, CocoAnnotation, CocoImage, load_coco, match_coco_images, rasterize
from segflow.data.imageio import image_size, read_mask, write_mask
from segflow.data.mask_folders import (
    MaskPair,
    MaskSource,
    check_class_names,
    default_class_names,
    pair_source,
    raise_background_only,
    to_class_indices,
    value_lookup,
)
from segflow.data.source_images import ImageIds, list_images
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json, owned_dir, refuse_overlap

if TYPE_CHECKING:
    import numpy as np

    from segflow.config import DataParams

__all__ = ["IngestReport", "ingest_coco", "ingest_from_params", "ingest_masks"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("image_id", "image_path", "mask_path", "width", "height", "split")
# Decoding PNG/JPEG and zlib release the GIL, so a few threads speed up the per-image work.
WORKERS = min(8, os.cpu_count() or 1)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class IngestReport:
    """What an ingest wrote: image counts, the warnings it logged and the class names (index order)."""

    labeled: int
    unlabeled: int
    warnings: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _ManifestRow:
    image_id: str
    image: Path
    width: int
    height: int
    labeled: bool
    split: str = ""


@dataclass(frozen=True)
class _CocoItem:
    image_id: str
    path: Path
    entry: CocoImage


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def ingest_coco(
    images: Path,
    annotations: Path,
    out: Path,
    *,
    unlabeled: Path | None = None,
    strict: bool = False,
) -> IngestReport:
    """Rasterize a COCO instance-segmentation file into index masks and write the dataset layout to ``out``."""
    images, annotations, out = Path(images), Path(annotations), Path(out)
    inputs = [images, annotations, unlabeled]
    refuse_overlap(out, inputs, "segflow ingest")  # before any work: the inputs are what it would replace
    final_out = _final_location(out)
    coco = load_coco(annotations)
    skipped = () if unlabeled is None else (Path(unlabeled),)  # an unlabeled folder inside the images folder
    present, warnings = match_coco_images(coco, images, annotations, skipped)
    ids = ImageIds()
    items = [_CocoItem(ids.assign(path), path, entry) for path, entry in present]
    unlabeled_files = _unlabeled_files(unlabeled, ids)
    _settle_warnings(warnings, strict)
    if not items:
        raise SegflowError(f"{annotations}: no image it lists was found under {images}; nothing to ingest.")

    categories = sorted(coco.categories, key=lambda category: category.id)  # class index = position + 1
    names = [BACKGROUND] + [category.name for category in categories]
    class_index = {category.id: index for index, category in enumerate(categories, start=1)}
    painted: dict[int, list[tuple[int, CocoAnnotation]]] = defaultdict(list)  # image id -> (class, annotation)
    for annotation in coco.annotations:
        painted[annotation.image_id].append((class_index[annotation.category_id], annotation))
    with owned_dir(out, "segflow ingest", inputs) as tmp:
        (tmp / "masks").mkdir()
        write_one = partial(_write_coco_mask, painted=painted, annotations_file=annotations, masks_dir=tmp / "masks")
        rows = _parallel_map(write_one, items)
        unlabeled_rows = _parallel_map(_unlabeled_row, unlabeled_files)
        _write_outputs(
            tmp,
            final_out,
            rows + unlabeled_rows,
            {
                "names": names,
                "coco_category_ids": [None] + [category.id for category in categories],
                "ignore_index": IGNORE_INDEX,
                "source": "coco",
            },
        )
    return IngestReport(len(rows), len(unlabeled_rows), warnings, names)


def ingest_masks(
    sources: Sequence[MaskSource],
    out: Path,
    *,
    classes: list[str] | None = None,
    value_map: dict[int, int] | None = None,
    ignore_value: int | None = None,
    unlabeled: Path | None = None,
    strict: bool = False,
) -> IngestReport:
    """Pair images with index masks by file stem, map their values and write the dataset layout to ``out``."""
    out = Path(out)
    final_out = _final_location(out)
    if not sources:
        raise SegflowError("ingest_masks needs at least one (images folder, masks folder) source.")
    inputs = [unlabeled, *(folder for source in sources for folder in (source.images, source.masks))]
    refuse_overlap(out, inputs, "segflow ingest")
    if classes is not None:
        check_class_names(classes)
    lookup = value_lookup(value_map, ignore_value)
    ids = ImageIds()
    pairs: list[MaskPair] = []
    warnings: list[str] = []
    for source in sources:
        source_pairs, source_warnings = pair_source(source, ids)
        pairs += source_pairs
        warnings += source_warnings
    unlabeled_files = _unlabeled_files(unlabeled, ids)
    _settle_warnings(warnings, strict)
    if not pairs:
        folders = ", ".join(f"{source.images} with {source.masks}" for source in sources)
        raise SegflowError(f"No image has a mask (paired by file name without extension) in: {folders}.")

    with owned_dir(out, "segflow ingest", inputs) as tmp:
        (tmp / "masks").mkdir()
        num_classes = None if classes is None else len(classes)
        convert_one = partial(_convert_mask, lookup=lookup, num_classes=num_classes, masks_dir=tmp / "masks")
        converted = _parallel_map(convert_one, pairs)
        rows = [row for row, _ in converted]
        highest = max(highest for _, highest in converted)
        if highest == 0 and not value_map and ignore_value is None:
            raise_background_only(sources)
        names = classes or default_class_names(highest)
        unlabeled_rows = _parallel_map(_unlabeled_row, unlabeled_files)
        _write_outputs(
            tmp,
            final_out,
            rows + unlabeled_rows,
            {"names": names, "coco_category_ids": None, "ignore_index": IGNORE_INDEX, "source": "masks"},
        )
    return IngestReport(len(rows), len(unlabeled_rows), warnings, list(names))


def check_data_root(root: Path, project: Path) -> None:
    """``data.root`` must be a folder of data that DVC can track as one dependency: not the project folder or a
    folder holding it (``/``: DVC would record the project inside itself, and say "up to date" after an image
    changed), and nothing inside a ``.git`` folder."""
    resolved, project = Path(root).resolve(), Path(project).resolve()
    if resolved == project or resolved in project.parents:
        raise SegflowError(f"data.root {root} holds the project folder {project} itself: DVC cannot track a folder "
                           "that contains the pipeline's own outputs. Point data.root at the folder of your images "
                           "(e.g. /data/my-project, or data/raw inside the project).")
    if ".git" in resolved.parts:
        raise SegflowError(f"data.root {root} is inside a .git folder: that is git's store, not data. Point data.root "
                           "at the folder of your images.")


def ingest_from_params(data: DataParams, out: Path, project: Path = Path(".")) -> IngestReport:
    """Run the ingest that ``params.yaml``'s ``data`` section describes; its paths are relative to ``data.root``,
    which must be a folder of data apart from the ``project`` folder (:func:`check_data_root`)."""
    check_data_root(data.root, project)
    unlabeled = None if data.unlabeled is None else data.root / data.unlabeled
    if data.format == "coco":
        images, annotations = data.root / data.coco.images, data.root / data.coco.annotations
        return ingest_coco(images, annotations, out, unlabeled=unlabeled, strict=data.strict)
    root = data.root
    sources = [MaskSource(root / folder.images, root / folder.masks, folder.split) for folder in data.masks.folders]
    return ingest_masks(
        sources,
        out,
        classes=data.masks.classes,
        value_map=data.masks.value_map,
        ignore_value=data.masks.ignore_value,
        unlabeled=unlabeled,
        strict=data.strict,
    )


# ----------------------------------------------------------------------------------------------------------
# Shared helpers: unlabeled images, warnings, output
# ----------------------------------------------------------------------------------------------------------


def _final_location(out: Path) -> Path:
    """Where ``out`` will be once written: its parent resolved, its own name kept (atomic_dir replaces it)."""
    return out.parent.resolve() / out.name


def _unlabeled_files(folder: Path | None, ids: ImageIds) -> list[tuple[str, Path]]:
    if folder is None:
        return []
    return [(ids.assign(path), path) for path in list_images(Path(folder), "unlabeled images")]


def _unlabeled_row(item: tuple[str, Path]) -> _ManifestRow:
    image_id, path = item
    width, height = image_size(path)
    return _ManifestRow(image_id, path, width, height, labeled=False)


def _settle_warnings(warnings: list[str], strict: bool) -> None:
    """Strict mode turns warnings into one error; otherwise they are logged and ingest goes on."""
    if strict and warnings:
        raise SegflowError("Strict mode (these would otherwise only be warnings): " + " ".join(warnings))
    for warning in warnings:
        log.warning(warning)


def _parallel_map(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[function(item) for item in items]`` on a few threads; the first failure in item order is raised."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _write_outputs(tmp: Path, final_out: Path, rows: list[_ManifestRow], classes_doc: dict[str, Any]) -> None:
    with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for row in rows:
            # Relative to where OUT will live, not the temp dir; the directory is resolved so `..` steps
            # are right on disk, the file name is kept so symlinked files (e.g. a DVC cache) stay as named.
            image_path = os.path.relpath(row.image.parent.resolve() / row.image.name, final_out)
            mask_path = f"masks/{row.image_id}.png" if row.labeled else ""
            writer.writerow([row.image_id, image_path, mask_path, row.width, row.height, row.split])
    atomic_write_json(tmp / "classes.json", classes_doc)


# ----------------------------------------------------------------------------------------------------------
# Writing each image's mask
# ----------------------------------------------------------------------------------------------------------


def _write_coco_mask(
    item: _CocoItem, painted: dict[int, list[tuple[int, CocoAnnotation]]], annotations_file: Path, masks_dir: Path
) -> _ManifestRow:
    entry = item.entry
    width, height = image_size(item.path)
    if (width, height) != (entry.width, entry.height):
        raise SegflowError(
            f"{annotations_file}: image id {entry.id} is {entry.width}x{entry.height} (width x height) there, "
            f"but {item.path} is {width}x{height} on disk."
        )
    mask = rasterize(painted.get(entry.id, []), entry)
    write_mask(masks_dir / f"{item.image_id}.png", mask)
    return _ManifestRow(item.image_id, item.path, width, height, labeled=True)


def _convert_mask(
    pair: MaskPair, lookup: np.ndarray, num_classes: int | None, masks_dir: Path
) -> tuple[_ManifestRow, int]:
    """Map one mask's values, check it, write it; returns its manifest row and its highest class index (-1: none)."""
    width, height = image_size(pair.image)
    raw = read_mask(pair.mask)
    if raw.shape != (height, width):
        raise SegflowError(
            f"{pair.mask} is {raw.shape[1]}x{raw.shape[0]} (width x height) but its image {pair.image} "
            f"is {width}x{height}; a mask must have its image's size."
        )
    mask, highest = to_class_indices(pair.mask, raw, lookup, num_classes)
    write_mask(masks_dir / f"{pair.image_id}.png", mask)
    return _ManifestRow(pair.image_id, pair.image, width, height, labeled=True, split=pair.split), highest

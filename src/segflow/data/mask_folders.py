"""Folders of images and their index masks: pairing them by file name, and mapping raw mask values to class
indices.

Masks pair with images by file name without extension; ``value_map`` is applied first, then ``ignore_value``
becomes 255. Masks must be lossless (png/bmp/tif), since JPEG alters label values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow import IGNORE_INDEX
from segflow.data.source_images import ImageIds, files_warning, list_images
from segflow.errors import SegflowError, shown

LOSSY_EXTENSIONS = frozenset({".jpg", ".jpeg"})
MAX_CLASSES = IGNORE_INDEX  # class indices 0..254; 255 is reserved for "ignore"


@dataclass(frozen=True)
class MaskSource:
    """A folder of images and the folder of their index masks, optionally one predefined split."""

    images: Path
    masks: Path
    split: str | None = None


@dataclass(frozen=True)
class MaskPair:
    image_id: str
    image: Path
    mask: Path
    split: str


def parse_value_map(text: str) -> dict[int, int]:
    """Parse ``"0:0,255:1"`` (raw mask value ``:`` class index, comma separated) into a dict."""
    value_map: dict[int, int] = {}
    for item in text.split(","):
        raw, sep, index = item.partition(":")
        if not sep or not _is_byte_text(raw) or not _is_byte_text(index):
            raise SegflowError(
                f"Value map {text!r}: cannot read {item.strip()!r}. Expected comma-separated raw:index pairs "
                "such as '0:0,255:1', each value an integer 0..255."
            )
        if int(raw) in value_map:
            raise SegflowError(f"Value map {text!r}: raw value {int(raw)} is mapped twice.")
        value_map[int(raw)] = int(index)
    return value_map


def _is_byte_text(text: str) -> bool:
    text = text.strip()
    return text.isascii() and text.isdigit() and int(text) <= 255


def check_class_names(names: Sequence[str], source: str = "classes") -> None:
    if not names or not all(isinstance(name, str) and name.strip() for name in names):
        raise SegflowError(f"{source}: give a non-empty list of non-empty class names, got {shown(list(names))}.")
    if len(names) > MAX_CLASSES:
        raise SegflowError(f"{source}: {len(names)} classes do not fit 8-bit masks (at most {MAX_CLASSES}).")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SegflowError(f"{source}: class names must be unique; repeated: {', '.join(map(repr, duplicates))}.")


def value_lookup(value_map: dict[int, int] | None, ignore_value: int | None) -> np.ndarray:
    """A 256-entry table taking raw mask values to class indices: value_map first, then ignore_value -> 255."""
    lookup = np.arange(256, dtype=np.uint8)
    for raw, index in (value_map or {}).items():
        if not (_is_byte_int(raw) and _is_byte_int(index)):
            raise SegflowError(f"value_map: {raw!r}:{index!r} is not a pair of integers 0..255.")
        lookup[raw] = index
    if ignore_value is not None:
        if not _is_byte_int(ignore_value):
            raise SegflowError(f"ignore_value must be an integer 0..255, got {shown(ignore_value)}.")
        lookup[lookup == ignore_value] = IGNORE_INDEX
    return lookup


def _is_byte_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


def pair_source(source: MaskSource, ids: ImageIds) -> tuple[list[MaskPair], list[str]]:
    """Images and masks of one source paired by stem, and warnings about those left without a partner."""
    images = _by_stem(list_images(Path(source.images), "images"))
    masks = _by_stem(list_images(Path(source.masks), "masks"))
    lossy = [path for path in masks.values() if path.suffix.lower() in LOSSY_EXTENSIONS]
    if lossy:
        raise SegflowError(
            f"{lossy[0]}: masks must be stored losslessly (png, bmp or tif); JPEG compression alters label "
            f"values ({len(lossy)} JPEG file(s) in {source.masks})."
        )
    warnings = []
    without_mask = sorted(images.keys() - masks.keys())
    without_image = sorted(masks.keys() - images.keys())
    if without_mask:
        problem = f"image(s) in {source.images} have no mask in {source.masks}"
        warnings.append(files_warning([images[stem].name for stem in without_mask], problem))
    if without_image:
        problem = f"mask(s) in {source.masks} have no image in {source.images}"
        warnings.append(files_warning([masks[stem].name for stem in without_image], problem))
    pairs = [
        MaskPair(ids.assign(images[stem]), images[stem], masks[stem], source.split or "")
        for stem in sorted(images.keys() & masks.keys())
    ]
    return pairs, warnings


def _by_stem(files: list[Path]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise SegflowError(
                f"{by_stem[path.stem]} and {path} have the same name without extension, so they cannot be paired."
            )
        by_stem[path.stem] = path
    return by_stem


def to_class_indices(
    mask: Path, raw: np.ndarray, lookup: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, int]:
    """``raw`` (the mask read from ``mask``) with its values mapped by ``lookup``, refused if one is not a class
    index given ``num_classes``; and its highest class index (-1: none)."""
    raw_values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    class_values = lookup[raw_values]
    labels = class_values[class_values != IGNORE_INDEX]
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        _raise_unknown_values(mask, raw_values, class_values, num_classes)
    return lookup[raw], int(labels.max()) if labels.size else -1


def _raise_unknown_values(mask: Path, raw_values: np.ndarray, class_values: np.ndarray, num_classes: int) -> None:
    unknown = (class_values >= num_classes) & (class_values != IGNORE_INDEX)
    raw_text = ", ".join(str(value) for value in raw_values[unknown])
    mapped = "" if np.array_equal(raw_values[unknown], class_values[unknown]) else (
        " (mapped to " + ", ".join(str(value) for value in class_values[unknown]) + ")"
    )
    raise SegflowError(
        f"{mask}: contains value(s) {raw_text}{mapped} that are not class indices: with {num_classes} classes "
        f"the allowed values are 0..{num_classes - 1}, plus {IGNORE_INDEX} for ignore. Map the others with "
        "value_map or ignore_value."
    )


def raise_background_only(sources: Sequence[MaskSource]) -> None:
    """Masks holding only 0 and 255 are binary masks nearly always: read as segflow's index masks (255 =
    ignore) their foreground would be ignored and one class left to learn."""
    folders = ", ".join(str(source.masks) for source in sources)
    raise SegflowError(
        f"{folders}: every mask holds class 0 only, apart from the value {IGNORE_INDEX} (ignore): nothing to "
        f"learn. Binary masks (0 = background, {IGNORE_INDEX} = object) need their values mapped: "
        f"--value-map 0:0,{IGNORE_INDEX}:1 --classes background,object (params: data.masks.value_map "
        f"{{0: 0, {IGNORE_INDEX}: 1}} and data.masks.classes [background, object])."
    )


def default_class_names(highest: int) -> list[str]:
    if highest < 0:
        raise SegflowError("Every mask is entirely ignore (255); there are no classes to name. Pass the class names.")
    return [f"class_{index}" for index in range(highest + 1)]

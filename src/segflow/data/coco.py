"""A COCO instance-segmentation file: parsed once into typed models that say what segflow needs of it, matched
to the images on disk, and rasterized into index masks.

An invalid file is one SegflowError naming its first few problems (where: ``annotations[3] (annotation id 7,
image 'a.png'): 'segmentation' ...``, what is wrong, the value found) and their count. Each annotation is
rasterized exactly as ``pycocotools.coco.COCO.annToMask`` does; overlaps are painted largest rasterized area first
(ties: lower annotation id first), so smaller objects stay on top.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    FiniteFloat,
    NonNegativeInt,
    PositiveInt,
    Tag,
    ValidationError,
    model_validator,
)

from segflow import IGNORE_INDEX
from segflow.data.source_images import files_warning, list_images, refuse_link_outside
from segflow.errors import SegflowError, shown

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

BACKGROUND = "background"  # the name of class 0: pixels of no annotation
MAX_PROBLEMS = 5  # an invalid annotations file is reported by its first few problems and a count


def _closed_polygons(polygons: list[list[float]]) -> list[list[float]]:
    for number, polygon in enumerate(polygons):  # pycocotools crashes on an odd count, reads 2 points as a box
        if len(polygon) % 2:
            raise ValueError(f"polygon {number} has an odd number of coordinates ({len(polygon)})")
        if len(polygon) < 6:
            raise ValueError(f"polygon {number} has {len(polygon) // 2} point(s); a polygon needs at least 3")
    return polygons


def _runs(counts: Any) -> Any:
    runs = _compressed_rle_runs(counts) if isinstance(counts, str) else counts
    if not isinstance(runs, list):
        raise ValueError("must be a list of non-negative integers or a valid compressed string")
    return runs


def _segmentation_kind(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(polygon, list) for polygon in value):
        return "polygons"
    return "RLE" if isinstance(value, dict) else None


_Text = Annotated[str, Field(pattern=r"\S")]  # not blank


class _Model(BaseModel):
    # Strict: 10.0, "10" and true are not the integer 10. Other keys (bbox, area, iscrowd, info, ...) are ignored.
    model_config = ConfigDict(strict=True)


class CocoImage(_Model):
    id: int
    file_name: _Text  # relative to the images folder
    width: PositiveInt
    height: PositiveInt


class CocoCategory(_Model):
    id: int
    name: _Text


class _Rle(_Model):
    """A run-length encoded mask: run lengths over the image in column-major order, starting with 0s."""

    size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]  # the image's [height, width]
    # A list of runs, or pycocotools' compressed string (decoded here to its runs as ``rleFrString`` does).
    counts: Annotated[list[NonNegativeInt], BeforeValidator(_runs)]

    @model_validator(mode="after")
    def _covers_the_image(self) -> _Rle:  # pycocotools leaves pixels past a short RLE uninitialised
        height, width = self.size
        if sum(self.counts) != height * width:
            raise ValueError(f"RLE counts cover {sum(self.counts)} pixels, but size {self.size} is {height}x{width} "
                             f"= {height * width}")
        return self


class CocoAnnotation(_Model):
    id: int
    image_id: int
    category_id: int
    # Polygons (flat lists x1,y1,x2,y2,..., several for an object in parts) or an RLE; a box alone makes no mask.
    segmentation: Annotated[
        Annotated[list[list[FiniteFloat]], Field(min_length=1), AfterValidator(_closed_polygons), Tag("polygons")]
        | Annotated[_Rle, Tag("RLE")],
        Discriminator(_segmentation_kind, custom_error_type="segmentation_type",
                      custom_error_message="must be a list of polygons (lists x1,y1,x2,y2,...) or an RLE object"),
    ]


class CocoFile(_Model):
    """What segflow reads of a COCO instances file; ``_cross_reference_problems`` checks ids and references."""

    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    # Categories in ascending id become class indices 1..254 (0 is background and 255 ignore in 8-bit masks).
    categories: Annotated[list[CocoCategory], Field(min_length=1, max_length=IGNORE_INDEX - 1)]


def load_coco(path: Path) -> CocoFile:
    """Parse the annotations file, or raise one SegflowError naming its first few problems and their count."""
    doc = _read_json(path)
    try:
        coco = CocoFile.model_validate(doc)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        _refuse_coco(path, [_describe(doc, error) for error in errors[:MAX_PROBLEMS]], len(errors))
    problems = list(_cross_reference_problems(coco))
    if problems:
        shown = [f"{_entry_name(doc, key, index)}: {problem}" for key, index, problem in problems[:MAX_PROBLEMS]]
        _refuse_coco(path, shown, len(problems))
    return coco


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SegflowError(f"{path}: annotations file not found.") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise SegflowError(f"{path}: cannot read the annotations file as UTF-8 text ({exc}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SegflowError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None


def _cross_reference_problems(coco: CocoFile) -> Iterator[tuple[str, int, str]]:
    """(list, index, problem) for what no entry shows alone: repeated ids or names, references to nothing."""
    yield from _repeats("categories", [category.id for category in coco.categories], "category id {} is defined")
    yield from _repeats("categories", [category.name for category in coco.categories], "'name' {!r} is used")
    yield from _repeats("images", [image.id for image in coco.images], "image id {} is used")
    files = [os.path.normpath(image.file_name) for image in coco.images]  # "a.png" and "./a.png" are one file
    yield from _repeats("images", files, "'file_name' {!r} is listed")
    yield from _repeats("annotations", [annotation.id for annotation in coco.annotations], "annotation id {} is used")
    for index, category in enumerate(coco.categories):
        if category.name == BACKGROUND:
            yield "categories", index, (f"'name' {BACKGROUND!r} is reserved for index 0 (pixels of no annotation). "
                                        "Rename the category, or remove it if no annotation uses it")
    images = {image.id: image for image in coco.images}
    category_ids = {category.id for category in coco.categories}
    for index, annotation in enumerate(coco.annotations):
        image, rle = images.get(annotation.image_id), annotation.segmentation
        if image is None:
            yield "annotations", index, f"'image_id' refers to image id {annotation.image_id}, not in 'images'"
        if annotation.category_id not in category_ids:
            yield "annotations", index, (
                f"'category_id' refers to category id {annotation.category_id}, not in 'categories'"
            )
        if image and isinstance(rle, _Rle) and rle.size != [image.height, image.width]:
            yield "annotations", index, (f"'segmentation' has RLE size {rle.size}, but the image's [height, width] "
                                         f"is [{image.height}, {image.width}]")


def _repeats(key: str, values: list, problem: str) -> Iterator[tuple[str, int, str]]:
    first: dict[Any, int] = {}
    for index, value in enumerate(values):
        if (earlier := first.setdefault(value, index)) != index:
            yield key, index, f"{problem.format(value)} twice (also by {key}[{earlier}])"


_PREDICATES = {  # pydantic's wording for a JSON file, where it does not fit ("Input should be" -> "must be")
    "int_type": "must be an integer",
    "list_type": "must be a list",
    "model_type": "must be a JSON object",
    "string_pattern_mismatch": "must not be blank",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
}


def _describe(doc: Any, error: ErrorDetails) -> str:
    """One pydantic error where the file has it: ``images[2] (image id 7): 'width' must be an integer, found '10'``."""
    loc = [part for part in error["loc"] if part not in ("polygons", "RLE")]  # union tags, not JSON keys
    kind = error["type"]
    if kind == "missing":
        key = loc.pop()
        if not loc:
            return f"missing top-level key {key!r} (a COCO file needs 'images', 'annotations' and 'categories')"
        predicate = f"has no {key!r}"
    elif kind == "too_short" and not error["input"]:
        predicate = "must not be an empty list"
    else:
        text = _PREDICATES[kind].format(**error.get("ctx", {})) if kind in _PREDICATES else error["msg"]
        text = text.replace("Input should be", "must be").removeprefix("Value error, ")
        predicate = f"{text}, found {shown(error['input'])}"
    if len(loc) < 2:  # the document itself, or one of its top-level keys
        return f"'{loc[0]}' {predicate}" if loc else f"the top level {predicate}"
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[2:]).lstrip(".")
    where = _entry_name(doc, *loc[:2])
    return f"{where}: '{field}' {predicate}" if field else f"{where} {predicate}"


def _entry_name(doc: dict, key: str, index: int) -> str:
    """``annotations[3] (annotation id 7, image 'a.png')``: where an entry is, and what the file calls it."""
    entry = doc[key][index]
    if not isinstance(entry, dict) or type(entry.get("id")) is not int:
        return f"{key}[{index}]"
    kind = {"images": "image", "annotations": "annotation", "categories": "category"}[key]
    image_id = entry.get("image_id") if key == "annotations" else None
    images = doc["images"] if image_id is not None and isinstance(doc.get("images"), list) else []
    names = [image.get("file_name") for image in images if isinstance(image, dict) and image.get("id") == image_id]
    image = f", image {names[0]!r}" if names and isinstance(names[0], str) else ""
    return f"{key}[{index}] ({kind} id {entry['id']}{image})"


def _refuse_coco(path: Path, problems: list[str], count: int) -> NoReturn:
    more = f"; and {count - len(problems)} more" if count > len(problems) else ""
    raise SegflowError(f"{path}: {count} problem(s) with this COCO annotations file: {'; '.join(problems)}{more}.")


def _compressed_rle_runs(text: str) -> list[int] | None:
    """Run lengths of a compressed RLE string, decoded as pycocotools' ``rleFrString`` does; None if malformed."""
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:  # 5 bits per character, 0x20 = "more characters follow", 0x10 on the last one = negative
            if position == len(text):
                return None
            char = ord(text[position]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:  # runs after the first two are stored as differences
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Matching the listed images to the files on disk, and rasterizing
# ----------------------------------------------------------------------------------------------------------


def match_coco_images(
    coco: CocoFile, images: Path, annotations: Path, skipped: tuple[Path, ...]
) -> tuple[list[tuple[Path, CocoImage]], list[str]]:
    """Listed images found on disk, and warnings about listed-but-missing and on-disk-but-unlisted ones."""
    _refuse_files_outside(coco, images, annotations)
    on_disk = {Path(os.path.normpath(path)) for path in list_images(images, "images", skipped)}
    listed = {Path(os.path.normpath(images / entry.file_name)): entry for entry in coco.images}
    present = [(path, entry) for path, entry in listed.items() if path.is_file()]
    missing = [entry.file_name for path, entry in listed.items() if not path.is_file()]
    unlisted = sorted(os.path.relpath(path, images) for path in on_disk - listed.keys())
    warnings = []
    if missing:
        problem = f"image(s) listed in {annotations} are missing under {images}"
        warnings.append(files_warning(missing, problem))
    if unlisted:
        problem = f"image(s) under {images} are not listed in {annotations}"
        warnings.append(files_warning(unlisted, problem))
    return present, warnings


def _refuse_files_outside(coco: CocoFile, images: Path, annotations: Path) -> None:
    """A file_name must name a file inside ``images``: one outside (absolute, or out through ``..`` or a linked
    folder) is data that DVC does not track, or a file the annotations' author should not get to read. The file
    itself may be a symbolic link into the images folder or DVC's cache (:func:`refuse_link_outside`)."""
    root = images.resolve()
    for entry in coco.images:
        folder = (images / entry.file_name).parent.resolve()
        if Path(entry.file_name).is_absolute() or not folder.is_relative_to(root):
            raise SegflowError(
                f"{annotations}: image id {entry.id} has file_name {entry.file_name!r}, which lies outside the "
                f"images folder {images} (an absolute path, or out through '..' or a linked folder). Images are "
                "read only from inside the images folder: give file_name relative to it, or move the file into it."
            )
        if (images / entry.file_name).is_symlink():
            refuse_link_outside(images / entry.file_name, images, "images")


def rasterize(painted: list[tuple[int, CocoAnnotation]], image: CocoImage) -> np.ndarray:
    """The index mask of ``image``: each (class index, annotation) painted largest area first, so small objects on
    top of large ones stay visible."""
    canvas = np.zeros((image.height, image.width), dtype=np.uint8)
    rles = [(index, annotation.id, _annotation_rle(annotation.segmentation, image)) for index, annotation in painted]
    # Areas come from the RLEs, so sorting needs no decoded masks; each is decoded only while painted.
    for index, _, rle in sorted(rles, key=lambda item: (int(mask_utils.area(item[2])), -item[1]), reverse=True):
        canvas[mask_utils.decode(rle).astype(bool)] = index
    return canvas


def _annotation_rle(segmentation: list[list[float]] | _Rle, image: CocoImage) -> dict:
    """The RLE that ``COCO.annToRLE`` builds, so masks match ``COCO.annToMask`` pixel for pixel."""
    if isinstance(segmentation, _Rle):  # a compressed string was decoded to these runs when parsed
        rle = {"size": segmentation.size, "counts": segmentation.counts}
        return mask_utils.frPyObjects(rle, image.height, image.width)
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, image.height, image.width))


"""Ingest stage: turn COCO annotations or folders of index masks into segflow's dataset layout.

Output, written inside ``fsutil.owned_dir`` so a failed ingest leaves the previous output untouched (and an
output folder that overlaps the inputs, or that segflow did not write, is refused):

- ``OUT/masks/<image_id>.png``: uint8 single-channel index mask, same size as its image, 255 = ignore.
- ``OUT/manifest.csv``: ``image_id,image_path,mask_path,width,height,split``, one row per image. Paths
  are relative to OUT (``..`` allowed); images are not copied. Unlabeled images have an empty
  ``mask_path``; ``split`` is empty unless the source defines splits.
- ``OUT/classes.json``: ``names``, ``coco_category_ids`` (``null`` for mask input), ``ignore_index``, ``source``.

``image_id`` is the image's file name without extension, with characters other than letters, digits,
``.``, ``_`` and ``-`` replaced by ``_``. Two images that would share an id (ids compare case-insensitively,
since masks would overwrite each other on case-insensitive filesystems) are an error naming both files.
Image folders are searched recursively for png/jpg/jpeg/bmp/tif/tiff; hidden files and folders (such as macOS
``._*`` files), and a COCO source's unlabeled folder lying inside its images folder, are skipped (an output folder
inside an input is refused: segflow.fsutil.refuse_overlap).

COCO: the file is parsed into typed models (``_CocoFile`` and the models it holds say what segflow needs of it);
an invalid file is one SegflowError naming its first few problems (where: ``annotations[3] (annotation id 7,
image 'a.png'): 'segmentation' ...``, what is wrong, the value found) and their count. Categories become indices
1..K in ascending category id (0 = ``background``). Each annotation is rasterized exactly as
``pycocotools.coco.COCO.annToMask`` does. Crowd annotations (``iscrowd: 1``) are painted with their category like
any other annotation rather than ignored: they do mark that category's pixels, only as a group. Overlaps are
painted largest rasterized area first (ties: lower annotation id first), so smaller objects stay on top.

Mask folders: masks pair with images by file name without extension; ``value_map`` is applied first,
then ``ignore_value`` becomes 255. Masks must be lossless (png/bmp/tif), since JPEG alters label values.

Manifest rows: labeled images in source order (the COCO file's order; mask sources in the order given,
each sorted by name), then unlabeled images sorted by path. Warnings (unpaired or unlisted images) are
logged on ``segflow.stages.ingest`` and returned in the report; ``strict=True`` makes them an error instead.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

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
from segflow.data.imageio import image_size, read_mask, write_mask
from segflow.errors import SegflowError, shown
from segflow.fsutil import atomic_write_json, owned_dir, refuse_overlap

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from segflow.config import DataParams

__all__ = ["IngestReport", "MaskSource", "ingest_coco", "ingest_from_params", "ingest_masks", "parse_value_map"]

log = logging.getLogger("segflow.stages.ingest")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LOSSY_EXTENSIONS = frozenset({".jpg", ".jpeg"})
MANIFEST_COLUMNS = ("image_id", "image_path", "mask_path", "width", "height", "split")
BACKGROUND = "background"
MAX_CLASSES = IGNORE_INDEX  # class indices 0..254; 255 is reserved for "ignore"
MAX_NAMED_FILES = 20  # a warning names at most this many files, then gives a count
# Decoding PNG/JPEG and zlib release the GIL, so a few threads speed up the per-image work.
WORKERS = min(8, os.cpu_count() or 1)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class MaskSource:
    """A folder of images and the folder of their index masks, optionally one predefined split."""

    images: Path
    masks: Path
    split: str | None = None


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
    coco = _load_coco(annotations)
    skipped = () if unlabeled is None else (Path(unlabeled),)  # an unlabeled folder inside the images folder
    present, warnings = _match_coco_images(coco, images, annotations, skipped)
    ids = _ImageIds()
    items = [_CocoItem(ids.assign(path), path, entry) for path, entry in present]
    unlabeled_files = _unlabeled_files(unlabeled, ids)
    _settle_warnings(warnings, strict)
    if not items:
        raise SegflowError(f"{annotations}: no image it lists was found under {images}; nothing to ingest.")

    categories = sorted(coco.categories, key=lambda category: category.id)  # class index = position + 1
    names = [BACKGROUND] + [category.name for category in categories]
    class_index = {category.id: index for index, category in enumerate(categories, start=1)}
    painted: dict[int, list[tuple[int, _CocoAnnotation]]] = defaultdict(list)  # image id -> (class, annotation)
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
        _check_class_names(classes)
    lookup = _value_lookup(value_map, ignore_value)
    ids = _ImageIds()
    pairs: list[_MaskPair] = []
    warnings: list[str] = []
    for source in sources:
        source_pairs, source_warnings = _pair_source(source, ids)
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
            _raise_background_only(sources)
        names = classes or _default_class_names(highest)
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


# ----------------------------------------------------------------------------------------------------------
# Shared helpers: image ids, file discovery, warnings, output
# ----------------------------------------------------------------------------------------------------------


class _ImageIds:
    """Hands out filesystem-safe image ids and refuses two files that would share one."""

    def __init__(self) -> None:
        self._owners: dict[str, Path] = {}

    def assign(self, image: Path) -> str:
        image_id = re.sub(r"[^A-Za-z0-9._-]", "_", image.stem)
        if image_id.startswith("."):  # a leading dot would hide the mask file
            image_id = "_" + image_id[1:]
        owner = self._owners.get(image_id.casefold())
        if owner is not None:
            raise SegflowError(
                f"{owner} and {image} would both get image id {image_id!r} (the file name without extension, "
                "made filesystem safe; ids must differ in more than letter case). Rename one of them."
            )
        self._owners[image_id.casefold()] = image
        return image_id


def _final_location(out: Path) -> Path:
    """Where ``out`` will be once written: its parent resolved, its own name kept (atomic_dir replaces it)."""
    return out.parent.resolve() / out.name


DVC_CACHE = Path(".dvc/cache")  # in the project folder: DVC's symlink and hardlink cache types link files there


def refuse_link_outside(path: Path, folder: Path, what: str) -> None:
    """The one symbolic-link policy for every file read as data: ``path`` (listed under ``folder``) may be or pass
    through a link only if where it ends up lies inside ``folder`` itself or in the project's DVC cache (DVC's
    symlink cache type links every tracked file there). A link elsewhere (``zzz.png -> /etc/shadow``) would make
    segflow read a file DVC does not track, or one the data's author should not get to read."""
    target, inside = path.resolve(), [Path(folder).resolve(), DVC_CACHE.resolve()]
    if not any(target.is_relative_to(root) for root in inside):
        raise SegflowError(
            f"{path}: a symbolic link (itself or a folder on its way) to {target}, outside the {what} folder "
            f"{folder} and the project's DVC cache. Data is read only from inside its folder: copy the file in, "
            "or point the data settings at the folder that holds it.")


def _list_images(folder: Path, what: str, skipped: Iterable[Path] = ()) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), leaving out hidden entries and ``skipped`` folders; a
    link out of ``folder`` is refused (:func:`refuse_link_outside`)."""
    if not folder.is_dir():
        raise SegflowError(f"{folder}: {what} folder not found (or not a folder).")
    skipped = [path.resolve() for path in skipped]
    resolved_folder = folder.resolve()
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() not in IMAGE_EXTENSIONS or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and not any((resolved_folder / relative).is_relative_to(skip) for skip in skipped):
            refuse_link_outside(path, folder, what)
            found.append(path)
    return sorted(found)


def _unlabeled_files(folder: Path | None, ids: _ImageIds) -> list[tuple[str, Path]]:
    if folder is None:
        return []
    return [(ids.assign(path), path) for path in _list_images(Path(folder), "unlabeled images")]


def _unlabeled_row(item: tuple[str, Path]) -> _ManifestRow:
    image_id, path = item
    width, height = image_size(path)
    return _ManifestRow(image_id, path, width, height, labeled=False)


def _files_warning(files: Sequence[Any], problem: str) -> str:
    """``"3 <problem>: a, b, c"``, naming at most MAX_NAMED_FILES of them."""
    named = ", ".join(str(name) for name in files[:MAX_NAMED_FILES])
    more = f" and {len(files) - MAX_NAMED_FILES} more" if len(files) > MAX_NAMED_FILES else ""
    return f"{len(files)} {problem} and are left out: {named}{more}."


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


def _is_byte_text(text: str) -> bool:
    text = text.strip()
    return text.isascii() and text.isdigit() and int(text) <= 255


# ----------------------------------------------------------------------------------------------------------
# COCO: the annotations file, parsed once into typed models (they say what segflow needs of it)
# ----------------------------------------------------------------------------------------------------------

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


class _CocoImage(_Model):
    id: int
    file_name: _Text  # relative to the images folder
    width: PositiveInt
    height: PositiveInt


class _CocoCategory(_Model):
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


class _CocoAnnotation(_Model):
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


class _CocoFile(_Model):
    """What segflow reads of a COCO instances file; ``_cross_reference_problems`` checks ids and references."""

    images: list[_CocoImage]
    annotations: list[_CocoAnnotation]
    # Categories in ascending id become class indices 1..254 (0 is background and 255 ignore in 8-bit masks).
    categories: Annotated[list[_CocoCategory], Field(min_length=1, max_length=MAX_CLASSES - 1)]


@dataclass(frozen=True)
class _CocoItem:
    image_id: str
    path: Path
    entry: _CocoImage


def _load_coco(path: Path) -> _CocoFile:
    """Parse the annotations file, or raise one SegflowError naming its first few problems and their count."""
    doc = _read_json(path)
    try:
        coco = _CocoFile.model_validate(doc)
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


def _cross_reference_problems(coco: _CocoFile) -> Iterator[tuple[str, int, str]]:
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
# COCO: matching images on disk and rasterizing
# ----------------------------------------------------------------------------------------------------------


def _match_coco_images(
    coco: _CocoFile, images: Path, annotations: Path, skipped: tuple[Path, ...]
) -> tuple[list[tuple[Path, _CocoImage]], list[str]]:
    """Listed images found on disk, and warnings about listed-but-missing and on-disk-but-unlisted ones."""
    _refuse_files_outside(coco, images, annotations)
    on_disk = {Path(os.path.normpath(path)) for path in _list_images(images, "images", skipped)}
    listed = {Path(os.path.normpath(images / entry.file_name)): entry for entry in coco.images}
    present = [(path, entry) for path, entry in listed.items() if path.is_file()]
    missing = [entry.file_name for path, entry in listed.items() if not path.is_file()]
    unlisted = sorted(os.path.relpath(path, images) for path in on_disk - listed.keys())
    warnings = []
    if missing:
        problem = f"image(s) listed in {annotations} are missing under {images}"
        warnings.append(_files_warning(missing, problem))
    if unlisted:
        problem = f"image(s) under {images} are not listed in {annotations}"
        warnings.append(_files_warning(unlisted, problem))
    return present, warnings


def _refuse_files_outside(coco: _CocoFile, images: Path, annotations: Path) -> None:
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


def _write_coco_mask(
    item: _CocoItem, painted: dict[int, list[tuple[int, _CocoAnnotation]]], annotations_file: Path, masks_dir: Path
) -> _ManifestRow:
    entry = item.entry
    width, height = image_size(item.path)
    if (width, height) != (entry.width, entry.height):
        raise SegflowError(
            f"{annotations_file}: image id {entry.id} is {entry.width}x{entry.height} (width x height) there, "
            f"but {item.path} is {width}x{height} on disk."
        )
    mask = _rasterize(painted.get(entry.id, []), entry)
    write_mask(masks_dir / f"{item.image_id}.png", mask)
    return _ManifestRow(item.image_id, item.path, width, height, labeled=True)


def _rasterize(painted: list[tuple[int, _CocoAnnotation]], image: _CocoImage) -> np.ndarray:
    """Paint annotations largest area first so small objects on top of large ones stay visible."""
    canvas = np.zeros((image.height, image.width), dtype=np.uint8)
    rles = [(index, annotation.id, _annotation_rle(annotation.segmentation, image)) for index, annotation in painted]
    # Areas come from the RLEs, so sorting needs no decoded masks; each is decoded only while painted.
    for index, _, rle in sorted(rles, key=lambda item: (int(mask_utils.area(item[2])), -item[1]), reverse=True):
        canvas[mask_utils.decode(rle).astype(bool)] = index
    return canvas


def _annotation_rle(segmentation: list[list[float]] | _Rle, image: _CocoImage) -> dict:
    """The RLE that ``COCO.annToRLE`` builds, so masks match ``COCO.annToMask`` pixel for pixel."""
    if isinstance(segmentation, _Rle):  # a compressed string was decoded to these runs when parsed
        rle = {"size": segmentation.size, "counts": segmentation.counts}
        return mask_utils.frPyObjects(rle, image.height, image.width)
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, image.height, image.width))


# ----------------------------------------------------------------------------------------------------------
# Mask folders
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MaskPair:
    image_id: str
    image: Path
    mask: Path
    split: str


def _check_class_names(names: Sequence[str], source: str = "classes") -> None:
    if not names or not all(isinstance(name, str) and name.strip() for name in names):
        raise SegflowError(f"{source}: give a non-empty list of non-empty class names, got {shown(list(names))}.")
    if len(names) > MAX_CLASSES:
        raise SegflowError(f"{source}: {len(names)} classes do not fit 8-bit masks (at most {MAX_CLASSES}).")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SegflowError(f"{source}: class names must be unique; repeated: {', '.join(map(repr, duplicates))}.")


def _value_lookup(value_map: dict[int, int] | None, ignore_value: int | None) -> np.ndarray:
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


def _pair_source(source: MaskSource, ids: _ImageIds) -> tuple[list[_MaskPair], list[str]]:
    """Images and masks of one source paired by stem, and warnings about those left without a partner."""
    images = _by_stem(_list_images(Path(source.images), "images"))
    masks = _by_stem(_list_images(Path(source.masks), "masks"))
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
        warnings.append(_files_warning([images[stem].name for stem in without_mask], problem))
    if without_image:
        problem = f"mask(s) in {source.masks} have no image in {source.images}"
        warnings.append(_files_warning([masks[stem].name for stem in without_image], problem))
    pairs = [
        _MaskPair(ids.assign(images[stem]), images[stem], masks[stem], source.split or "")
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


def _convert_mask(
    pair: _MaskPair, lookup: np.ndarray, num_classes: int | None, masks_dir: Path
) -> tuple[_ManifestRow, int]:
    """Map one mask's values, check it, write it; returns its manifest row and its highest class index (-1: none)."""
    width, height = image_size(pair.image)
    raw = read_mask(pair.mask)
    if raw.shape != (height, width):
        raise SegflowError(
            f"{pair.mask} is {raw.shape[1]}x{raw.shape[0]} (width x height) but its image {pair.image} "
            f"is {width}x{height}; a mask must have its image's size."
        )
    raw_values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    class_values = lookup[raw_values]
    labels = class_values[class_values != IGNORE_INDEX]
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        _raise_unknown_values(pair.mask, raw_values, class_values, num_classes)
    write_mask(masks_dir / f"{pair.image_id}.png", lookup[raw])
    highest = int(labels.max()) if labels.size else -1
    return _ManifestRow(pair.image_id, pair.image, width, height, labeled=True, split=pair.split), highest


def _raise_background_only(sources: Sequence[MaskSource]) -> None:
    """Masks holding only 0 and 255 are binary masks nearly always: read as segflow's index masks (255 =
    ignore) their foreground would be ignored and one class left to learn."""
    folders = ", ".join(str(source.masks) for source in sources)
    raise SegflowError(
        f"{folders}: every mask holds class 0 only, apart from the value {IGNORE_INDEX} (ignore): nothing to "
        f"learn. Binary masks (0 = background, {IGNORE_INDEX} = object) need their values mapped: "
        f"--value-map 0:0,{IGNORE_INDEX}:1 --classes background,object (params: data.masks.value_map "
        f"{{0: 0, {IGNORE_INDEX}: 1}} and data.masks.classes [background, object])."
    )


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


def _default_class_names(highest: int) -> list[str]:
    if highest < 0:
        raise SegflowError("Every mask is entirely ignore (255); there are no classes to name. Pass the class names.")
    return [f"class_{index}" for index in range(highest + 1)]

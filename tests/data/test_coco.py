"""Tests for reading a COCO annotations file: every problem is one SegflowError naming where it is, what is wrong
and the value found, and unused keys are ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from coco_testing import SQUARE, annotation, coco_doc, delete_in, good_doc, image_entry, set_in, write_json
from segflow.data.coco import load_coco
from segflow.errors import SegflowError

COMPRESSED_8X9 = mask_utils.encode(np.asfortranarray(np.eye(8, 9, dtype=np.uint8)))["counts"].decode()


def refusal(path: Path, expected: list[str]) -> str:
    """The message of the SegflowError reading ``path`` raises; it names the file and each of ``expected``."""
    with pytest.raises(SegflowError) as caught:
        load_coco(path)
    message = str(caught.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert str(path) in message
    return message


BAD_DOCS = {
    "missing images": (lambda d: delete_in(d, ("images",)), ["missing top-level key", "'images'"]),
    "missing annotations": (lambda d: delete_in(d, ("annotations",)), ["missing top-level key", "'annotations'"]),
    "missing categories": (lambda d: delete_in(d, ("categories",)), ["missing top-level key", "'categories'"]),
    "not an object": (lambda d: [d], ["must be a JSON object"]),
    "images not a list": (lambda d: set_in(d, ("images",), {}), ["'images' must be a list"]),
    "image not an object": (lambda d: set_in(d, ("images", 1), "b.png"), ["images[1]", "JSON object"]),
    "image without id": (lambda d: delete_in(d, ("images", 1, "id")), ["images[1]", "has no 'id'"]),
    "image without file_name": (lambda d: delete_in(d, ("images", 1, "file_name")), ["image id 2", "'file_name'"]),
    "image without width": (lambda d: delete_in(d, ("images", 0, "width")), ["image id 1", "has no 'width'"]),
    "image without height": (lambda d: delete_in(d, ("images", 0, "height")), ["image id 1", "has no 'height'"]),
    "width as text": (lambda d: set_in(d, ("images", 0, "width"), "10"), ["image id 1", "'width'", "integer"]),
    "category id as text": (lambda d: set_in(d, ("categories", 0, "id"), "1"), ["categories[0]", "'id'"]),
    "duplicate image id": (lambda d: set_in(d, ("images", 1, "id"), 1), ["image id 1 is used twice"]),
    "duplicate file_name": (lambda d: set_in(d, ("images", 1, "file_name"), "a.png"), ["'a.png' is listed twice"]),
    "duplicate annotation id": (lambda d: set_in(d, ("annotations", 1, "id"), 1), ["annotation id 1 is used twice"]),
    "duplicate category id": (lambda d: set_in(d, ("categories", 1, "id"), 1), ["category id 1 is defined twice"]),
    "category named background": (
        lambda d: set_in(d, ("categories", 1, "name"), "background"),
        ["category id 2", "'background'"],
    ),
    "two-point polygon": (
        lambda d: set_in(d, ("annotations", 1, "segmentation"), [SQUARE, [1, 1, 5, 5]]),
        ["annotation id 2", "'b.png'", "polygon 1 has 2 point(s)"],
    ),
    "odd polygon": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), [[1, 1, 5, 1, 5, 5, 1]]),
        ["annotation id 1", "'a.png'", "odd number"],
    ),
    "empty segmentation": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), []),
        ["annotation id 1", "empty list"],
    ),
    "segmentation as text": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), "square"),
        ["annotation id 1", "'segmentation' must be"],
    ),
    "no segmentation": (lambda d: delete_in(d, ("annotations", 0, "segmentation")), ["annotation id 1", "no 'seg"]),
    "unknown image id": (
        lambda d: set_in(d, ("annotations", 1, "image_id"), 99),
        ["annotation id 2", "image id 99", "not in 'images'"],
    ),
    "unknown category id": (
        lambda d: set_in(d, ("annotations", 1, "category_id"), 99),
        ["annotation id 2", "'b.png'", "category id 99", "not in 'categories'"],
    ),
    "rle of another size": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), {"size": [8, 9], "counts": [72]}),
        ["annotation id 1", "RLE size [8, 9]", "[8, 10]"],
    ),
    "corrupt compressed rle": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), {"size": [8, 10], "counts": "zzzz"}),
        ["annotation id 1", "'a.png'", "valid compressed string"],
    ),
    "rle counts short of the image": (  # pycocotools would leave the rest of the mask uninitialised
        lambda d: set_in(d, ("annotations", 0, "segmentation"), {"size": [8, 10], "counts": [5, 2]}),
        ["annotation id 1", "'a.png'", "cover 7 pixels", "8x10 = 80"],
    ),
    "compressed rle of another image size": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), {"size": [8, 10], "counts": COMPRESSED_8X9}),
        ["annotation id 1", "cover 72 pixels"],
    ),
    # Each problem names where it is (entry, what the file calls it, field path) and the value found there.
    "id as true": (lambda d: set_in(d, ("images", 0, "id"), True), ["images[0]: 'id' must be an integer, found True"]),
    "width as float": (
        lambda d: set_in(d, ("images", 0, "width"), 10.0),
        ["images[0] (image id 1): 'width' must be an integer, found 10.0"],
    ),
    "zero height": (lambda d: set_in(d, ("images", 1, "height"), 0), ["image id 2", "'height' must be greater than 0"]),
    "blank file_name": (
        lambda d: set_in(d, ("images", 1, "file_name"), " "),
        ["images[1] (image id 2): 'file_name' must not be blank, found ' '"],
    ),
    "blank category name": (
        lambda d: set_in(d, ("categories", 0, "name"), ""),
        ["categories[0] (category id 1): 'name' must not be blank, found ''"],
    ),
    "duplicate category name": (
        lambda d: set_in(d, ("categories", 1, "name"), "box"),
        ["categories[1] (category id 2): 'name' 'box' is used twice (also by categories[0])"],
    ),
    "no categories": (lambda d: set_in(d, ("categories",), []), ["'categories' must not be an empty list"]),
    "more categories than 8-bit masks hold": (
        lambda d: set_in(d, ("categories",), [{"id": i, "name": f"c{i}"} for i in range(1, 256)]),
        ["'categories' must have at most 254 item(s)"],
    ),
    "nan coordinate": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), [[2, 2, 6, float("nan"), 6, 5]]),
        ["annotations[0] (annotation id 1, image 'a.png'): 'segmentation[0][3]' must be a finite number, found nan"],
    ),
    "coordinate as text": (
        lambda d: set_in(d, ("annotations", 1, "segmentation"), [SQUARE, [2, "2", 6, 2, 6, 5]]),
        ["annotations[1] (annotation id 2, image 'b.png'): 'segmentation[1][1]' must be", "number", "found '2'"],
    ),
    "polygon not in a list of polygons": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), SQUARE),
        ["annotation id 1", "'segmentation' must be a list of polygons", "found [2, 2, 6, 2, 6, 5, ...]"],
    ),
    "rle size of one number": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), {"size": [80], "counts": [80]}),
        ["annotation id 1", "'segmentation.size' must have at least 2 item(s), found [80]"],
    ),
    "negative rle count": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), {"size": [8, 10], "counts": [90, -10]}),
        ["annotation id 1", "'segmentation.counts[1]' must be greater than or equal to 0, found -10"],
    ),
    "rle without counts": (
        lambda d: set_in(d, ("annotations", 0, "segmentation"), {"size": [8, 10]}),
        ["annotations[0] (annotation id 1, image 'a.png'): 'segmentation' has no 'counts'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCS))
def test_bad_annotations_are_refused_naming_the_problem(tmp_path, case):
    mutate, expected = BAD_DOCS[case]
    refusal(write_json(tmp_path / "ann.json", mutate(good_doc())), expected)


def test_every_problem_is_found_and_the_first_few_are_named_with_a_count(tmp_path):
    ann_path = tmp_path / "ann.json"
    doc = good_doc()
    doc["images"][0]["width"] = "10"
    doc["annotations"] += [annotation(10 + i, 1, 1, "square") for i in range(11)]  # annotations[2..12]
    doc["categories"][1]["id"] = "2"
    message = refusal(write_json(ann_path, doc), [])
    assert message.startswith(f"{ann_path}: 13 problem(s) with this COCO annotations file: ")  # all, not the first
    assert "images[0] (image id 1): 'width' must be an integer, found '10'; annotations[2] (annotation id 10" in message
    assert "annotations[5] (annotation id 13, image 'a.png'): 'segmentation' must be" in message
    assert "annotations[6]" not in message and "categories[1]" not in message
    assert message.endswith("; and 8 more.")
    assert "\n" not in message

    doc = good_doc()  # well formed, but its references are wrong: summarised the same way
    doc["annotations"] = [annotation(i, 100 + i, 1, [SQUARE]) for i in range(7)]
    message = refusal(write_json(ann_path, doc), [])
    assert message.startswith(f"{ann_path}: 7 problem(s) with this COCO annotations file: ")
    assert "annotations[4] (annotation id 4): 'image_id' refers to image id 104, not in 'images'" in message
    assert "annotations[5]" not in message and message.endswith("; and 2 more.")


def test_a_huge_wrong_value_is_quoted_briefly(tmp_path):
    doc = set_in(good_doc(), ("annotations", 0, "segmentation"), list(range(200_000)))
    expected = ["'segmentation' must be a list of polygons", "found [0, 1, 2, 3, 4, 5, ...]"]
    assert len(refusal(write_json(tmp_path / "ann.json", doc), expected)) < 400


def test_keys_segflow_does_not_use_are_ignored(tmp_path):
    """A COCO file as tools export it: info, licenses, bbox, area, supercategory, ... are not segflow's concern."""
    doc = coco_doc([image_entry(1, "a.png")], [annotation(1, 1, 1, [SQUARE], iscrowd=0)], [(1, "box")])
    doc.update(info={"year": 2024, "version": "1"}, licenses=[{"id": 1, "name": "CC-BY"}])
    doc["images"][0].update(license=1, coco_url="http://x/a.png", date_captured="2024-01-01")
    doc["annotations"][0].update(bbox=[2, 2, 4, 3], area=12.0, attributes={"occluded": False})
    doc["categories"][0]["supercategory"] = "thing"
    coco = load_coco(write_json(tmp_path / "ann.json", doc))
    assert [(image.id, image.file_name, image.width, image.height) for image in coco.images] == [(1, "a.png", 10, 8)]
    assert [(category.id, category.name) for category in coco.categories] == [(1, "box")]
    assert [annotation.segmentation for annotation in coco.annotations] == [[SQUARE]]


def test_annotations_that_are_not_json_report_line_and_column(tmp_path):
    ann_path = tmp_path / "ann.json"
    ann_path.write_text('{\n  "images": [,\n')
    refusal(ann_path, ["not valid JSON", "line 2, column 14"])


def test_missing_annotations_file_is_named(tmp_path):
    refusal(tmp_path / "nope.json", ["annotations file not found"])

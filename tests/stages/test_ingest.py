"""Tests for the ingest stage: exact masks from COCO and mask folders, warnings, errors and atomic output."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from coco_testing import SQUARE, annotation, coco_doc, delete_in, good_doc, image_entry, set_in, write_json
from segflow.config import DataParams
from segflow.data.imageio import read_image
from segflow.data.mask_folders import MaskSource, parse_value_map
from segflow.errors import SegflowError
from segflow.stages.ingest import ingest_coco, ingest_from_params, ingest_masks

MANIFEST_COLUMNS = ["image_id", "image_path", "mask_path", "width", "height", "split"]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def save_image(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height)).save(path)
    return path


def save_mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)
    return path


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MANIFEST_COLUMNS
        return list(reader)


def read_classes(out: Path) -> dict:
    return json.loads((out / "classes.json").read_text())


def out_mask(out: Path, image_id: str) -> np.ndarray:
    with Image.open(out / "masks" / f"{image_id}.png") as img:
        assert img.mode == "L"
        return np.asarray(img)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def ingest_single_image(tmp_path: Path, annotations: list[dict], categories, width=10, height=8) -> np.ndarray:
    save_image(tmp_path / "images" / "a.png", width, height)
    doc = coco_doc([image_entry(1, "a.png", width, height)], annotations, categories)
    ingest_coco(tmp_path / "images", write_json(tmp_path / "ann.json", doc), tmp_path / "out")
    return out_mask(tmp_path / "out", "a")


# ----------------------------------------------------------------------------------------------------------
# COCO: exact masks
# ----------------------------------------------------------------------------------------------------------


def test_polygon_square_gives_exact_mask(tmp_path):
    mask = ingest_single_image(tmp_path, [annotation(1, 1, 1, [SQUARE])], [(1, "box")])
    expected = np.zeros((8, 10), np.uint8)
    expected[2:5, 2:6] = 1
    np.testing.assert_array_equal(mask, expected)


def test_compressed_rle_is_decoded_exactly(tmp_path):
    shape = np.zeros((8, 10), np.uint8)
    shape[1:7, 2] = 1
    shape[6, 2:9] = 1  # an L
    rle = mask_utils.encode(np.asfortranarray(shape))
    segmentation = {"size": [8, 10], "counts": rle["counts"].decode("ascii")}
    mask = ingest_single_image(tmp_path, [annotation(1, 1, 4, segmentation)], [(2, "road"), (4, "car")])
    np.testing.assert_array_equal(mask, shape * 2)


def test_uncompressed_crowd_rle_is_painted_with_its_category(tmp_path):
    # Column-major runs over a 5x4 image: 5 off, 2 on, 2 off, 2 on, 9 off -> rows 1..2 of columns 1..2.
    segmentation = {"size": [4, 5], "counts": [5, 2, 2, 2, 9]}
    crowd = annotation(1, 1, 3, segmentation, iscrowd=1)
    mask = ingest_single_image(tmp_path, [crowd], [(3, "people")], width=5, height=4)
    expected = np.zeros((4, 5), np.uint8)
    expected[1:3, 1:3] = 1
    np.testing.assert_array_equal(mask, expected)


def test_overlaps_paint_smaller_objects_on_top(tmp_path):
    small = annotation(1, 1, 2, [[4, 3, 6, 3, 6, 5, 4, 5]])  # listed first
    large = annotation(2, 1, 1, [[0, 0, 10, 0, 10, 8, 0, 8]])
    mask = ingest_single_image(tmp_path, [small, large], [(1, "wall"), (2, "window")])
    expected = np.ones((8, 10), np.uint8)
    expected[3:5, 4:6] = 2
    np.testing.assert_array_equal(mask, expected)


def test_equal_areas_paint_higher_annotation_id_on_top(tmp_path):
    later = annotation(9, 1, 2, [[0, 0, 6, 0, 6, 4, 0, 4]])
    earlier = annotation(3, 1, 1, [[2, 0, 8, 0, 8, 4, 2, 4]])
    mask = ingest_single_image(tmp_path, [later, earlier], [(1, "a"), (2, "b")])
    expected = np.zeros((8, 10), np.uint8)
    expected[0:4, 2:8] = 1
    expected[0:4, 0:6] = 2
    np.testing.assert_array_equal(mask, expected)


def test_category_ids_become_contiguous_in_ascending_order(tmp_path):
    categories = [(7, "car"), (0, "sky"), (3, "road")]
    annotations = [
        annotation(1, 1, 7, [[0, 0, 2, 0, 2, 2, 0, 2]]),
        annotation(2, 1, 0, [[4, 0, 6, 0, 6, 2, 4, 2]]),
        annotation(3, 1, 3, [[0, 4, 2, 4, 2, 6, 0, 6]]),
    ]
    mask = ingest_single_image(tmp_path, annotations, categories)
    expected = np.zeros((8, 10), np.uint8)
    expected[0:2, 0:2] = 3  # id 7
    expected[0:2, 4:6] = 1  # id 0
    expected[4:6, 0:2] = 2  # id 3
    np.testing.assert_array_equal(mask, expected)
    assert read_classes(tmp_path / "out") == {
        "names": ["background", "sky", "road", "car"],
        "coco_category_ids": [None, 0, 3, 7],
        "ignore_index": 255,
        "source": "coco",
    }


def test_rasterization_matches_pycocotools_ann_to_mask(tmp_path):
    width, height = 40, 30
    blob = np.zeros((height, width), np.uint8)
    blob[5:20, 10:35] = 1
    blob[8:12, 12:30] = 0  # a hole
    segmentations = [
        ([[3.2, 2.7, 30.5, 4.1, 18.0, 12.9, 35.7, 27.3, 2.1, 25.0]], 0),  # non-convex, fractional coordinates
        ([[1, 1, 9, 1, 5, 9], [20, 20, 38, 21, 30, 29]], 0),  # two parts
        ({"size": [height, width], "counts": mask_utils.encode(np.asfortranarray(blob))["counts"].decode()}, 0),
        ({"size": [height, width], "counts": [100, 40, 30, 50, 400, 25, 555]}, 1),  # uncompressed crowd
        ([[25, 0, 39.9, 0, 39.9, 29.9]], 0),
    ]
    categories = [(0, "a"), (5, "b"), (9, "c")]
    images = [image_entry(i, f"single{i}.png", width, height) for i in range(len(segmentations))]
    images.append(image_entry(100, "combined.png", width, height))
    annotations = []
    for i, (segmentation, crowd) in enumerate(segmentations):
        category_id = categories[i % 3][0]
        annotations.append(annotation(i + 1, i, category_id, segmentation, crowd))
        annotations.append(annotation(i + 101, 100, category_id, segmentation, crowd))
    for entry in images:
        save_image(tmp_path / "images" / entry["file_name"], width, height)
    ann_path = write_json(tmp_path / "ann.json", coco_doc(images, annotations, categories))
    ingest_coco(tmp_path / "images", ann_path, tmp_path / "out")

    coco = COCO(str(ann_path))
    class_index = {0: 1, 5: 2, 9: 3}
    for i in range(len(segmentations)):
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[i]))
        expected = coco.annToMask(ann) * class_index[ann["category_id"]]
        assert expected.any()
        np.testing.assert_array_equal(out_mask(tmp_path / "out", f"single{i}"), expected)
    combined = coco.loadAnns(coco.getAnnIds(imgIds=[100]))
    expected = np.zeros((height, width), np.uint8)
    for ann in sorted(combined, key=lambda a: (-int(coco.annToMask(a).sum()), a["id"])):
        expected[coco.annToMask(ann) == 1] = class_index[ann["category_id"]]
    np.testing.assert_array_equal(out_mask(tmp_path / "out", "combined"), expected)


def test_image_without_annotations_is_all_background(tmp_path):
    mask = ingest_single_image(tmp_path, [], [(1, "thing")])
    np.testing.assert_array_equal(mask, np.zeros((8, 10), np.uint8))


# ----------------------------------------------------------------------------------------------------------
# COCO: manifest, images on disk, warnings
# ----------------------------------------------------------------------------------------------------------


def test_manifest_points_at_images_relative_to_final_out(tmp_path):
    image = save_image(tmp_path / "data" / "images" / "sub" / "a.png", 10, 8)
    doc = coco_doc([image_entry(1, "sub/a.png")], [annotation(1, 1, 1, [SQUARE])], [(1, "box")])
    out = tmp_path / "work" / "ingested"
    report = ingest_coco(tmp_path / "data" / "images", write_json(tmp_path / "ann.json", doc), out)

    (row,) = read_manifest(out)
    assert row == {
        "image_id": "a",
        "image_path": os.path.join("..", "..", "data", "images", "sub", "a.png"),
        "mask_path": "masks/a.png",
        "width": "10",
        "height": "8",
        "split": "",
    }
    assert (out / row["image_path"]).resolve() == image.resolve()
    assert sorted(p.name for p in out.iterdir()) == [".segflow-output", "classes.json", "manifest.csv", "masks"]
    assert (report.labeled, report.unlabeled, report.warnings) == (1, 0, [])
    assert report.classes == ["background", "box"]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA"])
def test_grayscale_palette_and_rgba_images_are_accepted(tmp_path, mode):
    save_image(tmp_path / "images" / "a.png", 10, 8, mode=mode)
    doc = coco_doc([image_entry(1, "a.png")], [annotation(1, 1, 1, [SQUARE])], [(1, "box")])
    ingest_coco(tmp_path / "images", write_json(tmp_path / "ann.json", doc), tmp_path / "out")
    assert read_manifest(tmp_path / "out")[0]["width"] == "10"
    assert out_mask(tmp_path / "out", "a").sum() == 12


@pytest.fixture
def coco_with_strays(tmp_path):
    """a.png listed and present, gone.png listed but missing, extra.jpg present but not listed."""
    save_image(tmp_path / "images" / "a.png", 10, 8)
    save_image(tmp_path / "images" / "deeper" / "extra.jpg", 10, 8)
    images = [image_entry(1, "a.png"), image_entry(2, "gone.png")]
    doc = coco_doc(images, [annotation(1, 1, 1, [SQUARE]), annotation(2, 2, 1, [SQUARE])], [(1, "box")])
    return tmp_path / "images", write_json(tmp_path / "ann.json", doc), tmp_path / "out"


def test_missing_and_unlisted_images_are_warned_about_and_left_out(coco_with_strays, caplog):
    images, ann_path, out = coco_with_strays
    with caplog.at_level(logging.WARNING, logger="segflow.stages.ingest"):
        report = ingest_coco(images, ann_path, out)
    assert [row["image_id"] for row in read_manifest(out)] == ["a"]
    assert not (out / "masks" / "gone.png").exists()
    assert len(report.warnings) == 2
    assert "gone.png" in report.warnings[0] and str(ann_path) in report.warnings[0]
    assert os.path.join("deeper", "extra.jpg") in report.warnings[1]
    assert [record.getMessage() for record in caplog.records] == report.warnings


def test_strict_turns_missing_and_unlisted_images_into_an_error(coco_with_strays):
    images, ann_path, out = coco_with_strays
    with pytest.raises(SegflowError, match="Strict") as caught:
        ingest_coco(images, ann_path, out, strict=True)
    assert "gone.png" in str(caught.value) and "extra.jpg" in str(caught.value)
    assert not out.exists()


def test_unlabeled_images_are_listed_without_masks(tmp_path):
    save_image(tmp_path / "images" / "a.png", 10, 8)
    save_image(tmp_path / "images" / "pool" / "u1.jpg", 12, 6)  # inside images/, but it is the unlabeled folder
    save_image(tmp_path / "pool2" / "u2.png", 4, 4, mode="L")
    doc = coco_doc([image_entry(1, "a.png")], [], [(1, "box")])
    ann_path = write_json(tmp_path / "ann.json", doc)
    report = ingest_coco(tmp_path / "images", ann_path, tmp_path / "out", unlabeled=tmp_path / "images" / "pool")
    rows = read_manifest(tmp_path / "out")
    assert [(r["image_id"], r["mask_path"], r["width"], r["height"]) for r in rows] == [
        ("a", "masks/a.png", "10", "8"),
        ("u1", "", "12", "6"),
    ]
    assert (report.labeled, report.unlabeled, report.warnings) == (1, 1, [])
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png"]


def test_unlabeled_image_colliding_with_a_labeled_one_is_an_error(tmp_path):
    labeled = save_image(tmp_path / "images" / "a.png", 10, 8)
    unlabeled = save_image(tmp_path / "pool" / "a.jpg", 10, 8)
    ann_path = write_json(tmp_path / "ann.json", coco_doc([image_entry(1, "a.png")], [], [(1, "box")]))
    with pytest.raises(SegflowError) as caught:
        ingest_coco(tmp_path / "images", ann_path, tmp_path / "out", unlabeled=tmp_path / "pool")
    assert str(labeled) in str(caught.value) and str(unlabeled) in str(caught.value)


def test_image_ids_are_made_filesystem_safe(tmp_path):
    save_image(tmp_path / "images" / "my photo (1).png", 10, 8)
    save_image(tmp_path / "images" / ".hidden-ok.png", 10, 8)  # listed explicitly, so it is used
    images = [image_entry(1, "my photo (1).png"), image_entry(2, ".hidden-ok.png")]
    ann_path = write_json(tmp_path / "ann.json", coco_doc(images, [], [(1, "box")]))
    ingest_coco(tmp_path / "images", ann_path, tmp_path / "out")
    ids = [row["image_id"] for row in read_manifest(tmp_path / "out")]
    assert ids == ["my_photo__1_", "_hidden-ok"]
    assert all((tmp_path / "out" / "masks" / f"{image_id}.png").is_file() for image_id in ids)


# ----------------------------------------------------------------------------------------------------------
# COCO: bad input is a SegflowError naming the problem, and a previous output survives it (each problem of the
# annotations file itself: tests/data/test_coco.py)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def coco_with_previous_output(tmp_path):
    """A good COCO dataset already ingested into out; returns (images, annotations path, out, out snapshot)."""
    for name in ("a.png", "b.png"):
        save_image(tmp_path / "images" / name, 10, 8)
    ann_path = write_json(tmp_path / "ann.json", good_doc())
    out = tmp_path / "out"
    ingest_coco(tmp_path / "images", ann_path, out)
    return tmp_path / "images", ann_path, out, snapshot(out)


def assert_error_keeps_previous_output(call, out: Path, before: dict, expected: list[str]) -> str:
    with pytest.raises(SegflowError) as caught:
        call()
    message = str(caught.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out")) == []  # no temp dirs left
    return message


def test_an_invalid_annotations_file_is_refused_and_the_previous_output_kept(coco_with_previous_output):
    images, ann_path, out, before = coco_with_previous_output
    write_json(ann_path, delete_in(good_doc(), ("images",)))
    expected = [str(ann_path), "missing top-level key", "'images'"]
    assert_error_keeps_previous_output(lambda: ingest_coco(images, ann_path, out), out, before, expected)


def test_an_image_size_differing_from_the_file_is_refused_and_the_previous_output_kept(coco_with_previous_output):
    images, ann_path, out, before = coco_with_previous_output
    write_json(ann_path, set_in(good_doc(), ("images", 1, "height"), 9))
    expected = [str(ann_path), "image id 2", "10x9", "b.png is 10x8"]
    assert_error_keeps_previous_output(lambda: ingest_coco(images, ann_path, out), out, before, expected)


def test_truncated_image_is_named(coco_with_previous_output):
    images, ann_path, out, before = coco_with_previous_output
    broken = images / "b.png"
    broken.write_bytes(broken.read_bytes()[:40])
    expected = [str(broken), "corrupt or truncated"]
    assert_error_keeps_previous_output(lambda: ingest_coco(images, ann_path, out), out, before, expected)


def test_two_images_with_one_image_id_are_both_named(coco_with_previous_output):
    images, ann_path, out, before = coco_with_previous_output
    save_image(images / "sub" / "a.png", 10, 8)
    doc = good_doc()
    doc["images"].append(image_entry(3, "sub/a.png"))
    write_json(ann_path, doc)
    expected = [str(images / "a.png"), str(images / "sub" / "a.png"), "image id 'a'"]
    assert_error_keeps_previous_output(lambda: ingest_coco(images, ann_path, out), out, before, expected)


@pytest.mark.parametrize("way_out", ["dot-dot", "absolute", "linked folder"])
def test_a_file_name_outside_the_images_folder_is_refused(coco_with_previous_output, way_out):
    images, ann_path, out, before = coco_with_previous_output
    outside = save_image(images.parent / "elsewhere" / "b.png", 10, 8)  # a real image, untracked with --images
    (images / "linked").symlink_to(outside.parent, target_is_directory=True)
    file_name = {"dot-dot": "sub/../../elsewhere/b.png", "absolute": str(outside), "linked folder": "linked/b.png"}
    write_json(ann_path, set_in(good_doc(), ("images", 1, "file_name"), file_name[way_out]))
    expected = [str(ann_path), f"image id 2 has file_name {file_name[way_out]!r}", "outside the images folder"]
    assert_error_keeps_previous_output(lambda: ingest_coco(images, ann_path, out), out, before, expected)


@pytest.mark.parametrize("file_name", ["sub/../b.png", "link.png"])
def test_a_dot_dot_that_stays_inside_and_a_file_linked_into_dvc_cache_are_fine(coco_with_previous_output, file_name,
                                                                                monkeypatch):
    images, ann_path, out, _ = coco_with_previous_output
    monkeypatch.chdir(images.parent)  # the project folder
    # As DVC's symlink cache type lays out a tracked folder: the file is a link into the cache.
    cached = images.parent / ".dvc/cache/files/md5/ab/cdef"  # no extension: DVC names cache files by hash
    cached.parent.mkdir(parents=True)
    save_image(images.parent / "b-copy.png", 10, 8).rename(cached)
    (images / "link.png").symlink_to(cached)
    write_json(ann_path, set_in(good_doc(), ("images", 1, "file_name"), file_name))
    assert ingest_coco(images, ann_path, out).labeled == 2


@pytest.mark.parametrize("listed_as", ["coco image", "mask folder image", "unlabeled image"])
def test_a_file_linked_outside_its_folder_and_the_dvc_cache_is_refused(coco_with_previous_output, monkeypatch,
                                                                       listed_as):
    images, ann_path, out, before = coco_with_previous_output
    monkeypatch.chdir(images.parent)
    secret = images.parent / "secret" / "shadow"  # a readable file nobody meant as data (/etc/shadow, a key)
    secret.parent.mkdir()
    save_image(images.parent / "shadow.png", 10, 8).rename(secret)
    if listed_as == "coco image":
        (images / "link.png").symlink_to(secret)
        write_json(ann_path, set_in(good_doc(), ("images", 1, "file_name"), "link.png"))
        call = lambda: ingest_coco(images, ann_path, out)  # noqa: E731
    elif listed_as == "mask folder image":
        source = MaskSource(images.parent / "frames", images.parent / "frame_masks", "train")
        save_image(source.images / "a.png", 8, 6)
        save_mask(source.masks / "a.png", pattern())
        (source.images / "zzz.png").symlink_to(secret)
        save_mask(source.masks / "zzz.png", pattern())
        call = lambda: ingest_masks([source], out)  # noqa: E731
    else:
        (images.parent / "pool").mkdir()
        (images.parent / "pool" / "zzz.png").symlink_to(secret)
        call = lambda: ingest_coco(images, ann_path, out, unlabeled=images.parent / "pool")  # noqa: E731
    expected = ["zzz.png" if listed_as != "coco image" else "link.png", f"a symbolic link (itself or a folder on its "
                f"way) to {secret}", "outside the"]
    assert_error_keeps_previous_output(call, out, before, expected)


def test_an_exif_rotated_photo_is_rasterized_on_the_picture_as_displayed(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # as the camera stored it: 40 wide, 20 high
    stored[:10, :10] = 255  # shown turned a quarter clockwise: the top-right 10x10 block of a 20x40 picture
    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "images" / "photo.jpg", exif=exif, quality=95)
    block = [10, 0, 20, 0, 20, 10, 10, 10]  # drawn by the labeling tool on the displayed picture
    doc = coco_doc([image_entry(1, "photo.jpg", width=20, height=40)], [annotation(1, 1, 1, [block])], [(1, "x")])

    ingest_coco(tmp_path / "images", write_json(tmp_path / "ann.json", doc), tmp_path / "out")

    shown = read_image(tmp_path / "images" / "photo.jpg")
    np.testing.assert_array_equal(out_mask(tmp_path / "out", "photo"), (shown[..., 0] > 127).astype(np.uint8))
    assert read_manifest(tmp_path / "out")[0]["width"] == "20"


# ----------------------------------------------------------------------------------------------------------
# Mask folders
# ----------------------------------------------------------------------------------------------------------


def pattern(height: int = 6, width: int = 8, values=(0, 1, 2)) -> np.ndarray:
    """A deterministic mask cycling through ``values`` row by row."""
    return np.array(values, np.uint8)[np.arange(height * width).reshape(height, width) // width % len(values)]


def test_masks_pair_with_images_by_stem_and_strays_are_warned_about(tmp_path, caplog):
    for name in ("a.jpg", "b.png", "c.png"):
        save_image(tmp_path / "img" / name, 8, 6)
    for name in ("a.png", "b.png", "d.png"):
        save_mask(tmp_path / "ann" / name, pattern())
    with caplog.at_level(logging.WARNING, logger="segflow.stages.ingest"):
        report = ingest_masks([MaskSource(tmp_path / "img", tmp_path / "ann")], tmp_path / "out")
    rows = read_manifest(tmp_path / "out")
    assert [(r["image_id"], Path(r["image_path"]).name, r["mask_path"], r["split"]) for r in rows] == [
        ("a", "a.jpg", "masks/a.png", ""),
        ("b", "b.png", "masks/b.png", ""),
    ]
    assert len(report.warnings) == 2
    assert "c.png" in report.warnings[0] and "no mask" in report.warnings[0]
    assert "d.png" in report.warnings[1] and "no image" in report.warnings[1]
    assert [record.getMessage() for record in caplog.records] == report.warnings
    np.testing.assert_array_equal(out_mask(tmp_path / "out", "a"), pattern())

    with pytest.raises(SegflowError, match="c.png.*d.png"):
        ingest_masks([MaskSource(tmp_path / "img", tmp_path / "ann")], tmp_path / "out2", strict=True)


def test_binary_masks_without_a_value_map_are_refused_with_the_fix(tmp_path):
    save_image(tmp_path / "img" / "a.png", 8, 6)
    save_mask(tmp_path / "ann" / "a.png", pattern(values=(0, 255)))
    # Read as index masks, 255 is ignore: the foreground would vanish and validate would see one class.
    with pytest.raises(SegflowError, match=r"every mask holds class 0 only.* --value-map 0:0,255:1 --classes"):
        ingest_masks([MaskSource(tmp_path / "img", tmp_path / "ann")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_value_map_turns_binary_masks_into_class_indices(tmp_path):
    save_image(tmp_path / "img" / "a.png", 8, 6)
    raw = pattern(values=(0, 255))
    save_mask(tmp_path / "ann" / "a.png", raw)
    report = ingest_masks(
        [MaskSource(tmp_path / "img", tmp_path / "ann")], tmp_path / "out", value_map=parse_value_map("0:0,255:1")
    )
    np.testing.assert_array_equal(out_mask(tmp_path / "out", "a"), (raw == 255).astype(np.uint8))
    assert report.classes == ["class_0", "class_1"]
    assert read_classes(tmp_path / "out") == {
        "names": ["class_0", "class_1"],
        "coco_category_ids": None,
        "ignore_index": 255,
        "source": "masks",
    }


def test_ignore_value_becomes_255_after_value_map(tmp_path):
    save_image(tmp_path / "img" / "a.png", 8, 6)
    save_mask(tmp_path / "ann" / "a.png", pattern(values=(0, 1, 2)))
    ingest_masks(
        [MaskSource(tmp_path / "img", tmp_path / "ann")],
        tmp_path / "out",
        classes=["x", "y", "z"],
        value_map={0: 2, 2: 0},
        ignore_value=2,  # applied after the map: raw 0 (mapped to 2) is ignored, raw 2 (mapped to 0) is kept
    )
    np.testing.assert_array_equal(out_mask(tmp_path / "out", "a"), pattern(values=(255, 1, 0)))


def test_camvid_style_void_becomes_ignore(tmp_path):
    save_image(tmp_path / "img" / "a.png", 8, 6)
    save_mask(tmp_path / "ann" / "a.png", pattern(values=(0, 10, 11)))
    ingest_masks(
        [MaskSource(tmp_path / "img", tmp_path / "ann")], tmp_path / "out", classes=list("abcdefghijk"), ignore_value=11
    )
    np.testing.assert_array_equal(out_mask(tmp_path / "out", "a"), pattern(values=(0, 10, 255)))


@pytest.fixture
def masks_with_previous_output(tmp_path):
    """A good mask dataset already ingested into out; returns (source, out, out snapshot)."""
    source = MaskSource(tmp_path / "img", tmp_path / "ann")
    save_image(source.images / "a.png", 8, 6)
    save_mask(source.masks / "a.png", pattern())
    ingest_masks([source], tmp_path / "out", classes=["x", "y", "z"])
    return source, tmp_path / "out", snapshot(tmp_path / "out")


def test_value_outside_classes_is_an_error_naming_file_and_values(masks_with_previous_output):
    source, out, before = masks_with_previous_output
    bad = save_mask(source.masks / "a.png", pattern(values=(0, 3, 7, 255)))
    expected = [str(bad), "value(s) 3, 7 ", "allowed values are 0..2"]
    call = lambda: ingest_masks([source], out, classes=["x", "y", "z"])  # noqa: E731
    assert_error_keeps_previous_output(call, out, before, expected)


def test_mask_of_another_size_is_an_error_naming_both_files(masks_with_previous_output):
    source, out, before = masks_with_previous_output
    bad = save_mask(source.masks / "a.png", pattern(height=5))
    expected = [str(bad), str(source.images / "a.png"), "8x5", "8x6"]
    assert_error_keeps_previous_output(lambda: ingest_masks([source], out), out, before, expected)


def test_rgb_mask_is_an_error(masks_with_previous_output):
    source, out, before = masks_with_previous_output
    bad = save_image(source.masks / "a.png", 8, 6, mode="RGB")
    assert_error_keeps_previous_output(lambda: ingest_masks([source], out), out, before, [str(bad), "mode RGB"])


def test_jpeg_masks_are_refused(masks_with_previous_output):
    source, out, before = masks_with_previous_output
    (source.masks / "a.png").unlink()
    bad = save_image(source.masks / "a.jpg", 8, 6, mode="L")
    assert_error_keeps_previous_output(lambda: ingest_masks([source], out), out, before, [str(bad), "lossless"])


def test_predefined_splits_are_recorded_and_default_names_span_all_masks(tmp_path):
    sources = []
    for split, (stem, values) in {"train": ("t1", (0, 1)), "val": ("v1", (0, 4, 255))}.items():
        source = MaskSource(tmp_path / split, tmp_path / f"{split}annot", split)
        save_image(source.images / f"{stem}.png", 8, 6)
        save_mask(source.masks / f"{stem}.png", pattern(values=values))
        sources.append(source)
    save_image(tmp_path / "unlabeled" / "u.png", 3, 3)
    report = ingest_masks(sources, tmp_path / "out", unlabeled=tmp_path / "unlabeled")
    rows = read_manifest(tmp_path / "out")
    assert [(r["image_id"], r["mask_path"], r["split"]) for r in rows] == [
        ("t1", "masks/t1.png", "train"),
        ("v1", "masks/v1.png", "val"),
        ("u", "", ""),
    ]
    assert report.classes == ["class_0", "class_1", "class_2", "class_3", "class_4"]
    assert (report.labeled, report.unlabeled) == (2, 1)


def test_same_stem_in_two_sources_is_an_error_naming_both(tmp_path):
    sources = [MaskSource(tmp_path / s, tmp_path / f"{s}annot", s) for s in ("train", "val")]
    for source in sources:
        save_image(source.images / "x.png", 8, 6)
        save_mask(source.masks / "x.png", pattern())
    with pytest.raises(SegflowError) as caught:
        ingest_masks(sources, tmp_path / "out")
    assert str(tmp_path / "train" / "x.png") in str(caught.value)
    assert str(tmp_path / "val" / "x.png") in str(caught.value)


def test_missing_source_folder_is_named(tmp_path):
    with pytest.raises(SegflowError, match="nowhere"):
        ingest_masks([MaskSource(tmp_path / "nowhere", tmp_path / "ann")], tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# ingest_from_params (the DVC stage)
# ----------------------------------------------------------------------------------------------------------


def test_params_choose_masks_ingest_with_paths_under_root(tmp_path):
    save_image(tmp_path / "raw" / "train" / "a.png", 8, 6)
    save_mask(tmp_path / "raw" / "trainannot" / "a.png", pattern(values=(0, 255, 9)))
    data = DataParams.model_validate(
        {
            "format": "masks",
            "root": str(tmp_path / "raw"),
            "masks": {
                "folders": [{"images": "train", "masks": "trainannot", "split": "train"}],
                "classes": ["road", "car"],
                "value_map": {255: 1},
                "ignore_value": 9,
            },
            "unlabeled": None,
        }
    )
    report = ingest_from_params(data, tmp_path / "out")
    assert (report.labeled, report.classes) == (1, ["road", "car"])
    assert read_manifest(tmp_path / "out")[0]["split"] == "train"
    np.testing.assert_array_equal(out_mask(tmp_path / "out", "a"), pattern(values=(0, 1, 255)))


def test_params_choose_coco_ingest_with_paths_under_root(tmp_path):
    save_image(tmp_path / "raw" / "images" / "a.png", 10, 8)
    save_image(tmp_path / "raw" / "unlabeled" / "u.png", 10, 8)
    doc = coco_doc([image_entry(1, "a.png")], [annotation(1, 1, 4, [SQUARE])], [(4, "box")])
    write_json(tmp_path / "raw" / "annotations.json", doc)
    report = ingest_from_params(DataParams(format="coco", root=tmp_path / "raw"), tmp_path / "out")
    assert (report.labeled, report.unlabeled, report.classes) == (1, 1, ["background", "box"])


# --- outputs never swallow inputs -------------------------------------------------------------------------


@pytest.fixture
def coco_project(tmp_path):
    """P/images (two images) and P/annotations.json, as a team's project folder holds them."""
    project = tmp_path / "P"
    for name in ("a.png", "b.png"):
        save_image(project / "images" / name, 10, 8)
    write_json(project / "annotations.json", good_doc())
    return project


@pytest.mark.parametrize("out, relation", [("images", "is the input"), (".", "contains the input"),
                                           ("images/ingested", "lies inside the input")])
def test_an_output_overlapping_the_inputs_is_refused_and_nothing_is_lost(coco_project, out, relation):
    before = snapshot(coco_project)
    with pytest.raises(SegflowError, match=f"output folder .* {relation}"):
        ingest_coco(coco_project / "images", coco_project / "annotations.json", coco_project / out)
    assert snapshot(coco_project) == before


def test_masks_output_inside_a_masks_folder_is_refused(tmp_path):
    save_image(tmp_path / "img" / "a.png", 4, 4)
    (tmp_path / "ann").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ann" / "a.png")
    with pytest.raises(SegflowError, match="lies inside the input"):
        ingest_masks([MaskSource(tmp_path / "img", tmp_path / "ann")], tmp_path / "ann" / "out")


def test_a_folder_segflow_did_not_write_is_never_replaced_but_its_own_output_is(coco_project, tmp_path):
    mine = tmp_path / "work"
    (mine / ".git").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SegflowError, match=r"was not written by segflow \(it holds no .segflow-output"):
        ingest_coco(coco_project / "images", coco_project / "annotations.json", mine)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / ".git").is_dir()

    out = tmp_path / "out"
    out.mkdir()  # new and empty: fine
    for _ in range(2):  # and its own output is replaced on the next run
        ingest_coco(coco_project / "images", coco_project / "annotations.json", out)
    assert (out / ".segflow-output").is_file() and (out / "manifest.csv").is_file()


@pytest.mark.parametrize("root, message", [
    ("/", "holds the project folder"),
    (".", "holds the project folder"),
    ("..", "holds the project folder"),
    (".git", "inside a .git folder"),
    (".git/objects", "inside a .git folder"),
])
def test_data_root_that_dvc_cannot_track_as_data_is_refused_before_anything_is_written(tmp_path, monkeypatch, root,
                                                                                       message):
    project = tmp_path / "project"
    (project / ".git" / "objects").mkdir(parents=True)
    monkeypatch.chdir(project)
    with pytest.raises(SegflowError, match=message) as caught:
        ingest_from_params(DataParams(format="coco", root=Path(root)), project / "data/ingested")
    assert f"data.root {root}" in str(caught.value)
    assert not (project / "data").exists()

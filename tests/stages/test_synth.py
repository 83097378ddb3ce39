"""Tests for the embedded synthetic dataset generator."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from segflow import cli
from segflow.config import SynthParams
from segflow.data.imageio import read_image
from segflow.errors import SegflowError
from segflow.stages import synth

SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synth.generate(out, seed=3, num_labeled=30, num_unlabeled=5, image_size=SIZE)
    return out, summary


def _rasterise(coco: COCO, image_id: int, height: int, width: int) -> np.ndarray:
    """Category-id map from the annotations, painting the largest area first (a common ingest policy)."""
    label_map = np.zeros((height, width), dtype=np.uint8)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    for annotation in sorted(annotations, key=lambda a: -a["area"]):
        label_map[coco.annToMask(annotation) > 0] = annotation["category_id"]
    return label_map


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"num_labeled": 4, "num_unlabeled": 2, "image_size": 48}
    first = tmp_path / "a"
    synth.generate(first, seed=11, **kwargs)
    synth.generate(tmp_path / "b", seed=11, **kwargs)
    synth.generate(tmp_path / "c", seed=12, **kwargs)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 1 + 4 + 2 + 1  # annotations, images, unlabeled images, the output marker
    for relative in files:
        assert (first / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative

    other = tmp_path / "c"
    assert (first / "annotations.json").read_bytes() != (other / "annotations.json").read_bytes()
    assert (first / "images/labeled_000000.png").read_bytes() != (other / "images/labeled_000000.png").read_bytes()
    assert (first / "unlabeled/unlabeled_000000.png").read_bytes() != (other / "unlabeled/unlabeled_000000.png").read_bytes()


def test_labeled_images_do_not_depend_on_unlabeled_count(tmp_path: Path) -> None:
    synth.generate(tmp_path / "few", seed=5, num_labeled=2, num_unlabeled=0, image_size=48)
    synth.generate(tmp_path / "many", seed=5, num_labeled=2, num_unlabeled=3, image_size=48)
    for name in ("annotations.json", "images/labeled_000001.png"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()
    # Unlabeled images come from their own stream, not copies of the labeled ones.
    assert not np.array_equal(
        read_image(tmp_path / "many/unlabeled/unlabeled_000000.png"), read_image(tmp_path / "many/images/labeled_000000.png")
    )


def test_coco_json_loads_and_every_annotation_is_a_nonempty_visible_mask(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    coco = COCO(str(out / "annotations.json"))
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    assert [c["id"] for c in categories] == [1, 2, 3, 5, 8]
    assert tuple(c["name"] for c in categories) == synth.CLASS_NAMES
    assert all(c["supercategory"] for c in categories)

    annotation_ids = coco.getAnnIds()
    assert len(annotation_ids) >= 30
    assert len(set(annotation_ids)) == len(annotation_ids)
    for annotation in coco.loadAnns(annotation_ids):
        image = coco.imgs[annotation["image_id"]]
        assert (image["width"], image["height"]) == (SIZE, SIZE)
        assert annotation["iscrowd"] == 0
        polygons = annotation["segmentation"]
        assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
        mask = coco.annToMask(annotation)
        assert mask.shape == (SIZE, SIZE)
        assert mask.sum() == annotation["area"] > 0
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x, y, w, h = annotation["bbox"]
        assert (x, y, w, h) == (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)


def test_counts_match_arguments_and_every_class_appears(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["images"]) == 30
    file_names = sorted(image["file_name"] for image in coco["images"])
    assert sorted(p.name for p in (out / "images").iterdir()) == file_names
    assert len(list((out / "unlabeled").glob("*.png"))) == 5
    assert read_image(out / "unlabeled/unlabeled_000004.png").shape == (SIZE, SIZE, 3)

    assert summary["num_labeled"] == 30 and summary["num_unlabeled"] == 5
    assert summary["num_annotations"] == len(coco["annotations"])
    assert summary["class_names"] == list(synth.CLASS_NAMES)
    per_class = {name: 0 for name in synth.CLASS_NAMES}
    images_with = {name: set() for name in synth.CLASS_NAMES}
    name_of = {c["id"]: c["name"] for c in coco["categories"]}
    for annotation in coco["annotations"]:
        per_class[name_of[annotation["category_id"]]] += 1
        images_with[name_of[annotation["category_id"]]].add(annotation["image_id"])
    assert summary["instances_per_class"] == per_class
    # Every class in a fair share of images, yet the classes are imbalanced.
    assert min(len(ids) for ids in images_with.values()) >= 5
    assert max(per_class.values()) >= 2 * min(per_class.values())


def test_polygons_reproduce_the_visible_label_map(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    coco = COCO(str(out / "annotations.json"))
    agreements, foreground = [], []
    for image in coco.dataset["images"]:
        scene = synth.render_scene(3, synth.LABELED_STREAM, image["id"] - 1, SIZE)
        assert np.array_equal(read_image(out / "images" / image["file_name"]), scene.image)
        expected = scene.label_map()
        rasterised = _rasterise(coco, image["id"], image["height"], image["width"])
        agreements.append(float((rasterised == expected).mean()))
        foreground.append(float((expected > 0).mean()))
    assert min(agreements) > 0.97
    assert np.mean(agreements) > 0.995
    assert np.mean(foreground) > 0.05  # the agreement is not just empty maps matching


def test_occluded_objects_are_labeled_by_their_visible_region() -> None:
    # Some instance must be cut into several pieces or lose pixels to a neighbour on top; both show up as
    # two instances sharing a border in the instance map.
    shared_borders = 0
    for index in range(20):
        instances = synth.render_scene(0, synth.LABELED_STREAM, index, SIZE).instance_map
        right = (instances[:, 1:] != instances[:, :-1]) & (instances[:, 1:] > 0) & (instances[:, :-1] > 0)
        down = (instances[1:, :] != instances[:-1, :]) & (instances[1:, :] > 0) & (instances[:-1, :] > 0)
        shared_borders += int(right.any() or down.any())
    assert shared_borders >= 3


def _has_hole(mask: np.ndarray) -> bool:
    doubled = np.pad(mask.astype(np.uint8).repeat(2, axis=0).repeat(2, axis=1), 2)
    _, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return bool((hierarchy[0][:, 3] >= 0).any())


def test_no_visible_region_has_a_hole() -> None:
    # COCO polygons cannot express holes; occasional placements (a ball inside a tree) would create one.
    instances_seen = 0
    for index in range(200):
        instances = synth.render_scene(0, synth.LABELED_STREAM, index, SIZE).instance_map
        for k in range(1, instances.max() + 1):
            instances_seen += 1
            assert not _has_hole(instances == k), (index, k)
    assert instances_seen > 500


def test_visible_polygons_trace_pixels_exactly() -> None:
    mask = np.zeros((20, 24), dtype=bool)
    mask[2:15, 3] = True  # one pixel wide pole
    mask[5:9, 10:20] = True
    mask[np.arange(9, 13), np.arange(20, 24)] = True  # diagonal staircase touching the box corner only
    mask[19, 23] = True  # single pixel in the image corner
    polygons = synth.visible_polygons(mask)
    assert len(polygons) == 3
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, *mask.shape))
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_colour_alone_does_not_identify_the_class() -> None:
    pixels, labels = [], []
    for index in range(40):
        scene = synth.render_scene(1, synth.LABELED_STREAM, index, SIZE)
        label_map = scene.label_map()
        pixels.append(scene.image[label_map > 0].astype(np.float64))
        labels.append(label_map[label_map > 0])
    colours, classes = np.concatenate(pixels), np.concatenate(labels)
    present = np.unique(classes)
    assert present.tolist() == [1, 2, 3, 5, 8]
    means = np.stack([colours[classes == c].mean(axis=0) for c in present])
    nearest = present[np.argmin(((colours[:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)]
    assert (nearest == classes).mean() < 0.75


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_labeled": 0}, "num_labeled"),
        ({"num_labeled": -3}, "num_labeled"),
        ({"num_unlabeled": -1}, "num_unlabeled"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"num_labeled": True}, "num_labeled"),
    ],
)
def test_bad_arguments_raise_a_user_error_naming_the_argument(
    tmp_path: Path, kwargs: dict, argument: str
) -> None:
    out = tmp_path / "data"
    with pytest.raises(SegflowError, match=argument) as excinfo:
        synth.generate(out, **{"num_labeled": 2, "num_unlabeled": 0, "image_size": 32, **kwargs})
    assert "\n" not in str(excinfo.value)
    assert not out.exists()


def test_synth_never_replaces_a_folder_it_did_not_write(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "README.md").write_text("my project")
    with pytest.raises(SegflowError, match="was not written by segflow"):
        synth.generate(project, num_labeled=1, num_unlabeled=0, image_size=32)
    assert (project / "README.md").read_text() == "my project" and (project / ".git").is_dir()
    synth.generate(tmp_path / "data", num_labeled=1, num_unlabeled=0, image_size=32)
    synth.generate(tmp_path / "data", num_labeled=2, num_unlabeled=0, image_size=32)  # its own: replaced
    assert len(list((tmp_path / "data/images").iterdir())) == 2


def test_the_generator_the_command_and_params_yaml_share_one_set_of_defaults():
    schema = SynthParams()
    generator = inspect.signature(synth.generate).parameters
    command = inspect.signature(cli.synth).parameters
    assert [generator[k].default for k in ("seed", "num_labeled", "num_unlabeled", "image_size")] == \
        [command[k].default for k in ("seed", "labeled", "unlabeled", "size")] == \
        [schema.seed, schema.num_labeled, schema.num_unlabeled, schema.image_size]


def test_the_stage_writes_no_image_when_the_data_root_is_elsewhere(tmp_path):
    result = CliRunner().invoke(cli.app, ["synth", str(tmp_path / "synthetic"), "--labeled", "2", "--unlabeled", "0",
                                          "--size", "32", "--for-data-root", str(tmp_path / "own-data")])
    assert result.exit_code == 0, result.output
    assert "left empty" in result.output and not any(p.is_file() and not p.name.startswith(".")
                                                     for p in (tmp_path / "synthetic").rglob("*"))
    result = CliRunner().invoke(cli.app, ["synth", str(tmp_path / "synthetic"), "--labeled", "2", "--unlabeled", "0",
                                          "--size", "32", "--for-data-root", str(tmp_path / "synthetic")])
    assert result.exit_code == 0 and len(list((tmp_path / "synthetic/images").glob("*.png"))) == 2

"""Near-copies: export names, perceptual hashes, and a labeling tool's export of the default data split with
every picture's copies in one split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from segflow.config import parse_params
from segflow.data.imageio import read_image
from segflow.data.near_copies import export_name_key, picture_groups, picture_hash
from segflow.stages.ingest import ingest_coco
from segflow.stages.split import make_splits
from segflow.stages.synth import generate
from segflow.stages.validate import validate

DEFAULTS = parse_params({})


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """The embedded default data at its default size: 40 labeled scenes."""
    root = tmp_path_factory.mktemp("scenes")
    generate(root, seed=0, num_labeled=40, num_unlabeled=0)
    return root


def exported_copy(image: np.ndarray, copy: int) -> Image.Image:
    """One of a labeling tool's augmented exports: brightness and contrast, blur or noise, the second copy
    mirrored (a tool's flip), saved as JPEG by the caller."""
    rng = np.random.default_rng(copy)
    picture = Image.fromarray(image)
    if copy == 1:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    picture = ImageEnhance.Brightness(picture).enhance(rng.uniform(0.85, 1.15))
    picture = ImageEnhance.Contrast(picture).enhance(rng.uniform(0.85, 1.15))
    if copy == 2:
        picture = picture.filter(ImageFilter.GaussianBlur(0.8))
    noisy = np.asarray(picture).astype(np.int16) + rng.normal(0, 4, size=image.shape).round().astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def export(scenes: Path, out: Path) -> Path:
    """The scenes as a Roboflow COCO export: three copies of each photo, NAME_png.rf.HASH.jpg, annotations
    mirrored with the copy that is."""
    coco = json.loads((scenes / "annotations.json").read_text())
    (out / "images").mkdir(parents=True)
    images, annotations = [], []
    for entry in coco["images"]:
        image = read_image(scenes / "images" / entry["file_name"])
        for copy in range(3):
            digest = hashlib.md5(f"{entry['id']}-{copy}".encode()).hexdigest()
            name = f"{Path(entry['file_name']).stem}_png.rf.{digest}.jpg"
            exported_copy(image, copy).save(out / "images" / name, quality=90)
            image_id = len(images) + 1
            images.append({**entry, "id": image_id, "file_name": name})
            for annotation in (a for a in coco["annotations"] if a["image_id"] == entry["id"]):
                polygons = annotation["segmentation"]
                if copy == 1:  # x -> width - x
                    polygons = [[entry["width"] - v if i % 2 == 0 else v for i, v in enumerate(p)] for p in polygons]
                annotations.append({**annotation, "id": len(annotations) + 1, "image_id": image_id,
                                    "segmentation": polygons, "bbox": []})
    (out / "annotations.json").write_text(json.dumps({**coco, "images": images, "annotations": annotations}))
    return out


def test_a_labeling_tools_export_names_its_upload():
    assert export_name_key("street_12_jpg.rf.3f2a9c0d1e.jpg") == "street_12_jpg"
    assert export_name_key("images/IMG 4.PNG.rf.00ff.PNG") is None  # the upload's dot is replaced in its exports
    assert export_name_key("IMG_4_PNG.rf.00ff.jpg") == "IMG_4_PNG"
    assert export_name_key("street_12.jpg") is None


def test_links_and_near_hashes_group_transitively_and_none_links_nothing():
    plain, mirrored = "0" * 32, "f" * 16 + "0" * 16  # the second is a flipped copy of the first
    groups = picture_groups([["a", "a", None, None, None], [None, "k", "k", None, None]],
                            [None, None, None, plain, mirrored], max_distance=3)
    assert groups == [0, 0, 0, 1, 1]
    three_bits = "0" * 15 + "7" + "f" * 16  # 3 bits from `plain`, its mirror far
    assert picture_groups([], [plain, three_bits], max_distance=3) == [0, 0]
    assert picture_groups([], [plain, three_bits], max_distance=2) == [0, 1]
    assert picture_groups([], [plain, plain], max_distance=None) == [0, 1]


def test_copies_are_grouped_by_their_pixels_alone_and_different_scenes_never(scenes):
    paths = sorted((scenes / "images").glob("*.png"))
    hashes, scene = [], []
    for number, path in enumerate(paths):
        image = read_image(path)
        for copy in range(3):
            exported_copy(image, copy).save(jpeg := scenes / "copy.jpg", quality=90)
            hashes.append(picture_hash(read_image(jpeg)))
            scene.append(number)
    groups = np.array(picture_groups([], hashes, DEFAULTS.split.near_copy_distance))
    scene = np.array(scene)
    whole = np.mean([len(set(groups[scene == number])) == 1 for number in range(len(paths))])
    assert whole >= 0.95, f"{whole:.0%} of the scenes' copies grouped together"
    assert all(len(set(scene[groups == group])) == 1 for group in set(groups)), "two scenes merged"


def test_an_exports_copies_land_in_one_split_under_the_default_params(scenes, tmp_path):
    exported = export(scenes, tmp_path / "export")
    data = tmp_path / "ingested"
    ingest_coco(exported / "images", exported / "annotations.json", data)
    result = validate(DEFAULTS.validate_, DEFAULTS.split, data_dir=data, out_dir=tmp_path / "validation")
    assert result.summary["counts"]["distinct_labeled_pictures"] == 40 < result.summary["counts"]["labeled"]
    cfg = DEFAULTS.split
    splits = make_splits(data, tmp_path / "validation/stats.csv", tmp_path / "splits.csv", seed=cfg.seed,
                         val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                         near_copy_distance=cfg.near_copy_distance)
    stems = {}
    for image_id, split in zip(splits["image_id"], splits["split"]):
        stems.setdefault(image_id.split("_png.rf.")[0], set()).add(split)
    assert len(stems) == 40 and all(len(found) == 1 for found in stems.values())

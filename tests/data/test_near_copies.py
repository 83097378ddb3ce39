"""Near-copies: export names, registration of the pixels, and a labeling tool's export of the default data split
with every picture's copies in one split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from segflow.config import parse_params
from segflow.data.imageio import read_image
from segflow.data.near_copies import export_name_key, near_copy_groups, picture_groups, similarity, thumbnail
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


def exported_copy(image: np.ndarray, copy: int, seed: int = 0) -> Image.Image:
    """One of a labeling tool's augmented exports (Roboflow's list): a crop of up to 10% resized back, a rotation
    of up to 5 degrees, brightness and contrast, blur or noise, the second copy mirrored (a tool's flip); saved as
    JPEG by the caller."""
    rng = np.random.default_rng([seed, copy])
    picture = Image.fromarray(image)
    if copy == 1:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    width, height = picture.size
    kept = 1 - rng.uniform(0, 0.1)
    left, top = rng.uniform(0, width * (1 - kept)), rng.uniform(0, height * (1 - kept))
    picture = picture.resize((width, height), Image.Resampling.BILINEAR,
                             box=(left, top, left + width * kept, top + height * kept))
    picture = picture.rotate(rng.uniform(-5, 5), Image.Resampling.BILINEAR)
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


def test_links_and_pairs_group_transitively_and_none_links_nothing():
    groups = picture_groups([["a", "a", None, None, None, None], [None, "k", "k", None, None, None]], 6,
                            pairs=[(3, 4)])
    assert groups == [0, 0, 0, 1, 1, 2]
    assert picture_groups([], 3, pairs=[(0, 2), (2, 1)]) == [0, 0, 0]
    assert picture_groups([[None, None]], 2) == [0, 1]


def test_registration_undoes_a_crop_and_a_rotation_and_tells_scenes_apart(scenes):
    first, second = (read_image(scenes / "images" / name) for name in sorted(p.name for p in (scenes / "images").iterdir())[:2])
    copy = np.asarray(exported_copy(first, 0))
    assert similarity(thumbnail(copy), thumbnail(first)) >= DEFAULTS.split.near_copy_similarity
    assert similarity(thumbnail(second), thumbnail(first)) < 0.9
    uniform = np.full_like(first, 128)  # nothing to register: no link, not an error
    assert near_copy_groups([thumbnail(first), thumbnail(uniform), None, thumbnail(copy)], 0.97) == [0, 1, 2, 0]
    assert near_copy_groups([thumbnail(first), thumbnail(copy)], None) == [0, 1]


def test_copies_are_grouped_by_their_pixels_alone_and_different_scenes_never(scenes):
    paths = sorted((scenes / "images").glob("*.png"))
    thumbnails, scene = [], []
    for number, path in enumerate(paths):
        image = read_image(path)
        for copy in range(3):
            exported_copy(image, copy, seed=1).save(jpeg := scenes / "copy.jpg", quality=90)
            thumbnails.append(thumbnail(read_image(jpeg)))
            scene.append(number)
    groups = np.array(near_copy_groups(thumbnails, DEFAULTS.split.near_copy_similarity))
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
                         val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    stems = {}
    for image_id, split in zip(splits["image_id"], splits["split"]):
        stems.setdefault(image_id.split("_png.rf.")[0], set()).add(split)
    assert len(stems) == 40 and all(len(found) == 1 for found in stems.values())

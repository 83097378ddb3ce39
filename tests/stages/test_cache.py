import json

import numpy as np
import pytest
import torch

from segflow.config import Layout, parse_params
from segflow.data import datasets
from segflow.data.datasets import Sample, SegmentationDataset
from segflow.data.decoded_cache import INDEX_FILE, open_cache
from segflow.data.imageio import read_image, read_mask, write_image, write_mask
from segflow.errors import SegflowError
from segflow.stages.cache import build_cache
from train_testing import PLAIN_UNET, SIZE, make_project, train_from_params, weights

# (image id, height, width, labeled): sizes differ, and an unlabeled image sits between labeled ones.
IMAGES = [("a", 20, 30, True), ("b", 17, 11, False), ("c", 32, 32, True), ("d", 9, 40, True)]


@pytest.fixture
def ingested(tmp_path):
    """An ingested folder by hand: photos-like images elsewhere, masks inside, the manifest pointing at both."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "ingested"
    (data_dir / "masks").mkdir(parents=True)
    (tmp_path / "photos").mkdir()
    rows = ["image_id,image_path,mask_path,width,height,split"]
    for image_id, height, width, labeled in IMAGES:
        write_image(tmp_path / "photos" / f"{image_id}.png", rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        mask_path = ""
        if labeled:
            write_mask(data_dir / "masks" / f"{image_id}.png", rng.integers(0, 5, (height, width), dtype=np.uint8))
            mask_path = f"masks/{image_id}.png"
        rows.append(f"{image_id},../photos/{image_id}.png,{mask_path},{width},{height},")
    (data_dir / "manifest.csv").write_text("\n".join(rows) + "\n")
    return data_dir


def test_the_cache_returns_exactly_the_decoded_arrays(ingested, tmp_path):
    summary = build_cache(ingested, tmp_path / "cache", shard_bytes=3000)  # a few images per shard
    assert (summary.images, summary.masks) == (4, 3) and summary.shards > 1
    cache = open_cache(tmp_path / "cache", ingested)
    for image_id, _, _, labeled in IMAGES:
        image = cache.image(image_id)
        np.testing.assert_array_equal(image, read_image(ingested.parent / "photos" / f"{image_id}.png"))
        assert image.dtype == np.uint8 and image.flags.writeable
        if labeled:
            np.testing.assert_array_equal(cache.mask(image_id), read_mask(ingested / "masks" / f"{image_id}.png"))
    with pytest.raises(SegflowError, match="'b' has no mask"):
        cache.mask("b")


def test_a_dataset_reading_the_cache_gives_the_same_samples(ingested, tmp_path):
    build_cache(ingested, tmp_path / "cache")
    photos = ingested.parent / "photos"
    pseudo_mask = tmp_path / "pseudo_b.png"  # pseudo masks are written after the cache: read from their file
    write_mask(pseudo_mask, np.full((17, 11), 3, np.uint8))
    samples = [Sample("a", photos / "a.png", ingested / "masks/a.png"), Sample("b", photos / "b.png", pseudo_mask, pseudo=True),
               Sample("d", photos / "d.png", None)]
    train = parse_params({}).train
    decoding, cached = (SegmentationDataset(samples, crop_size=16, augment=train.augment, strong_augment=train.pseudo_augment,
                                            cache=cache) for cache in (None, open_cache(tmp_path / "cache", ingested)))
    for index in range(len(samples)):
        torch.manual_seed(index)
        expected = decoding[index]
        torch.manual_seed(index)
        for name, value in cached[index].items():
            assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("damage, message", [
    (lambda cache, data: (cache / "shard-001.npy").unlink(), "shard-001.npy: shard of the decoded-image cache is missing"),
    (lambda cache, data: np.save(cache / "shard-000.npy", np.zeros(5, np.uint8)), r"says uint8 \(\d+,\)"),
    (lambda cache, data: (cache / "shard-000.npy").write_bytes(b"not numpy"), "not a readable .npy shard"),
    (lambda cache, data: _edit_index(cache, images=5), "lists 4 entries for 5 images"),
    (lambda cache, data: _edit_index(cache, entries=lambda e: e[:3]), "lists 3 entries for 4 images"),
    (lambda cache, data: (cache / INDEX_FILE).unlink(), "no decoded-image cache here"),
    (lambda cache, data: (data / "manifest.csv").write_text((data / "manifest.csv").read_text().replace("\nb,", "\nbb,")),
     "stale"),
])
def test_a_damaged_or_stale_cache_is_refused_naming_the_problem(ingested, tmp_path, damage, message):
    build_cache(ingested, tmp_path / "cache", shard_bytes=3000)
    damage(tmp_path / "cache", ingested)
    with pytest.raises(SegflowError, match=message) as error:
        open_cache(tmp_path / "cache", ingested)
    assert "segflow cache" in str(error.value)


def _edit_index(cache_dir, images=None, entries=None):
    index = json.loads((cache_dir / INDEX_FILE).read_text())
    index["images"] = images or index["images"]
    index["entries"] = entries(index["entries"]) if entries else index["entries"]
    (cache_dir / INDEX_FILE).write_text(json.dumps(index))


def test_an_image_whose_size_disagrees_with_the_manifest_stops_the_build(ingested, tmp_path):
    manifest = ingested / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("masks/c.png,32,32", "masks/c.png,32,31"))
    with pytest.raises(SegflowError, match=r"c.png: decodes to 32x32 but .*manifest.csv says 32x31"):
        build_cache(ingested, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_training_from_the_cache_gives_the_same_weights(tmp_path, monkeypatch):
    project = make_project(tmp_path / "project", train=4)
    build_cache(project / Layout.ingested, project / "cache")
    for name, cached in [("decoded", False), ("cached", True)]:
        if cached:  # so the run can only read the cache (the files stay: the cache is checked against them)
            for reader in ("read_image", "read_mask"):
                monkeypatch.setattr(datasets, reader, lambda path: pytest.fail(f"decoded {path}"))
        params = parse_params({
            "train": {"epochs": 1, "batch_size": 2, "crop_size": SIZE, "device": "cpu", "use_pseudo_labels": False,
                      "decoded_cache": cached},
            "models": {"unet_original": PLAIN_UNET},
        })
        train_from_params(params, "unet_original", data_dir=project / Layout.ingested, splits_csv=project / Layout.splits,
              out_dir=tmp_path / name, cache_dir=project / "cache")
    decoded, cached = weights(tmp_path / "decoded"), weights(tmp_path / "cached")
    assert all(torch.equal(cached[name], value) for name, value in decoded.items())


@pytest.mark.parametrize("edit, changed", [
    (lambda data: write_mask(data / "masks/c.png", np.zeros((32, 32), np.uint8)), "changed masks/c.png"),
    (lambda data: write_image(data.parent / "photos/b.png", np.zeros((17, 11, 3), np.uint8)), "changed ../photos/b.png"),
])
def test_a_cache_of_other_pixels_is_stale_even_with_the_manifest_unchanged(ingested, tmp_path, edit, changed):
    build_cache(ingested, tmp_path / "cache")
    edit(ingested)  # annotations edited and re-ingested: same manifest, other masks
    with pytest.raises(SegflowError, match=f"stale: .* has {changed} since it was built"):
        open_cache(tmp_path / "cache", ingested)


@pytest.mark.parametrize("out", ["ingested", "ingested/cache", "."])
def test_a_cache_folder_that_is_inside_or_holds_the_data_is_refused(ingested, tmp_path, out):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SegflowError, match="segflow cache: the output folder .* the input"):
        build_cache(ingested, tmp_path / out)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
